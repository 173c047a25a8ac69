#!/usr/bin/env python3
"""Ray on Golem: Ray clusters on machines rented from the Golem Network.

One self-contained module (bottle.py style). Importing it touches the standard
library only; PyYAML, golem-core and Ray are imported lazily inside the
functions that need them, so `--help`, `version`, `status` and `reputation
list` start fast from the zipapp on a bare Python.

Sections, in dependency order (each uses only those above it):

    1.  Constants and paths
    2.  Errors
    3.  Config            cluster YAML: defaults, validation, node-type merge
    4.  Store             sqlite3: reputation, blacklist, clusters, ledger
    5.  Yagna             find/start/stop yagna or the local network, app key
    6.  Market            demand, filter chain, scoring, negotiation, Funnel
    7.  Clusters          node state machine, provisioning, payments
    8.  Webserver         asyncio HTTP/1.1, one handler method per route
    9.  Daemon control    start/stop/status of the detached webserver
    10. Ray integration   GolemNodeProvider, GolemCommandRunner
    11. CLI               argparse; `main()`
"""

from __future__ import annotations

import os
import sys

###############################################################################
# 1. Constants and paths ######################################################
###############################################################################

__version__ = "0.1.0"
PACKAGE_NAME = "ray-on-golem"

DEFAULT_WEBSERVER_PORT = 4578
WEBSERVER_HOST = "127.0.0.1"  # never 0.0.0.0: the webserver spends money
DEFAULT_YAGNA_API_URL = "http://127.0.0.1:7465"
DEFAULT_YAGNA_APPNAME = "ray-on-golem"

# Payment networks we accept; dead testnets get a hint instead of a silent failure.
PAYMENT_NETWORKS = ("local", "holesky", "polygon")
DEAD_PAYMENT_NETWORKS = {
    "goerli": "goerli was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "mumbai": "mumbai was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "rinkeby": "rinkeby was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "mainnet": "Ray on Golem pays on Polygon: use `polygon` for mainnet",
}

