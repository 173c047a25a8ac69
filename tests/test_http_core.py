"""One table of raw HTTP requests, run against both servers: the webserver and the local network.

`ray_on_golem.py` (HttpTransport) and `golem_localnet.py` (HttpServer) each keep a copy of a small
HTTP/1.1 parser and response writer: the two files never import each other. This table keeps the
copies answering alike: version check, framing (Content-Length, chunked), limits, 405 with `Allow`,
413, keep-alive. Every bad request gets a JSON reply (never a dropped connection) and the connection
closes after it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import golem_localnet as gl  # noqa: E402  (its constants only: the server runs as its own process)
import ray_on_golem as rog  # noqa: E402
from conftest import cli_env, pid_alive, start_localnet, stop_localnet  # noqa: E402


class Server:
    """A running server: where it listens, the header that authenticates, a GET route, a route that
    reads a JSON body, its error key, its connection cap and its read timeout."""

    def __init__(self, name: str, port: int, auth: str, get_path: str, json_path: str, error_key: str,
                 max_connections: int, read_timeout: float, datadir: Path):
        self.name, self.port, self.auth, self.get_path = name, port, auth, get_path
        self.json_path, self.error_key = json_path, error_key
        self.max_connections, self.read_timeout, self.datadir = max_connections, read_timeout, datadir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def localnet_server(tmp_path_factory):
    ln = start_localnet(tmp_path_factory.mktemp("http-localnet") / "net")
    yield Server("localnet", int(ln.url.rsplit(":", 1)[1]), f"Authorization: Bearer {ln.app_key}", "/me",
                 "/market-api/v1/demands", "message", gl.MAX_CONNECTIONS, gl.REQUEST_READ_TIMEOUT, ln.datadir)
    assert stop_localnet(ln) == 0


@pytest.fixture(scope="module")
def webserver_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("http-webserver")
    datadir, home = base / "rog", base / "home"
    home.mkdir()
    env = cli_env(datadir, home)
    port = _free_port()
    cli = [sys.executable, str(ROOT / "ray_on_golem.py")]
    started = subprocess.run([*cli, "start", "-p", str(port), "--network", "local"], capture_output=True, text=True,
                             env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = rog.read_runtime(str(datadir))["pid"]
    token = rog.read_token(str(datadir))
    yield Server("webserver", port, f"Authorization: Bearer {token}", "/status", "/shutdown", "error",
                 rog.MAX_CONNECTIONS, rog.REQUEST_READ_TIMEOUT, datadir)
    stopped = subprocess.run([*cli, "stop", "--kill"], capture_output=True, text=True, env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert rog.wait_process_exit(pid, None, 30) and not pid_alive(pid)


@pytest.fixture(params=["webserver", "localnet"])
def server(request) -> Server:
    return request.getfixturevalue(f"{request.param}_server")


def exchange(port: int, data: bytes, responses: int = 1) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes on one connection and read `responses` answers: [(status, headers, body)]."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        stream = s.makefile("rb")
        out = []
        for _ in range(responses):
            status_line = stream.readline()
            assert status_line, "the server closed the connection without a reply"
            headers = {}
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            out.append((int(status_line.split()[1]), headers, stream.read(int(headers.get("content-length", 0)))))
        return out


LONG = "a" * 70_000  # beyond both servers' line limits
HEX_LONG = "0" * 70_000 + "1"

# (case, request head after the request line's method, expected status, text in the error message).
# `{get}` is the server's GET route, `{auth}` its Authorization header line.
CASES = [
    ("version 9.9", "GET {get} HTTP/9.9\r\n{auth}\r\n\r\n", 400, "malformed request line"),
    ("version 2.0", "GET {get} HTTP/2.0\r\n{auth}\r\n\r\n", 400, "malformed request line"),
    ("no version", "GET {get}\r\n{auth}\r\n\r\n", 400, "malformed request line"),
    ("garbage line", "GARBAGE\r\n\r\n", 400, "malformed request line"),
    ("target not a path", "GET status HTTP/1.1\r\n{auth}\r\n\r\n", 400, "malformed request line"),
    ("header without colon", "GET {get} HTTP/1.1\r\n{auth}\r\nno-colon-here\r\n\r\n", 400, "malformed header line"),
    ("space in header name", "GET {get} HTTP/1.1\r\n{auth}\r\nBad Name: x\r\n\r\n", 400, "malformed header line"),
    ("request line too long", "GET /" + LONG + " HTTP/1.1\r\n{auth}\r\n\r\n", 414, "request line too long"),
    ("header line too long", "GET {get} HTTP/1.1\r\n{auth}\r\nX-Pad: " + LONG + "\r\n\r\n", 431, "too large"),
    ("too many headers", "GET {get} HTTP/1.1\r\n{auth}\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(101)) + "\r\n",
     431, "too large"),
    ("Content-Length word", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: many\r\n\r\n", 400,
     "malformed Content-Length"),
    ("Content-Length +2", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: +2\r\n\r\n{{}}", 400,
     "malformed Content-Length"),
    ("Content-Length 0_2", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: 0_2\r\n\r\n{{}}", 400,
     "malformed Content-Length"),
    ("Content-Length -5", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: -5\r\n\r\n", 400,
     "malformed Content-Length"),
    ("body too large", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: 1000000000000\r\n\r\n", 413,
     "request body over"),
    ("chunk size ZZZ", "GET {get} HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n{{}}\r\n0\r\n\r\n",
     400, "chunk"),
    ("chunk size -5", "GET {get} HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n{{}}\r\n0\r\n\r\n",
     400, "chunk"),
    ("chunk size line too long",
     "GET {get} HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n" + HEX_LONG + "\r\nx\r\n0\r\n\r\n", 400, "chunk"),
    # issue 16: strict headers
    ("NUL in a header", "GET {get} HTTP/1.1\r\n{auth}\r\nX-A: a\x00b\r\n\r\n", 400, "malformed header line"),
    ("NUL in the target", "GET {get}\x00 HTTP/1.1\r\n{auth}\r\n\r\n", 400, "malformed request line"),
    ("conflicting Content-Length", "POST {get} HTTP/1.1\r\n{auth}\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}",
     400, "conflicting content-length"),
    ("two Authorization headers", "GET {get} HTTP/1.1\r\n{auth}\r\n{auth}\r\n\r\n", 400, "conflicting authorization"),
    ("chunked and Content-Length",
     "GET {get} HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n",
     400, "chunk"),
]


@pytest.mark.parametrize("case, head, status, message", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_json_reply_and_close(server, case, head, status, message):
    ((got, headers, body),) = exchange(server.port, head.format(get=server.get_path, auth=server.auth).encode())
    assert got == status, body
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert message.lower() in json.loads(body)[server.error_key].lower()


def test_valid_chunked_body(server):
    """The local network takes chunked bodies (aiohttp may send them); the webserver says it takes none."""
    head = f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\n{{}}\r\n0\r\n\r\n"
    ((status, headers, body),) = exchange(server.port, head.encode())
    if server.name == "localnet":
        assert status == 200 and headers["connection"] == "keep-alive"
    else:
        assert status == 400 and "chunked request bodies are not supported" in json.loads(body)["error"]


def test_405_names_allowed_methods(server):
    ((status, headers, body),) = exchange(server.port, f"DELETE {server.get_path} HTTP/1.1\r\n{server.auth}\r\n"
                                                       "Content-Length: 0\r\n\r\n".encode())
    assert status == 405
    assert headers["allow"] == "GET"
    assert "GET" in json.loads(body)[server.error_key]


def test_unknown_path_is_404(server):
    ((status, _, body),) = exchange(server.port, f"GET /no/such/route HTTP/1.1\r\n{server.auth}\r\n\r\n".encode())
    assert status == 404 and json.loads(body)[server.error_key]


def test_keep_alive_and_http10(server):
    request = f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\n\r\n".encode()
    answers = exchange(server.port, request * 3, responses=3)  # pipelined on one connection
    assert [a[0] for a in answers] == [200, 200, 200]
    assert all(a[1].get("connection", "keep-alive") == "keep-alive" for a in answers)
    ((status, headers, _),) = exchange(server.port, f"GET {server.get_path} HTTP/1.0\r\n{server.auth}\r\n\r\n".encode())
    assert status == 200 and headers["connection"] == "close"


def test_stale_keep_alive_connection_is_retried_once(server):
    """HTTPConnection (the one client of both servers) retries a kept-alive connection the server closed."""
    connection = rog.HTTPConnection("127.0.0.1", server.port)
    name, _, value = server.auth.partition(": ")
    try:
        assert connection.request("GET", server.get_path, {name: value}, None)[0] == 200
        connection._sock.shutdown(socket.SHUT_RD)  # as if the server had closed it while idle
        assert connection.request("GET", server.get_path, {name: value}, None)[0] == 200
    finally:
        connection.close()


def test_stale_keep_alive_against_a_closing_server():
    """A server that closes every connection after one answer without saying so: each request still succeeds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    served = []

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                served.append(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    connection = rog.HTTPConnection("127.0.0.1", listener.getsockname()[1])
    try:
        assert connection.request("GET", "/", {}, None) == (200, b"{}")
        thread.join(0.5)  # the server has closed the kept-alive connection
        assert connection.request("GET", "/", {}, None) == (200, b"{}")
    finally:
        connection.close()
        listener.close()
        thread.join(5)
    assert len(served) == 2 and not thread.is_alive()
    assert os.getpid()  # nothing started: nothing to stop


# ---- issue 16 (HTTP part) ------------------------------------------------------------------


def test_token_is_checked_before_the_body_is_read(server):
    """A stranger announcing a large body is answered 401 at once: the server never waits for (or reads) it."""
    head = f"POST {server.json_path} HTTP/1.1\r\nContent-Length: 900000\r\n\r\n".encode()
    ((status, headers, body),) = exchange(server.port, head)  # no body sent: a server that waited would time out
    assert status == 401 and headers["connection"] == "close"
    assert headers.get("www-authenticate", "Bearer").startswith("Bearer")
    message = json.loads(body)[server.error_key]
    assert str(server.datadir) not in message  # no file path for strangers


def test_unknown_path_without_key_is_401_not_404(server):
    ((status, _, body),) = exchange(server.port, b"GET /no/such/route HTTP/1.1\r\n\r\n")
    assert status == 401 and json.loads(body)[server.error_key]


def test_deeply_nested_json_is_400(server):
    body = b"[" * 100_000
    head = f"POST {server.json_path} HTTP/1.1\r\n{server.auth}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    ((status, _, answer),) = exchange(server.port, head + body)
    assert status == 400
    assert "nested too deeply" in json.loads(answer)[server.error_key]
    assert exchange(server.port, f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\n\r\n".encode())[0][0] == 200


def test_connection_cap(server):
    """One connection over the cap is answered 503 and closed; the others are served on."""
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(server.max_connections)]
    try:
        ((status, headers, body),) = exchange(server.port, f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\n\r\n".encode())
        assert status == 503 and headers["connection"] == "close"
        assert "too many connections" in json.loads(body)[server.error_key]
        sockets[0].sendall(f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\n\r\n".encode())
        assert sockets[0].recv(12).startswith(b"HTTP/1.1 200")
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_a_slow_request_is_closed_after_the_read_timeout(localnet_server, webserver_server):
    """A request whose body never completes (a slowloris) does not hold a connection: both servers close it."""
    def stalled(server: Server) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=server.read_timeout * 3) as s:
            s.sendall(f"GET {server.get_path} HTTP/1.1\r\n{server.auth}\r\nContent-Length: 10\r\n\r\n{{".encode())
            try:
                return s.recv(100)  # b"": closed by the server
            except ConnectionResetError:
                return b""

    results: dict = {}
    threads = [threading.Thread(target=lambda srv=srv: results.__setitem__(srv.name, stalled(srv)))
               for srv in (localnet_server, webserver_server)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"localnet": b"", "webserver": b""}


NODES = "/clusters/c16/nodes"


@pytest.mark.parametrize("path, body, field", [
    (NODES, {"count": None}, "'count'"),
    (NODES, {"tags": None}, "'tags'"),
    (NODES, {"provider_parameters": None}, "'provider_parameters'"),
    (NODES, {"count": "2"}, "'count'"),
    (NODES, {"count": True}, "'count'"),
    (NODES, {"provider_parameters": {"node_start_timeout": "abc"}}, "provider_parameters.node_start_timeout"),
    (NODES, {"provider_parameters": {"node_start_timeout": [1]}}, "provider_parameters.node_start_timeout"),
    (NODES, {"node_config": {}}, "node_config.demand: Either the `image_tag` or `image_hash` is required"),
    (NODES, {"node_config": {"demand": {"image_tag": 7}}}, "node_config.demand.image_tag"),
    (NODES + "/node1/tags", {"tags": None}, "'tags'"),
    ("/shutdown", {"force": None}, "'force'"),
    ("/shutdown", {"keep_clusters": "yes"}, "'keep_clusters'"),
    ("/shutdown", {"force": True, "keep_clusters": True}, "keep_clusters: not together with force"),
])
def test_body_fields_reject_null_and_wrong_types(webserver_server, path, body, field):
    """Every body field is checked before anything happens: a 400 naming it, no cluster registered."""
    client = rog.WebserverClient(str(webserver_server.datadir), webserver_server.port)
    try:
        with pytest.raises(rog.UsageError) as error:
            client.request("POST", path, body)
        assert field in str(error.value)
        assert "c16" not in client.request("GET", "/clusters")["clusters"]
        assert client.request("GET", "/status")["state"] == "running"
    finally:
        client.close()


def test_database_side_files_are_private(webserver_server, tmp_path):
    with rog.Store(str(tmp_path / "d")) as store:
        store.record_provider("0x" + "ab" * 20, "p")
        names = [n for n in os.listdir(tmp_path / "d") if n.startswith(rog.DB_FILENAME)]
        assert {f"{rog.DB_FILENAME}-wal", f"{rog.DB_FILENAME}-shm"} <= set(names)
        assert all(os.stat(tmp_path / "d" / n).st_mode & 0o777 == 0o600 for n in names)
    side = [webserver_server.datadir / n for n in os.listdir(webserver_server.datadir) if n.startswith(rog.DB_FILENAME)]
    assert len(side) == 3 and all(p.stat().st_mode & 0o777 == 0o600 for p in side)
