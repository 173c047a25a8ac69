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


###############################################################################
# 6. Market ###################################################################
###############################################################################


###############################################################################
# 7. Clusters #################################################################
###############################################################################


###############################################################################
# 8. Webserver ################################################################
###############################################################################


###############################################################################
# 9. Daemon control ###########################################################
###############################################################################


###############################################################################
# 10. Ray integration #########################################################
###############################################################################
# Ray loads `provider: {type: external, module: ray_on_golem.GolemNodeProvider}`
# with importlib + getattr (ray/autoscaler/_private/loader.py), in the `ray up`
# process on this machine AND in the autoscaler (monitor) process on the head
# node. Both instances are thin clients of the one webserver, which owns all
# cluster state (ray-provider.md §5). Ray is imported only inside the builders
# below; the module-level `__getattr__` (PEP 562) builds the classes on first use.

import base64 as _base64
import http.client as _http_client
import io as _io
import json as _json
import shlex as _shlex
import tarfile as _tarfile
import threading as _threading
import time as _time
import urllib.parse as _urlparse

# Ray's tag names (ray/autoscaler/tags.py), repeated so the webserver side
# never has to import Ray to recognise a head node.
RAY_TAG_NODE_KIND = "ray-node-type"
RAY_NODE_KIND_HEAD = "head"
RAY_TAG_NODE_NAME = "ray-node-name"

# Largest archive (after gzip) a file mount / rsync may move through the
# command channel: each piece travels base64-encoded inside an ExeScript `run`.
MAX_TRANSFER_BYTES = 64 * 1024 * 1024

# Commands Ray sends for `ray attach`: they need an interactive TTY, which an
# ExeScript `run` cannot give (commands.py::attach_cluster).
_INTERACTIVE_COMMANDS = ("$SHELL", "tmux attach || tmux new", "screen -L -xRR")

# Set in the environment of every node (see section 7): code running on a node
# (the head's autoscaler) knows it is inside the cluster.
ON_GOLEM_NETWORK_ENV = "ON_GOLEM_NETWORK"