# Exit codes of the CLI.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def default_datadir() -> str:
    """`$RAY_ON_GOLEM_DATADIR`, else the XDG data dir (`~/.local/share/ray_on_golem`)."""
    env = os.environ.get("RAY_ON_GOLEM_DATADIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "ray_on_golem")


def ensure_datadir(path: str) -> str:
    """Create the data dir (mode 0700: it holds tokens and app keys) and return it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def write_secret_file(path: str, content: str) -> None:
    """Write `content` to `path` with mode 0600 from the first byte (no window of 0644)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


###############################################################################
# 2. Errors ###################################################################
###############################################################################


class RayOnGolemError(Exception):
    """Base of every error we expect: the CLI prints the message, the webserver sends it as JSON."""

    exit_code = EXIT_FAILED
    http_status = 500


class UsageError(RayOnGolemError):
    """Bad argument or bad input: exit 2, HTTP 400."""

    exit_code = EXIT_USAGE
    http_status = 400


class ConfigError(UsageError):
    """A cluster config that cannot be used; the message names the field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class NotFound(RayOnGolemError):
    exit_code = EXIT_FAILED
    http_status = 404


class Unauthorized(RayOnGolemError):
    http_status = 401


class Conflict(RayOnGolemError):
    http_status = 409


class ServiceUnavailable(RayOnGolemError):
    """yagna, the local network or the webserver cannot be reached (exit 1, HTTP 503)."""

    http_status = 503


###############################################################################
# 3. Config ###################################################################
###############################################################################


###############################################################################
# 4. Store ####################################################################
###############################################################################


###############################################################################
# 5. Yagna ####################################################################
###############################################################################

# Payment tokens: mainnets pay in GLM, every test network (and the local one) in tGLM.
MAINNET_PAYMENT_NETWORKS = ("polygon", "mainnet")
YAGNA_READY_TIMEOUT = 120.0  # real yagna offline answers after ~3.7 s (relay timeout): yagna-offline.md §1
YAGNA_STOP_TIMEOUT = 10.0
YAGNA_LOG_MAX_BYTES = 10 * 1024 * 1024
# Chains whose RPC endpoint yagna resolves at run time as `{CHAIN}_GETH_ADDR` (yagna-offline.md §1).
YAGNA_CHAINS = ("MAINNET", "GOERLI", "HOLESKY", "MUMBAI", "POLYGON", "AMOY", "SEPOLIA", "HOODI", "RINKEBY")


def payment_platform(network: str, driver: str = "erc20", token: str | None = None) -> str:
    """yagna's payment platform name, `erc20-<network>-<token>` (e.g. `erc20-holesky-tglm`)."""
    if token is None:
        token = "glm" if network in MAINNET_PAYMENT_NETWORKS else "tglm"
    return f"{driver}-{network}-{token}"


def find_yagna_binary() -> str:
    """`$YAGNA_PATH`, else `yagna` on PATH, else the one golem-node installed next to this Python."""
    explicit = os.environ.get("YAGNA_PATH")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServiceUnavailable(f"YAGNA_PATH={explicit!r} is not an executable file")
        return explicit
    import shutil

    found = shutil.which("yagna")
    if found:
        return found
    beside_python = os.path.join(os.path.dirname(sys.executable), "yagna")
    if os.access(beside_python, os.X_OK):
        return beside_python
    raise ServiceUnavailable(
        "the yagna binary was not found: install it with `pip install golem-node==0.17.6` or set YAGNA_PATH"
    )


def yagna_loopback_env(yagna_datadir: str, port_base: int) -> dict[str, str]:
    """Environment that keeps a real yagna on 127.0.0.1: yagna-offline.md §1, used verbatim.

    Without `YA_NET_RELAY_HOST` yagna asks 8.8.8.8 for relay SRV records and never
    serves REST (§8); the proxies make the GitHub release check fail at once.
    Ports: GSB `port_base`, REST `+1`, net bind (UDP) `+2`, dead relay `+3`, central `+4`.
    """
    dead = "http://127.0.0.1:1"
    env = {
        "YAGNA_DATADIR": yagna_datadir,
        "GSB_URL": f"tcp://127.0.0.1:{port_base}",
        "YAGNA_API_URL": f"http://127.0.0.1:{port_base + 1}",
        "YA_NET_TYPE": "hybrid",
        "YA_NET_BIND_URL": f"udp://127.0.0.1:{port_base + 2}",
        "YA_NET_RELAY_HOST": f"127.0.0.1:{port_base + 3}",
        "CENTRAL_NET_HOST": f"127.0.0.1:{port_base + 4}",
        "YAGNA_METRICS_URL": f"{dead}/",
        "RUST_LOG": "info",
        "RUST_BACKTRACE": "0",  # else every CLI error prints a 45-frame backtrace (§3)
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for chain in YAGNA_CHAINS:
        env[f"{chain}_GETH_ADDR"] = dead
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[proxy] = env[proxy.lower()] = dead
    return env


def proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if it is gone.

    A pid plus its start time names one process for good: the kernel reuses pids,
    never (pid, start time) pairs.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs and, if `start_time` is given, is still the same process."""
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def stop_process(pid: int, start_time: int | None, first_signal: int, timeout: float) -> str:
    """Send `first_signal`, wait up to `timeout`, then SIGKILL. Returns what it took: gone|signal|killed."""
    import signal

    if not process_alive(pid, start_time):
        return "gone"
    try:
        os.kill(pid, first_signal)
    except ProcessLookupError:
        return "gone"
    if wait_process_exit(pid, start_time, timeout):
        return "signal"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "signal"
    wait_process_exit(pid, start_time, 5.0)
    return "killed"


def wait_process_exit(pid: int, start_time: int | None, timeout: float) -> bool:
    """Poll until the process is gone (reaping it if it is our child); True if it went in time."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:  # our own child stays a zombie until reaped
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not process_alive(pid, start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def tail_lines(path: str, count: int = 20) -> list[str]:
    """The last `count` lines of a log file (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return data.splitlines()[-count:]


def open_rotated_log(path: str, max_bytes: int, backups: int = 3):
    """Open a child process's log for appending, first rolling it over if it grew past `max_bytes`.

    A child writes through an inherited fd, so it can only be rotated between runs.
    """
    try:
        if os.path.getsize(path) > max_bytes:
            for i in range(backups - 1, 0, -1):
                if os.path.exists(f"{path}.{i}"):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: object = None,
    timeout: float = 10.0,
    connection=None,
) -> tuple[int, object]:
    """One JSON request over HTTP/1.1 (stdlib); returns (status, decoded JSON or text).

    Raises ServiceUnavailable when nothing answers. `connection` reuses a keep-alive
    `http.client.HTTPConnection` to the same host.
    """
    import http.client
    import json
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = connection or http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise ServiceUnavailable(f"no answer from {parts.scheme}://{parts.netloc}: {e}") from None
    finally:
        if connection is None:
            conn.close()
    text = raw.decode(errors="replace")
    try:
        return response.status, json.loads(text) if text else None
    except ValueError:
        return response.status, text


class YagnaService:
    """The yagna REST endpoint the webserver talks to, and the process behind it if we started it.

    `payment_network: local` means the local Golem network (`golem_localnet.py serve`);
    anything else means the real `yagna service run`. A daemon that already answers
    is used as it is and left running on stop: only what we started is ours to stop.
    """

    def __init__(self, network: str, datadir: str, appname: str = DEFAULT_YAGNA_APPNAME):
        import logging

        self.network = network
        self.datadir = datadir
        self.appname = appname
        self.kind = "localnet" if network == "local" else "yagna"
        self.api_url = ""
        self.app_key = ""  # secret: never logged, never in argv, never in an HTTP response
        self.version: str | None = None
        self.identity: str | None = None
        self.pid: int | None = None
        self.pid_start_time: int | None = None
        self.started_by_us = False
        self.warnings: list[str] = []
        # The daemon a killed webserver had started in this data dir ({"url", "pid",
        # "pid_start_time"}): found still running, it is adopted, so that it is stopped with us.
        self.orphan: dict | None = None
        self._process = None
        self._log = logging.getLogger("ray_on_golem.yagna")

    @property
    def payment_platform(self) -> str:
        return payment_platform(self.network)

    @property
    def log_path(self) -> str:
        return os.path.join(self.datadir, "localnet.log" if self.kind == "localnet" else "yagna.log")

    def info(self) -> dict:
        """What status shows about the daemon (no secrets)."""
        return {
            "kind": self.kind,
            "url": self.api_url or None,
            "version": self.version,
            "pid": self.pid,
            "started_by_us": self.started_by_us,
            "identity": self.identity,
            "payment_network": self.network,
            "payment_platform": self.payment_platform,
        }

    # -- start ---------------------------------------------------------------

    def start(self, timeout: float = YAGNA_READY_TIMEOUT) -> None:
        """Connect to a reachable daemon or start one; then get the app key and version. Blocking."""
        if self.kind == "localnet":
            self._connect_or_start_localnet(timeout)
        else:
            self._connect_or_start_yagna(timeout)
        me = self.get("/me")
        self.identity = me.get("identity") if isinstance(me, dict) else None
        self.version = self._fetch_version()
        self._log.info(
            "using %s at %s (version %s, %s)",
            self.kind,
            self.api_url,
            self.version,
            "started by us" if self.started_by_us else "started externally",
        )

    def _reachable(self, url: str) -> bool:
        """Any HTTP answer (even 401) means a daemon listens: the anchor's check (§2.5)."""
        try:
            http_request("GET", f"{url}/me", timeout=2.0)
        except ServiceUnavailable:
            return False
        return True

    def _connect_or_start_localnet(self, timeout: float) -> None:
        import json

        netdir = ensure_datadir(os.path.join(self.datadir, "localnet"))
        state_path = os.path.join(netdir, "localnet.json")
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("url") and process_alive(int(state.get("pid") or 0)) and self._reachable(state["url"]):
            self.api_url = state["url"]
            self.pid = int(state["pid"])
            self._adopt_or_leave("the local network")
        else:
            try:
                os.unlink(state_path)  # stale: the new process writes its own
            except FileNotFoundError:
                pass
            # `-m golem_localnet` with this module's directory on the path works from a
            # checkout, a venv and the zipapp alike (zipimport reads the .pyz entry).
            cmd = [sys.executable, "-m", "golem_localnet", "serve", "--port", "0", "--datadir", netdir]
            env = dict(os.environ)
            here = os.path.dirname(os.path.abspath(__file__))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
            self._spawn(cmd, env)
            self._wait_ready(timeout, lambda: self._localnet_url(state_path))
        self.app_key = os.environ.get("YAGNA_APPKEY") or self._read_localnet_appkey(netdir)

    def _adopt_or_leave(self, what: str) -> None:
        """A reachable daemon is ours only if a killed webserver of this data dir had started it."""
        orphan = self.orphan or {}
        if orphan.get("url") == self.api_url and process_alive(orphan.get("pid") or 0, orphan.get("pid_start_time")):
            self.pid, self.pid_start_time = orphan["pid"], orphan.get("pid_start_time")
            self.started_by_us = True
            self._log.info("adopting %s (pid %s), left running by a webserver that was killed", what, self.pid)
        else:
            self._log.info("not starting %s: it was started externally (%s)", what, self.api_url)

    def _localnet_url(self, state_path: str) -> str | None:
        """The URL from `localnet.json` once our child wrote it (internals.md: the local network process)."""
        import json

        try:
            with open(state_path) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        if state.get("pid") != self.pid or not state.get("url"):
            return None
        return state["url"] if self._reachable(state["url"]) else None

    @staticmethod
    def _read_localnet_appkey(netdir: str) -> str:
        try:
            with open(os.path.join(netdir, "appkey")) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise ServiceUnavailable(f"the local network wrote no app key in {netdir}") from None

    def _connect_or_start_yagna(self, timeout: float) -> None:
        url = os.environ.get("YAGNA_API_URL", DEFAULT_YAGNA_API_URL).rstrip("/")
        if self._reachable(url):
            self.api_url = url
            self._adopt_or_leave("yagna")
        else:
            binary = find_yagna_binary()
            env = dict(os.environ, RUST_BACKTRACE="0")
            # --disable-metrics-push: no reports to metrics.golem.network from a user's machine.
            self._spawn([binary, "service", "run", "--disable-metrics-push"], env)
            self._wait_ready(timeout, lambda: url if self._reachable(url) else None)
        self.app_key = os.environ.get("YAGNA_APPKEY") or self._yagna_app_key()
        try:
            # Registers the requestor account for this platform; works offline and is
            # idempotent (yagna-offline.md §3). Funding needs the chain, so it is not done here.
            self.yagna_cli("payment", "init", "--sender", "--network", self.network)
        except ServiceUnavailable as e:
            self._warn(f"payment account not initialised: {e}")

    def _warn(self, message: str) -> None:
        import datetime

        self._log.warning("%s", message)
        self.warnings.append(f"{datetime.datetime.now(datetime.timezone.utc).isoformat()} {message}")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        import subprocess

        log = open_rotated_log(self.log_path, YAGNA_LOG_MAX_BYTES)
        try:
            # Own session: a Ctrl-C on a foreground webserver must not reach the daemon
            # before the webserver has closed its agreements.
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True,
            )  # fmt: skip
        finally:
            log.close()
        self.pid = self._process.pid
        self.pid_start_time = proc_start_time(self.pid)
        self.started_by_us = True
        self._log.info("started %s (pid %s), log in %s", self.kind, self.pid, self.log_path)

    def _wait_ready(self, timeout: float, ready) -> None:
        import time

        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                lines = "\n".join(tail_lines(self.log_path, 20))
                raise ServiceUnavailable(
                    f"{self.kind} exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{lines}"
                )
            url = ready()
            if url:
                self.api_url = url.rstrip("/")
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ServiceUnavailable(f"{self.kind} did not answer within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def yagna_cli(self, *args: str, timeout: float = 30.0) -> str:
        """Run `yagna ARGS` (same environment as the daemon: the CLI needs its GSB_URL) and return stdout."""
        import subprocess

        try:
            done = subprocess.run(
                [find_yagna_binary(), *args], capture_output=True, text=True, timeout=timeout,
                env=dict(os.environ, RUST_BACKTRACE="0"), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"`yagna {' '.join(args)}` did not finish within {timeout:.0f} s") from None
        if done.returncode != 0:
            # stderr of the yagna CLI names the problem ("Server is unreachable"); it never holds the key.
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ServiceUnavailable(f"`yagna {' '.join(args)}` failed: {err}")
        return done.stdout

    def _yagna_app_key(self) -> str:
        """Reuse the app key named `appname`, else create it (`yagna app-key create` is idempotent by name)."""
        import json

        for entry in json.loads(self.yagna_cli("app-key", "list", "--json") or "[]"):
            if entry.get("name") == self.appname:
                return entry["key"]
        out = self.yagna_cli("app-key", "create", self.appname).strip()
        try:  # some yagna versions print the key as a JSON string
            out = json.loads(out)
        except ValueError:
            pass
        if not out:
            raise ServiceUnavailable("`yagna app-key create` printed no key")
        return out

    def _fetch_version(self) -> str | None:
        """yagna answers `/version/get` with `{"current": {"version": ...}}` (yagna-offline.md §2)."""
        try:
            data = self.get("/version/get")
            return data["current"]["version"]
        except (RayOnGolemError, KeyError, TypeError):
            pass
        if self.kind == "yagna":
            try:  # `yagna 0.17.6 (a98d28015 2026-03-13)`
                return self.yagna_cli("--version", timeout=10).split()[1]
            except (RayOnGolemError, IndexError):
                return None
        return None

    def get(self, path: str, timeout: float = 10.0) -> object:
        """GET a yagna REST path with the app key; raises ServiceUnavailable on an HTTP error."""
        status, data = http_request("GET", self.api_url + path, token=self.app_key, timeout=timeout)
        if status >= 400:
            msg = data.get("message") if isinstance(data, dict) else data
            raise ServiceUnavailable(f"{self.kind} answered {status} to GET {path}: {msg}")
        return data

    # -- stop ----------------------------------------------------------------

    def stop(self) -> str:
        """Stop the daemon if we started it; say what happened."""
        import signal

        if not self.started_by_us or self.pid is None:
            if self.api_url:
                self._log.info("not stopping %s: it was started externally", self.kind)
            return "left running (started externally)"
        # yagna: SIGINT, never SIGTERM alone: a daemon stuck in net init ignores
        # SIGTERM for minutes (yagna-offline.md §6). The local network exits on either.
        how = stop_process(self.pid, self.pid_start_time, signal.SIGINT, YAGNA_STOP_TIMEOUT)
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except Exception:  # noqa: BLE001 - already killed above; reaping is best effort
                pass
        self._log.info("stopped %s (pid %s): %s", self.kind, self.pid, how)
        self.started_by_us = False
        return {"gone": "already gone", "signal": "stopped", "killed": "killed after a timeout"}[how]


###############################################################################
# 6. Market ###################################################################
###############################################################################


###############################################################################
# 7. Clusters #################################################################
###############################################################################


###############################################################################
# 8. Webserver ################################################################
###############################################################################

WEBSERVER_TOKEN_FILE = "webserver.token"
WEBSERVER_PID_FILE = "webserver.pid"
WEBSERVER_RUNTIME_FILE = "webserver.json"  # port, pid, yagna kind/URL/pid: lets stop/status find it (no secrets)
WEBSERVER_RUN_LOCK = "webserver.run.lock"  # held by the running webserver: one per data dir
WEBSERVER_LOG_FILE = "webserver.log"
WEBSERVER_LOG_MAX_BYTES = 5 * 1024 * 1024
WEBSERVER_LOG_BACKUPS = 3
MAX_REQUEST_HEAD = 16 * 1024  # request line + headers
MAX_REQUEST_BODY = 1024 * 1024
KEEPALIVE_IDLE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this
REQUEST_READ_TIMEOUT = 30.0  # a started request must arrive whole within this


def read_pidfile(datadir: str) -> tuple[int, int | None] | None:
    """`(pid, start_time)` from `<datadir>/webserver.pid` (`PID START_TIME`), None if absent or garbled."""
    try:
        with open(os.path.join(datadir, WEBSERVER_PID_FILE)) as f:
            fields = f.read().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (FileNotFoundError, ValueError, IndexError):
        return None


def write_pidfile(datadir: str, pid: int) -> None:
    """Record `pid` with its start time, so a reused pid is never mistaken for the webserver."""
    write_secret_file(os.path.join(datadir, WEBSERVER_PID_FILE), f"{pid} {proc_start_time(pid) or 0}\n")


def live_pid(datadir: str) -> tuple[int, int | None] | None:
    """The pidfile's process if it still runs and is the same process (PID-reuse safe), else None."""
    entry = read_pidfile(datadir)
    if entry and process_alive(entry[0], entry[1] or None):
        return entry
    return None


def read_runtime(datadir: str) -> dict:
    """`<datadir>/webserver.json` as the running (or last crashed) webserver wrote it; {} if none."""
    import json

    try:
        with open(os.path.join(datadir, WEBSERVER_RUNTIME_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


class MethodNotAllowed(RayOnGolemError):
    http_status = 405


class PayloadTooLarge(RayOnGolemError):
    http_status = 413


class _SecretRedactor:
    """logging.Filter that blanks known secrets (token, app key) out of every record: defence in depth."""

    def __init__(self):
        self.secrets: set[str] = set()

    def filter(self, record) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "[***]")
            record.msg, record.args = message, None
        return True


def setup_webserver_logging(datadir: str, redactor: _SecretRedactor | None = None):
    """Log to `<datadir>/webserver.log`, rotated by size; returns the `ray_on_golem` logger."""
    import logging
    import logging.handlers

    handler = logging.handlers.RotatingFileHandler(
        os.path.join(datadir, WEBSERVER_LOG_FILE), maxBytes=WEBSERVER_LOG_MAX_BYTES,
        backupCount=WEBSERVER_LOG_BACKUPS, encoding="utf-8",
    )  # fmt: skip
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)-7s] [%(name)s] %(message)s"))
    if redactor is not None:
        handler.addFilter(redactor)
    os.chmod(handler.baseFilename, 0o600)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger("ray_on_golem")


def load_or_create_token(datadir: str) -> str:
    """The webserver's bearer token, `<datadir>/webserver.token` (0600), created on first start."""
    import secrets

    path = os.path.join(datadir, WEBSERVER_TOKEN_FILE)
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: a readable token is an open door
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    write_secret_file(path, token + "\n")
    return token


def read_token(datadir: str) -> str | None:
    try:
        with open(os.path.join(datadir, WEBSERVER_TOKEN_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


class Request:
    """One parsed HTTP request; `params` holds the `{name}` parts of the matched route pattern."""

    __slots__ = ("method", "path", "query", "version", "headers", "body", "params")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], body: bytes):
        path, _, query = target.partition("?")
        self.method, self.path, self.version = method, path, version
        self.query = query
        self.headers, self.body = headers, body
        self.params: dict[str, str] = {}

    def query_params(self) -> dict[str, str]:
        import urllib.parse

        return dict(urllib.parse.parse_qsl(self.query))

    def json(self) -> dict:
        """The body as a JSON object (empty body: `{}`); UsageError (400) otherwise."""
        import json

        if not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as e:
            raise UsageError(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UsageError("request body must be a JSON object")
        return data

    def fields(self, spec: dict[str, tuple[type, object]]) -> dict:
        """Validate the JSON body against `{field: (type, default)}`; unknown or mistyped fields are a 400."""
        data = self.json()
        unknown = sorted(set(data) - set(spec))
        if unknown:
            raise UsageError(f"unknown field {unknown[0]!r} (expected: {', '.join(sorted(spec))})")
        out = {}
        for name, (kind, default) in spec.items():
            value = data.get(name, default)
            # bool is an int in Python; a JSON `1` is not a valid `force`.
            if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise UsageError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
            out[name] = value
        return out


class Router:
    """The route table as data: (method, path pattern) -> handler method name; `{name}` matches one segment."""

    def __init__(self, routes):
        import re

        self._static: dict[str, dict[str, str]] = {}
        self._patterns: list[tuple[re.Pattern, dict[str, str]]] = []
        for method, pattern, name in routes:
            if "{" in pattern:
                regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
                for existing, methods in self._patterns:
                    if existing.pattern == regex.pattern:
                        methods[method] = name
                        break
                else:
                    self._patterns.append((regex, {method: name}))
            else:
                self._static.setdefault(pattern, {})[method] = name

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        """The handler name and path params; NotFound (404) or MethodNotAllowed (405)."""
        import urllib.parse

        methods, params = self._static.get(path), {}
        if methods is None:
            for regex, candidate in self._patterns:
                m = regex.match(path)
                if m:
                    methods = candidate
                    params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                    break
            else:
                raise NotFound(f"no route {path}")
        name = methods.get(method)
        if name is None:
            raise MethodNotAllowed(f"{method} not allowed on {path} (allowed: {', '.join(sorted(methods))})")
        return name, params


class WebserverHandler:
    """The webserver's routes, in the style of `http.server`: one coroutine method per route.

    Each takes the Request and returns a JSON-able dict (sent as 200) or raises a
    RayOnGolemError (sent as its http_status with `{"error": message}`). A later
    section adds a route by adding a method and a row to ROUTES.
    """

    ROUTES = (
        ("GET", "/status", "status"),
        ("GET", "/wallet", "wallet"),
        ("POST", "/shutdown", "shutdown"),
    )

    def __init__(self, server: "Webserver"):
        self.server = server

    async def status(self, request: Request) -> dict:
        return self.server.status()

    async def wallet(self, request: Request) -> dict:
        return await self.server.wallet_status()

    async def shutdown(self, request: Request) -> dict:
        body = request.fields({"force": (bool, False)})
        return self.server.request_shutdown(force=body["force"])


class Webserver:
    """The long-running service: owns yagna, serves the routes, shuts down gracefully.

    Everything long-running (golem-core is asyncio) lives in this event loop:
    `run()` binds 127.0.0.1, then brings yagna up while already answering
    `status` (state `starting`), so `start` can tell a slow yagna from a dead webserver.
    """

    handler_class = WebserverHandler

    def __init__(self, datadir: str, port: int = DEFAULT_WEBSERVER_PORT, network: str = "local"):
        import time

        self.datadir = ensure_datadir(datadir)
        self.port = port
        self.network = network
        self.state = "starting"  # starting -> running -> shutting_down
        self.warnings: list[str] = []
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.yagna = YagnaService(network, self.datadir)
        # Coroutines `hook(force)` run on shutdown before yagna stops: the Clusters
        # section registers one that terminates nodes and settles payments.
        self.shutdown_hooks: list = []
        # Callables returning {cluster_name: {node_state: count}}; status and the
        # live-node check of `shutdown` read them.
        self.cluster_sources: list = []
        self.redactor = _SecretRedactor()
        self.router = Router(self.handler_class.ROUTES)
        self.handler = self.handler_class(self)
        self.exit_code = 0
        self._token = b""
        self._server = None
        self._stopped = None  # asyncio.Event, set when shutdown is complete
        self._connections: set = set()
        self._run_lock_fd: int | None = None
        self._watcher = None
        self._log = None

    # -- status and shutdown (used by the route methods) ------------------------

    def uptime(self) -> float:
        import time

        return round(time.monotonic() - self._started_monotonic, 3)

    def clusters(self) -> dict[str, dict[str, int]]:
        merged: dict[str, dict[str, int]] = {}
        for source in self.cluster_sources:
            for name, counts in source().items():
                merged.setdefault(name, {}).update(counts)
        return merged

    def live_nodes(self) -> int:
        """Nodes that still hold an agreement: everything not `terminated`."""
        return sum(n for counts in self.clusters().values() for state, n in counts.items() if state != "terminated")

    def status(self) -> dict:
        return {
            "version": __version__,
            "state": self.state,
            "shutting_down": self.state == "shutting_down",
            "datadir": self.datadir,
            "url": f"http://{WEBSERVER_HOST}:{self.port}",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": self.uptime(),
            "yagna": self.yagna.info(),
            "clusters": self.clusters(),
            "warnings": self.yagna.warnings + self.warnings,
        }

    async def wallet_status(self) -> dict:
        """The requestor's identity (wallet address), platform, payment accounts and allocations."""
        import asyncio

        if self.state == "starting":
            raise ServiceUnavailable(f"{self.yagna.kind} is still starting")
        result = {
            "payment_network": self.network,
            "payment_platform": self.yagna.payment_platform,
            "wallet_address": self.yagna.identity,
            "accounts": [],
            "allocations": [],
            "balance": None,
            "errors": [],
        }
        for key, path in (("accounts", "/payment-api/v1/requestorAccounts"), ("allocations", "/payment-api/v1/allocations")):
            try:
                result[key] = await asyncio.to_thread(self.yagna.get, path)
            except RayOnGolemError as e:
                result["errors"].append(str(e))
        if self.yagna.kind == "yagna":
            # Balances come only from the chain (`yagna payment status`); offline it
            # fails with "Server is unreachable" (yagna-offline.md §3) and we say so.
            try:
                import json

                out = await asyncio.to_thread(
                    self.yagna.yagna_cli, "payment", "status", "--network", self.network, "--json"
                )
                result["balance"] = json.loads(out)
            except (RayOnGolemError, ValueError) as e:
                result["errors"].append(str(e))
        return result

    def request_shutdown(self, force: bool = False) -> dict:
        """Start a graceful shutdown; a 409 while nodes live unless `force` (which terminates them first)."""
        import asyncio

        if self.state == "shutting_down":
            return {"shutdown": "already_shutting_down", "live_nodes": self.live_nodes()}
        live = self.live_nodes()
        if live and not force:
            names = ", ".join(sorted(self.clusters()))
            raise Conflict(f"the webserver has {live} live node(s) in cluster(s) {names}; force the shutdown to terminate them")
        self._log.info("shutdown requested%s (live nodes: %d)", " with force" if force else "", live)
        asyncio.get_running_loop().create_task(self.shutdown(force))
        return {"shutdown": "forced_shutdown" if force else "will_shutdown", "live_nodes": live}

    async def shutdown(self, force: bool = False) -> None:
        """Run the shutdown hooks, stop taking requests, stop yagna if ours; then `run()` returns."""
        import asyncio

        if self.state == "shutting_down":
            return
        self.state = "shutting_down"
        await asyncio.sleep(0)  # let the response to POST /shutdown go out first
        for hook in self.shutdown_hooks:
            try:
                await hook(force)
            except Exception:  # noqa: BLE001 - one failing hook must not keep yagna alive
                self._log.exception("shutdown hook %r failed", hook)
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        outcome = await asyncio.to_thread(self.yagna.stop)
        self._log.info("%s: %s", self.yagna.kind, outcome)
        self._stopped.set()

    # -- process lifecycle ---------------------------------------------------------

    def _take_run_lock(self) -> None:
        """One webserver per data dir: an flock held for the process lifetime (released by the kernel on death)."""
        import fcntl

        fd = os.open(os.path.join(self.datadir, WEBSERVER_RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_pidfile(self.datadir)
            owner = f" (pid {pid[0]})" if pid else ""
            raise Conflict(f"another webserver already runs with data dir {self.datadir}{owner}") from None
        self._run_lock_fd = fd

    def _write_runtime_files(self) -> None:
        import json

        write_pidfile(self.datadir, os.getpid())
        runtime = {"pid": os.getpid(), "port": self.port, "url": f"http://{WEBSERVER_HOST}:{self.port}",
                   "network": self.network, "started_at": self.started_at, "yagna": self.yagna.info(),
                   "yagna_pid_start_time": self.yagna.pid_start_time}  # fmt: skip
        write_secret_file(os.path.join(self.datadir, WEBSERVER_RUNTIME_FILE), json.dumps(runtime))

    def _remove_runtime_files(self) -> None:
        pid = read_pidfile(self.datadir)
        if pid and pid[0] == os.getpid():
            for name in (WEBSERVER_PID_FILE, WEBSERVER_RUNTIME_FILE):
                try:
                    os.unlink(os.path.join(self.datadir, name))
                except FileNotFoundError:
                    pass

    async def run(self) -> int:
        """Serve until shut down (route, SIGTERM or SIGINT); return the exit code."""
        import asyncio
        import signal

        self._log = setup_webserver_logging(self.datadir, self.redactor)
        self._take_run_lock()
        # Holding the run lock, any runtime file left is a dead webserver's.
        previous = read_runtime(self.datadir)
        if (previous.get("yagna") or {}).get("started_by_us"):
            self.yagna.orphan = {"url": previous["yagna"].get("url"), "pid": previous["yagna"].get("pid"),
                                 "pid_start_time": previous.get("yagna_pid_start_time")}  # fmt: skip
        token = load_or_create_token(self.datadir)
        self.redactor.secrets.add(token)
        self._token = f"Bearer {token}".encode()
        self._stopped = asyncio.Event()
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, WEBSERVER_HOST, self.port, limit=MAX_REQUEST_HEAD, backlog=512
            )
        except OSError as e:
            raise ServiceUnavailable(f"cannot listen on {WEBSERVER_HOST}:{self.port}: {e.strerror}") from None
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._write_runtime_files()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.shutdown(force=True)))
        self._log.info("listening on http://%s:%d (pid %d, data dir %s)", WEBSERVER_HOST, self.port, os.getpid(), self.datadir)
        try:
            await asyncio.to_thread(self.yagna.start)
        except RayOnGolemError as e:
            self._log.error("cannot start: %s", e)
            print(f"ray-on-golem: error: {e}", file=sys.stderr, flush=True)
            self.exit_code = e.exit_code
            await self.shutdown()
        else:
            if self.state == "starting":
                self.redactor.secrets.add(self.yagna.app_key)
                self._write_runtime_files()
                self.state = "running"
                self._log.info("ready: %s at %s", self.yagna.kind, self.yagna.api_url)
                self._watcher = asyncio.get_running_loop().create_task(self._watch_yagna())
        await self._stopped.wait()
        await self._server.wait_closed()
        self._remove_runtime_files()
        self._log.info("stopped, bye")
        return self.exit_code

    async def _watch_yagna(self) -> None:
        """Turn an early exit of our daemon into a status warning (the anchor only logged it)."""
        import asyncio

        while self.state == "running" and self.yagna.started_by_us:
            await asyncio.sleep(1.0)
            if self.state == "running" and not process_alive(self.yagna.pid, self.yagna.pid_start_time):
                self.yagna.started_by_us = False
                self.yagna._warn(f"{self.yagna.kind} (pid {self.yagna.pid}) exited unexpectedly; "
                                 "restart the webserver (`ray-on-golem stop`, then `start`)")  # fmt: skip

    # -- HTTP/1.1 ----------------------------------------------------------------

    async def _serve_connection(self, reader, writer) -> None:
        """Serve one keep-alive connection: read a request, dispatch it, answer; repeat."""
        import asyncio

        self._connections.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_IDLE_TIMEOUT):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return  # client went away or idled out
                except asyncio.LimitOverrunError:
                    await self._respond(writer, 431, {"error": "request head too large"}, keep_alive=False)
                    return
                try:
                    async with asyncio.timeout(REQUEST_READ_TIMEOUT):
                        request, keep_alive = await self._parse_request(head, reader)
                except RayOnGolemError as e:
                    await self._respond(writer, e.http_status, {"error": str(e)}, keep_alive=False)
                    return
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                status, payload = await self._dispatch(request)
                if self.state == "shutting_down":
                    keep_alive = False
                await self._respond(writer, status, payload, keep_alive)
                if not keep_alive:
                    return
        except ConnectionError:
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    @staticmethod
    async def _parse_request(head: bytes, reader) -> tuple[Request, bool]:
        lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise UsageError("malformed request line") from None
        if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
            raise UsageError("malformed request line")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise UsageError("malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise UsageError("chunked request bodies are not supported: send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise UsageError("malformed Content-Length") from None
        if length < 0:
            raise UsageError("malformed Content-Length")
        if length > MAX_REQUEST_BODY:
            raise PayloadTooLarge(f"request body over {MAX_REQUEST_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        return Request(method, target, version, headers, body), keep_alive

    async def _dispatch(self, request: Request) -> tuple[int, dict]:
        """Authenticate, route, call the handler; every failure becomes a JSON error, never a traceback."""
        import hmac

        # Authenticate before routing: without the token nobody learns which routes exist.
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), self._token):
            return 401, {"error": "missing or wrong bearer token: send `Authorization: Bearer <token>` from "
                                  f"{os.path.join(self.datadir, WEBSERVER_TOKEN_FILE)}"}  # fmt: skip
        try:
            name, request.params = self.router.match(request.method, request.path)
            return 200, await getattr(self.handler, name)(request)
        except RayOnGolemError as e:
            return e.http_status, {"error": str(e)}
        except Exception:  # noqa: BLE001 - the client gets a message, the log gets the traceback
            self._log.exception("%s %s failed", request.method, request.path)
            return 500, {"error": f"internal error in {request.method} {request.path}; see {WEBSERVER_LOG_FILE}"}

    @staticmethod
    async def _respond(writer, status: int, payload: dict, keep_alive: bool) -> None:
        import json
        from http import HTTPStatus

        body = json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}"]  # fmt: skip
        if not keep_alive:
            head.append("Connection: close")
        if status == 401:
            head.append("WWW-Authenticate: Bearer")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()


