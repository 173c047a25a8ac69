"""Background services: `start`, `stop`, `status`, `webserver`, against the local network and the real yagna.

Every test drives the CLI as a user would (subprocesses, exit codes, printed lines)
or the webserver's HTTP port as a client would (raw sockets for malformed input).
The `services` fixture stops what a test started, by PID, and fails the test if
anything is left running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ray_on_golem as rog  # noqa: E402
from conftest import cli_env  # noqa: E402

MODULE = os.path.join(ROOT, "ray_on_golem.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localnet_available() -> bool:
    with open(os.path.join(ROOT, "golem_localnet.py")) as f:
        return 'raise SystemExit("not built yet")' not in f.read()


def yagna_binary() -> str | None:
    try:
        return rog.require_yagna()
    except rog.RayOnGolemError:
        return None


###############################################################################
# Fixtures ####################################################################
###############################################################################


class Services:
    """One data dir and port; runs the CLI there and remembers every process it saw, to check they end."""

    def __init__(self, datadir: str, port: int, network: str, env: dict[str, str], netns: str | None = None):
        self.datadir, self.port, self.network = datadir, port, network
        self.env, self.netns = env, netns
        self.seen: dict[int, int | None] = {}  # pid -> start time

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [sys.executable, MODULE, *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        self.remember()
        return done

    def cli_python(self, code: str) -> subprocess.CompletedProcess:
        """Run Python code where the CLI runs (inside the namespace for the real yagna)."""
        cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    def start(self, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("start", "--datadir", self.datadir, "-p", str(self.port), "--network", self.network, *extra)

    def stop(self, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("stop", "--datadir", self.datadir, *extra)

    def status(self, *extra: str) -> subprocess.CompletedProcess:
        return self.cli("status", "--datadir", self.datadir, *extra)

    def runtime(self) -> dict:
        return rog.read_runtime(self.datadir)

    def remember(self) -> None:
        """Note the webserver and the daemon it started, from the files the webserver writes."""
        runtime = self.runtime()
        if runtime.get("pid"):
            self.seen.setdefault(runtime["pid"], rog.proc_start_time(runtime["pid"]))
        yagna = runtime.get("yagna") or {}
        if yagna.get("started_by_us") and yagna.get("pid"):
            self.seen.setdefault(yagna["pid"], runtime.get("yagna_pid_start_time"))
        pidfile = rog.read_pidfile(self.datadir)
        if pidfile:
            self.seen.setdefault(pidfile[0], pidfile[1])

    def alive(self) -> list[int]:
        return [pid for pid, start in self.seen.items() if rog.process_alive(pid, start)]

    def token(self) -> str:
        with open(os.path.join(self.datadir, rog.WEBSERVER_TOKEN_FILE)) as f:
            return f.read().strip()


def _service_env(tmp_path, extra: dict[str, str] | None = None) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return cli_env(None, home, extra)


def _make_services(tmp_path, network: str, netns: str | None) -> Services:
    datadir = str(tmp_path / "rog")
    if network == "local":
        if not localnet_available():
            pytest.skip("golem_localnet.py serve is not built on this branch yet")
        return Services(datadir, free_port(), network, _service_env(tmp_path))
    if yagna_binary() is None:
        pytest.skip("the yagna binary (PyPI golem-node) is not installed")
    # Inside the namespace every port is free; the loopback recipe keeps yagna off the internet.
    env = _service_env(tmp_path, rog.yagna_loopback_env(str(tmp_path / "yagna"), next(_YAGNA_PORTS)))
    env["PATH"] = os.path.dirname(yagna_binary()) + os.pathsep + env.get("PATH", "")
    return Services(datadir, 4578, network, env, netns)


_YAGNA_PORTS = iter(range(17464, 30000, 10))  # fresh ports per test: no TIME_WAIT reuse


def _teardown(services: Services) -> None:
    services.remember()
    leftover = services.alive()
    leftover += [pid for pid in processes_mentioning(services.datadir) if pid not in leftover]
    services.seen.update({pid: rog.proc_start_time(pid) for pid in leftover if pid not in services.seen})
    for pid in leftover:  # kill by PID what the test left, then fail it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftover:
        rog.wait_process_exit(pid, services.seen[pid], 10)
    assert not leftover, f"processes left running: {leftover}"


@pytest.fixture
def services(tmp_path):
    """The local network backend."""
    svc = _make_services(tmp_path, "local", None)
    yield svc
    _teardown(svc)


@pytest.fixture(params=["local", pytest.param("holesky", marks=pytest.mark.yagna)])
def any_services(request, tmp_path):
    """Both backends: the local network, and the real yagna in the loopback-only namespace."""
    ns = request.getfixturevalue("netns") if request.param != "local" else None
    svc = _make_services(tmp_path, request.param, ns)
    yield svc
    _teardown(svc)


@pytest.fixture
def running(services):
    """A started webserver on the local network, stopped at the end: for tests that stop or restart it."""
    done = services.start()
    assert done.returncode == 0, done.stdout + done.stderr
    yield services
    services.stop("--kill")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One webserver on the local network for the read-only HTTP tests of this module."""
    svc = _make_services(tmp_path_factory.mktemp("shared"), "local", None)
    done = svc.start()
    assert done.returncode == 0, done.stdout + done.stderr
    yield svc
    svc.stop("--kill")
    _teardown(svc)