class WebserverClient:
    """JSON client of the webserver, safe to share between threads.

    Ray calls the provider from many threads (NodeLauncher, NodeUpdaterThreads,
    the v2 adapter's executor): each thread keeps its own keep-alive connection.
    The bearer token is read from its 0600 file, never passed around as text.
    """

    def __init__(self, url: str, token_file: str, timeout: float = 30.0):
        parsed = _urlparse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise UsageError(f"webserver URL must be http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self.token_file = token_file
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._timeout = timeout
        self._local = _threading.local()
        self._token: str | None = None

    def _read_token(self) -> str:
        try:
            with open(self.token_file) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise ServiceUnavailable(
                f"no webserver token at {self.token_file}: is the Ray on Golem webserver "
                "running? Start it with `ray-on-golem start`"
            ) from None

    def _connection(self, timeout: float | None) -> _http_client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _http_client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = -1.0):
        """Send one request and return the decoded JSON; errors become `RayOnGolemError`s.

        `timeout=None` waits as long as the webserver takes (a user's `ray submit` job);
        the default is the client's timeout.
        """
        response = self._send(method, path, body, timeout)
        data = response.read()
        return self._decode(response, data)

    def stream(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        """Yield the JSON objects of an `application/x-ndjson` answer as they arrive.

        A plain JSON answer is yielded as a single object, so the caller does not
        depend on whether the webserver streams.
        """
        response = self._send(method, path, body, timeout)
        if response.status >= 400 or "ndjson" not in (response.getheader("Content-Type") or ""):
            yield self._decode(response, response.read())
            return
        while True:
            line = response.readline()
            if not line:
                break
            if line.strip():
                yield _json.loads(line)

    def _send(self, method, path, body, timeout):
        if timeout == -1.0:
            timeout = self._timeout
        if self._token is None:
            self._token = self._read_token()
        payload = b"" if body is None else _json.dumps(body).encode()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn = self._connection(timeout)
            try:
                conn.request(method, path, body=payload if body is not None else None, headers=headers)
                response = conn.getresponse()
            except (ConnectionError, _http_client.HTTPException, OSError) as exc:
                self._drop_connection()
                # A keep-alive connection the server closed while idle fails on
                # first use: retry once on a fresh one (only for idempotent reads
                # or when nothing reached the server).
                if attempt == 1 and isinstance(
                    exc, (_http_client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                ):
                    continue
                raise ServiceUnavailable(
                    f"Ray on Golem webserver not reachable at {self.url} ({exc}); "
                    "start it with `ray-on-golem start`"
                ) from None
            if response.status == 401 and attempt == 1:
                # The webserver may have been restarted with a new token.
                response.read()
                self._token = self._read_token()
                continue
            return response
        return response

    def _decode(self, response, data: bytes):
        try:
            decoded = _json.loads(data) if data else {}
        except ValueError:
            decoded = {"error": data.decode(errors="replace")[:500]}
        if response.status >= 400:
            message = decoded.get("error") or decoded.get("message") or f"HTTP {response.status}"
            for cls in (NotFound, Unauthorized, Conflict, ServiceUnavailable, UsageError):
                if cls.http_status == response.status:
                    raise cls(message)
            raise RayOnGolemError(message)
        return decoded


def _node_path(cluster_name: str, node_id: str | None = None, action: str = "") -> str:
    """Path of a node route: `/clusters/{cluster}/nodes[/{node}[/{action}]]`."""
    path = f"/clusters/{_urlparse.quote(cluster_name, safe='')}/nodes"
    if node_id is not None:
        path += f"/{_urlparse.quote(node_id, safe='')}"
    if action:
        path += f"/{action}"
    return path


def webserver_client_for(provider_config: dict) -> WebserverClient:
    """The client a provider instance uses: the head's copy of the config names
    the webserver explicitly (prepare_for_head_node); on this machine it is
    found from `provider.parameters` like `ray-on-golem start` finds it."""
    url = provider_config.get("_webserver_url")
    token_file = provider_config.get("_webserver_token_file")
    if url and token_file:
        return WebserverClient(url, token_file)
    params = provider_config.get("parameters") or {}
    port = int(params.get("webserver_port") or DEFAULT_WEBSERVER_PORT)
    datadir = params.get("webserver_datadir") or default_datadir()
    datadir = os.path.abspath(os.path.expanduser(datadir))
    return WebserverClient(f"http://{WEBSERVER_HOST}:{port}", os.path.join(datadir, "webserver.token"))


def _remote_path(path: str) -> str:
    """Quote a node path for `/bin/sh`, expanding a leading `~` to the node's $HOME."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:]
        return '"$HOME"/' + _shlex.quote(rest) if rest else '"$HOME"'
    return _shlex.quote(path)


def _excluded(name: str, patterns: list) -> bool:
    import fnmatch

    base = os.path.basename(name.rstrip("/"))
    return any(fnmatch.fnmatch(base, p) or fnmatch.fnmatch(name, p) for p in patterns)


def pack_for_upload(source: str, target: str, exclude: list | None = None) -> tuple[str, bytes]:
    """(node directory, gzip tar) reproducing rsync's `source target` semantics.

    A directory source (Ray passes `dir/` on both sides) copies its contents into
    `target`; a file source becomes the file `target` (or `target/<name>` when
    `target` ends with `/`).
    """
    exclude = list(exclude or [])
    buf = _io.BytesIO()
    with _tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if os.path.isdir(source):
            directory = target.rstrip("/") or "/"
            for entry in sorted(os.listdir(source)):
                if not _excluded(entry, exclude):
                    tar.add(
                        os.path.join(source, entry),
                        arcname=entry,
                        filter=lambda info: None if _excluded(info.name, exclude) else info,
                    )
        elif os.path.exists(source):
            if target.endswith("/"):
                directory, name = target.rstrip("/") or "/", os.path.basename(source)
            else:
                directory, name = os.path.dirname(target) or ".", os.path.basename(target)
            tar.add(source, arcname=name)
        else:
            raise UsageError(f"cannot upload {source!r}: no such file or directory")
    data = buf.getvalue()
    if len(data) > MAX_TRANSFER_BYTES:
        raise UsageError(
            f"cannot upload {source!r}: {len(data)} bytes compressed, above the "
            f"{MAX_TRANSFER_BYTES} byte limit of the command channel; put large data "
            "in the node image or fetch it from the node"
        )
    return directory, data


def unpack_download(archive: bytes, is_dir: bool, source: str, target: str) -> None:
    """Write what `download` returned to `target` with rsync's semantics (see pack_for_upload)."""
    with _tarfile.open(fileobj=_io.BytesIO(archive), mode="r:gz") as tar:
        if is_dir:
            os.makedirs(target, exist_ok=True)
            tar.extractall(target, filter="data")
            return
        member = tar.getmembers()[0]
        if target.endswith("/") or os.path.isdir(target):
            os.makedirs(target, exist_ok=True)
            dest = os.path.join(target, os.path.basename(source.rstrip("/")))
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            dest = target
        extracted = tar.extractfile(member)
        if extracted is None:
            raise UsageError(f"cannot download {source!r}: not a regular file")
        with open(dest, "wb") as f:
            f.write(extracted.read())


def _print_node_progress(cli_logger, seen: dict, nodes: list) -> None:
    """Print the state-log lines of `nodes` not printed yet (ray up's head progress)."""
    for node in nodes:
        log = node.get("state_log") or []
        for line in log[seen.get(node["node_id"], 0):]:
            cli_logger.print("{}: {}", node["node_id"], line)
        seen[node["node_id"]] = len(log)


def _build_node_provider_class():
    """Build `GolemNodeProvider`, a subclass of Ray's NodeProvider (imports Ray)."""
    import copy

    import click
    from ray.autoscaler._private.cli_logger import cli_logger
    from ray.autoscaler.node_launch_exception import NodeLaunchException
    from ray.autoscaler.node_provider import NodeProvider

    class ProviderError(click.ClickException):
        """What `ray up/exec/down` print for our errors: `Error: <message>`, no traceback."""

        def __init__(self, error: RayOnGolemError):
            super().__init__(str(error))
            self.exit_code = error.exit_code

    class GolemNodeProvider(NodeProvider):
        """Ray's external node provider: every call is one request to the webserver.

        Holds no cluster state of its own, only the node data of its latest
        listing so `is_running`/`node_tags`/IPs called right after
        `non_terminated_nodes` (v2 adapter, ray up) need no extra request.
        """

        def __init__(self, provider_config: dict, cluster_name: str):
            super().__init__(provider_config, cluster_name)
            self._client = webserver_client_for(provider_config)
            self._lock = _threading.Lock()
            self._cache: dict[str, dict] = {}

        # -- helpers ----------------------------------------------------------
        def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = -1.0):
            try:
                return self._client.request(method, path, body, timeout=timeout)
            except RayOnGolemError as exc:
                raise ProviderError(exc) from None

        def _remember(self, nodes: list) -> None:
            with self._lock:
                for node in nodes:
                    self._cache[node["node_id"]] = node

        def _node(self, node_id: str, fresh: bool = False) -> dict:
            if not fresh:
                with self._lock:
                    cached = self._cache.get(node_id)
                if cached is not None:
                    return cached
            node = self._call("GET", _node_path(self.cluster_name, node_id))
            self._remember([node])
            return node

        # -- NodeProvider -----------------------------------------------------
        def non_terminated_nodes(self, tag_filters: dict) -> list:
            query = _urlparse.urlencode({f"tag.{k}": v for k, v in (tag_filters or {}).items()})
            path = _node_path(self.cluster_name) + (f"?{query}" if query else "")
            nodes = self._call("GET", path)["nodes"]
            self._remember(nodes)
            return [node["node_id"] for node in nodes]

        def is_running(self, node_id: str) -> bool:
            return self._node(node_id)["state"] == "running"

        def is_terminated(self, node_id: str) -> bool:
            # Polled by NodeUpdater.wait_ready: always ask, never the cache.
            return self._node(node_id, fresh=True)["state"] in ("terminating", "terminated")

        def node_tags(self, node_id: str) -> dict:
            return dict(self._node(node_id)["tags"])

        def internal_ip(self, node_id: str):
            node = self._node(node_id)
            if not node.get("internal_ip"):
                node = self._node(node_id, fresh=True)
            return node.get("internal_ip")

        def external_ip(self, node_id: str):
            node = self._node(node_id)
            if not node.get("external_ip"):
                node = self._node(node_id, fresh=True)
            return node.get("external_ip")

        def set_node_tags(self, node_id: str, tags: dict) -> None:
            node = self._call("POST", _node_path(self.cluster_name, node_id, "tags"), {"tags": tags})
            self._remember([node])

        def create_node(self, node_config: dict, tags: dict, count: int):
            return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

        def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            body = {
                "provider_parameters": self.provider_config.get("parameters") or {},
                "node_config": node_config or {},
                "tags": tags or {},
                "count": count,
                "resources": resources or {},
                "labels": labels or {},
            }
            try:
                nodes = self._client.request("POST", _node_path(self.cluster_name), body)["nodes"]
            except RayOnGolemError as exc:
                if (tags or {}).get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD:
                    raise ProviderError(exc) from None
                raise NodeLaunchException("ray-on-golem", str(exc), None) from None
            self._remember(nodes)
            if (tags or {}).get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD and not os.environ.get(
                ON_GOLEM_NETWORK_ENV
            ):
                nodes = self._wait_for_head(nodes)
            return {node["node_id"]: node for node in nodes}

        def _wait_for_head(self, nodes: list) -> list:
            """`ray up` only: follow the head's state log until it runs or ends.

            The head is visible (pending) at once, so Ray's 50 s fetch window
            is never at risk; waiting here lets the user see the provisioning
            steps and, if the node ends, the webserver's diagnosis instead of
            Ray's generic "wait_ready aborting".
            """
            seen: dict = {}
            cli_logger.print("Ray on Golem {}: requested {} node(s)", __version__, len(nodes))
            ids = [node["node_id"] for node in nodes]
            while True:
                nodes = [self._node(node_id, fresh=True) for node_id in ids]
                _print_node_progress(cli_logger, seen, nodes)
                states = {node["state"] for node in nodes}
                if states <= {"running"}:
                    return nodes
                if states & {"terminating", "terminated"}:
                    reason = "; ".join(n.get("error") or "terminated" for n in nodes)
                    raise ProviderError(RayOnGolemError(f"head node failed to start: {reason}"))
                _time.sleep(0.5)

        def terminate_node(self, node_id: str):
            node = self._call("DELETE", _node_path(self.cluster_name, node_id))
            self._remember([node])
            return {node_id: node}

        def terminate_nodes(self, node_ids: list):
            # One request per node, but without waiting for the activities to end:
            # the webserver releases them in the background (ray down polls).
            result = {}
            for node_id in node_ids:
                result.update(self.terminate_node(node_id))
            return result

        def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner,
                               use_internal_ip, docker_config=None):
            if docker_config and docker_config.get("container_name"):
                raise ProviderError(UsageError("docker: Ray on Golem nodes run no docker; remove the `docker` section"))
            runner_cls = globals().get("GolemCommandRunner") or __getattr__("GolemCommandRunner")
            return runner_cls(log_prefix, node_id, self, cluster_name)

        @staticmethod
        def bootstrap_config(cluster_config: dict) -> dict:
            try:
                return bootstrap_cluster_config(cluster_config)
            except RayOnGolemError as exc:
                raise ProviderError(exc) from None

        def prepare_for_head_node(self, cluster_config: dict) -> dict:
            # The head's autoscaler must reach the same webserver with the token.
            # On the local network the head runs on this machine, so the URL
            # and the 0600 token file work as they are (the token never goes
            # into the config itself).
            config = copy.deepcopy(cluster_config)
            config["provider"]["_webserver_url"] = self._client.url
            config["provider"]["_webserver_token_file"] = os.path.abspath(self._client.token_file)
            return config

        @staticmethod
        def fillout_available_node_types_resources(cluster_config: dict) -> dict:
            return cluster_config

    GolemNodeProvider.__module__ = __name__
    return GolemNodeProvider