###############################################################################
# 9. Daemon control ###########################################################
###############################################################################

WEBSERVER_START_LOCK = "webserver.lock"  # held by `start` from its check to readiness: one spawn at a time
WEBSERVER_OUT_FILE = "webserver.out"  # the webserver's stdout/stderr: what it says before logging is set up
WEBSERVER_START_TIMEOUT = 180.0  # covers a real yagna's start (~4 s offline, more on a busy machine)
WEBSERVER_STOP_TIMEOUT = 60.0
_HTTP_ERRORS = {400: UsageError, 401: Unauthorized, 404: NotFound, 409: Conflict, 503: ServiceUnavailable}


def webserver_module_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run this module with `sys.executable`, from a checkout, venv or zipapp."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))  # the .pyz itself when run from the zipapp
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "ray_on_golem", *args], env


class WebserverClient:
    """HTTP client of the webserver (CLI, node provider): bearer token from the data dir, one keep-alive connection."""

    def __init__(self, datadir: str | None = None, port: int | None = None, timeout: float = 10.0):
        self.datadir = datadir or default_datadir()
        self.port = port if port is not None else read_runtime(self.datadir).get("port", DEFAULT_WEBSERVER_PORT)
        self.url = f"http://{WEBSERVER_HOST}:{self.port}"
        self.timeout = timeout
        self._connection = None

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """Call a route; the webserver's `{"error": ...}` comes back as the matching RayOnGolemError."""
        import http.client

        token = read_token(self.datadir)
        if token is None:
            raise ServiceUnavailable(f"no webserver token in {self.datadir}: is the webserver started?")
        if self._connection is None:
            self._connection = http.client.HTTPConnection(WEBSERVER_HOST, self.port, timeout=timeout or self.timeout)
        try:
            status, data = http_request(method, self.url + path, token=token, body=body, connection=self._connection)
        except ServiceUnavailable:
            self._connection = None
            raise ServiceUnavailable(f"no webserver answers on {self.url}") from None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else str(data)
            raise _HTTP_ERRORS.get(status, RayOnGolemError)(message or f"HTTP {status}")
        return data

    def status(self) -> dict | None:
        """The status route, or None when nothing answers."""
        try:
            return self.request("GET", "/status", timeout=3.0)
        except ServiceUnavailable:
            return None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _start_lock(datadir: str):
    """Context manager: an exclusive flock on `<datadir>/webserver.lock` (concurrent `start`s queue here)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        fd = os.open(os.path.join(datadir, WEBSERVER_START_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    return held()


def _failure_report(datadir: str, reason: str) -> str:
    lines = [f"Starting the webserver failed: {reason}"]
    for name in (WEBSERVER_LOG_FILE, WEBSERVER_OUT_FILE):
        tail = tail_lines(os.path.join(datadir, name), 20)
        if tail:
            lines.append(f"Last lines of {os.path.join(datadir, name)}:")
            lines.extend(f"    {line}" for line in tail)
    return "\n".join(lines)


def start_webserver(datadir: str, port: int, network: str, timeout: float = WEBSERVER_START_TIMEOUT, out=print) -> int:
    """Spawn the webserver detached unless one already runs; wait until it serves. Returns the exit code."""
    import subprocess
    import time

    ensure_datadir(datadir)
    client = WebserverClient(datadir, port)
    with _start_lock(datadir):
        status = client.status()
        if status and status["state"] == "shutting_down":
            out("The webserver is shutting down; waiting for it to stop before starting a new one...")
            wait_process_exit(status["pid"], proc_start_time(status["pid"]), timeout)
            status = client.status()
        if status:
            out(f"Not starting the webserver, as it's already running on {client.url} (pid {status['pid']}).")
            if os.path.realpath(status["datadir"]) != os.path.realpath(datadir):
                out(f"Warning: its data directory is {status['datadir']}, not {datadir}.")
            if status["yagna"]["payment_network"] != network:
                out(f"Warning: it uses payment network `{status['yagna']['payment_network']}`, not `{network}`.")
            return _wait_running(client, None, datadir, timeout, out) if status["state"] == "starting" else EXIT_OK
        running = live_pid(datadir)
        if running:
            out(f"A webserver process (pid {running[0]}) runs but does not answer on {client.url}.")
            out("Stop it with `ray-on-golem stop --kill`, then start again.")
            return EXIT_FAILED
        cmd, env = webserver_module_command(
            "webserver", "--port", str(port), "--network", network, "--datadir", datadir
        )
        out(f"Starting webserver on {client.url}...")
        log = open_rotated_log(os.path.join(datadir, WEBSERVER_OUT_FILE), 1024 * 1024, backups=1)
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, close_fds=True, cwd=datadir,
            )  # fmt: skip
        finally:
            log.close()
        write_pidfile(datadir, process.pid)  # before readiness: even a hung start can be stopped
        started = time.monotonic()
        code = _wait_running(client, process, datadir, timeout, out)
        if code == EXIT_OK:
            out(f"Starting webserver done in {time.monotonic() - started:.1f} s.")
        return code


def _wait_running(client: WebserverClient, process, datadir: str, timeout: float, out) -> int:
    """Poll the status route until `running`; report the log tail if the process dies or time runs out."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            out(_failure_report(datadir, f"the webserver exited with code {process.returncode}"))
            return EXIT_FAILED
        status = client.status() if read_token(datadir) else None
        if status and status["state"] == "running":
            yagna = status["yagna"]
            out(f"Webserver is running on {client.url} (pid {status['pid']}); "
                f"{yagna['kind']} {yagna['version'] or ''} at {yagna['url']}.".replace("  ", " "))  # fmt: skip
            return EXIT_OK
        if time.monotonic() >= deadline:
            if process is not None:
                stop_process(process.pid, proc_start_time(process.pid), signal.SIGTERM, 10.0)
            out(_failure_report(datadir, f"no answer within {timeout:.0f} s"))
            return EXIT_FAILED
        time.sleep(0.02)