def raw_http(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one response: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_response(s.makefile("rb"))


def _read_response(stream) -> tuple[int, dict, bytes]:
    """One response from a buffered socket file (exact framing: pipelined answers stay in the buffer)."""
    status_line = stream.readline()
    if not status_line:
        raise ConnectionError("closed before a response")
    status = int(status_line.split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", 0)))


def request_bytes(method: str, path: str, token: str | None, body: bytes = b"", extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


###############################################################################
# start / status / stop #######################################################
###############################################################################


def test_start_status_stop(any_services):
    svc = any_services
    started = svc.start()
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"Webserver is running on http://127.0.0.1:{svc.port}" in started.stdout
    runtime = svc.runtime()
    kind = "localnet" if svc.network == "local" else "yagna"
    assert runtime["yagna"]["kind"] == kind and runtime["yagna"]["started_by_us"]

    status = svc.status()
    assert status.returncode == 0
    assert f"Listening on:     http://127.0.0.1:{svc.port}" in status.stdout
    assert "Status:           Running" in status.stdout
    assert f"Yagna:            {kind} " in status.stdout
    assert "started by the webserver" in status.stdout
    if kind == "localnet":  # how its nodes are made: VM-like as root (auto), else the sandbox, said
        expected = "VM-like (own network" if os.geteuid() == 0 else "sandbox (shared loopback)"
        assert f"Local nodes:      {expected}" in status.stdout

    report = json.loads(svc.status("--json").stdout)
    assert report["running"] is True
    assert report["webserver"]["yagna"]["payment_platform"] == rog.payment_platform(svc.network)
    assert report["webserver"]["datadir"] == svc.datadir
    if kind == "yagna":
        assert report["webserver"]["yagna"]["version"] == "0.17.6"
        # The wallet route, asked from inside the namespace as the node provider would.
        asked = svc.cli_python(
            "import json, ray_on_golem as r; "
            f"print(json.dumps(r.WebserverClient({svc.datadir!r}, {svc.port}).request('GET', '/wallet')))"
        )
        wallet = json.loads(asked.stdout)
        assert wallet["wallet_address"] == report["webserver"]["yagna"]["identity"].lower()
        assert wallet["payment_platform"] == "erc20-holesky-tglm"
        # `payment init --sender` registered the account offline (docs/yagna-behaviour.md §5) ...
        assert any(a["platform"] == "erc20-holesky-tglm" and a["send"] for a in wallet["accounts"])
        # ... but a balance needs the chain: said, not hidden.
        assert wallet["balance"] is None and any("Server is unreachable" in e for e in wallet["errors"])

    again = svc.start()
    assert again.returncode == 0
    assert "Not starting the webserver, as it's already running" in again.stdout

    pids = dict(svc.seen)
    assert len(pids) == 2  # the webserver and the daemon it started
    stopped = svc.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "Webserver stopped" in stopped.stdout and f"the {kind} it had started" in stopped.stdout
    assert not svc.alive()
    assert not os.path.exists(os.path.join(svc.datadir, rog.WEBSERVER_PID_FILE))

    after = svc.status("-p", str(svc.port))  # no runtime file left to name the port
    assert after.returncode == 0
    assert f"The webserver doesn't seem to be listening on http://127.0.0.1:{svc.port}." in after.stdout
    assert "No webserver found on" in svc.stop("-p", str(svc.port)).stdout


def test_start_shapes_the_local_network_it_starts(services):
    """`--local-*` (what `ray up` passes from the YAML's `local_network`) reach the local network;
    a second `start` keeps the running one as it is."""
    started = services.start("--local-providers", "3", "--local-seed", "5", "--local-time-scale", "4")
    assert started.returncode == 0, started.stdout + started.stderr
    with open(os.path.join(services.datadir, "localnet", "localnet.json")) as f:
        url = json.load(f)["url"]
    with open(os.path.join(services.datadir, "localnet", "appkey")) as f:
        key = f.read().strip()
    request = urllib.request.Request(f"{url}/localnet/v1/state", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        state = json.load(response)
    assert (state["providers"], state["time_scale"]) == (3, 4.0)
    # The webserver knows the clock of the network it uses (autostop's idle minutes run on it).
    assert services.runtime()["yagna"]["time_scale"] == 4.0
    again = services.start("--local-providers", "9")
    assert again.returncode == 0 and "already running" in again.stdout
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["providers"] == 3
    assert services.stop().returncode == 0


def test_a_sandboxed_local_network_gets_no_node_request(services, tmp_path):
    """A local network in sandbox mode (its nodes share this machine's loopback and cannot run sshd,
    so Ray could not reach them): the webserver that uses it refuses a node request at once, 409
    saying why, before any demand or agreement; its time scale is the webserver's too."""
    from pathlib import Path

    from conftest import start_localnet, stop_localnet

    ln = start_localnet(Path(services.datadir) / "localnet", providers=2, isolation="sandbox", time_scale=3)
    try:
        started = services.start()
        assert started.returncode == 0, started.stdout + started.stderr
        assert services.runtime()["yagna"]["time_scale"] == 3.0 and not services.runtime()["yagna"]["started_by_us"]
        config = rog.load_cluster_config(os.path.join(ROOT, "sample-cluster.yaml"))
        body = {"provider_parameters": dict(config.parameters, payment_network="local"),
                "node_config": config.node_types["ray.head.default"].node_config,
                "tags": {"ray-node-type": "head", "ray-user-node-type": "ray.head.default"}, "count": 1}
        client = rog.WebserverClient(services.datadir, services.port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.request("POST", "/clusters/sandboxed/nodes", body)
                raise AssertionError("a node was accepted on a sandboxed local network")
            except rog.ServiceUnavailable:  # still connecting: retry
                assert time.monotonic() < deadline
                time.sleep(0.5)
            except rog.Conflict as e:
                message = str(e)
                break
        assert message == ("no Ray node can run on this network: the local network runs in sandbox mode: its "
                           "nodes share this machine's loopback and cannot run sshd; run it as root for VM-like nodes")
        state = ln.state()
        assert state["demands"]["count"] == 0 and state["agreements"]["count"] == 0, state
        assert client.request("GET", "/clusters/sandboxed/nodes")["nodes"] == []
        assert services.stop().returncode == 0
    finally:
        assert stop_localnet(ln) == 0


def test_kill_9_then_status_and_start(any_services):
    svc = any_services
    assert svc.start().returncode == 0
    webserver_pid = svc.runtime()["pid"]
    daemon_pid = svc.runtime()["yagna"]["pid"]
    os.kill(webserver_pid, signal.SIGKILL)
    assert rog.wait_process_exit(webserver_pid, None, 10)

    status = svc.status()
    assert status.returncode == 0
    assert "doesn't seem to be listening" in status.stdout
    assert "stale pid file points to pid" in status.stdout

    restarted = svc.start()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    runtime = svc.runtime()
    assert runtime["pid"] != webserver_pid
    # The daemon the killed webserver left behind is adopted, hence stopped with the new one.
    assert runtime["yagna"]["pid"] == daemon_pid and runtime["yagna"]["started_by_us"]
    assert svc.stop().returncode == 0
    assert not svc.alive()


def test_concurrent_starts_make_one_webserver(services):
    procs = [
        subprocess.Popen(
            [sys.executable, MODULE, "start", "--datadir", services.datadir, "-p", str(services.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=services.env,
        )  # fmt: skip
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    services.remember()
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sum("Starting webserver on" in out for out in outputs) == 1, outputs
    assert sum("already running" in out for out in outputs) == 2, outputs
    assert len(services.alive()) == 2  # one webserver, one local network
    assert services.stop().returncode == 0
    assert not services.alive()


def test_stale_pidfile(services):
    # A pid that exists but is another process (a reused pid): our own pid, wrong start time.
    with open(os.path.join(_mk(services.datadir), "webserver.pid"), "w") as f:
        f.write(f"{os.getpid()} 1\n")
    status = services.status()
    assert f"A stale pid file points to pid {os.getpid()}" in status.stdout
    assert "seems to be running under pid" not in status.stdout

    stop = services.stop()
    assert stop.returncode == 0
    assert f"Removed a stale pid file (pid {os.getpid()} is not running)" in stop.stdout

    with open(os.path.join(services.datadir, "webserver.pid"), "w") as f:
        f.write(f"{os.getpid()} 1\n")
    started = services.start()
    assert started.returncode == 0, started.stdout + started.stderr
    pid, start_time = rog.read_pidfile(services.datadir)
    assert pid != os.getpid() and start_time == rog.proc_start_time(pid)
    assert services.stop().returncode == 0


def _mk(path: str) -> str:
    os.makedirs(path, mode=0o700)
    return path


def test_status_names_a_live_process_that_does_not_answer(services):
    """A pidfile naming a live process, nothing listening: status and stop say how to end it, --kill does."""
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        services.seen[hung.pid] = rog.proc_start_time(hung.pid)
        _mk(services.datadir)
        rog.write_pidfile(services.datadir, hung.pid)
        status = services.status()
        assert f"However, the webserver seems to be running under pid: {hung.pid}." in status.stdout
        assert "ray-on-golem stop --kill" in status.stdout
        start = services.start()
        assert start.returncode == 1 and f"(pid {hung.pid}) runs but does not answer" in start.stdout
        refused = services.stop()
        assert refused.returncode == 1 and "--kill" in refused.stdout
        killed = services.stop("--kill")
        assert killed.returncode == 0 and f"Process {hung.pid} terminated." in killed.stdout
        assert hung.wait(10) == -signal.SIGKILL
    finally:
        hung.kill()
        hung.wait()


def test_start_failure_shows_log_lines_and_exit_1(tmp_path):
    """yagna cannot be found: the webserver exits, `start` prints why and the log tail, no traceback."""
    svc = Services(str(tmp_path / "rog"), free_port(), "holesky",
                   _service_env(tmp_path, {"YAGNA_PATH": str(tmp_path / "no-yagna"), "YAGNA_API_URL": f"http://127.0.0.1:{free_port()}"}))  # fmt: skip
    done = svc.start()
    assert done.returncode == 1
    assert "Starting the webserver failed: the webserver exited with code 1" in done.stdout
    assert f"YAGNA_PATH={str(tmp_path / 'no-yagna')!r} is not an executable file" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    _teardown(svc)


def test_port_in_use_fails_cleanly(services):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", services.port))
        blocker.listen()
        done = services.start()
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{services.port}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert rog.read_pidfile(services.datadir) is None  # the failed webserver removed what `start` wrote
    assert "stale" not in services.status().stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["start", "--port", "70000"], "70000 is not a port number"),
        (["start", "--network", "goerli"], "goerli was shut down"),
        (["start", "--network", "nowhere"], "'nowhere' is not one of local, holesky, polygon"),
        (["stop", "--port", "x"], "'x' is not a port number"),
        (["stop", "--timeout", "-1"], "'-1' must be a positive number of seconds"),
        (["start", "--timeout", "soon"], "'soon' is not a number of seconds"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["start", "--local-providers", "0"], "--local-providers: '0' is not an integer >= 1"),
        (["start", "--local-time-scale", "-2"], "--local-time-scale: '-2' is not a number > 0"),
        (["webserver", "--local-seed", "x"], "--local-seed: 'x' is not an integer"),
    ],
)
def test_bad_arguments_exit_2(args, message, tmp_path):
    done = subprocess.run([sys.executable, MODULE, *args, "--datadir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


###############################################################################
# The webserver over HTTP #####################################################
###############################################################################


def test_token_file_is_0600_and_reused(running):
    path = os.path.join(running.datadir, rog.WEBSERVER_TOKEN_FILE)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(running.datadir).st_mode & 0o777 == 0o700
    token = running.token()
    assert len(token) >= 32
    assert running.stop().returncode == 0
    assert running.start().returncode == 0
    assert running.token() == token


@pytest.mark.parametrize(
    "auth",
    [None, "Authorization: Bearer wrong\r\n", "Authorization: Basic Zm9vOmJhcg==\r\n", "Authorization: Bearer\r\n"],
)
@pytest.mark.parametrize("method, path", [("GET", "/status"), ("POST", "/shutdown"), ("GET", "/no/such/route")])
def test_unauthorised_requests_get_401_json(shared, auth, method, path):
    data = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth or ''}Content-Length: 0\r\n\r\n".encode()
    status, headers, body = raw_http(shared.port, data)
    assert status == 401
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"] == "Bearer"
    assert "bearer token" in json.loads(body)["error"]
    assert shared.token() not in body.decode()
    assert rog.process_alive(shared.runtime()["pid"])  # and the shutdown did not happen


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (("POST", "/shutdown", b"{bad json"), 400, "request body is not valid JSON"),
        (("POST", "/shutdown", b"[1, 2]"), 400, "request body must be a JSON object"),
        (("POST", "/shutdown", b'{"force": 1}'), 400, "field 'force' must be bool, got int"),
        (("POST", "/shutdown", b'{"forse": true}'), 400, "unknown field 'forse' (expected: force, keep_clusters)"),
        (("GET", "/nope", b""), 404, "no route /nope"),
        (("DELETE", "/status", b""), 405, "DELETE not allowed on /status (allowed: GET)"),
    ],
)
def test_malformed_requests_get_4xx_json(shared, raw, status, message):
    method, path, body = raw
    got, headers, answer = raw_http(shared.port, request_bytes(method, path, shared.token(), body))
    assert got == status
    assert headers["content-type"] == "application/json"
    assert message in json.loads(answer)["error"]
    assert rog.process_alive(shared.runtime()["pid"])


@pytest.mark.parametrize(
    "head, message",
    [
        ("GARBAGE\r\n\r\n", "malformed request line"),
        ("GET /status HTTP/9.9\r\n\r\n", "malformed request line"),
        ("GET /status HTTP/1.1\r\nno-colon-here\r\n\r\n", "malformed header line"),
        ("POST /shutdown HTTP/1.1\r\nContent-Length: many\r\n\r\n", "malformed Content-Length"),
        ("POST /shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked request bodies are not supported"),
    ],
)
def test_unparseable_requests_get_400_and_close(shared, head, message):
    status, headers, body = raw_http(shared.port, head.encode())
    assert status == 400
    assert headers["connection"] == "close"
    assert message in json.loads(body)["error"]


def test_oversized_body_gets_413(shared):
    head = f"POST /shutdown HTTP/1.1\r\nAuthorization: Bearer {shared.token()}\r\n"
    head += f"Content-Length: {rog.MAX_REQUEST_BODY + 1}\r\n\r\n"
    status, headers, body = raw_http(shared.port, head.encode())  # answered before any body byte is read
    assert status == 413 and headers["connection"] == "close"
    assert "request body over" in json.loads(body)["error"]


def test_oversized_head_gets_431(shared):
    status, _, body = raw_http(shared.port, b"GET /status HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
    assert status == 431
    assert "too large" in json.loads(body)["error"]


def test_keep_alive_serves_many_requests_on_one_connection(shared):
    token = shared.token()
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
        stream = s.makefile("rb")
        for _ in range(20):
            s.sendall(request_bytes("GET", "/status", token))
            status, headers, body = _read_response(stream)
            assert status == 200 and "connection" not in headers
            assert json.loads(body)["state"] == "running"
        # Pipelined: two requests in one write, two answers in order.
        s.sendall(request_bytes("GET", "/status", token) + request_bytes("GET", "/nope", token))
        assert _read_response(stream)[0] == 200
        assert _read_response(stream)[0] == 404


def test_status_route_fields(shared):
    client = rog.WebserverClient(shared.datadir, shared.port)
    status = client.request("GET", "/status")
    assert status["version"] == rog.__version__
    assert status["datadir"] == shared.datadir
    assert status["state"] == "running" and status["shutting_down"] is False
    assert status["uptime"] >= 0
    assert status["yagna"]["kind"] == "localnet" and status["yagna"]["url"].startswith("http://127.0.0.1:")
    assert status["warnings"] == []
    assert "app_key" not in json.dumps(status)


def test_wallet_route(shared):
    wallet = rog.WebserverClient(shared.datadir, shared.port).request("GET", "/wallet")
    assert wallet["payment_platform"] == "erc20-local-tglm"
    assert wallet["wallet_address"] == shared.runtime()["yagna"]["identity"]
    assert isinstance(wallet["allocations"], list)


def test_shutdown_route(running):
    client = rog.WebserverClient(running.datadir, running.port)
    pid = running.runtime()["pid"]
    assert client.request("POST", "/shutdown", {}) == {"shutdown": "will_shutdown", "live_nodes": 0}
    assert rog.wait_process_exit(pid, None, 30)
    assert not running.alive()


def _add_cluster(datadir: str, name: str, node_states: list[str]) -> None:
    """Rows as the Clusters section writes them: the webserver's status and stop read the same database."""
    now = time.time()
    with rog.Store(datadir) as store:
        store.conn.execute("INSERT INTO clusters (name, network, state, config, total_budget, created_at, updated_at) "
                           "VALUES (?, 'local', 'running', '{}', '1', ?, ?)", (name, now, now))  # fmt: skip
        for i, state in enumerate(node_states):
            store.conn.execute("INSERT INTO nodes (node_id, cluster_name, node_type, state, created_at, updated_at) "
                               "VALUES (?, ?, 'ray.worker.default', ?, ?, ?)", (f"{name}-{i}", name, state, now, now))  # fmt: skip


def test_stop_refuses_while_clusters_have_live_nodes(running):
    _add_cluster(running.datadir, "golem-cluster", ["running", "pending", "terminated"])
    _add_cluster(running.datadir, "empty-cluster", [])
    status = running.status()
    assert "\tgolem-cluster: 1 pending, 1 running, 1 terminated" in status.stdout
    assert "\tempty-cluster: no nodes" in status.stdout
    report = json.loads(running.status("--json").stdout)
    assert report["webserver"]["clusters"]["golem-cluster"] == {"pending": 1, "running": 1, "terminated": 1}

    refused = running.stop()
    assert refused.returncode == 1
    assert "Cannot stop the webserver: 2 live node(s) in cluster(s) golem-cluster (2); " in refused.stdout
    assert "ray-on-golem stop --force" in refused.stdout
    assert rog.process_alive(running.runtime()["pid"])

    forced = running.stop("--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "Forcing webserver shutdown" in forced.stdout and "Webserver stopped" in forced.stdout
    assert not running.alive()


def test_no_secret_in_argv_or_logs(running):
    token = running.token()
    runtime = running.runtime()
    app_key_file = os.path.join(running.datadir, "localnet", "appkey")
    with open(app_key_file) as f:
        app_key = f.read().strip()
    for pid in (runtime["pid"], runtime["yagna"]["pid"]):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode()
        assert token not in argv and app_key not in argv
    client = rog.WebserverClient(running.datadir, running.port)
    client.request("GET", "/wallet")
    assert running.stop().returncode == 0
    secret_files = (rog.WEBSERVER_TOKEN_FILE, rog.YAGNA_APPKEY_FILE)  # the secrets' own files, 0600
    for name in secret_files:
        assert os.stat(os.path.join(running.datadir, name)).st_mode & 0o777 == 0o600, name
    for name in os.listdir(running.datadir):
        path = os.path.join(running.datadir, name)
        if os.path.isfile(path) and name not in secret_files:
            with open(path, errors="replace") as f:
                text = f.read()
            assert token not in text and app_key not in text, name


def test_log_redactor_blanks_secrets():
    import logging

    redactor = rog._SecretRedactor()
    redactor.secrets.add("s3cr3t")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s here", ("s3cr3t",), None)
    assert redactor.filter(record)
    assert record.getMessage() == "key=[***] here"


def test_log_redactor_blanks_secrets_in_tracebacks_and_ignores_empty_ones():
    import logging

    redactor = rog._SecretRedactor()
    redactor.secrets.update({"s3cr3t", ""})  # an app key not known yet is empty
    try:
        raise ValueError("bad key s3cr3t")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    record.stack_info = "Stack (most recent call last):\n  token s3cr3t"
    assert redactor.filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert "s3cr3t" not in text and "ValueError: bad key [***]" in text and "token [***]" in text
    assert text.startswith("failed\nTraceback")  # the empty secret blanked nothing


def test_many_concurrent_clients(shared):
    """100 keep-alive clients at once all get answers (the bench measures how fast)."""
    token = shared.token()
    errors: list[BaseException] = []

    def client():
        try:
            with socket.create_connection(("127.0.0.1", shared.port), timeout=30) as s:
                stream = s.makefile("rb")
                for _ in range(10):
                    s.sendall(request_bytes("GET", "/status", token))
                    assert _read_response(stream)[0] == 200
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


###############################################################################
# Section 5 helpers ###########################################################
###############################################################################


@pytest.mark.parametrize(
    "network, platform",
    [("local", "erc20-local-tglm"), ("holesky", "erc20-holesky-tglm"), ("polygon", "erc20-polygon-glm")],
)
def test_payment_platform_names(network, platform):
    assert rog.payment_platform(network) == platform


def test_loopback_env_points_everything_at_127_0_0_1(tmp_path):
    env = rog.yagna_loopback_env(str(tmp_path), 20000)
    assert env["YAGNA_API_URL"] == "http://127.0.0.1:20001" and env["GSB_URL"] == "tcp://127.0.0.1:20000"
    assert env["YA_NET_RELAY_HOST"].startswith("127.0.0.1:")  # without it yagna asks 8.8.8.8 (§8)
    for key, value in env.items():
        if "://" in value:
            assert "://127.0.0.1:" in value, key
    assert all(f"{c}_GETH_ADDR" in env for c in rog.YAGNA_CHAINS)


def test_proc_start_time_tells_reused_pids_apart():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = rog.proc_start_time(child.pid)
    assert start is not None and rog.process_alive(child.pid, start)
    assert not rog.process_alive(child.pid, start + 1)
    child.wait()
    assert rog.proc_start_time(child.pid) is None


@pytest.mark.slow
def test_start_status_stop_from_the_zipapp(tmp_path):
    """`start` from the zipapp on a bare Python (-I -S) spawns a webserver and local network that run from it."""
    if not localnet_available():
        pytest.skip("golem_localnet.py serve is not built on this branch yet")
    pyz = tmp_path / "ray-on-golem.pyz"
    built = subprocess.run([sys.executable, os.path.join(ROOT, "build_zipapp.py"), "--output", str(pyz)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr
    svc = Services(str(tmp_path / "rog"), free_port(), "local", _service_env(tmp_path))

    def bare(*args):
        done = subprocess.run([sys.executable, "-I", "-S", str(pyz), *args, "--datadir", svc.datadir],
                              capture_output=True, text=True, env=svc.env, timeout=120, cwd=tmp_path)  # fmt: skip
        svc.remember()
        assert "Traceback" not in done.stderr, done.stderr
        return done

    try:
        started = bare("start", "-p", str(svc.port))
        assert started.returncode == 0, started.stdout + (tmp_path / "rog" / "webserver.out").read_text()
        for pid in svc.seen:  # both children run this zipapp's code, not a checkout's
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert f"PYTHONPATH={pyz}".encode() in f.read().split(b"\0")
        assert "Status:           Running" in bare("status").stdout
        stopped = bare("stop")
        assert stopped.returncode == 0 and "Webserver stopped" in stopped.stdout
    finally:
        _teardown(svc)


def test_one_webserver_per_datadir_and_per_port(running, tmp_path):
    """Another port for the same data dir is refused; another data dir on the same port is told the port is taken."""
    other_port = free_port()
    again = running.cli("start", "--datadir", running.datadir, "-p", str(other_port))
    assert again.returncode == 1
    assert f"A webserver for {running.datadir} already runs on http://127.0.0.1:{running.port}" in again.stdout

    stranger = Services(str(tmp_path / "other"), running.port, "local", running.env)
    clash = stranger.start()
    assert clash.returncode == 1
    assert f"the webserver on http://127.0.0.1:{running.port} does not accept the token" in clash.stderr
    assert "Traceback" not in clash.stdout + clash.stderr
    _teardown(stranger)


def test_expect_100_continue(shared):
    body = b'{"force": "no"}'
    data = request_bytes("POST", "/shutdown", shared.token(), body, extra="Expect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
        stream = s.makefile("rb")
        s.sendall(data[: -len(body)])
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
        s.sendall(body)
        status, _, answer = _read_response(stream)
    assert status == 400 and "field 'force' must be bool, got str" in json.loads(answer)["error"]


def processes_mentioning(text: str) -> list[int]:
    """Every process whose command line mentions `text` (a test's data dir): the 'nothing left' check."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read() and rog.process_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _foreground_webserver(svc: Services, cwd: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MODULE, "webserver", "--datadir", svc.datadir, "-p", str(svc.port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=svc.env, cwd=cwd)  # fmt: skip


def _wait_state(svc: Services, want: str) -> str | None:
    """Poll `status` until the webserver is in state `want` (or give up); the last state seen."""
    client = rog.WebserverClient(svc.datadir, svc.port)
    state = None
    for _ in range(3000):
        status = client.status() if os.path.exists(os.path.join(svc.datadir, "webserver.token")) else None
        state = status and status["state"]
        if state == want:
            break
        time.sleep(0.005)
    return state


@pytest.mark.parametrize("when", ["starting", "running"])
def test_sigterm_is_a_graceful_shutdown(services, when):
    """SIGTERM while the daemon is still starting or once running: exit 0, the daemon stopped, files removed."""
    proc = _foreground_webserver(services)
    try:
        state = _wait_state(services, when)
        assert state == when  # starting: the local network needs far more than one poll to come up
        services.remember()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert proc.stdout.readline().startswith(f"Ray on Golem webserver {rog.__version__} listening on "
                                                 f"http://127.0.0.1:{services.port} (pid {proc.pid})")  # fmt: skip
        assert processes_mentioning(services.datadir) == []
        assert not os.path.exists(os.path.join(services.datadir, rog.WEBSERVER_PID_FILE))
        assert not os.path.exists(os.path.join(services.datadir, rog.WEBSERVER_RUNTIME_FILE))
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_total_budget_is_a_400_while_the_daemon_starts(services):
    """Input is checked before the daemon is needed: a bad request is 400, not 503, during start-up."""
    import urllib.error
    import urllib.request

    proc = _foreground_webserver(services)
    try:
        state = _wait_state(services, "starting")
        assert state == "starting"
        token = rog.read_token(services.datadir)
        req = urllib.request.Request(
            f"http://127.0.0.1:{services.port}/clusters/c1/nodes", method="POST",
            data=json.dumps({"provider_parameters": {"total_budget": "lots"}}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=30)
        body = json.loads(answer.value.read())
        assert answer.value.code == 400 and body["error"] == "provider_parameters.total_budget: 'lots' is not a decimal amount"
        services.remember()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
        assert processes_mentioning(services.datadir) == []
    finally:
        proc.kill()
        proc.wait()


def test_daemon_dying_becomes_a_status_warning(running):
    daemon = running.runtime()["yagna"]["pid"]
    os.kill(daemon, signal.SIGKILL)
    client = rog.WebserverClient(running.datadir, running.port)
    for _ in range(200):
        warnings = client.request("GET", "/status")["warnings"]
        if warnings:
            break
        time.sleep(0.05)
    assert len(warnings) == 1 and f"localnet (pid {daemon}) exited unexpectedly" in warnings[0]
    assert "Server warnings:" in running.status().stdout
    assert running.stop().returncode == 0
    assert processes_mentioning(running.datadir) == []


def test_listens_on_loopback_only(shared):
    """The listening socket is bound to 127.0.0.1, not 0.0.0.0 (/proc/net/tcp: state 0A = LISTEN)."""
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    ours = [addr for addr in listening if int(addr.split(":")[1], 16) == shared.port]
    assert ours == ["0100007F:%04X" % shared.port]


def test_external_daemon_is_used_and_left_running(services):
    """A local network that already runs for this data dir is used; stop leaves it to whoever started it."""
    netdir = os.path.join(_mk(services.datadir), "localnet")
    external = subprocess.Popen([sys.executable, os.path.join(ROOT, "golem_localnet.py"), "serve", "--port", "0",
                                 "--datadir", netdir], stdout=subprocess.PIPE, text=True, env=services.env)  # fmt: skip
    try:
        assert external.stdout.readline().startswith("golem-localnet listening on http://127.0.0.1:")
        started = services.start()
        assert started.returncode == 0, started.stdout + started.stderr
        yagna = services.runtime()["yagna"]
        assert yagna["pid"] == external.pid and yagna["started_by_us"] is False
        assert "started externally" in services.status().stdout
        stopped = services.stop()
        assert stopped.returncode == 0
        assert "localnet at http://127.0.0.1:" in stopped.stdout and "left running (started externally)" in stopped.stdout
        assert external.poll() is None  # still running: not ours to stop
        services.seen.pop(external.pid, None)
    finally:
        external.terminate()
        assert external.wait(30) == 0


def test_stop_kill_ends_a_frozen_webserver_and_its_daemon(running):
    """A webserver that cannot answer (SIGSTOP): stop refuses without --kill; --kill ends it and its local network."""
    runtime = running.runtime()
    os.kill(runtime["pid"], signal.SIGSTOP)
    refused = running.stop("--timeout", "1")
    assert refused.returncode == 1 and "Use `ray-on-golem stop --kill` to end it." in refused.stdout
    killed = running.stop("--kill", "--timeout", "1")
    assert killed.returncode == 0, killed.stdout
    assert f"Process {runtime['pid']} terminated." in killed.stdout
    assert f"Stopped the localnet it had started (pid {runtime['yagna']['pid']})." in killed.stdout
    assert not running.alive() and processes_mentioning(running.datadir) == []
    assert rog.read_pidfile(running.datadir) is None


def test_daemon_spawn_ignores_a_stray_module_in_the_cwd(services, tmp_path):
    """`-m golem_localnet` looks in the cwd first: a foreground webserver started elsewhere must not pick it up."""
    stray = tmp_path / "elsewhere"
    stray.mkdir()
    (stray / "golem_localnet.py").write_text("raise SystemExit('stray copy')\n")
    proc = _foreground_webserver(services, cwd=str(stray))
    try:
        assert proc.stdout.readline().startswith("Ray on Golem webserver")  # bound
        client = rog.WebserverClient(services.datadir, services.port)
        while (state := client.request("GET", "/status")["state"]) == "starting":
            assert proc.poll() is None
            time.sleep(0.02)
        assert state == "running"  # the real local network came up, not the stray copy
        services.remember()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.yagna
def test_start_waits_for_a_webserver_that_is_still_starting(tmp_path, netns):
    """The real yagna needs >3 s to serve REST (relay timeout, docs/yagna-behaviour.md §5): a `start` in that window
    finds the webserver `starting` and waits for it like the `start` that spawned it."""
    svc = _make_services(tmp_path, "holesky", netns)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, MODULE, "webserver", "--datadir",
                             svc.datadir, "-p", str(svc.port), "--network", "holesky"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=svc.env)  # fmt: skip
    try:
        # The ready line comes once bound, before yagna is even spawned.
        assert proc.stdout.readline().startswith("Ray on Golem webserver")
        svc.remember()
        started = svc.start()
        assert started.returncode == 0, started.stdout + started.stderr
        assert "already running" in started.stdout
        assert "Webserver is running on" in started.stdout and "yagna 0.17.6" in started.stdout
        assert svc.stop().returncode == 0
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        _teardown(svc)


def test_daemon_log_rolls_over_by_size_at_open(tmp_path):
    path = str(tmp_path / "yagna.log")
    for generation in range(4):
        with open(path, "ab") as f:
            f.write(b"x" * 2048 + str(generation).encode())
        rog.open_rotated_log(path, max_bytes=1024, backups=2).close()
    assert os.path.getsize(path) == 0  # a fresh file for the next run
    with open(path + ".1", "rb") as f:
        assert f.read().endswith(b"3")  # the newest run's log
    with open(path + ".2", "rb") as f:
        assert f.read().endswith(b"2")
    assert not os.path.exists(path + ".3")  # no more than `backups` old logs
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_start_racing_a_foreground_webserver_makes_one(services):
    """`webserver` by hand and `start` at the same moment: one wins the data dir, `start` waits for it, exit 0."""
    proc = _foreground_webserver(services)
    try:
        started = services.start()
        assert started.returncode == 0, started.stdout + started.stderr
        status = rog.WebserverClient(services.datadir, services.port).request("GET", "/status")
        assert status["state"] == "running"
        webservers = [p for p in processes_mentioning(services.datadir) if p != status["yagna"]["pid"]]
        assert webservers == [status["pid"]]
        assert services.stop().returncode == 0
        assert proc.wait(30) in (0, 1)  # 0: it won and was stopped; 1: it lost the data dir to start's child
    finally:
        proc.kill()
        proc.wait()


def test_idle_timeout_stops_the_webserver_and_what_it_started(services):
    """`start --idle-timeout`: a cluster keeps the webserver up; with none for that long it stops
    itself and the local network it had started (issue 13)."""
    started = services.start("--idle-timeout", "4s")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        _add_cluster(services.datadir, "busy-cluster", ["running"])
        status = services.status()
        assert "Idle shutdown:    after 4s without a cluster (clusters running)" in status.stdout, status.stdout
        pids = dict(services.seen)
        assert len(pids) == 2  # the webserver and the local network it started
        webserver = services.runtime()["pid"]
        # Well past the timeout, the live node keeps it running.
        assert not rog.wait_process_exit(webserver, pids[webserver], 8)

        with rog.Store(services.datadir) as store:
            store.conn.execute("UPDATE nodes SET state = 'terminated' WHERE cluster_name = 'busy-cluster'")
        report = json.loads(services.status("--json").stdout)["webserver"]["idle_shutdown"]
        assert report["idle_timeout_s"] == 4.0
        assert rog.wait_process_exit(webserver, pids[webserver], 60)
        for pid, start in pids.items():
            assert rog.wait_process_exit(pid, start, 30), f"pid {pid} left running"
        assert not os.path.exists(os.path.join(services.datadir, rog.WEBSERVER_PID_FILE))
    finally:
        if services.alive():
            services.stop("--force", "--kill")


def test_idle_shutdown_clock():
    idle = rog.IdleShutdown(600.0, now=1000.0)
    assert idle.remaining(1100.0) == 500.0
    assert not idle.observe(0, 1500.0)
    assert idle.observe(2, 1700.0) is False and idle.remaining(1700.0) is None  # a cluster: no clock
    assert not idle.observe(0, 1800.0) and idle.remaining(1800.0) == 600.0
    assert idle.observe(0, 2400.0)
    never = rog.IdleShutdown(None, now=0.0)
    assert not never.observe(0, 1e9) and never.as_dict(1e9, 0)["remaining_s"] is None
    assert idle.as_dict(2400.0, 1)["remaining_s"] is None  # live nodes: nothing to count down


def test_idle_timeout_bad_duration_exits_2(services):
    proc = services.start("--idle-timeout", "ten minutes")
    assert proc.returncode == 2
    assert "--idle-timeout: expected a duration like 90s" in proc.stderr