def _build_command_runner_class():
    """Build `GolemCommandRunner`, Ray's CommandRunnerInterface over the webserver."""
    import click
    from ray.autoscaler._private.command_runner import _with_environment_variables
    from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
    from ray.autoscaler.command_runner import CommandRunnerInterface

    class GolemCommandRunner(CommandRunnerInterface):
        """Runs Ray's commands on a node through its activity (ExeScript `run` of
        `/bin/sh -c`), via the webserver; files travel as gzip tar archives."""

        def __init__(self, log_prefix: str, node_id: str, provider, cluster_name: str):
            self.log_prefix = log_prefix
            self.node_id = node_id
            self.provider = provider
            self.cluster_name = cluster_name
            self._client: WebserverClient = provider._client

        def _path(self, action: str) -> str:
            return _node_path(self.cluster_name, self.node_id, action)

        def run(self, cmd=None, timeout=120, exit_on_fail=False, port_forward=None, with_output=False,
                environment_variables=None, run_env="auto", ssh_options_override_ssh_key="",
                shutdown_after_run=False, silent=False):
            if cmd is None or port_forward:
                raise click.ClickException(
                    "port forwarding (`ray dashboard`, `--port-forward`) is not supported by "
                    "Ray on Golem's command runner yet"
                )
            if cmd.strip() in _INTERACTIVE_COMMANDS:
                raise click.ClickException(
                    "`ray attach` needs an interactive terminal, which Golem activities do not "
                    "offer; use `ray exec CLUSTER.yaml 'COMMAND'` instead"
                )
            if environment_variables:
                cmd = _with_environment_variables(cmd, environment_variables)
            body = {"command": cmd, "wait_running_s": timeout}
            stdout, exit_code, error = [], None, None
            try:
                # Ray gives no real deadline for the command itself (the ssh
                # runner ignores `timeout` but for connecting): wait as long as
                # it runs; `timeout` bounds only the wait for a pending node.
                for event in self._client.stream("POST", self._path("run"), body, timeout=None):
                    if "stdout" in event:
                        if with_output:
                            stdout.append(event["stdout"])
                        elif not silent:
                            sys.stdout.write(event["stdout"])
                            sys.stdout.flush()
                    if "stderr" in event and not silent:
                        sys.stderr.write(event["stderr"])
                        sys.stderr.flush()
                    if "exit_code" in event:
                        exit_code = event["exit_code"]
                    if event.get("error"):
                        error = event["error"]
            except RayOnGolemError as exc:
                error = str(exc)
            if shutdown_after_run:
                self.provider.terminate_node(self.node_id)
            if error is not None or exit_code != 0:
                message = error or f"exit code {exit_code}"
                if exit_on_fail:
                    raise click.ClickException(f"Command failed on node {self.node_id} ({message}):\n\n  {cmd}\n")
                raise ProcessRunnerError(
                    f"Command failed on node {self.node_id}: {message}",
                    "ssh_command_failed",
                    code=exit_code,
                    command=cmd,
                )
            return "".join(stdout).encode() if with_output else ""

        def run_rsync_up(self, source, target, options=None):
            options = options or {}
            try:
                directory, archive = pack_for_upload(source, target, options.get("rsync_exclude"))
                self._client.request(
                    "POST",
                    self._path("upload"),
                    {"directory": directory, "archive": _base64.b64encode(archive).decode()},
                    timeout=None,
                )
            except RayOnGolemError as exc:
                raise click.ClickException(f"upload {source} -> {self.node_id}:{target}: {exc}") from None

        def run_rsync_down(self, source, target, options=None):
            try:
                answer = self._client.request("POST", self._path("download"), {"path": source}, timeout=None)
                unpack_download(_base64.b64decode(answer["archive"]), answer["is_dir"], source, target)
            except RayOnGolemError as exc:
                raise click.ClickException(f"download {self.node_id}:{source} -> {target}: {exc}") from None

        def remote_shell_command_str(self) -> str:
            return f"ray exec <cluster.yaml> 'COMMAND'  # node {self.node_id}: no interactive shell on Golem"

    GolemCommandRunner.__module__ = __name__
    return GolemCommandRunner


_LAZY_ATTRIBUTES = {
    "GolemNodeProvider": _build_node_provider_class,
    "GolemCommandRunner": _build_command_runner_class,
}


def __getattr__(name: str):
    """PEP 562: build the Ray-dependent classes on first access, then cache them."""
    if name in globals():
        return globals()[name]
    builder = _LAZY_ATTRIBUTES.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = builder()
    return value


###############################################################################
# 11. CLI #####################################################################
###############################################################################


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ray-on-golem` console script and `python -m ray_on_golem`."""
    raise SystemExit("not built yet")


if __name__ == "__main__":
    sys.exit(main())