def _kill_leftovers(datadir: str, pid: int, start_time: int | None, out) -> None:
    """SIGKILL the webserver and the daemon it had started (from webserver.json): nothing may be left."""
    import signal

    runtime = read_runtime(datadir)
    how = stop_process(pid, start_time, signal.SIGKILL, 5.0)
    out(f"Process {pid} {'terminated' if how != 'gone' else 'was already gone'}.")
    yagna = runtime.get("yagna") or {}
    if runtime.get("pid") == pid and yagna.get("started_by_us") and yagna.get("pid"):
        ypid, ystart = yagna["pid"], runtime.get("yagna_pid_start_time")
        # SIGINT first: yagna closes its databases cleanly (yagna-offline.md §6).
        if stop_process(ypid, ystart, signal.SIGINT, YAGNA_STOP_TIMEOUT) != "gone":
            out(f"Stopped the {yagna['kind']} it had started (pid {ypid}).")
    for name in (WEBSERVER_PID_FILE, WEBSERVER_RUNTIME_FILE):
        try:
            os.unlink(os.path.join(datadir, name))
        except FileNotFoundError:
            pass


def stop_webserver(datadir: str, port: int | None, force: bool, kill: bool,
                   timeout: float = WEBSERVER_STOP_TIMEOUT, out=print) -> int:  # fmt: skip
    """Graceful shutdown through the route; `kill` ends a process that does not answer or exit in time."""
    client = WebserverClient(datadir, port)
    pidfile = live_pid(datadir)
    status = client.status()
    if status is None:
        if pidfile and kill:
            out(f"No webserver answers on {client.url}; killing its process (pid {pidfile[0]}).")
            _kill_leftovers(datadir, pidfile[0], pidfile[1], out)
            return EXIT_OK
        if pidfile:
            out(f"No webserver answers on {client.url}, but its process runs (pid {pidfile[0]}).")
            out("Use `ray-on-golem stop --kill` to end it.")
            return EXIT_FAILED
        out(f"No webserver found on: {client.url}.")
        stale = read_pidfile(datadir)
        if stale:
            os.unlink(os.path.join(datadir, WEBSERVER_PID_FILE))
            out(f"Removed a stale pid file (pid {stale[0]} is not running).")
        return EXIT_OK
    pid = status["pid"]
    start_time = pidfile[1] if pidfile and pidfile[0] == pid else proc_start_time(pid)
    if status["shutting_down"]:
        out("The webserver is already shutting down.")
    else:
        out("Forcing webserver shutdown (terminating nodes, settling payments)..." if force
            else "Requesting webserver shutdown...")  # fmt: skip
        try:
            client.request("POST", "/shutdown", {"force": force})
        except Conflict as e:
            out(f"Cannot stop the webserver: {e}.")
            out("Use `ray-on-golem stop --force` to terminate them and settle payments first.")
            return EXIT_FAILED
        except ServiceUnavailable:
            pass  # it went away between status and shutdown: the wait below tells
    client.close()
    if wait_process_exit(pid, start_time, timeout):
        yagna = status["yagna"]
        if yagna["started_by_us"]:
            out(f"Webserver stopped (pid {pid}), and the {yagna['kind']} it had started (pid {yagna['pid']}).")
        else:
            out(f"Webserver stopped (pid {pid}); {yagna['kind']} at {yagna['url']} left running (started externally).")
        return EXIT_OK
    if kill:
        out(f"The webserver did not exit within {timeout:.0f} s.")
        _kill_leftovers(datadir, pid, start_time, out)
        return EXIT_OK
    out(f"The webserver is still running (pid {pid}) after {timeout:.0f} s. Use `ray-on-golem stop --kill` to end it.")
    return EXIT_FAILED


def webserver_status(datadir: str, port: int | None) -> dict:
    """What `status` shows: the status route if it answers, else what the pidfile says."""
    client = WebserverClient(datadir, port)
    status = client.status()
    report = {"running": status is not None, "url": client.url, "datadir": datadir, "webserver": status}
    if status is None:
        stale = read_pidfile(datadir)
        alive = live_pid(datadir)
        report["pid"] = alive[0] if alive else None
        report["stale_pidfile"] = stale[0] if stale and not alive else None
    else:
        report["pid"] = status["pid"]
    return report


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts + [f"{seconds}s"])


def format_status(report: dict) -> str:
    """The human status text, as in the anchor's `status` (§1.4) plus yagna and clusters."""
    status = report["webserver"]
    if status is None:
        lines = [f"The webserver doesn't seem to be listening on {report['url']}."]
        if report["pid"]:
            lines.append(f"However, the webserver seems to be running under pid: {report['pid']}.")
            lines.append("You may use the `ray-on-golem stop --kill` command to terminate it.")
        elif report["stale_pidfile"]:
            lines.append(f"A stale pid file points to pid {report['stale_pidfile']}, which is not the webserver any "
                         "more; `ray-on-golem start` replaces it.")  # fmt: skip
        return "\n".join(lines)
    yagna = status["yagna"]
    state = {"running": "Running", "starting": "Starting", "shutting_down": "Shutting down"}[status["state"]]
    origin = "started by the webserver" if yagna["started_by_us"] else "started externally"
    clusters = status["clusters"]
    lines = [
        f"Ray on Golem webserver {status['version']}",
        f"   Listening on:     {status['url']}",
        f"   Status:           {state} (pid {status['pid']}, up {_format_duration(status['uptime'])})",
        f"   Data directory:   {status['datadir']}",
        f"   Yagna:            {yagna['kind']} {yagna['version'] or '(version unknown)'} at "
        f"{yagna['url'] or '(not yet connected)'}, {origin}",
        f"   Payment network:  {yagna['payment_network']} ({yagna['payment_platform']})",
    ]
    if clusters:
        lines.append("   Clusters:")
        for name, counts in sorted(clusters.items()):
            summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n) or "no nodes"
            lines.append(f"\t{name}: {summary}")
    else:
        lines.append("   Clusters:         none")
    if status["warnings"]:
        lines.append("   Server warnings:")
        lines.extend(f"\t{w}" for w in status["warnings"])
    else:
        lines.append("   Server warnings:  none")
    return "\n".join(lines)


###############################################################################
# 10. Ray integration #########################################################
###############################################################################


###############################################################################
# 11. CLI #####################################################################
###############################################################################


def _port_arg(value: str) -> int:
    import argparse

    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _payment_network_arg(value: str) -> str:
    import argparse

    if value in DEAD_PAYMENT_NETWORKS:
        raise argparse.ArgumentTypeError(DEAD_PAYMENT_NETWORKS[value])
    if value not in PAYMENT_NETWORKS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(PAYMENT_NETWORKS)}")
    return value


def _service_datadir(args) -> str:
    return os.path.abspath(os.path.expanduser(args.datadir)) if args.datadir else default_datadir()


def cmd_webserver(args) -> int:
    """Run the webserver in the foreground until shut down."""
    import asyncio

    return asyncio.run(Webserver(_service_datadir(args), args.port, args.network).run())


def cmd_start(args) -> int:
    return start_webserver(_service_datadir(args), args.port, args.network, args.timeout)


def cmd_stop(args) -> int:
    return stop_webserver(_service_datadir(args), args.port, args.force, args.kill, args.timeout)


def cmd_status(args) -> int:
    import json

    report = webserver_status(_service_datadir(args), args.port)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def add_service_parsers(subparsers) -> None:
    """The `webserver`, `start`, `stop` and `status` subcommands."""
    datadir_help = f"Ray on Golem's data directory (default: {default_datadir()})"
    network_help = "payment network: `local` runs the local Golem network, others the real yagna (default: local)"

    p = subparsers.add_parser("webserver", help="Run Ray on Golem's webserver in the foreground.")
    p.add_argument("-p", "--port", type=lambda v: 0 if v == "0" else _port_arg(v), default=DEFAULT_WEBSERVER_PORT,
                   help=f"listen port on 127.0.0.1 (default: {DEFAULT_WEBSERVER_PORT}; 0 picks a free one)")  # fmt: skip
    p.add_argument("--network", type=_payment_network_arg, default="local", help=network_help)
    p.add_argument("--datadir", help=datadir_help)
    p.set_defaults(func=cmd_webserver)

    p = subparsers.add_parser("start", help="Start Ray on Golem's webserver and yagna (or the local network).")
    p.add_argument("-p", "--port", type=_port_arg, default=DEFAULT_WEBSERVER_PORT,
                   help=f"listen port on 127.0.0.1 (default: {DEFAULT_WEBSERVER_PORT})")  # fmt: skip
    p.add_argument("--network", type=_payment_network_arg, default="local", help=network_help)
    p.add_argument("--timeout", type=float, default=WEBSERVER_START_TIMEOUT,
                   help=f"seconds to wait until it serves (default: {WEBSERVER_START_TIMEOUT:.0f})")  # fmt: skip
    p.add_argument("--datadir", help=datadir_help)
    p.set_defaults(func=cmd_start)

    p = subparsers.add_parser("stop", help="Stop Ray on Golem's webserver and the yagna it started.")
    p.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    p.add_argument("-f", "--force", action="store_true",
                   help="stop even if clusters have live nodes: terminate them and settle payments first")  # fmt: skip
    p.add_argument("-k", "--kill", action="store_true", help="kill the process if it does not exit in time")
    p.add_argument("--timeout", type=float, default=WEBSERVER_STOP_TIMEOUT,
                   help=f"seconds to wait for the process to exit (default: {WEBSERVER_STOP_TIMEOUT:.0f})")  # fmt: skip
    p.add_argument("--datadir", help=datadir_help)
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("status", help="Show the webserver's status.")
    p.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--datadir", help=datadir_help)
    p.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ray-on-golem` console script and `python -m ray_on_golem`."""
    import argparse

    parser = argparse.ArgumentParser(prog="ray-on-golem")
    add_service_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RayOnGolemError as e:
        print(f"ray-on-golem: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
