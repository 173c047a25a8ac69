#!/usr/bin/env python3
"""The local Golem network: a yagna-compatible REST daemon and a simulated provider population.

Runs as its own process (`python golem_localnet.py serve ...`). The unmodified
golem-core must not be able to tell it from yagna; see
docs/yagna-behaviour.md (a bare `§N` in a comment is a section of it). `ray_on_golem.py` never
imports this file, it only starts it. Standard library only on the server side.

Sections, in dependency order:

    1.  Constants and clock         time scale, timestamps
    2.  HTTP                        asyncio HTTP/1.1 server, handler class, JSON errors
    3.  Population                  seeded provider profiles, offers, behaviours
    4.  Identity                    /me, app key
    5.  Market                      demands, offers, proposals, negotiation, agreements
    6.  Activities                  sandboxed process groups, ExeScript
    7.  Net                         VPN networks, TCP-over-WebSocket bridge
    8.  Payments                    allocations, debit notes, invoices
    9.  Routes                      the route table: method + path -> handler method
    10. CLI                         `serve`, `population`

How the sections meet: a section that owns state defines a *part* (`Population`,
`Identity`, `Market`, `Payments`, ...) that `Localnet` (section 9) holds as an
attribute, and a *routes mixin* (`MarketRoutes`, ...) whose methods are the HTTP
handlers. Section 9 composes the mixins into `LocalnetHandler` and maps
method + path onto handler names in `ROUTES`, a plain list.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import operator
import os
import random
import re
import secrets
import signal
import sys
import time
import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

###############################################################################
# 1. Constants and clock ######################################################
###############################################################################

VERSION = "0.1.0"
YAGNA_VERSION = "0.17.6"  # the version whose behaviour we copy (docs/yagna-behaviour.md)
DEFAULT_HOST = "127.0.0.1"
READY_LINE = "golem-localnet listening on {url}"
APPKEY_ENV = "YAGNA_APPKEY"
APPKEY_FILE = "appkey"
STATE_FILE = "localnet.json"

# yagna's long-poll defaults: payment events 5 s (DEFAULT_EVENT_TIMEOUT, docs/yagna-behaviour.md §2);
# market events take `timeout` from the query; agreement wait is capped below golem-core's
# 16 s client timeout (§3).
PAYMENT_EVENT_TIMEOUT_S = 5.0
MARKET_EVENT_TIMEOUT_S = 5.0
MAX_LONG_POLL_S = 15.0
MARKET_MAX_EVENTS_DEFAULT = 20  # yagna MARKET_MAX_EVENTS_DEFAULT (docs/yagna-behaviour.md §2)
MARKET_MAX_EVENTS_MAX = 100
MAX_BODY_BYTES = 16 * 1024 * 1024

# platform -> (driver, network, token): the local platform plus the real names yagna
# 0.17.6 lists (docs/yagna-behaviour.md §5), so golem-core's defaults (holesky) work unchanged.
PAYMENT_PLATFORMS: dict[str, tuple[str, str, str]] = {
    "erc20-local-tglm": ("erc20", "local", "tGLM"),
    "erc20-holesky-tglm": ("erc20", "holesky", "tGLM"),
    "erc20-hoodi-tglm": ("erc20", "hoodi", "tGLM"),
    "erc20-sepolia-tglm": ("erc20", "sepolia", "tGLM"),
    "erc20-amoy-tglm": ("erc20", "amoy", "tGLM"),
    "erc20-polygon-glm": ("erc20", "polygon", "GLM"),
    "erc20-mainnet-glm": ("erc20", "mainnet", "GLM"),
}
DEFAULT_PAYMENT_PLATFORM = "erc20-local-tglm"


def utcnow() -> datetime:
    """Timezone-aware now, microsecond precision (golem-core compares with aware datetimes)."""
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    """RFC 3339 with zone and at most microseconds: golem-core echoes it back truncated to µs,
    so anything finer would make a strict `afterTimestamp` repeat events forever (§3)."""
    return ts.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_iso(text: str, field: str) -> datetime:
    """Parse an RFC 3339 timestamp from a request; naive ones are taken as UTC."""
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "+"))
    except (ValueError, AttributeError):
        raise HttpError(400, f"{field}: not an RFC 3339 timestamp: {text!r}") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts


def json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


class Clock:
    """Simulated time for provider behaviour (offer discovery, answer latency).

    Timestamps handed to clients stay real UTC time (golem-core compares them with
    its own clock); only *delays* of the simulated providers are divided by the time
    scale, so `--time-scale 60` turns a 5-minute market scan into 5 seconds.
    """

    def __init__(self, time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise ValueError("time scale must be > 0")
        self.time_scale = time_scale
        self._start = time.monotonic()
        self.started_at = utcnow()
        self._last_event = self.started_at

    def sim_elapsed(self) -> float:
        """Simulated seconds since the network started."""
        return (time.monotonic() - self._start) * self.time_scale

    def real_delay(self, sim_seconds: float) -> float:
        return max(0.0, sim_seconds) / self.time_scale

    def event_now(self) -> datetime:
        """A strictly increasing timestamp for event logs: with strict `afterTimestamp`
        two events in the same microsecond would lose one."""
        now = utcnow()
        if now <= self._last_event:
            now = self._last_event + timedelta(microseconds=1)
        self._last_event = now
        return now


def new_id(prefix: str = "") -> str:
    """Opaque hex ids (yagna uses hex; golem-core path-quotes ids with no safe chars, §1)."""
    return prefix + uuid.uuid4().hex


def node_id_from(seed_text: str) -> str:
    """A deterministic 0x-prefixed 20-byte node id."""
    return "0x" + hashlib.sha256(seed_text.encode()).hexdigest()[:40]


###############################################################################
# 2. HTTP #####################################################################
###############################################################################


class HttpError(Exception):
    """An error answered as JSON `{"message": ...}`: golem-core does
    `json.loads(e.body)["message"]` on errors (docs/yagna-behaviour.md §1)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. `Allow` of a 405


_REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 413: "Payload Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}
MAX_REQUEST_LINE = 64 * 1024  # the request line (414 beyond), one header line (431) or chunk-size line (400)
MAX_REQUEST_HEADERS = 100  # header lines (431 beyond), as http.server
MAX_CONNECTIONS = 512  # open client connections; one more is answered 503 and closed
KEEPALIVE_IDLE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this
REQUEST_READ_TIMEOUT = 30.0  # a started request must arrive whole within this
# Request headers: no control characters but tab (NUL, CR, ...); these may come once (a repeat with
# another value is a 400: two parsers could read different bodies or identities).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SINGLE_HEADERS = ("content-length", "transfer-encoding", "host")


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: Any = None  # (reader, writer): for a handler that upgrades the connection (WebSocket)

    def json(self) -> Any:
        """The body as JSON; malformed JSON is the client's fault (400)."""
        if not self.body.strip():
            raise HttpError(400, "request body: expected JSON, got nothing")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body: malformed JSON: {e}") from None
        except RecursionError:
            raise HttpError(400, "request body: malformed JSON: nested too deeply") from None

    def json_object(self) -> dict:
        data = self.json()
        if not isinstance(data, dict):
            raise HttpError(400, "request body: expected a JSON object")
        return data

    def query_float(self, name: str, default: float, lo: float = 0.0, hi: float = 1e9) -> float:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise HttpError(400, f"query parameter {name}: not a number: {raw!r}") from None
        if not lo <= value <= hi or value != value:
            raise HttpError(400, f"query parameter {name}: must be in [{lo}, {hi}]")
        return value

    def query_int(self, name: str, default: int, lo: int = 0, hi: int = 10**9) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(400, f"query parameter {name}: not an integer: {raw!r}") from None
        if not lo <= value <= hi:
            raise HttpError(400, f"query parameter {name}: must be in [{lo}, {hi}]")
        return value


@dataclasses.dataclass
class Response:
    status: int = 200
    body: Any = None  # JSON-able; None with 200 is sent as `null`, as yagna does
    content_type: str = "application/json"
    raw: bytes | None = None
    upgraded: bool = False  # the handler took the connection over (WebSocket): write nothing
    headers: dict[str, str] | None = None  # extra response headers (`Allow` of a 405)

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if self.status == 204:
            return b""
        return json_text(self.body).encode()


class Signal:
    """Wakes long-polls waiting on a piece of state. A waiting poll is a parked
    coroutine with a timer: it costs no CPU until notified or timed out."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass


async def long_poll(
    signal_: Signal,
    take: Callable[[], Any],
    timeout: float,
    next_due: Callable[[], float | None] | None = None,
) -> Any:
    """Block until `take()` returns something truthy or `timeout` seconds pass.

    golem-core's event loops call again with no sleep (docs/yagna-behaviour.md §2): answering
    `[]` at once would make it spin, so an empty answer only ever comes at the deadline.
    `next_due()` (seconds until some scheduled state change) shortens a wait that
    would otherwise sleep past it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = take()
        remaining = deadline - loop.time()
        if result or remaining <= 0:
            return result
        wait = remaining
        if next_due is not None:
            due = next_due()
            if due is not None:
                wait = min(wait, max(due, 0.001))
        await signal_.wait(wait)


class HttpHandler:
    """Base of the handler class: one instance per request, like http.server's
    BaseHTTPRequestHandler; subclasses add behaviour by adding route methods."""

    def __init__(self, net: "Localnet", request: Request, params: dict[str, str]) -> None:
        self.net = net
        self.request = request
        self.params = params

    # -- helpers for route methods --
    @staticmethod
    def ok(body: Any = None, status: int = 200) -> Response:
        return Response(status, body)

    @staticmethod
    def no_content() -> Response:
        return Response(204)

    def not_implemented(self) -> Response:
        """Spec endpoints golem-core 0.7.8 never calls (docs/yagna-behaviour.md §1)."""
        raise HttpError(501, f"{self.request.method} {self.request.path} is not implemented by golem-localnet")


class Router:
    """The route table as data: (METHOD, "/path/{param}", "handler_method_name")."""

    _PARAM = re.compile(r"\{(\w+)\}")

    def __init__(self, routes: Iterable[tuple[str, str, str]]) -> None:
        self.routes: list[tuple[str, re.Pattern, str]] = []
        for method, pattern, name in routes:
            rx = "^" + self._PARAM.sub(r"(?P<\1>[^/]+)", re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}")) + "$"
            self.routes.append((method, re.compile(rx), name))

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        allowed = []
        for route_method, rx, name in self.routes:
            m = rx.match(path)
            if m:
                if route_method == method:
                    return name, {k: unquote(v) for k, v in m.groupdict().items()}
                allowed.append(route_method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise HttpError(405, f"method {method} not allowed on {path}; allowed: {methods}", {"Allow": methods})
        raise HttpError(404, f"no such endpoint: {method} {path}")


class HttpServer:
    """A small asyncio HTTP/1.1 server with keep-alive (golem-core's aiohttp pool reuses
    connections). It parses each request once and hands it to `dispatch`.

    ray_on_golem.py's HttpTransport keeps a copy of this parser (the two files never import
    each other); tests/test_http_core.py runs one table of requests against both.
    """

    def __init__(self, dispatch: Callable[[Request], Any], authorize: Callable[[Request], None] | None = None) -> None:
        self.dispatch = dispatch
        # Raises HttpError(401) before any body byte is read: a stranger's body is never read.
        self.authorize = authorize
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        # writer -> (timeout, since) while waiting for the client, None while handling a request.
        self._waiting: dict = {}
        self._reaper: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve_connection, host, port, limit=256 * 1024)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_connections())
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= MAX_CONNECTIONS:
            try:
                await self.send_error(writer, HttpError(503, f"too many connections (at most {MAX_CONNECTIONS})"))
            except ConnectionError:
                pass
            writer.close()
            return
        self._connections.add(task)
        waiting, clock = self._waiting, asyncio.get_running_loop().time
        try:
            while True:
                # Timeouts are the reaper's job (one task, not a timer per request): see _reap_connections.
                waiting[writer] = (KEEPALIVE_IDLE_TIMEOUT, clock())
                try:
                    parsed = await self._read_request(reader, lambda: waiting.__setitem__(
                        writer, (REQUEST_READ_TIMEOUT, clock())))
                except HttpError as error:
                    await self.send_error(writer, error)
                    break
                if parsed is None:
                    break
                request, keep_alive = parsed
                request.connection = (reader, writer)
                waiting[writer] = None  # handling (long-polls, WebSocket bridges): never reaped
                response = await self.dispatch(request)
                if response.upgraded:
                    break
                self._write_response(writer, response, keep_alive)
                await writer.drain()
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            waiting.pop(writer, None)
            try:
                writer.close()
            except Exception:
                pass

    async def _reap_connections(self) -> None:
        """Close connections idle past KEEPALIVE_IDLE_TIMEOUT or slower than REQUEST_READ_TIMEOUT to send a request."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for writer, since in list(self._waiting.items()):
                if since is not None and now - since[1] > since[0]:
                    writer.close()

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader, too_long: HttpError) -> bytes:
        """One CRLF line (b"" at EOF); `too_long` beyond MAX_REQUEST_LINE bytes."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise too_long from None
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return b""
        if len(line) > MAX_REQUEST_LINE:
            raise too_long
        return line

    async def _read_request(self, reader: asyncio.StreamReader, started: Callable[[], None]) -> tuple[Request, bool] | None:
        """Parse one request (None: the client closed between requests); HttpError for a bad one.
        `started()` once its first line came.

        The checks, in order: request line (414, 400, version), header lines (431, 400: control
        characters, a repeated Content-Length that differs or a second Authorization), the body's framing
        (Content-Length or chunked), the size (413) and the key (401, `authorize`), both before any body
        byte is read.
        """
        line = await self._read_line(reader, HttpError(414, "request line too long"))
        if not line:
            return None
        started()
        try:
            method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
        except ValueError:
            raise HttpError(400, "malformed request line") from None
        if (version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/") or not method
                or _CONTROL_CHARACTERS.search(target)):
            raise HttpError(400, "malformed request line")
        headers: dict[str, str] = {}
        while True:
            hline = await self._read_line(reader, HttpError(431, "request head too large"))
            if not hline:
                raise ConnectionResetError("the client closed the connection within the request head")
            if hline in (b"\r\n", b"\n"):
                break
            if len(headers) >= MAX_REQUEST_HEADERS:
                raise HttpError(431, "request head too large")
            name, sep, value = hline.decode("latin-1").rstrip("\r\n").partition(":")
            if not sep or not name or name != name.strip() or " " in name or _CONTROL_CHARACTERS.search(name + value):
                raise HttpError(400, "malformed header line")
            name, value = name.lower(), value.strip()
            if name in headers:
                if name in _SINGLE_HEADERS and headers[name] != value or name == "authorization":
                    raise HttpError(400, f"conflicting {name} headers")
                value = headers[name] if name in _SINGLE_HEADERS else f"{headers[name]}, {value}"
            headers[name] = value
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        chunked = "transfer-encoding" in headers
        if chunked:
            if headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers:
                raise HttpError(400, "unsupported Transfer-Encoding (chunked alone is)")
            length = 0
        else:
            length_text = headers.get("content-length", "0")
            if not length_text.isdigit() or not length_text.isascii():
                raise HttpError(400, "malformed Content-Length")
            length = int(length_text)
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        request = Request(method.upper(), split.path, query, headers, b"")
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        if self.authorize is not None:
            self.authorize(request)
        if chunked:
            request.body = await self._read_chunked(reader)
        elif length:
            request.body = await reader.readexactly(length)
        return request, keep_alive

    @classmethod
    async def _read_chunked(cls, reader: asyncio.StreamReader) -> bytes:
        chunks = []
        total = 0
        while True:
            line = await cls._read_line(reader, HttpError(400, "malformed chunk size: line too long"))
            size_text = line.split(b";")[0].strip()
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise HttpError(400, f"malformed chunk size: {size_text[:20].decode('latin-1')!r}")
            size = int(size_text, 16)
            if size == 0:
                while (await cls._read_line(reader, HttpError(400, "malformed chunk trailer"))) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
            chunks.append(await reader.readexactly(size))
            if (await reader.readexactly(2)) != b"\r\n":
                raise HttpError(400, "malformed chunk: no CRLF after its data")

    async def send_error(self, writer: asyncio.StreamWriter, error: HttpError) -> None:
        """The one error exit of the parser: JSON `{"message": ...}` (what golem-core reads), connection closed."""
        self._write_response(writer, Response(error.status, {"message": error.message}, headers=error.headers), False)
        await writer.drain()

    @staticmethod
    def _write_response(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
        payload = response.encode()
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}",
            f"Content-Length: {len(payload)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            "Server: golem-localnet",
        ]
        if response.status != 204:
            head.append(f"Content-Type: {response.content_type}")
        head += [f"{name}: {value}" for name, value in (response.headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)


###############################################################################
# 3. Population ###############################################################
###############################################################################

# The profile format (JSON, or YAML when the file ends in .yaml/.yml and PyYAML is
# installed). Every key is optional; missing keys take the values of DEFAULT_PROFILE.
#
#   providers: 40              # population size (the CLI's --providers overrides it)
#   seed: 1                    # the CLI's --seed overrides it
#   sizes:                     # machine shapes, drawn by weight
#     - {weight: 4, cpu_threads: 4, mem_gib: 8, storage_gib: 40}
#   prices:                    # GLM, drawn uniformly in [lo, hi] per provider
#     cpu_per_hour: [0.01, 0.2]        # -> golem.usage.cpu_sec coefficient
#     duration_per_hour: [0.0, 0.05]   # -> golem.usage.duration_sec coefficient
#     start: [0.0, 0.01]               # initial price (the last coefficient)
#   subnets: {public: 1.0}     # golem.node.debug.subnet, drawn by weight
#   payment_platforms: [erc20-local-tglm, erc20-holesky-tglm]
#   agreement_limit: 1         # yagna provider default (max_agreements.rs)
#   latency_s: [0.05, 1.0]     # simulated seconds before a provider answers
#   slow_latency_s: [10, 40]   # latency of the `slow` behaviour
#   discovery_s: 300           # offers reach the market within this many simulated seconds
#   known_at_start: 0.4        # share of offers already on the market at start
#   behaviours:                # share of providers with each behaviour (the rest: ok)
#     busy: 0.1                # "No capacity available. Reached Agreements limit: N"
#     outbound_rules: 0.05     # rejects demands asking for outbound access (manifest)
#     no_answer: 0.05          # never answers a counter-proposal (requestor times out)
#     unreachable: 0.05        # counter-proposal POST answers 500 with the GSB error
#     reject_agreement: 0.05   # rejects the agreement (wait -> 410 "Rejected")
#     slow: 0.05               # answers after slow_latency_s
#   activity_faults:           # share of providers whose activities fail (drawn from the seed,
#     deploy_fails: 0.02       #   apart from the draws above): every deploy fails,
#     dies: 0.02               #   activities die dies_after_s simulated seconds after creation,
#     stops_answering: 0.02    #   the exe-unit stops answering (500 GSB error) after that time,
#     sshd_never_answers: 0.02 #   the node runs but its sshd never answers (VPN to port 22 is silent)
#     dies_after_s: [600, 7200]
#     stops_answering_after_s: [600, 7200]
#   explicit:                  # exact providers placed first (any Provider field)
#     - {name: my-provider, cpu_threads: 8, behaviour: ok}
#     # billing misbehaviour, explicit providers only: usage counters (hence debit notes and
#     # the invoice) multiplied by inflate_billing; debit notes every debit_note_interval_s
#     # real seconds instead of the agreed interval (tests get notes without waiting minutes)
#     - {name: greedy, inflate_billing: 10, debit_note_interval_s: 2}
#     # and a shorter window to accept each debit note than the agreed one (real seconds), after
#     # which the provider terminates the agreement
#     - {name: strict, debit_note_interval_s: 2, debit_note_accept_timeout_s: 5}
#   wallet_tglm: 1000          # the requestor's local wallet starts funded with this much tGLM
#
# The same seed and profile always give the same population (`population --json`).

BEHAVIOURS = ("ok", "busy", "outbound_rules", "no_answer", "unreachable", "reject_agreement", "slow")

DEFAULT_PROFILE: dict[str, Any] = {
    "providers": 40,
    "seed": 1,
    "sizes": [
        {"weight": 3, "cpu_threads": 2, "mem_gib": 4.0, "storage_gib": 20.0},
        {"weight": 5, "cpu_threads": 4, "mem_gib": 8.0, "storage_gib": 40.0},
        {"weight": 3, "cpu_threads": 8, "mem_gib": 16.0, "storage_gib": 80.0},
        {"weight": 2, "cpu_threads": 16, "mem_gib": 32.0, "storage_gib": 120.0},
        {"weight": 1, "cpu_threads": 32, "mem_gib": 64.0, "storage_gib": 250.0},
    ],
    "prices": {"cpu_per_hour": [0.01, 0.2], "duration_per_hour": [0.0, 0.05], "start": [0.0, 0.01]},
    "subnets": {"public": 1.0},
    "payment_platforms": ["erc20-local-tglm", "erc20-holesky-tglm"],
    "agreement_limit": 1,
    "latency_s": [0.05, 1.0],
    "slow_latency_s": [10.0, 40.0],
    "discovery_s": 300.0,
    "known_at_start": 0.4,
    "behaviours": {
        "busy": 0.1, "outbound_rules": 0.05, "no_answer": 0.05, "unreachable": 0.05,
        "reject_agreement": 0.05, "slow": 0.05,
    },
    "activity_faults": {},
    "explicit": [],
    "wallet_tglm": 1000,
}

RUNTIME_CAPABILITIES = ["inet", "vpn", "manifest-support", "start-entrypoint"]
USAGE_VECTOR = ["golem.usage.cpu_sec", "golem.usage.duration_sec"]
# The outbound rule messages of a provider with default rules (docs/yagna-behaviour.md §3,
# yagna agent/provider/src/rules/outbound.rs).
OUTBOUND_REJECTION = (
    "Outbound rejected because: Everyone rule didn't match whitelist ; "
    "Audited-Payload rule requires manifest signature ; Partner rule requires node descriptor ; "
)


DEBIT_NOTE_INTERVAL_KEY = "golem.com.scheme.payu.debit-note.interval-sec?"
PAYMENT_TIMEOUT_KEY = "golem.com.scheme.payu.payment-timeout-sec?"
MID_AGREEMENT_REQUIRED_FROM_S = 10 * 3600  # payment_timeout.rs: payment_timeout_required_duration
ACCEPT_TIMEOUT_KEY = "golem.com.payment.debit-notes.accept-timeout?"
ACCEPT_TIMEOUT_S = 240  # expiration.rs: debit_note_acceptance_deadline (4min)
MIN_EXPIRATION_S = 5 * 60  # expiration.rs limits (docs/yagna-behaviour.md §3)
MAX_EXPIRATION_S = 100 * 31_557_600
MAX_EXPIRATION_WITHOUT_DEADLINE_S = 30 * 60


def humantime(seconds: int) -> str:
    """A duration as Rust's humantime::format_duration writes it in provider messages
    ("1s", "2m 30s", "10h", "1day")."""
    parts = []
    for unit, size, plural in (("year", 31_557_600, True), ("month", 2_630_016, True), ("day", 86_400, True),
                               ("h", 3600, False), ("m", 60, False), ("s", 1, False)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}{'s' if plural and count > 1 else ''}")
    return " ".join(parts) or "0s"


def _chrono_display(ts: datetime) -> str:
    """chrono's Display of a DateTime<Utc> built from milliseconds: `2026-11-26 22:36:44.081 UTC`."""
    return ts.strftime("%Y-%m-%d %H:%M:%S") + (f".{ts.microsecond // 1000:03d}" if ts.microsecond else "") + " UTC"


def _rfc3339(ts: datetime) -> str:
    """chrono's to_rfc3339 (AutoSi fractions) for millisecond timestamps."""
    return ts.isoformat(timespec="milliseconds" if ts.microsecond else "seconds")


class ProfileError(ValueError):
    """A bad profile; the message names the field."""


@dataclasses.dataclass(slots=True)
class Provider:
    """One simulated provider node and its single VM offer."""

    index: int
    node_id: str
    name: str
    cpu_threads: int
    cpu_cores: int
    mem_gib: float
    storage_gib: float
    subnet: str
    cpu_sec_price: float
    duration_sec_price: float
    start_price: float
    behaviour: str = "ok"
    latency_s: float = 0.1
    agreement_limit: int = 1
    offer_at_s: float = 0.0  # simulated seconds after start when the offer reaches the market
    payment_platforms: tuple[str, ...] = ("erc20-local-tglm",)
    offer_id: str = ""
    approved_agreements: int = 0  # live (Approved) agreements, for the agreement limit
    # activity faults (section 6): probability that a deploy fails, seconds after creation
    deploy_fails: float = 0.0
    dies_after_s: float | None = None
    stops_answering_after_s: float | None = None
    sshd_never_answers: float = 0.0  # probability: the node's port 22 swallows bytes, answers none
    # billing (section 8): usage counters multiplied by this; debit notes on this interval
    inflate_billing: float = 1.0
    debit_note_interval_s: float | None = None
    debit_note_accept_timeout_s: float | None = None
    _properties: dict | None = None

    def offer_properties(self, created_ms: int) -> dict:
        """The flat offer properties of a yagna VM provider (docs/yagna-behaviour.md §3)."""
        if self._properties is None:
            props: dict[str, Any] = {
                "golem.activity.caps.transfer.protocol": ["gftp", "https", "http"],
                ACCEPT_TIMEOUT_KEY: ACCEPT_TIMEOUT_S,
                "golem.com.payment.protocol.version": 3,
                "golem.com.pricing.model": "linear",
                # usage-vector order, then the initial price (§3)
                "golem.com.pricing.model.linear.coeffs": [self.cpu_sec_price, self.duration_sec_price, self.start_price],
                "golem.com.scheme": "payu",
                "golem.com.scheme.payu.debit-note.interval-sec?": 120,
                "golem.com.scheme.payu.payment-timeout-sec?": 120,
                "golem.com.usage.vector": list(USAGE_VECTOR),
                "golem.inf.cpu.architecture": "x86_64",
                "golem.inf.cpu.cores": self.cpu_cores,
                "golem.inf.cpu.threads": self.cpu_threads,
                "golem.inf.mem.gib": self.mem_gib,
                "golem.inf.storage.gib": self.storage_gib,
                "golem.node.id.name": self.name,
                "golem.node.debug.subnet": self.subnet,
                "golem.node.net.is-public": False,
                "golem.runtime.name": "vm",
                "golem.runtime.version": "0.4.2",
                "golem.runtime.capabilities": list(RUNTIME_CAPABILITIES),
                "golem.srv.caps.multi-activity": True,
                "golem.srv.caps.payload-manifest": True,
                "golem.srv.comp.expiration": created_ms + 10 * 365 * 86400 * 1000,
            }
            for platform in self.payment_platforms:
                props[f"golem.com.payment.platform.{platform}.address"] = self.node_id
            self._properties = props
        return self._properties

    def offer_constraints(self, created_ms: int) -> str:
        # the provider agent's own constraints (provider_agent.rs:277-284)
        return f"(&\n  (golem.srv.comp.expiration>{created_ms})\n  (golem.node.debug.subnet={self.subnet})\n)"

    def describe(self) -> dict:
        """Everything a test needs to predict what the market will do with this provider."""
        return {
            "index": self.index, "node_id": self.node_id, "name": self.name,
            "cpu_threads": self.cpu_threads, "cpu_cores": self.cpu_cores, "mem_gib": self.mem_gib,
            "storage_gib": self.storage_gib, "subnet": self.subnet,
            "coeffs": [self.cpu_sec_price, self.duration_sec_price, self.start_price],
            "usage_vector": list(USAGE_VECTOR), "behaviour": self.behaviour,
            "latency_s": self.latency_s, "agreement_limit": self.agreement_limit,
            "offer_at_s": self.offer_at_s, "payment_platforms": list(self.payment_platforms),
            "deploy_fails": self.deploy_fails, "dies_after_s": self.dies_after_s,
            "stops_answering_after_s": self.stops_answering_after_s,
            "sshd_never_answers": self.sshd_never_answers,
            "inflate_billing": self.inflate_billing, "debit_note_interval_s": self.debit_note_interval_s,
            "debit_note_accept_timeout_s": self.debit_note_accept_timeout_s,
        }


def load_profile(path: str | None) -> dict:
    """Read a profile file (JSON or YAML) over DEFAULT_PROFILE."""
    profile = json.loads(json.dumps(DEFAULT_PROFILE))
    if path is None:
        return profile
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ProfileError(f"profile {path}: {e.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # optional: only for YAML profiles
        except ImportError:
            raise ProfileError(f"profile {path}: YAML needs PyYAML; use a .json profile") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ProfileError(f"profile {path}: invalid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ProfileError(f"profile {path}: invalid JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: expected a mapping at the top level")
    unknown = set(data) - set(DEFAULT_PROFILE)
    if unknown:
        raise ProfileError(f"profile {path}: unknown field(s): {', '.join(sorted(unknown))}")
    profile.update(data)
    return profile


def wallet_funds(profile: dict) -> Decimal:
    """`wallet_tglm` of the profile: the local wallet starts funded (no faucet to wait for)."""
    value = profile.get("wallet_tglm", DEFAULT_PROFILE["wallet_tglm"])
    try:
        funds = Decimal(str(value))
    except InvalidOperation:
        funds = Decimal(-1)
    if isinstance(value, bool) or not funds.is_finite() or funds < 0:
        raise ProfileError("profile field wallet_tglm: expected an amount >= 0")
    return funds


def _range(profile: dict, key: str) -> tuple[float, float]:
    value = profile[key] if key in profile else None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or value[0] > value[1] or value[0] < 0):
        raise ProfileError(f"profile field {key}: expected [low, high] with 0 <= low <= high")
    return float(value[0]), float(value[1])


def _weighted(rng: random.Random, items: list, weights: list[float]):
    return rng.choices(items, weights=weights, k=1)[0]


class Population:
    """The seeded provider population: the same seed and profile give the same providers."""

    def __init__(self, profile: dict, seed: int | None = None, providers: int | None = None) -> None:
        self.profile = profile
        self.seed = int(profile.get("seed", 1) if seed is None else seed)
        count = profile.get("providers") if providers is None else providers
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ProfileError("profile field providers: expected an integer >= 0")
        self.providers: list[Provider] = self._generate(count)
        self._assign_activity_faults()
        self.by_node_id: dict[str, Provider] = {p.node_id: p for p in self.providers}

    def _assign_activity_faults(self) -> None:
        """Activity faults by share, from a generator of their own so that adding faults to a
        profile leaves every other draw (and the market funnel) unchanged."""
        faults = self.profile.get("activity_faults") or {}
        known = {"deploy_fails", "dies", "stops_answering", "dies_after_s", "stops_answering_after_s",
                 "sshd_never_answers"}
        if not isinstance(faults, dict) or not set(faults) <= known:
            raise ProfileError(f"profile field activity_faults: keys must be among {', '.join(sorted(known))}")
        rng = random.Random(f"activity-faults:{self.seed}")
        explicit = len(self.profile.get("explicit") or [])
        for name, attr in (("deploy_fails", "deploy_fails"), ("dies", "dies_after_s"),
                           ("stops_answering", "stops_answering_after_s"),
                           ("sshd_never_answers", "sshd_never_answers")):
            share = faults.get(name, 0)
            if not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise ProfileError(f"profile field activity_faults.{name}: expected a share in [0, 1]")
            # deploy_fails and sshd_never_answers are shares only; the others also have a time range
            lo, hi = _range(faults, attr) if attr != name and attr in faults else (600.0, 7200.0)
            order = list(range(explicit, len(self.providers)))
            rng.shuffle(order)
            for idx in order[:round(share * len(self.providers))]:
                setattr(self.providers[idx], attr, 1.0 if name == attr else round(rng.uniform(lo, hi), 3))

    def _generate(self, count: int) -> list[Provider]:
        profile, rng = self.profile, random.Random(self.seed)
        sizes = profile.get("sizes")
        if not isinstance(sizes, list) or not sizes:
            raise ProfileError("profile field sizes: expected a non-empty list")
        for i, s in enumerate(sizes):
            if not isinstance(s, dict) or not {"cpu_threads", "mem_gib", "storage_gib"} <= set(s):
                raise ProfileError(f"profile field sizes[{i}]: needs cpu_threads, mem_gib, storage_gib")
        prices = profile.get("prices")
        if not isinstance(prices, dict):
            raise ProfileError("profile field prices: expected a mapping")
        cpu_r, dur_r, start_r = (_range(prices, k) for k in ("cpu_per_hour", "duration_per_hour", "start"))
        latency_r, slow_r = _range(profile, "latency_s"), _range(profile, "slow_latency_s")
        subnets = profile.get("subnets")
        if not isinstance(subnets, dict) or not subnets:
            raise ProfileError("profile field subnets: expected a non-empty mapping name -> weight")
        platforms = profile.get("payment_platforms")
        if not isinstance(platforms, list) or not platforms or not all(p in PAYMENT_PLATFORMS for p in platforms):
            raise ProfileError(f"profile field payment_platforms: expected a list from {sorted(PAYMENT_PLATFORMS)}")
        behaviours = profile.get("behaviours") or {}
        if not isinstance(behaviours, dict) or not set(behaviours) <= set(BEHAVIOURS):
            raise ProfileError(f"profile field behaviours: keys must be among {', '.join(BEHAVIOURS)}")
        limit = profile.get("agreement_limit", 1)
        if not isinstance(limit, int) or limit < 1:
            raise ProfileError("profile field agreement_limit: expected an integer >= 1")
        discovery = float(profile.get("discovery_s", 0))
        known = float(profile.get("known_at_start", 1.0))
        explicit = profile.get("explicit") or []
        if not isinstance(explicit, list):
            raise ProfileError("profile field explicit: expected a list")

        # behaviours by exact counts over a seeded shuffle, so tests can predict the funnel
        assigned = ["ok"] * count
        order = list(range(len(explicit), count))
        rng.shuffle(order)
        pos = 0
        for name in BEHAVIOURS:
            share = behaviours.get(name, 0)
            if not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise ProfileError(f"profile field behaviours.{name}: expected a share in [0, 1]")
            n = round(share * count)
            for idx in order[pos:pos + n]:
                assigned[idx] = name
            pos += n

        result = []
        subnet_names, subnet_weights = list(subnets), [float(w) for w in subnets.values()]
        size_weights = [float(s.get("weight", 1)) for s in sizes]
        for i in range(count):
            size = _weighted(rng, sizes, size_weights)
            behaviour = assigned[i]
            latency = rng.uniform(*(slow_r if behaviour == "slow" else latency_r))
            offer_at = 0.0 if rng.random() < known else rng.uniform(0, discovery)
            p = Provider(
                index=i,
                node_id="0x%040x" % rng.getrandbits(160),
                name=f"sim-{size['cpu_threads']}c-{i:04d}",
                cpu_threads=int(size["cpu_threads"]),
                cpu_cores=max(1, int(size["cpu_threads"]) // 2),
                mem_gib=float(size["mem_gib"]),
                storage_gib=float(size["storage_gib"]),
                subnet=_weighted(rng, subnet_names, subnet_weights),
                cpu_sec_price=round(rng.uniform(*cpu_r) / 3600, 12),
                duration_sec_price=round(rng.uniform(*dur_r) / 3600, 12),
                start_price=round(rng.uniform(*start_r), 6),
                behaviour=behaviour,
                latency_s=round(latency, 3),
                agreement_limit=limit,
                offer_at_s=round(offer_at, 3),
                payment_platforms=tuple(platforms),
            )
            if i < len(explicit):
                spec = explicit[i]
                if not isinstance(spec, dict):
                    raise ProfileError(f"profile field explicit[{i}]: expected a mapping")
                for key, value in spec.items():
                    if key not in ("name", "cpu_threads", "cpu_cores", "mem_gib", "storage_gib", "subnet",
                                   "cpu_sec_price", "duration_sec_price", "start_price", "behaviour",
                                   "latency_s", "agreement_limit", "offer_at_s", "node_id",
                                   "deploy_fails", "dies_after_s", "stops_answering_after_s",
                                   "sshd_never_answers", "inflate_billing", "debit_note_interval_s",
                                   "debit_note_accept_timeout_s"):
                        raise ProfileError(f"profile field explicit[{i}].{key}: unknown field")
                    if key in ("inflate_billing", "debit_note_interval_s", "debit_note_accept_timeout_s") and not (
                            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                        raise ProfileError(f"profile field explicit[{i}].{key}: expected a number > 0")
                    if key == "behaviour" and value not in BEHAVIOURS:
                        raise ProfileError(f"profile field explicit[{i}].behaviour: must be one of {', '.join(BEHAVIOURS)}")
                    setattr(p, key, value)
                if spec.get("behaviour") == "slow" and "latency_s" not in spec:
                    # drawn apart from the main sequence, which the other providers depend on
                    p.latency_s = round(random.Random(f"{self.seed}:slow:{i}").uniform(*slow_r), 3)
            # yagna's subscription id shape: <uuid hex>-<sha256 hex>
            digest = hashlib.sha256(f"offer:{self.seed}:{p.node_id}".encode()).hexdigest()
            p.offer_id = f"{digest[:32]}-{hashlib.sha256(digest.encode()).hexdigest()}"
            result.append(p)
        return result

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.providers]


###############################################################################
# 4. Identity #################################################################
###############################################################################


class Identity:
    """The requestor identity behind the app key (yagna: the default identity)."""

    def __init__(self, app_key: str, seed: int) -> None:
        self.app_key = app_key
        self.node_id = node_id_from(f"golem-localnet-requestor:{seed}")
        self.name = "golem-localnet"

    def check(self, request: Request) -> None:
        """yagna's auth middleware: Bearer header or `?authToken=` (docs/yagna-behaviour.md §1)."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.query.get("authToken")
        if not token:
            raise HttpError(401, "Missing application key")
        if not secrets.compare_digest(token.encode(), self.app_key.encode()):
            raise HttpError(401, "Invalid application key")


def load_app_key(datadir: str) -> str:
    """`YAGNA_APPKEY` if set, else DIR/appkey (0600, created once, reused afterwards)."""
    key = os.environ.get(APPKEY_ENV)
    if key:
        return key
    path = os.path.join(datadir, APPKEY_FILE)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if key:
            os.chmod(path, 0o600)
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
    return key


class IdentityRoutes(HttpHandler):
    async def get_me(self) -> Response:
        ident = self.net.identity
        return self.ok({"identity": ident.node_id, "name": ident.name, "role": "manager"})

    async def get_version(self) -> Response:
        return self.ok({"current": {"version": YAGNA_VERSION, "name": f"golem-localnet {VERSION}",
                                    "seen": False, "releaseTs": iso(self.net.clock.started_at),
                                    "insertionTs": iso(self.net.clock.started_at), "updateTs": None},
                        "pending": None})

    async def get_root(self) -> Response:
        # RoG's liveness check is a bare GET of the API URL: any answer counts (§1)
        return self.ok({"name": "golem-localnet", "version": VERSION})


###############################################################################
# 5. Market ###################################################################
###############################################################################

# --- constraints: golem-core's grammar, yagna's matching semantics (§3) ---


class ConstraintError(ValueError):
    pass


_NAME_RX = re.compile(r"[\w!\-]+(?:\.[\w!\-]+)*")
_OPS = ("<=", ">=", "=", "<", ">")
_VALUE_RX = re.compile(r"[\sa-zA-Z0-9_.*/\\:;-]+")  # golem-core's parser.tx Value


def parse_constraints(text: str) -> tuple:
    """Parse an LDAP-style constraint string into a tree:
    ("&"|"|"|"!", [children]) or ("leaf", name, op, value)."""
    if not isinstance(text, str):
        raise ConstraintError("constraints must be a string")
    pos = 0
    n = len(text)

    def skip() -> None:
        nonlocal pos
        while pos < n and text[pos].isspace():
            pos += 1

    def node() -> tuple:
        nonlocal pos
        skip()
        if pos >= n or text[pos] != "(":
            raise ConstraintError(f"expected '(' at offset {pos}")
        pos += 1
        skip()
        if pos < n and text[pos] in "&|!":
            op = text[pos]
            pos += 1
            children = []
            skip()
            while pos < n and text[pos] == "(":
                children.append(node())
                skip()
            if pos >= n or text[pos] != ")":
                raise ConstraintError(f"expected ')' at offset {pos}")
            pos += 1
            if op == "!" and len(children) != 1:
                raise ConstraintError("'!' takes exactly one operand")
            return (op, children)
        m = _NAME_RX.match(text, pos)
        if not m:
            raise ConstraintError(f"expected a property name at offset {pos}")
        name = m.group(0)
        pos = m.end()
        skip()
        for op in _OPS:
            if text.startswith(op, pos):
                pos += len(op)
                break
        else:
            raise ConstraintError(f"expected one of = < <= > >= at offset {pos}")
        end = text.find(")", pos)
        if end < 0:
            raise ConstraintError("unterminated constraint")
        value = text[pos:end].strip()
        if value.startswith("[") and value.endswith("]"):
            value = [v.strip() for v in value[1:-1].split(",")]
            bad = [v for v in value if not _VALUE_RX.fullmatch(v)]
        else:
            bad = [] if _VALUE_RX.fullmatch(value) else [value]
        if bad:
            raise ConstraintError(f"value {bad[0]!r} of {name} is outside golem-core's constraint grammar")
        pos = end + 1
        return ("leaf", name, op, value)

    tree = node()
    skip()
    if pos != n:
        raise ConstraintError(f"unexpected text at offset {pos}")
    return tree


_ORDER = {"=": operator.eq, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _compare(prop: Any, op: str, value: str) -> bool:
    if isinstance(prop, bool):
        v = value.lower()
        return op == "=" and v in ("true", "false") and prop == (v == "true")
    if isinstance(prop, (int, float)):
        number = _as_number(value)
        return number is not None and _ORDER[op](prop, number)
    if isinstance(prop, str):
        if op == "=" and "*" in value:
            return _wildcard(value).fullmatch(prop) is not None
        return _ORDER[op](prop, value)
    if isinstance(prop, list):
        # lists: `=` means contains; ordering is false (yagna resolver, §3)
        return op == "=" and any(_compare(item, "=", value) for item in prop)
    return False


@functools.lru_cache(maxsize=4096)
def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _wildcard(value: str) -> re.Pattern:
    return re.compile(".*".join(map(re.escape, value.split("*"))))


def evaluate(tree: tuple, props: dict) -> bool | None:
    """Three-valued: True, False or None (a missing property is "undefined", not a match)."""
    kind = tree[0]
    if kind == "leaf":
        _, name, op, value = tree
        if name not in props:
            return None
        if op == "=" and value == "*":
            return True
        prop = props[name]
        if isinstance(value, list):
            return all(_compare(prop, op, v) for v in value)
        return _compare(prop, op, value)
    if kind == "!":
        result = evaluate(tree[1][0], props)
        return None if result is None else not result
    # `&` is decided by the first False, `|` by the first True; otherwise any undefined
    # operand leaves the group undefined
    decisive = kind == "|"
    undefined = False
    for child in tree[1]:
        result = evaluate(child, props)
        if result is decisive:
            return decisive
        undefined = undefined or result is None
    return None if undefined else not decisive


def flatten_properties(props: dict, prefix: str = "") -> dict:
    """yagna flattens nested property objects into dotted keys on subscribe and counter (§3)."""
    flat: dict = {}
    for key, value in props.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_properties(value, full + "."))
        else:
            flat[full] = value
    return flat


# --- market state ---

# the enums of ya-aioclient's models: anything else kills golem-core's loops (§2)
PROPOSAL_STATES = ("Initial", "Draft", "Rejected", "Accepted", "Expired")
AGREEMENT_STATES = ("Proposal", "Pending", "Cancelled", "Rejected", "Approved", "Expired", "Terminated")


class Proposal:
    """A proposal in a negotiation: the provider's (offer side) or the requestor's (demand side)."""

    __slots__ = ("id", "demand", "provider", "from_requestor", "state", "properties", "constraints",
                 "prev_id", "timestamp", "countered", "agreement_id")

    def __init__(self, demand: "Demand", provider: Provider, from_requestor: bool, state: str,
                 properties: dict, constraints: str, prev_id: str | None) -> None:
        # the requestor's view of a negotiation: yagna prefixes every proposal id with R-
        self.id = "R-" + secrets.token_hex(32)
        self.demand = demand
        self.provider = provider
        self.from_requestor = from_requestor
        assert state in PROPOSAL_STATES, state
        self.state = state
        self.properties = properties
        self.constraints = constraints
        self.prev_id = prev_id
        self.timestamp = utcnow()
        self.countered = False
        self.agreement_id: str | None = None

    def issuer_id(self, market: "Market") -> str:
        return market.identity.node_id if self.from_requestor else self.provider.node_id

    def to_json(self, market: "Market") -> dict:
        data = {"properties": self.properties, "constraints": self.constraints, "proposalId": self.id,
                "issuerId": self.issuer_id(market), "state": self.state, "timestamp": iso(self.timestamp)}
        if self.prev_id is not None:
            data["prevProposalId"] = self.prev_id
        return data


class Demand:
    """A subscribed demand: its queue of negotiation events, taken on delivery (§2)."""

    def __init__(self, market: "Market", properties: dict, constraints: str, tree: tuple) -> None:
        self.id = f"{uuid.uuid4().hex}-{secrets.token_hex(32)}"
        self.properties = properties
        self.constraints = constraints
        self.tree = tree
        self.timestamp = utcnow()
        self.subscribed_sim_s = market.clock.sim_elapsed()
        self.subscribed_mono = time.monotonic()
        self.events: deque[dict] = deque()
        self.signal = Signal()
        # offers not yet due, as (due monotonic time, provider index), sorted by due time
        self.pending_offers: deque[tuple[float, int]] = deque()
        self.offers_delivered = 0
        self.offers_unmatched = 0
        self.proposals: dict[str, Proposal] = {}

    def to_json(self, market: "Market") -> dict:
        return {"properties": self.properties, "constraints": self.constraints, "demandId": self.id,
                "requestorId": market.identity.node_id, "timestamp": iso(self.timestamp)}


class Agreement:
    """An agreement and its state machine (docs/yagna-behaviour.md §3). Other sections read
    `state`, `provider`, `app_session_id`, `offer_properties`, `demand_properties` and
    `approved_at`, and can watch transitions through `Market.agreement_observers`."""

    def __init__(self, market: "Market", proposal: Proposal, valid_to: datetime) -> None:
        self.id = uuid.uuid4().hex + secrets.token_hex(16)
        self.proposal = proposal
        self.provider = proposal.provider
        self.demand_id = proposal.demand.id
        requestor = market.proposals[proposal.prev_id] if proposal.prev_id in market.proposals else None
        self.demand_properties = requestor.properties if requestor else proposal.demand.properties
        self.demand_constraints = requestor.constraints if requestor else proposal.demand.constraints
        self.offer_properties = proposal.properties
        self.offer_constraints = proposal.constraints
        self.valid_to = valid_to
        self.state = "Proposal"
        self.timestamp = utcnow()
        self.approved_at: datetime | None = None
        self.terminated_at: datetime | None = None
        self.terminate_reason: dict | None = None
        self.app_session_id: str | None = None
        self.signal = Signal()

    def to_json(self, market: "Market") -> dict:
        data = {
            "agreementId": self.id,
            "demand": {"properties": self.demand_properties, "constraints": self.demand_constraints,
                       "demandId": self.demand_id, "requestorId": market.identity.node_id,
                       "timestamp": iso(self.proposal.demand.timestamp)},
            "offer": {"properties": self.offer_properties, "constraints": self.offer_constraints,
                      "offerId": self.provider.offer_id, "providerId": self.provider.node_id,
                      "timestamp": iso(market.clock.started_at)},
            "validTo": iso(self.valid_to),
            "state": self.state,
            "timestamp": iso(self.timestamp),
        }
        if self.approved_at is not None:
            data["approvedDate"] = iso(self.approved_at)
            data["proposedSignature"] = data["approvedSignature"] = data["committedSignature"] = "NoSignature"
        if self.app_session_id is not None:
            data["appSessionId"] = self.app_session_id
        return data


class Market:
    """Demands, proposals, negotiation with the simulated providers, agreements."""

    def __init__(self, clock: Clock, population: Population, identity: Identity) -> None:
        self.clock = clock
        self.population = population
        self.identity = identity
        self.demands: dict[str, Demand] = {}
        self.unsubscribed: set[str] = set()
        self.proposals: dict[str, Proposal] = {}
        self.agreements: dict[str, Agreement] = {}
        # callables (agreement, old_state, new_state), e.g. invoices after termination
        self.agreement_observers: list[Callable[[Agreement, str, str], None]] = []
        self._offer_ms = ms(clock.started_at)
        self._offer_trees: dict[str, tuple] = {}
        self._offer_json: dict[int, str] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    # --- demands and offers ---
    def subscribe(self, properties: dict, constraints: str) -> Demand:
        try:
            tree = parse_constraints(constraints)
        except ConstraintError as e:
            raise HttpError(400, f"constraints: {e}") from None
        demand = Demand(self, properties, constraints, tree)
        # offers already on the market match at once; the rest arrive as they are
        # broadcast (P2P discovery), on the simulated clock
        now_sim = demand.subscribed_sim_s
        # ... in the order the node received them, the known ones included
        schedule = sorted(
            (max(0.0, p.offer_at_s - now_sim), p.offer_at_s, p.index) for p in self.population.providers)
        mono = demand.subscribed_mono
        demand.pending_offers = deque((mono + self.clock.real_delay(d), i) for d, _, i in schedule)
        self.demands[demand.id] = demand
        return demand

    def get_demand(self, demand_id: str) -> Demand:
        demand = self.demands.get(demand_id)
        if demand is None:
            raise HttpError(404, f"Subscription [{demand_id}] not found. Could be unsubscribed.")  # yagna 0.17.6
        return demand

    def unsubscribe(self, demand_id: str) -> None:
        demand = self.demands.get(demand_id)
        if demand is None:
            # yagna 0.17.6 on a repeated unsubscribe (recorded by the fidelity test)
            raise HttpError(404, f"Demand [{demand_id}] not found.")
        del self.demands[demand_id]
        self.unsubscribed.add(demand_id)
        demand.signal.notify()

    def offer_matches(self, demand: Demand, provider: Provider) -> bool:
        """Both directions must hold (yagna matcher, §3)."""
        props = provider.offer_properties(self._offer_ms)
        if evaluate(demand.tree, props) is not True:
            return False
        text = provider.offer_constraints(self._offer_ms)
        tree = self._offer_trees.get(text)
        if tree is None:
            tree = self._offer_trees[text] = parse_constraints(text)
        return evaluate(tree, demand.properties) is True

    def _release_due_offers(self, demand: Demand, limit: int) -> None:
        now = time.monotonic()
        pending = demand.pending_offers
        while pending and pending[0][0] <= now and len(demand.events) < limit:
            _, index = pending.popleft()
            provider = self.population.providers[index]
            if not self.offer_matches(demand, provider):
                demand.offers_unmatched += 1
                continue
            self._offer_initial(demand, provider)

    def _offer_initial(self, demand: Demand, provider: Provider) -> None:
        proposal = Proposal(demand, provider, False, "Initial", provider.offer_properties(self._offer_ms),
                            provider.offer_constraints(self._offer_ms), None)
        self._add_proposal(proposal)
        demand.offers_delivered += 1
        demand.events.append({"eventType": "ProposalEvent", "proposal": proposal})

    def _add_proposal(self, proposal: Proposal) -> None:
        self.proposals[proposal.id] = proposal
        proposal.demand.proposals[proposal.id] = proposal

    def take_events(self, demand: Demand, max_events: int) -> list[str]:
        """Take up to max_events, as JSON texts: yagna removes what it returns, so each
        is delivered once (§2)."""
        self._release_due_offers(demand, max_events)
        out = []
        while demand.events and len(out) < max_events:
            event = demand.events.popleft()
            date = iso(self.clock.event_now())
            if event["eventType"] == "ProposalEvent":
                out.append(self._proposal_event_json(event["proposal"], date))
            else:
                out.append(json_text({**event, "eventDate": date}))
        return out

    def _proposal_event_json(self, proposal: Proposal, date: str) -> str:
        """A ProposalEvent; an offer's properties are encoded once per provider, since a big
        population sends the same offers to every demand."""
        provider = proposal.provider
        if proposal.properties is provider.offer_properties(self._offer_ms):
            props = self._offer_json.get(provider.index)
            if props is None:
                props = self._offer_json[provider.index] = json_text(proposal.properties)
        else:
            props = json_text(proposal.properties)
        rest = proposal.to_json(self)
        del rest["properties"]
        return f'{{"eventType":"ProposalEvent","eventDate":"{date}","proposal":{{"properties":{props},{json_text(rest)[1:]}}}'

    def seconds_to_next_offer(self, demand: Demand) -> float | None:
        if not demand.pending_offers:
            return None
        return demand.pending_offers[0][0] - time.monotonic()

    def get_proposal(self, demand: Demand, proposal_id: str) -> Proposal:
        proposal = demand.proposals.get(proposal_id)
        if proposal is None:
            raise HttpError(404, f"Proposal [{proposal_id}] not found")
        return proposal

    # --- negotiation ---
    def counter(self, demand: Demand, prev: Proposal, properties: dict, constraints: str) -> Proposal:
        """The requestor counters a provider proposal; the provider answers later, on its latency."""
        if prev.from_requestor:
            raise HttpError(400, f"Can't counter own Proposal [{prev.id}]")
        if prev.state not in ("Initial", "Draft"):
            raise HttpError(400, f"Can't counter Proposal [{prev.id}] in state {prev.state}")
        if prev.countered:
            raise HttpError(400, f"Proposal [{prev.id}] was already countered")
        try:
            tree = parse_constraints(constraints)
        except ConstraintError as e:
            raise HttpError(400, f"constraints: {e}") from None
        provider = prev.provider
        # the two-way check of a counter against the previous proposal (negotiation/common.rs)
        offer_tree = parse_constraints(prev.constraints)
        if evaluate(tree, prev.properties) is not True or evaluate(offer_tree, properties) is not True:
            raise HttpError(400, f"Proposal properties [new] doesn't match previous Proposal [{prev.id}]. "
                                 "Mismatched constraints")
        proposal = Proposal(demand, provider, True, "Draft", properties, constraints, prev.id)
        if provider.behaviour == "unreachable":
            # what yagna answers when the provider node cannot be reached over the net (GSB)
            raise HttpError(500, f"Failed to send response for Proposal [{prev.id}]. Error: Countering Proposal "
                                 f"[{proposal.id}] GSB error: GSB failure: Net: error forwarding message: "
                                 "Connection timed out..")
        prev.countered = True
        self._add_proposal(proposal)
        if provider.behaviour != "no_answer":
            self._later(provider.latency_s, self._provider_answer, proposal)
        return proposal

    def _later(self, sim_seconds: float, fn: Callable, *args: Any) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def run() -> None:
            self._timers.discard(handle)
            fn(*args)

        handle = loop.call_later(self.clock.real_delay(sim_seconds), run)
        self._timers.add(handle)

    def rejection(self, provider: Provider, properties: dict) -> tuple[str, bool] | None:
        """The provider's negotiators on a counter-proposal: (message, is_final) or None to
        accept. The exact strings of yagna's provider agent (§3), its default limits, and
        the order of its composite negotiator: Validation, LimitAgreements, LimitExpiration,
        DebitNoteInterval, PaymentTimeout, ManifestSignature (outbound rules)."""
        if "golem.com.payment.chosen-platform" not in properties:
            return "Missing fields: /golem/com/payment/chosen-platform", False
        if provider.behaviour == "busy" or provider.approved_agreements >= provider.agreement_limit:
            return f"No capacity available. Reached Agreements limit: {provider.agreement_limit}", False
        expiration = properties.get("golem.srv.comp.expiration")
        expires_at = (datetime.fromtimestamp(expiration / 1000, timezone.utc)
                      if isinstance(expiration, (int, float)) and not isinstance(expiration, bool) else None)
        now = utcnow()
        deadline = properties.get(ACCEPT_TIMEOUT_KEY)
        if expires_at is not None:
            longest = MAX_EXPIRATION_S if deadline is not None else MAX_EXPIRATION_WITHOUT_DEADLINE_S
            too_late = expires_at < now + timedelta(seconds=MIN_EXPIRATION_S)
            if too_late or expires_at > now + timedelta(seconds=longest):
                return (f"Proposal expires at: {_chrono_display(expires_at)} which is less than "
                        f"{humantime(MIN_EXPIRATION_S)} or more than {humantime(longest)} from now"), too_late
        if isinstance(deadline, (int, float)) and not isinstance(deadline, bool):
            if deadline > ACCEPT_TIMEOUT_S:
                return f"DebitNote acceptance deadline should be less than {humantime(ACCEPT_TIMEOUT_S)}.", True
            if deadline < 5:
                return f"To low DebitNotes timeout: {humantime(int(deadline))}", True
        for key, label in ((DEBIT_NOTE_INTERVAL_KEY, "DebitNote interval"),
                           (PAYMENT_TIMEOUT_KEY, "DebitNote payment timeout")):
            value = properties.get(key)
            if isinstance(value, (int, float)) and not 1 <= value <= 86400:
                return (f"Demand {label} {humantime(int(value))} not in acceptable range of "
                        f"[{humantime(1)}; {humantime(86400)}]"), True
        if (expires_at is not None and PAYMENT_TIMEOUT_KEY not in properties
                and expires_at - now >= timedelta(seconds=MID_AGREEMENT_REQUIRED_FROM_S)):
            return (f"Expiration time {_rfc3339(expires_at)} exceeds the "
                    f"{humantime(MID_AGREEMENT_REQUIRED_FROM_S)} threshold of enforcing mid-agreement payments "
                    f"but the required property '{PAYMENT_TIMEOUT_KEY}' was not present in the Demand"), True
        if provider.behaviour == "outbound_rules" and "golem.srv.comp.payload" in properties:
            return OUTBOUND_REJECTION, True
        return None

    def _provider_answer(self, counter: Proposal) -> None:
        demand = counter.demand
        if demand.id not in self.demands or counter.state != "Draft":
            return
        provider = counter.provider
        refusal = self.rejection(provider, counter.properties)
        if refusal is not None:
            message, final = refusal
            counter.state = "Rejected"
            # golem-core reads reason.message without a None check: always send it (§2)
            demand.events.append({"eventType": "ProposalRejectedEvent", "proposalId": counter.id,
                                  "reason": {"message": message, "golem.proposal.rejection.is-final": final}})
        else:
            props = dict(provider.offer_properties(self._offer_ms))
            # a real provider echoes the requestor's mid-agreement terms within its limits,
            # so one round trip is enough (§3), and drops them when the demand has none
            for key in (DEBIT_NOTE_INTERVAL_KEY, PAYMENT_TIMEOUT_KEY):
                if key in counter.properties:
                    props[key] = counter.properties[key]
                else:
                    props.pop(key, None)
            # expiration.rs: adopt a shorter acceptance deadline, drop ours if the demand has none
            if ACCEPT_TIMEOUT_KEY in counter.properties:
                props[ACCEPT_TIMEOUT_KEY] = counter.properties[ACCEPT_TIMEOUT_KEY]
            else:
                props.pop(ACCEPT_TIMEOUT_KEY, None)
            if "golem.com.payment.chosen-platform" in counter.properties:
                props["golem.com.payment.chosen-platform"] = counter.properties["golem.com.payment.chosen-platform"]
            draft = Proposal(demand, provider, False, "Draft", props, provider.offer_constraints(self._offer_ms),
                             counter.id)
            counter.countered = True
            self._add_proposal(draft)
            demand.events.append({"eventType": "ProposalEvent", "proposal": draft})
        demand.signal.notify()

    def reject_proposal(self, demand: Demand, proposal: Proposal) -> None:
        if proposal.from_requestor:
            raise HttpError(400, f"Can't reject own Proposal [{proposal.id}]")
        proposal.state = "Rejected"

    # --- agreements ---
    def create_agreement(self, proposal_id: str, valid_to: datetime) -> Agreement:
        proposal = self.proposals.get(proposal_id)
        if proposal is None or proposal.demand.id not in self.demands:
            raise HttpError(404, f"Proposal [{proposal_id}] not found")
        if proposal.from_requestor:
            raise HttpError(400, f"Can't create Agreement for own Proposal [{proposal_id}]")
        if proposal.state == "Initial":
            raise HttpError(400, f"Can't create Agreement for Proposal [{proposal_id}]. No negotiation with "
                                 "Provider took place. (You should counter Proposal at least one time)")
        if proposal.agreement_id is not None:
            raise HttpError(409, f"Can't create second Agreement for Proposal [{proposal_id}].")
        if proposal.state != "Draft" or proposal.countered:
            raise HttpError(400, f"Can't create Agreement for Proposal [{proposal_id}] in state {proposal.state}")
        if valid_to <= utcnow():
            raise HttpError(400, f"validTo: {iso(valid_to)} is in the past")
        agreement = Agreement(self, proposal, valid_to)
        proposal.agreement_id = agreement.id
        proposal.state = "Accepted"
        self.agreements[agreement.id] = agreement
        return agreement

    def get_agreement(self, agreement_id: str) -> Agreement:
        agreement = self.agreements.get(agreement_id)
        if agreement is None:
            raise HttpError(404, f"Agreement [{agreement_id}] not found.")
        self._expire(agreement)
        return agreement

    def list_agreements(self, app_session_id: str | None = None, state: str | None = None,
                        before: datetime | None = None, after: datetime | None = None) -> list[dict]:
        """`GET /agreements`: yagna's filters (equal session and state, creation time strictly
        before/after) and its `AgreementListEntry` (core/market/src/db/dao/agreement.rs `list`,
        core/market/src/market.rs `list_agreements`; docs/yagna-behaviour.md §3)."""
        entries = []
        for agreement in list(self.agreements.values()):
            self._expire(agreement)
            if app_session_id is not None and agreement.app_session_id != app_session_id:
                continue
            if state is not None and agreement.state != state:
                continue
            if (before is not None and agreement.timestamp >= before) or (after is not None and agreement.timestamp <= after):
                continue
            entry = {"id": agreement.id, "timestamp": iso(agreement.timestamp), "role": "Requestor"}
            if agreement.approved_at is not None:
                entry["approvedDate"] = iso(agreement.approved_at)
            entries.append(entry)
        return entries

    def set_state(self, agreement: Agreement, state: str) -> None:
        assert state in AGREEMENT_STATES, state
        old = agreement.state
        if old == state:
            return
        agreement.state = state
        provider = agreement.provider
        if state == "Approved":
            agreement.approved_at = utcnow()
            provider.approved_agreements += 1
        elif old == "Approved":
            provider.approved_agreements -= 1
        if state == "Terminated":
            agreement.terminated_at = utcnow()
        agreement.signal.notify()
        for observer in list(self.agreement_observers):
            observer(agreement, old, state)

    def _expire(self, agreement: Agreement) -> None:
        if agreement.state in ("Proposal", "Pending") and utcnow() >= agreement.valid_to:
            self.set_state(agreement, "Expired")

    def confirm(self, agreement: Agreement, app_session_id: str | None) -> None:
        if agreement.state != "Proposal":
            raise HttpError(400, f"Can't confirm Agreement [{agreement.id}] in state {agreement.state}")
        agreement.app_session_id = app_session_id
        self.set_state(agreement, "Pending")
        self._later(agreement.provider.latency_s, self._provider_decide, agreement)

    def _provider_decide(self, agreement: Agreement) -> None:
        self._expire(agreement)
        if agreement.state != "Pending":
            return
        provider = agreement.provider
        if provider.behaviour == "reject_agreement" or provider.approved_agreements >= provider.agreement_limit:
            self.set_state(agreement, "Rejected")
        else:
            self.set_state(agreement, "Approved")

    async def wait(self, agreement: Agreement, timeout: float) -> Response:
        """204 once approved, 410 when dead, 408 when undecided within `timeout` (§3)."""
        def decided() -> bool:
            self._expire(agreement)
            return agreement.state not in ("Proposal", "Pending")

        def seconds_to_expiry() -> float:
            return (agreement.valid_to - utcnow()).total_seconds()

        await long_poll(agreement.signal, decided, timeout, seconds_to_expiry)
        state = agreement.state
        if state == "Approved":
            return Response(204)
        if state in ("Proposal", "Pending"):
            raise HttpError(408, f"Timeout while waiting for Agreement [{agreement.id}] approval.")
        if state == "Expired":
            raise HttpError(410, f"Agreement [{agreement.id}] expired.")
        raise HttpError(410, state)

    def terminate(self, agreement: Agreement, reason: dict | None) -> None:
        if agreement.state != "Approved":
            # golem-core swallows a 410 unless it says "from Approving"/"from Pending" (§3)
            raise HttpError(410, f"Can't update Agreement state from {agreement.state} to Terminated.")
        agreement.terminate_reason = reason
        self.set_state(agreement, "Terminated")
        demand = self.demands.get(agreement.demand_id)
        if demand is not None:
            # the provider's offer matches the demand again (docs/yagna-behaviour.md §3)
            self._later(agreement.provider.latency_s, self._rematch, demand, agreement.provider)

    def _rematch(self, demand: Demand, provider: Provider) -> None:
        if demand.id in self.demands and self.offer_matches(demand, provider):
            self._offer_initial(demand, provider)
            demand.signal.notify()

    def close(self) -> None:
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()

    def inspect(self) -> dict:
        by_state: dict[str, int] = {}
        for agreement in self.agreements.values():
            self._expire(agreement)
            by_state[agreement.state] = by_state.get(agreement.state, 0) + 1
        return {
            "providers": len(self.population.providers),
            "demands": {"count": len(self.demands), "unsubscribed": len(self.unsubscribed),
                        "items": [{"id": d.id, "offers_delivered": d.offers_delivered,
                                   "offers_unmatched": d.offers_unmatched,
                                   "offers_pending": len(d.pending_offers), "events_queued": len(d.events)}
                                  for d in self.demands.values()]},
            "proposals": len(self.proposals),
            "agreements": {"count": len(self.agreements), "by_state": by_state,
                           "items": [{"id": a.id, "state": a.state, "provider": a.provider.node_id,
                                      "provider_name": a.provider.name, "app_session_id": a.app_session_id}
                                     for a in self.agreements.values()]},
        }


def _demand_body(request: Request) -> tuple[dict, str]:
    """A `DemandOfferBase`: {"properties": {...}, "constraints": "..."}."""
    body = request.json_object()
    props = body.get("properties")
    constraints = body.get("constraints")
    if not isinstance(props, dict):
        raise HttpError(400, "properties: expected a JSON object")
    if not isinstance(constraints, str):
        raise HttpError(400, "constraints: expected a string")
    return flatten_properties(props), constraints


class MarketRoutes(HttpHandler):
    async def post_demands(self) -> Response:
        props, constraints = _demand_body(self.request)
        demand = self.net.market.subscribe(props, constraints)
        return self.ok(demand.id, 201)  # yagna: 201 with the id as a JSON string

    async def get_demands(self) -> Response:
        market = self.net.market
        return self.ok([d.to_json(market) for d in market.demands.values()])

    async def delete_demand(self) -> Response:
        self.net.market.unsubscribe(self.params["demand_id"])
        return self.no_content()

    async def get_demand_events(self) -> Response:
        market = self.net.market
        demand = market.get_demand(self.params["demand_id"])
        timeout = self.request.query_float("timeout", MARKET_EVENT_TIMEOUT_S, 0, 1e6)
        max_events = min(self.request.query_int("maxEvents", MARKET_MAX_EVENTS_DEFAULT, 1), MARKET_MAX_EVENTS_MAX)

        def take() -> list[dict] | bool:
            # an unsubscribe ends the polls in flight at once, as in yagna
            return market.take_events(demand, max_events) if demand.id in market.demands else True

        events = await long_poll(demand.signal, take, min(timeout, MAX_LONG_POLL_S),
                                 lambda: market.seconds_to_next_offer(demand))
        if events is True:
            market.get_demand(demand.id)  # raises the 404
        return Response(200, raw=("[" + ",".join(events) + "]").encode())

    async def get_proposal(self) -> Response:
        market = self.net.market
        demand = market.get_demand(self.params["demand_id"])
        return self.ok(market.get_proposal(demand, self.params["proposal_id"]).to_json(market))

    async def post_counter_proposal(self) -> Response:
        market = self.net.market
        demand = market.get_demand(self.params["demand_id"])
        props, constraints = _demand_body(self.request)
        prev = market.get_proposal(demand, self.params["proposal_id"])
        return self.ok(market.counter(demand, prev, props, constraints).id)

    async def post_reject_proposal(self) -> Response:
        market = self.net.market
        demand = market.get_demand(self.params["demand_id"])
        if self.request.body.strip():
            body = self.request.json()
            if not isinstance(body, (dict, type(None))):
                raise HttpError(400, "request body: expected a Reason object {\"message\": ...}")
        market.reject_proposal(demand, market.get_proposal(demand, self.params["proposal_id"]))
        return self.no_content()

    async def post_agreements(self) -> Response:
        body = self.request.json_object()
        proposal_id = body.get("proposalId")
        if not isinstance(proposal_id, str) or not proposal_id:
            raise HttpError(400, "proposalId: expected a proposal id string")
        valid_to_raw = body.get("validTo")
        if not isinstance(valid_to_raw, str):
            raise HttpError(400, "validTo: expected an RFC 3339 timestamp")
        agreement = self.net.market.create_agreement(proposal_id, parse_iso(valid_to_raw, "validTo"))
        return self.ok(agreement.id)  # yagna answers 200 with the id (docs/yagna-behaviour.md §3)

    async def get_agreement(self) -> Response:
        market = self.net.market
        return self.ok(market.get_agreement(self.params["agreement_id"]).to_json(market))

    async def get_agreements(self) -> Response:
        query = self.request.query
        state = query.get("state") or None
        if state is not None and state not in AGREEMENT_STATES:
            raise HttpError(400, f"state: expected one of {', '.join(AGREEMENT_STATES)}, got {state!r}")
        before = parse_iso(query["beforeDate"], "beforeDate") if query.get("beforeDate") else None
        after = parse_iso(query["afterDate"], "afterDate") if query.get("afterDate") else None
        return self.ok(self.net.market.list_agreements(query.get("appSessionId") or None, state, before, after))

    async def post_agreement_confirm(self) -> Response:
        market = self.net.market
        agreement = market.get_agreement(self.params["agreement_id"])
        market.confirm(agreement, self.request.query.get("appSessionId") or None)
        return self.no_content()

    async def post_agreement_wait(self) -> Response:
        market = self.net.market
        agreement = market.get_agreement(self.params["agreement_id"])
        timeout = self.request.query_float("timeout", 5.0, 0, 1e6)
        return await market.wait(agreement, min(timeout, MAX_LONG_POLL_S))

    async def post_agreement_terminate(self) -> Response:
        market = self.net.market
        agreement = market.get_agreement(self.params["agreement_id"])
        reason = self.request.json() if self.request.body.strip() else None
        if reason is not None and not isinstance(reason, dict):
            raise HttpError(400, "request body: expected a Reason object {\"message\": ...}")
        market.terminate(agreement, reason)
        return self.ok(None)


###############################################################################
# 6. Activities ###############################################################
###############################################################################


# Section-local imports (modules only sections 6-8 use), kept here so the parallel
# branches editing the header do not conflict on the import block.
import ctypes
import fcntl
import ipaddress
import subprocess
import tempfile
from pathlib import Path

ACTIVITY_MARKER_ENV = "GOLEM_LOCALNET_ACTIVITY"
# The exe-unit's batch-result long-poll never holds longer than this (docs/yagna-behaviour.md §2:
# golem-core's client timeout for it is 5.5 s).
BATCH_POLL_MAX_SECONDS = 5.0
# stdout/stderr of one `run` returned in its result (the tail beyond is dropped).
CAPTURE_LIMIT_BYTES = 1 << 20
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36


# --- the process table ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    """One line of /proc/<pid>/stat, the fields process ownership and pricing need."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    ticks: int  # utime + stime + cutime + cstime: own CPU plus that of reaped children
    start: int  # start time in ticks since boot: (pid, start) names a process, immune to PID reuse


def read_proc(pid: int) -> ProcInfo | None:
    try:  # os-level calls: a scan reads every process of the machine
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        sid=int(fields[3]),
        ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
        start=int(fields[19]),
    )


def read_proc_table() -> dict[int, ProcInfo]:
    """Every process of the machine, one pass over /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def become_subreaper() -> bool:
    """Make this process the reaper of orphaned descendants (Linux prctl), so a daemon started by
    an activity that double-forks is re-parented here, stays attributable and gets its CPU counted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# --- loopback addresses -----------------------------------------------------


class LoopbackPool:
    """Gives every activity an address of its own in 127.B.0.0/16.

    All of 127.0.0.0/8 reaches `lo` on Linux without configuration, so a node can bind
    `NODE_IP:port` like a VM binds its VPN address. B is claimed with an flock per localnet
    process so that several local networks on one machine (tests of other engineers, CI) never
    hand out the same address. The third octet is the network's slot, the fourth follows the VPN
    address when free: 192.168.0.3 of the first network -> 127.B.1.3.
    """

    def __init__(self, lock_dir: str | None = None):
        self._lock_dir = Path(lock_dir or tempfile.gettempdir()) / "golem-localnet-loopback"
        self._lock_dir.mkdir(mode=0o755, exist_ok=True)
        self._lock_file = None
        self.block = self._claim_block()
        self._net_slots: dict[str, int] = {}
        self._taken: set[str] = set()

    def _claim_block(self) -> int:
        start = os.getpid() % 200
        for i in range(200):
            block = 20 + (start + i) % 200  # 127.20.-.- .. 127.219.-.-: clear of 127.0.0.x
            f = open(self._lock_dir / f"{block}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock_file = f
            return block
        raise RuntimeError(f"no free loopback block left under {self._lock_dir}")

    def allocate(self, net_id: str | None, vpn_ip: str | None) -> str:
        if net_id is None:
            slot = 0
        else:
            slot = self._net_slots.setdefault(net_id, len(self._net_slots) % 255 + 1)
        preferred = [int(vpn_ip.rsplit(".", 1)[1])] if vpn_ip else []
        for third in [slot] + [t for t in range(256) if t != slot]:
            for host in preferred + list(range(2, 255)):
                ip = f"127.{self.block}.{third}.{host}"
                if 1 <= host <= 254 and ip not in self._taken:
                    self._taken.add(ip)
                    return ip
        raise HttpError(503, f"all addresses of 127.{self.block}.0.0/16 are in use")

    def release(self, ip: str) -> None:
        self._taken.discard(ip)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


# --- cgroup v2 (when the machine lets us) ----------------------------------


class CgroupTree:
    """One cgroup v2 per activity under `<cgroup2 mount>/<our cgroup>/golem-localnet-<pid>/`.

    Where cgroup2 is mounted and writable, a sandbox's processes are put in its cgroup before
    they exec, so membership survives setsid, double forks and rewritten environments,
    `cgroup.kill` ends them all at once, and `cpu.stat` counts the CPU of every process that
    ever ran there. Without it, the sandbox falls back to sessions + descendants + marker.
    Trees left by a localnet that died without cleaning up (SIGKILL) are killed on start.
    """

    PREFIX = "golem-localnet-"

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def create(cls) -> "CgroupTree | None":
        # Joining a cgroup costs ~20 ms per command on this kernel (the write to cgroup.procs
        # waits for an RCU grace period): GOLEM_LOCALNET_CGROUPS=0 trades that for speed.
        if os.environ.get("GOLEM_LOCALNET_CGROUPS", "1") == "0":
            return None
        try:
            mount = next(
                line.split(" - ")[0].split()[4]
                for line in open("/proc/self/mountinfo", encoding="utf-8")
                if " - cgroup2 " in line
            )
            own = next(line[3:].strip() for line in open("/proc/self/cgroup", encoding="utf-8") if line.startswith("0::"))
            base = Path(mount) / own.lstrip("/")
            cls._clean_stale(base)
            root = base / f"{cls.PREFIX}{os.getpid()}"
            root.mkdir(mode=0o755, exist_ok=True)
            if not (root / "cgroup.procs").exists():
                raise OSError("not a cgroup2 directory")
            return cls(root)
        except (OSError, StopIteration):
            return None

    @classmethod
    def _clean_stale(cls, base: Path) -> None:
        for tree in base.glob(f"{cls.PREFIX}*"):
            pid = tree.name[len(cls.PREFIX):]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                for group in tree.iterdir():
                    if group.is_dir():
                        cls._kill(group)
                        cls._wait_empty(group)
                        cls._remove(group)
                cls._remove(tree)

    def group(self, activity_id: str) -> Path | None:
        path = self.root / activity_id
        try:
            path.mkdir(mode=0o755)
            return path
        except OSError:
            return None

    @staticmethod
    def members(group: Path) -> set[int]:
        try:
            return {int(pid) for pid in (group / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    @staticmethod
    def cpu_seconds(group: Path) -> Decimal:
        """CPU of everything that ever ran in the group, exited processes included."""
        try:
            for line in (group / "cpu.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "usage_usec":
                    return Decimal(int(value)) / 1_000_000
        except OSError:
            pass
        return Decimal(0)

    @staticmethod
    def _kill(group: Path) -> None:
        try:
            (group / "cgroup.kill").write_text("1")  # Linux >= 5.14: SIGKILL to all, no fork race
        except OSError:
            for pid in CgroupTree.members(group):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    kill = _kill

    @staticmethod
    def _wait_empty(group: Path, seconds: float = 2.0) -> None:
        """Killed members take a moment to leave; rmdir fails until they have (cgroup.events)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if "populated 0" in (group / "cgroup.events").read_text():
                    return
            except OSError:
                return
            time.sleep(0.01)

    @staticmethod
    def _remove(group: Path) -> None:
        try:
            group.rmdir()
        except OSError:
            pass

    remove = _remove

    def close(self) -> None:
        for group in self.root.glob("*"):
            if group.is_dir():
                self._kill(group)
                self._wait_empty(group)
                self._remove(group)
        self._remove(self.root)


# --- the sandbox ------------------------------------------------------------


class Sandbox:
    """The 'virtual machine' of one activity: a directory as HOME, TMPDIR inside it, an own
    loopback address, and every process it starts.

    Ownership is tracked three ways because none is enough alone: each
    command runs in a session of its own (start_new_session), descendants are followed through
    their parent links on every scan, and an environment marker catches orphans that called
    setsid. The marker alone is not enough: Ray's processes rewrite /proc/<pid>/environ.
    """

    def __init__(self, root: Path, activity_id: str, cgroup: Path | None = None):
        self.activity_id = activity_id
        self.cgroup = cgroup
        self.home = root / activity_id
        self.tmp = self.home / "tmp"
        os.makedirs(self.tmp, mode=0o700)  # HOME and TMPDIR; mkdir is the costly part of a create
        self.loopback_ip: str | None = None
        self.vpn_ip: str | None = None
        self.sessions: set[int] = set()
        self.known: set[tuple[int, int]] = set()  # (pid, start) of processes seen as ours
        self.finished_seconds = Decimal(0)  # CPU of processes reaped by the localnet itself
        self._cpu_reported = Decimal(0)
        self._marker = f"{ACTIVITY_MARKER_ENV}={activity_id}".encode()

    def environment(self, extra: dict | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("YAGNA_")}  # never leak the app key
        # The "image": this Python (and whatever its environment has, e.g. `ray`) comes first on PATH.
        path = env.get("PATH", os.defpath)
        env.update(
            PATH=os.pathsep.join([os.path.dirname(sys.executable), path]),
            HOME=str(self.home),
            TMPDIR=str(self.tmp),
            NODE_IP=self.loopback_ip or "127.0.0.1",
            GOLEM_VPN_IP=self.vpn_ip or "",
            PWD=str(self.home),
            **{ACTIVITY_MARKER_ENV: self.activity_id},
        )
        if extra:
            env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def owned(self, table: dict[int, ProcInfo]) -> dict[int, ProcInfo]:
        """The sandbox's processes in `table`; remembers them so their orphans stay ours."""
        me = os.getpid()
        members = CgroupTree.members(self.cgroup) if self.cgroup else set()
        owned = {
            pid: info
            for pid, info in table.items()
            if info.sid in self.sessions or (pid, info.start) in self.known or pid in members
        }
        # Descendants of owned processes, to a fixed point (setsid'd children of a daemon).
        children: dict[int, list[ProcInfo]] = {}
        for info in table.values():
            children.setdefault(info.ppid, []).append(info)
        stack = list(owned)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child.pid not in owned:
                    owned[child.pid] = child
                    stack.append(child.pid)
        # Orphans re-parented to the localnet (subreaper) that left our sessions.
        for child in children.get(me, ()):
            if child.pid not in owned and child.state != "Z" and _environ_has(child.pid, self._marker):
                owned[child.pid] = child
        self.known = {(pid, info.start) for pid, info in owned.items()}
        return owned

    def cpu_seconds(self, table: dict[int, ProcInfo]) -> Decimal:
        """CPU seconds of the whole process tree, dead and alive; never decreases."""
        live = sum(info.ticks for info in self.owned(table).values())
        total = self.finished_seconds + Decimal(live) / _CLK_TCK
        if self.cgroup:
            total = max(total, CgroupTree.cpu_seconds(self.cgroup))
        self._cpu_reported = max(self._cpu_reported, total)
        return self._cpu_reported

    def add_rusage(self, rusage) -> None:
        # wait4 gives the reaped process's CPU including its own reaped descendants.
        self.finished_seconds += Decimal(str(rusage.ru_utime)) + Decimal(str(rusage.ru_stime))

    def signal_all(self, table: dict[int, ProcInfo], sig: int) -> set[int]:
        pids = {pid for pid, info in self.owned(table).items() if info.state != "Z"}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        return pids


# --- VM-like nodes: namespaces, cgroups, VPN bridges ------------------------
#
# In `namespaces` isolation every activity is a machine of its own, like the VM a Golem provider
# starts: an init process (PID 1 of a new PID namespace) in new network, mount, UTS, IPC and cgroup
# namespaces, inside cgroups limited to the offer's CPU threads and memory. Its network has `lo`
# and, once deployed on a VPN, one veth `eth0` with the address the requestor assigned; the other
# end sits on a bridge in a namespace of its own per VPN, which has no address and no route, so
# nodes reach their VPN peers and nothing else (not the host, not another VPN). The requestor
# reaches a node only through the net API's WebSocket bridge, which connects from inside the
# node's network namespace. The host namespace never gets a VPN address, route or interface.
#
# Everything is named with the local network's prefix `gln<pid>` (netns `gln<pid>-vpn<n>`,
# cgroups `.../golem-localnet-<pid>/...`), so the next local network reaps what a killed one left.

ISOLATION_MODES = ("auto", "namespaces", "sandbox")
NODE_PREFIX = "gln"
CLONE_NEWNET = 0x40000000
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_BOOT_TIMEOUT_S = 30.0
# The image's own directories that a node gets empty (private) copies of (a VM's disk).
# /run is made first (it holds the node's own files), the others after.
NODE_PRIVATE_DIRS = (("/tmp", "1777"), ("/dev/shm", "1777"), ("/root", "700"))

# PID 1 of a node. Runs in the new namespaces before anything else: private mounts, the node's
# own view of /proc, /sys and its cgroups (so Ray's autodetection reads the offer's size, see
# ray/_private/utils.py get_num_cpus and get_cgroup_mem_stats), a /proc/meminfo for `free` (as
# lxcfs does), the image read-only with a copy-on-write layer (overlay, its upper in the node's
# /run) over the directories software writes to (/etc: the bring-up writes /etc/hostname and
# /etc/environment; /usr, /var, /opt, the image's Python for `pip install`), the image's commands
# (its Python, `ray`, `pip`: NodeMachine._image_commands) in the node's own /usr/local/bin, where a
# plain SSH login's PATH finds them as in the python:3.10 based Golem image, a host key of its own
# for sshd and root login by key only, then reaps orphans forever (dash's `wait` reaps any child, as an init must).
# Arguments come in the environment; nothing of the host's environment is passed.
NODE_INIT_SCRIPT = r"""
set -eu
hostname "$NODE_NAME"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir -p /run/golem/keep
i=0
for dir in $NODE_OVERLAY; do
    if [ -d "$dir" ]; then
        mkdir -p "/run/golem/overlay/$i/upper" "/run/golem/overlay/$i/work"
        mount -t overlay overlay \
            -o "lowerdir=$dir,upperdir=/run/golem/overlay/$i/upper,workdir=/run/golem/overlay/$i/work" "$dir"
    fi
    i=$((i+1))
done
echo "$NODE_NAME" > /etc/hostname
mkdir -p /usr/local/bin
for command in $NODE_IMAGE_COMMANDS; do
    printf '#!/bin/sh\nexec %s "$@"\n' "${command#*=}" > "/usr/local/bin/${command%%=*}"
    chmod 755 "/usr/local/bin/${command%%=*}"
done
if [ -d /etc/ssh ]; then
    rm -f /etc/ssh/ssh_host_*
    if command -v ssh-keygen >/dev/null; then ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key; fi
    mkdir -p /etc/ssh/sshd_config.d
    printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n' \
        > /etc/ssh/sshd_config.d/golem-node.conf
fi
i=0
for keep in $NODE_KEEP; do
    mkdir -p "/run/golem/keep/$i"; mount --bind "$keep" "/run/golem/keep/$i"; i=$((i+1))
done
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
eval "$NODE_CGROUP_MOUNTS"
for spec in $NODE_PRIVATE; do
    mount -t tmpfs -o "mode=${spec#*:},nosuid,nodev" tmpfs "${spec%:*}"
done
i=0
for keep in $NODE_KEEP; do
    mkdir -p "$keep" "/run/golem/overlay/keep$i/upper" "/run/golem/overlay/keep$i/work"
    mount -o remount,bind,ro "/run/golem/keep/$i"
    mount -t overlay overlay -o \
        "lowerdir=/run/golem/keep/$i,upperdir=/run/golem/overlay/keep$i/upper,workdir=/run/golem/overlay/keep$i/work" "$keep"
    umount -l "/run/golem/keep/$i"; i=$((i+1))
done
for hide in $NODE_HIDE; do
    if [ -d "$hide" ]; then mount -t tmpfs -o mode=700,size=16k,nosuid,nodev,noexec tmpfs "$hide"; fi
done
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh
printf '%s\n' "$NODE_MEMINFO" > /run/golem/meminfo
mount --bind -o ro /run/golem/meminfo /proc/meminfo
for ro in $NODE_READONLY; do
    mount -o remount,bind,ro "$ro" 2>/dev/null || true
done
ip link set lo up
echo ready
exec 1>/dev/null 2>&1
trap 'exit 0' TERM INT
while :; do sleep 2147483647 & wait || true; done
"""


# Filesystems that are no disk of the host's: a node gets its own or none of them.
_PSEUDO_FILESYSTEMS = {
    "proc", "sysfs", "cgroup", "cgroup2", "devtmpfs", "devpts", "mqueue", "tmpfs", "securityfs", "debugfs",
    "tracefs", "pstore", "bpf", "autofs", "hugetlbfs", "fusectl", "configfs", "binfmt_misc", "nsfs", "ramfs",
    "efivarfs", "rpc_pipefs", "fuse.lxcfs", "overlay",
}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


async def _read_until_eof_or_line(stream, timeout: float, whole: bool = False) -> bytes:
    """Read a pipe without blocking the loop: up to the first newline (or EOF with `whole`)."""
    loop = asyncio.get_running_loop()
    fd = stream.fileno()
    os.set_blocking(fd, False)
    data = b""
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            break
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        data += chunk
        if not chunk or (not whole and b"\n" in data):
            break
    return data


def choose_isolation(requested: str) -> tuple[str | None, str | None]:
    """(mode, reason): `auto` gives namespaces where they work, else the sandbox and why;
    `namespaces` where they do not gives (None, why)."""
    if requested == "sandbox":
        return "sandbox", None
    why = namespaces_unavailable()
    if why is None:
        return "namespaces", None
    return (None, why) if requested == "namespaces" else ("sandbox", why)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make VM-like nodes, or None when it can (root and util-linux's
    unshare/nsenter plus iproute2: Python 3.11 has no os.setns)."""
    if os.geteuid() != 0:
        return "not root (network namespaces with bridges and cgroup limits need root)"
    import shutil

    for tool in ("unshare", "nsenter", "ip", "mount"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--uts", "--ipc", "--cgroup", "--fork", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    if probe.returncode != 0:
        return f"unshare failed: {probe.stderr.strip() or probe.returncode}"
    return None


def _run(argv: list[str], stdin: str | None = None) -> None:
    """A short configuration command (ip, mount); its failure is a bug of ours, said with stderr."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, stdin=None if stdin else subprocess.DEVNULL)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv[:4])}: {done.stderr.strip() or done.returncode}")


class NodeCgroups:
    """The cgroups of one node, in every hierarchy the machine mounts: v1 controllers (`cpu`,
    `cpuacct`, `cpuset`, `memory`, `pids`, ...) and the v2 tree. Limits go where the controller
    is: cpu.cfs_quota_us / cpu.max, cpuset.cpus, memory.limit_in_bytes / memory.max."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs

    @staticmethod
    def hierarchies() -> list[tuple[str, Path, str]]:
        """(fstype, mount point, controllers) of every cgroup hierarchy mounted here."""
        found = []
        for line in open("/proc/self/mountinfo", encoding="utf-8"):
            left, _, right = line.partition(" - ")
            fstype, _source, options = (right.split() + ["", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                controllers = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
                found.append((fstype, Path(left.split()[4]), controllers))
        return found

    @classmethod
    def create(cls, parent_name: str, name: str, cpus: int, mem_bytes: int) -> "NodeCgroups":
        dirs = []
        host_cpus = sorted(os.sched_getaffinity(0))
        for fstype, mount, controllers in cls.hierarchies():
            own = _own_cgroup(fstype, controllers)
            parent = mount / own.lstrip("/") / parent_name
            try:
                parent.mkdir(mode=0o755, exist_ok=True)
                if "cpuset" in controllers.split(","):
                    for knob in ("cpuset.cpus", "cpuset.mems"):  # v1: a child starts empty
                        if not (parent / knob).read_text().strip():
                            (parent / knob).write_text((parent.parent / knob).read_text())
                group = parent / name
                group.mkdir(mode=0o755)
            except OSError:
                continue
            dirs.append(group)
            cls._limit(group, cpus, mem_bytes, host_cpus)
        return cls(dirs)

    @staticmethod
    def _limit(group: Path, cpus: int, mem_bytes: int, host_cpus: list[int]) -> None:
        def write(knob: str, value: str) -> None:
            try:
                (group / knob).write_text(value)
            except OSError:
                pass

        period = 100_000
        if (group / "cpuset.cpus").exists():
            write("cpuset.mems", (group.parent / "cpuset.mems").read_text().strip())
            # A machine cannot offer threads it lacks: the cpuset holds min(offer, host) CPUs.
            write("cpuset.cpus", ",".join(str(c) for c in host_cpus[: max(1, min(cpus, len(host_cpus)))]))
        write("cpu.cfs_period_us", str(period))
        write("cpu.cfs_quota_us", str(cpus * period))
        write("cpu.max", f"{cpus * period} {period}")
        write("memory.limit_in_bytes", str(mem_bytes))
        write("memory.memsw.limit_in_bytes", str(mem_bytes))  # no swap beyond the offer either
        write("memory.max", str(mem_bytes))
        write("memory.swap.max", "0")

    def joiner(self) -> Callable[[], None]:
        """A preexec_fn that moves the child into every hierarchy before exec (os calls only)."""
        files = [str(g / "cgroup.procs") if (g / "cgroup.procs").exists() else str(g / "tasks") for g in self.dirs]

        def join() -> None:
            for path in files:
                try:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, b"0")
                    finally:
                        os.close(fd)
                except OSError:
                    pass

        return join

    def members(self) -> set[int]:
        pids: set[int] = set()
        for group in self.dirs:
            pids |= CgroupTree.members(group)
        return pids

    def cpu_seconds(self) -> Decimal:
        for group in self.dirs:
            usage = group / "cpuacct.usage"
            if usage.exists():
                try:
                    return Decimal(int(usage.read_text())) / 1_000_000_000
                except (OSError, ValueError):
                    pass
            if (group / "cpu.stat").exists() and (group / "cgroup.procs").exists():
                seconds = CgroupTree.cpu_seconds(group)
                if seconds:
                    return seconds
        return Decimal(0)

    async def remove(self) -> None:
        """Kill what is left, wait until the groups are empty, remove them."""
        for _ in range(300):
            left = self.members()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            await asyncio.sleep(0.01)
        for group in self.dirs:
            await asyncio.to_thread(_rmdir_when_empty, group)

    @classmethod
    def reap_stale(cls, alive: Callable[[int], bool]) -> None:
        """Remove the node cgroups of local networks that are gone (killed with SIGKILL)."""
        for fstype, mount, controllers in cls.hierarchies():
            base = mount / _own_cgroup(fstype, controllers).lstrip("/")
            for parent in base.glob(f"{CgroupTree.PREFIX}*"):
                pid = parent.name[len(CgroupTree.PREFIX):].split("-")[0]
                if not pid.isdigit() or alive(int(pid)):
                    continue
                for group in [g for g in parent.iterdir() if g.is_dir()] + [parent]:
                    for member in CgroupTree.members(group):
                        try:
                            os.kill(member, signal.SIGKILL)
                        except OSError:
                            pass
                    _rmdir_when_empty(group)


def _rmdir_when_empty(group: Path, tries: int = 100) -> None:
    """Remove a cgroup whose killed members may still be leaving (rmdir fails until they have)."""
    for _ in range(tries):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _own_cgroup(fstype: str, controllers: str) -> str:
    """This process's cgroup path in one hierarchy (/proc/self/cgroup)."""
    for line in open("/proc/self/cgroup", encoding="utf-8"):
        number, names, path = line.rstrip("\n").split(":", 2)
        if fstype == "cgroup2" and number == "0" and names == "":
            return path
        if fstype == "cgroup" and names and set(names.split(",")) == set(controllers.split(",")):
            return path
    return "/"


class VpnBridge:
    """One VPN's switch: a bridge `br0` in a network namespace of its own (`ip netns`), no
    address, no route. Nodes plug veths into it."""

    def __init__(self, name: str):
        self.name = name
        self._ports = 0
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "-b", "-"], "link set lo up\nlink add br0 type bridge\nlink set br0 up\n")

    def next_port(self) -> str:
        self._ports += 1
        return f"v{self._ports}"

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class NodeHost:
    """What the local network needs to make VM-like nodes: its prefix, the VPN bridges, the
    directories to hide from nodes; reaps what a killed predecessor left."""

    def __init__(self, hide: list[str]):
        self.prefix = f"{NODE_PREFIX}{os.getpid()}"
        self.cgroup_parent = f"{CgroupTree.PREFIX}{os.getpid()}-nodes"
        self.hide = sorted({os.path.realpath(p) for p in hide if p})
        self.bridges: dict[str, VpnBridge] = {}
        self._host_netns = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.cgroup_mounts = self._cgroup_mount_script()  # shell lines for a node's init
        self.reap_stale()

    @staticmethod
    def _cgroup_mount_script() -> str:
        """Shell lines that mount, in the node's mount namespace, every cgroup hierarchy the host
        has at the same place: with the cgroup namespace, the node sees its own group as root."""
        lines = []
        parents = set()
        for fstype, mount, controllers in NodeCgroups.hierarchies():
            parents.add(str(mount.parent))
            opt = f"-o {controllers} " if fstype == "cgroup" else ""
            lines.append(f"mkdir -p {mount}; mount -t {fstype} {opt}{fstype} {mount}")
        head = [f"mount -t tmpfs -o mode=755 cgroup {p}" for p in sorted(parents) if p == "/sys/fs/cgroup"]
        return "\n".join(head + lines)

    def reap_stale(self) -> None:
        """Bridges and cgroups of local networks that were killed (their pid is gone)."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(rf"{NODE_PREFIX}(\d+)-vpn\d+", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        NodeCgroups.reap_stale(lambda pid: os.path.exists(f"/proc/{pid}"))

    def bridge(self, net_id: str) -> VpnBridge:
        bridge = self.bridges.get(net_id)
        if bridge is None:
            bridge = VpnBridge(f"{self.prefix}-vpn{len(self.bridges) + 1}")
            self.bridges[net_id] = bridge
        return bridge

    def drop_bridge(self, net_id: str) -> None:
        bridge = self.bridges.pop(net_id, None)
        if bridge:
            bridge.delete()

    def connect_inside(self, init_pid: int, ip: str, port: int, timeout: float = 10.0):
        """A TCP socket connected from inside a node's network namespace (a blocking call for an
        executor thread: setns moves only the calling thread, which goes back before returning)."""
        import socket

        libc = _libc()
        fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the node's network namespace failed")
            try:
                sock = socket.create_connection((ip, port), timeout=timeout)
            finally:
                if libc.setns(self._host_netns, CLONE_NEWNET) != 0:  # never leave a pool thread inside
                    os._exit(70)
        finally:
            os.close(fd)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for net_id in list(self.bridges):
            self.drop_bridge(net_id)
        for fstype, mount, controllers in NodeCgroups.hierarchies():
            try:
                (mount / _own_cgroup(fstype, controllers).lstrip("/") / self.cgroup_parent).rmdir()
            except OSError:
                pass
        os.close(self._host_netns)


class NodeMachine:
    """One activity's VM-like machine: the init process in its namespaces and cgroups, its
    interface on a VPN, and how commands get in (nsenter)."""

    def __init__(self, host: NodeHost, activity_id: str, name: str, cpu_threads: int, mem_bytes: int):
        self.host = host
        self.activity_id = activity_id
        self.name = name
        self.cpu_threads = cpu_threads
        self.mem_bytes = mem_bytes
        self.cgroups = NodeCgroups.create(host.cgroup_parent, activity_id, cpu_threads, mem_bytes)
        self.init_pid: int | None = None
        self.vpn_ip: str | None = None
        self._launcher: subprocess.Popen | None = None
        self._final_cpu: Decimal | None = None
        self.booted = asyncio.ensure_future(self._boot())

    def cpu_seconds(self) -> Decimal:
        """CPU of everything that ran in the node (its cgroup counts the dead too)."""
        return self.cgroups.cpu_seconds() if self._final_cpu is None else self._final_cpu

    def _meminfo(self) -> str:
        kib = self.mem_bytes // 1024
        rows = [("MemTotal", kib), ("MemFree", kib), ("MemAvailable", kib), ("Buffers", 0), ("Cached", 0),
                ("SwapCached", 0), ("Shmem", 0), ("SReclaimable", 0), ("SwapTotal", 0), ("SwapFree", 0)]
        return "\n".join(f"{k + ':':<16}{v:>8} kB" for k, v in rows)

    def _overlay_paths(self) -> list[str]:
        """Directories of the image a node may write to, each on a copy-on-write layer of its own."""
        paths = ["/etc", "/usr", "/var", "/opt", "/home", "/srv"]
        private = [d for d, _ in NODE_PRIVATE_DIRS] + ["/run"]
        for path in sorted({os.path.realpath(sys.prefix)}):
            inside = any(path == d or path.startswith(d + "/") for d in paths + private)
            if not inside and " " not in path:
                paths.append(path)
        return paths

    def _readonly_mounts(self) -> list[str]:
        """The host's disk mounts (`/` first): read-only in the node, but for the overlaid dirs."""
        skip = set(self._overlay_paths()) | {d for d, _ in NODE_PRIVATE_DIRS}
        mounts = ["/"]
        for line in open("/proc/self/mountinfo", encoding="utf-8"):
            left, _, right = line.partition(" - ")
            point, fstype = left.split()[4], right.split()[0]
            if (fstype in _PSEUDO_FILESYSTEMS or "\\" in point or point in skip or point in mounts
                    or any(point.startswith(p + "/") for p in ("/proc", "/sys", "/dev", "/run", *skip))):
                continue
            mounts.append(point)
        return mounts

    def _keep_paths(self) -> list[str]:
        """The image's Python when it lives under a directory the node gets empty (/root, /tmp):
        put back on a copy-on-write layer of its own, as the overlaid directories are."""
        keep = []
        for path in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                     os.path.dirname(os.path.realpath(__file__))}:
            if any(path == d or path.startswith(d + "/") for d, _ in NODE_PRIVATE_DIRS + (("/run", ""),)):
                if " " not in path and os.path.isdir(path):  # not a zipapp's file
                    keep.append(path)
        return sorted(keep)

    @staticmethod
    def _image_commands() -> list[str]:
        """`name=target` for each command of the image a node gets in its own /usr/local/bin: the
        image is the Python that runs the local network, so `python3`, `python` and every program of
        its bin dir (`ray`, `pip`, ...). Small scripts that exec the target by its path, not symlinks:
        a symlink to a venv's python loses the venv. When that bin dir is on NODE_PATH already, only
        the Python names it lacks (Debian's /usr/bin has no `python`)."""
        bin_dir = os.path.dirname(os.path.abspath(sys.executable))
        on_path = os.path.realpath(bin_dir) in {os.path.realpath(d) for d in NODE_PATH.split(os.pathsep)}

        def program(name: str) -> bool:
            path = os.path.join(bin_dir, name)
            return os.path.isfile(path) and os.access(path, os.X_OK)

        commands = {name: sys.executable for name in ("python3", "python") if not (on_path and program(name))}
        if not on_path:
            for name in sorted(os.listdir(bin_dir)):
                if re.fullmatch(r"[A-Za-z0-9._+-]+", name) and program(name):
                    commands.setdefault(name, os.path.join(bin_dir, name))
        return [f"{name}={target}" for name, target in commands.items()
                if re.fullmatch(r"[A-Za-z0-9._+/-]+", target)]

    async def _boot(self) -> None:
        env = {
            "PATH": NODE_PATH,
            "NODE_NAME": self.name,
            "NODE_IMAGE_COMMANDS": " ".join(self._image_commands()),
            "NODE_KEEP": " ".join(self._keep_paths()),
            "NODE_OVERLAY": " ".join(self._overlay_paths()),
            "NODE_READONLY": " ".join(self._readonly_mounts()),
            "NODE_PRIVATE": " ".join(f"{d}:{mode}" for d, mode in NODE_PRIVATE_DIRS),
            "NODE_HIDE": " ".join(h for h in self.host.hide if " " not in h),
            "NODE_CGROUP_MOUNTS": self.host.cgroup_mounts,
            "NODE_MEMINFO": self._meminfo(),
        }
        join_cgroups = self.cgroups.joiner()
        prctl = _libc().prctl

        def prepare() -> None:  # preexec_fn: os calls only, nothing that allocates locks
            join_cgroups()
            prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: dies with the local network

        self._launcher = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--uts", "--ipc", "--cgroup", "--fork", "--kill-child",
             "--propagation", "private", "/bin/sh", "-s", "golem-node-init"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=prepare,
        )
        # The script on stdin (`sh -s`): `ps` on the node shows a short PID 1, not the script.
        self._launcher.stdin.write(NODE_INIT_SCRIPT.encode())
        self._launcher.stdin.close()
        out = await _read_until_eof_or_line(self._launcher.stdout, NODE_BOOT_TIMEOUT_S)
        if out.strip() != b"ready":
            err = await _read_until_eof_or_line(self._launcher.stderr, 2.0, whole=True)
            raise OSError(f"node {self.name} did not boot: {err.decode(errors='replace').strip()[-500:]}")
        self._launcher.stderr.close()
        self._launcher.stdout.close()
        children = Path(f"/proc/{self._launcher.pid}/task/{self._launcher.pid}/children").read_text().split()
        self.init_pid = int(children[0])

    async def attach(self, bridge: VpnBridge, ip: str, prefixlen: int) -> None:
        """Plug the node into its VPN at `ip`: veth `eth0` inside, its peer on the bridge."""
        await self.booted
        port = bridge.next_port()
        loop = asyncio.get_running_loop()

        def configure():
            _run(["nsenter", f"--net=/proc/{self.init_pid}/ns/net", "ip", "-b", "-"],
                 f"link add eth0 type veth peer name {port} netns {bridge.name}\n"
                 f"addr add {ip}/{prefixlen} dev eth0\nlink set eth0 up\n")
            _run(["ip", "-n", bridge.name, "link", "set", port, "master", "br0", "up"])

        await loop.run_in_executor(None, configure)
        self.vpn_ip = ip

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the node: all its namespaces, from /root."""
        return ["nsenter", "-t", str(self.init_pid), "--all", "--wd=/root", *argv]

    def environment(self, extra: dict | None = None) -> dict[str, str]:
        """A fresh environment, as a VM's exe-unit gives: nothing of the host's; the image's PATH
        (its commands are in /usr/local/bin, see _image_commands)."""
        env = {
            "PATH": NODE_PATH,
            "HOME": "/root",
            "USER": "root",
            "LANG": "C.UTF-8",
            "NODE_IP": self.vpn_ip or "127.0.0.1",
            "GOLEM_VPN_IP": self.vpn_ip or "",
        }
        if extra:
            env.update({str(k): str(v) for k, v in extra.items()})
        return env

    async def shutdown(self) -> None:
        """Kill PID 1 (the kernel then kills the whole PID namespace), wait, remove the cgroups.
        The network and mount namespaces go with their last process, and the veth with them."""
        if not self.booted.done():
            self.booted.cancel()
        try:
            await self.booted
        except (asyncio.CancelledError, Exception):
            pass
        if self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except OSError:
                pass
        if self._launcher is not None:
            try:
                self._launcher.kill()
            except OSError:
                pass
            while self._launcher.poll() is None:
                await asyncio.sleep(0.005)
            for stream in (self._launcher.stdout, self._launcher.stderr):
                if stream and not stream.closed:
                    stream.close()
        self._final_cpu = self.cgroups.cpu_seconds()
        await self.cgroups.remove()


# --- the image registry -----------------------------------------------------

# The image a node runs is this host's own files (the Python and Ray of the local network's
# environment, OpenSSH's sshd, rsync), which is what the original project's image carries
# (its Dockerfile: Python, Ray, openssh-server, rsync). The registry API answers for it as
# registry.golem.network does: GET /v1/image/info?tag=|hash=[&count=] -> {"tag", "sha3", "http",
# ...}; 404 for what it does not know.
LOCAL_IMAGE_REPOSITORY = "golem/ray-on-golem"
LOCAL_IMAGE_TAGS = (f"{LOCAL_IMAGE_REPOSITORY}:local",)


class ImageRegistry:
    """The local stand-in for the Golem registry: every `golem/ray-on-golem:*` tag names the
    host's image, each tag with a hash of its own (sha3-224, as the registry's gvmi hashes)."""

    def __init__(self):
        self._by_hash: dict[str, str] = {}
        self.downloads: dict[str, int] = {}
        for tag in LOCAL_IMAGE_TAGS:
            self._remember(tag)

    @staticmethod
    def hash_of(tag: str) -> str:
        return hashlib.sha3_224(f"golem-localnet image {tag}".encode()).hexdigest()

    def _remember(self, tag: str) -> str:
        digest = self.hash_of(tag)
        self._by_hash[digest] = tag
        return digest

    def lookup(self, tag: str | None, digest: str | None, base_url: str, count: bool) -> dict:
        if bool(tag) == bool(digest):
            raise HttpError(400, "give exactly one of `tag` and `hash`")
        if tag:
            if not tag.startswith(f"{LOCAL_IMAGE_REPOSITORY}:") or len(tag) <= len(LOCAL_IMAGE_REPOSITORY) + 1:
                raise HttpError(404, f"image tag {tag} does not exist")
            digest = self._remember(tag)
        else:
            digest = digest.lower().removeprefix("sha3:")
            tag = self._by_hash.get(digest)
            if tag is None:
                raise HttpError(404, f"image hash {digest} does not exist")
        if count:
            self.downloads[digest] = self.downloads.get(digest, 0) + 1
        return {
            "tag": tag,
            "sha3": digest,
            "http": f"{base_url}/download/{digest}",
            "https": None,
            "size": 0,
            "downloads": self.downloads.get(digest, 0),
        }


class RegistryRoutes(HttpHandler):
    """The Golem registry's image lookup (no authentication, as registry.golem.network)."""

    async def get_image_info(self) -> Response:
        query = self.request.query
        host = self.request.headers.get("host") or "127.0.0.1"
        return self.ok(self.net.registry.lookup(query.get("tag"), query.get("hash"), f"http://{host}",
                                                (query.get("count") or "").lower() == "true"))


# --- ExeScript --------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    """One ExeScript batch: its commands and the cumulative results golem-core polls."""

    batch_id: str
    commands: list
    results: list = dataclasses.field(default_factory=list)
    finished: bool = False
    signal: Signal = dataclasses.field(default_factory=Signal)

    def add_result(self, result: dict) -> None:
        self.results.append(result)
        if result["isBatchFinished"]:
            self.finished = True
        self.signal.notify()


@dataclasses.dataclass
class ActivityFaults:
    """The faults of one activity, decided at creation from its provider's profile fields
    (`deploy_fails`, `dies_after_s`, `stops_answering_after_s`, `sshd_never_answers`, section 3)
    and the seed."""

    deploy_fails: bool = False
    dies_after: float | None = None  # real seconds after creation: terminates with an error
    stops_answering_after: float | None = None  # real seconds after creation: exe-unit calls fail
    sshd_never_answers: bool = False  # the net bridge to port 22 swallows bytes and answers none

    @classmethod
    def for_provider(cls, provider, seed, activity_ordinal: int, time_scale: float = 1.0) -> "ActivityFaults":
        key = f"{seed}:{provider.node_id}:{activity_ordinal}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))

        def real(sim_seconds):
            return None if sim_seconds is None else float(sim_seconds) / time_scale

        return cls(
            deploy_fails=rng.random() < float(provider.deploy_fails or 0),
            dies_after=real(provider.dies_after_s),
            stops_answering_after=real(provider.stops_answering_after_s),
            sshd_never_answers=rng.random() < float(provider.sshd_never_answers or 0),
        )


class Activity:
    """One activity: the exe-unit state machine over a Sandbox (docs/yagna-behaviour.md §4)."""

    def __init__(self, engine: "ActivityEngine", activity_id: str, agreement, faults: ActivityFaults):
        self.engine = engine
        self.activity_id = activity_id
        self.agreement = agreement
        self.agreement_id = agreement.id
        self.provider_id = agreement.provider.node_id
        self.faults = faults
        self.state = ["Initialized", None]
        self.reason: str | None = None
        self.error_message: str | None = None
        self.created_monotonic = time.monotonic()
        self.created_at = iso(utcnow())
        nodes = engine.nodes
        # A node's processes live in the node's own cgroups; the sandbox tracks only what the
        # local network itself starts for it (the nsenter of each `run`).
        self.sandbox = Sandbox(engine.sandbox_root, activity_id,
                               None if nodes else engine.cgroups and engine.cgroups.group(activity_id))
        provider = agreement.provider
        self.node = nodes and NodeMachine(nodes, activity_id, provider.name, int(provider.cpu_threads),
                                          int(float(provider.mem_gib) * (1 << 30)))
        self.deploy_net: list = []
        # set once the activity's processes are gone (what the invoice bills)
        self.final_cpu_seconds: Decimal | None = None
        self.final_wall_seconds: Decimal | None = None
        self.batches: dict[str, Batch] = {}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._current: Batch | None = None
        self._worker = asyncio.ensure_future(self._run_batches())
        self._timers: list[asyncio.TimerHandle] = []
        loop = asyncio.get_running_loop()
        if faults.dies_after is not None:
            self._timers.append(loop.call_later(faults.dies_after, self._die))
        self.terminated = asyncio.Event()

    # -- state --

    @property
    def alive(self) -> bool:
        return self.state[0] != "Terminated"

    def answering(self) -> bool:
        limit = self.faults.stops_answering_after
        return limit is None or time.monotonic() - self.created_monotonic < limit

    def check_answering(self) -> None:
        if not self.answering():
            # What yagna's router answers when the provider's node is gone (docs/yagna-behaviour.md §2).
            raise HttpError(
                500, f"GSB error: GSB failure: Bad request: endpoint address not found: /net/{self.provider_id}/exeunit"
            )

    def state_json(self) -> dict:
        return {"state": list(self.state), "reason": self.reason, "errorMessage": self.error_message}

    def wall_seconds(self) -> Decimal:
        return Decimal(str(round(time.monotonic() - self.created_monotonic, 6)))

    def _die(self) -> None:
        asyncio.ensure_future(self.engine.terminate(self.activity_id, "activity died", error="Activity process exited"))

    # -- batches --

    def submit(self, commands: list) -> str:
        if not self.alive:
            raise HttpError(400, f"Activity {self.activity_id} is terminated")
        if not isinstance(commands, list) or not commands:
            raise HttpError(400, "text: the ExeScript must be a non-empty JSON list of commands")
        batch = Batch(new_id(), commands)
        self.batches[batch.batch_id] = batch
        self._queue.put_nowait(batch)
        return batch.batch_id

    async def results(self, batch_id: str, timeout: float, command_index: int | None = None) -> list:
        """Cumulative results from index 0; blocks until the batch (or `command_index`) is done or
        `timeout` passes (exe-unit semantics, docs/yagna-behaviour.md §2)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            raise HttpError(404, f"Batch {batch_id} not found for activity {self.activity_id}")

        def done():
            if command_index is not None:
                return len(batch.results) > command_index or batch.finished
            return batch.finished

        await long_poll(batch.signal, done, max(0.0, min(timeout, BATCH_POLL_MAX_SECONDS)))
        if command_index is not None:
            return batch.results[: command_index + 1]
        return list(batch.results)

    async def _run_batches(self) -> None:
        while True:
            batch = await self._queue.get()
            if batch.finished:  # closed by a termination while queued
                continue
            self._current = batch
            for index, command in enumerate(batch.commands):
                ok, stdout, stderr, message = await self._command(command)
                last = index == len(batch.commands) - 1
                batch.add_result(
                    {
                        "index": index,
                        "eventDate": iso(utcnow()),
                        "result": "Ok" if ok else "Error",
                        "stdout": stdout,
                        "stderr": stderr,
                        "message": message,
                        # yagna ends a batch at its first error (docs/yagna-behaviour.md §4).
                        "isBatchFinished": last or not ok,
                    }
                )
                if not ok:
                    break
            self._current = None

    def fail_pending(self, message: str) -> None:
        """Finish every unfinished batch with an error result (the activity is gone)."""
        for batch in self.batches.values():
            if not batch.finished and batch is not self._current:
                batch.add_result(
                    {
                        "index": len(batch.results),
                        "eventDate": iso(utcnow()),
                        "result": "Error",
                        "stdout": None,
                        "stderr": None,
                        "message": message,
                        "isBatchFinished": True,
                    }
                )

    async def _command(self, command) -> tuple[bool, str | None, str | None, str | None]:
        if not isinstance(command, dict) or len(command) != 1:
            return False, None, None, f"invalid ExeScript command {command!r}: expected one {{name: args}} object"
        name, args = next(iter(command.items()))
        args = args or {}
        if not self.alive:
            return False, None, None, f"Activity {self.activity_id} is terminated"
        handler = getattr(self, f"_exe_{name}", None)
        if handler is None:
            return False, None, None, f"ExeScript command `{name}` is not supported by the local network"
        if not isinstance(args, dict):
            return False, None, None, f"ExeScript command `{name}`: arguments must be an object"
        try:
            return await handler(args)
        except asyncio.CancelledError:
            raise
        except HttpError as e:
            return False, None, None, e.message
        except Exception as e:  # a bug of ours must still finish the batch, never hang the poll
            print(f"golem-localnet: ExeScript `{name}` failed: {e!r}", file=sys.stderr)
            return False, None, None, f"ExeScript command `{name}` failed in the local network: {type(e).__name__}"

    async def _exe_deploy(self, args: dict):
        if self.state[0] != "Initialized":
            return False, None, None, f"deploy: activity is {self.state[0]}, not Initialized"
        net = args.get("net") or []
        if not isinstance(net, list) or not all(isinstance(n, dict) for n in net):
            return False, None, None, "deploy: `net` must be a list of network objects"
        for i, n in enumerate(net):
            try:
                ipaddress.IPv4Address(n.get("nodeIp"))
            except ValueError:
                return False, None, None, f"deploy: net[{i}].nodeIp must be an IPv4 address, got {n.get('nodeIp')!r}"
            if not isinstance(n.get("id"), str):
                return False, None, None, f"deploy: net[{i}].id must be the network id"
        self.state = ["Initialized", "Deployed"]
        if self.faults.deploy_fails:
            # The provider's profile says the image never comes up.
            await self.engine.terminate(
                self.activity_id, "deploy failed", error="Deployment failed: image unavailable", from_batch=True
            )
            return False, None, None, "Deployment failed: image unavailable"
        self.deploy_net = net
        first = net[0] if net else {}
        self.sandbox.vpn_ip = first.get("nodeIp")
        if self.node:
            try:
                await self.node.booted
                for n in net:
                    await self.node.attach(self.engine.nodes.bridge(n["id"]), n["nodeIp"], _prefixlen(n))
            except OSError as e:
                print(f"golem-localnet: activity {self.activity_id}: {e}", file=sys.stderr)
                return False, None, None, "Deployment failed: the VM did not come up"
        else:
            self.sandbox.loopback_ip = self.engine.loopback.allocate(first.get("id"), first.get("nodeIp"))
        self.state = ["Deployed", None]
        return True, None, None, None

    async def _exe_start(self, args: dict):
        if self.state[0] != "Deployed":
            return False, None, None, f"start: activity is {self.state[0]}, not Deployed"
        self.state = ["Ready", None]
        return True, None, None, None

    async def _exe_run(self, args: dict):
        if self.state[0] != "Ready":
            return False, None, None, f"run: activity is {self.state[0]}, not Ready (deploy and start first)"
        entry_point = args.get("entry_point")
        argv_rest = args.get("args") or []
        if not isinstance(entry_point, str) or not entry_point:
            return False, None, None, "run: `entry_point` must be a non-empty string"
        if not isinstance(argv_rest, list) or not all(isinstance(a, str) for a in argv_rest):
            return False, None, None, "run: `args` must be a list of strings"
        env = args.get("env") if isinstance(args.get("env"), dict) else None
        try:
            code, stdout, stderr = await self.engine.spawn(self, [entry_point, *argv_rest], env)
        except OSError as e:
            return False, None, None, f"run: cannot execute {entry_point}: {e.strerror}"
        if code != 0:
            return False, stdout, stderr, f"ExeScript command exited with code {code}"
        return True, stdout, stderr, None

    async def _exe_terminate(self, args: dict):
        await self.engine.terminate(self.activity_id, "terminated by ExeScript", from_batch=True)
        return True, None, None, None


def _prefixlen(net: dict) -> int:
    """The VPN's prefix length from a deploy `net` entry (golem-core sends `ip` and `mask`)."""
    try:
        return ipaddress.IPv4Network(f"{net.get('ip') or net['nodeIp']}/{net.get('mask') or 24}", strict=False).prefixlen
    except (ValueError, KeyError):
        return 24


class ActivityEngine:
    """All activities of the local network: creation from agreements, ExeScript, process
    accounting, and killing every process an activity started when it ends."""

    def __init__(self, datadir: str | Path, seed: int | str = 0, time_scale: float = 1.0,
                 isolation: str = "sandbox", isolation_reason: str | None = None, hide: Iterable[str] = ()):
        self.sandbox_root = Path(datadir) / "activities"
        self.sandbox_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.seed = seed
        self.activities: dict[str, Activity] = {}
        self.loopback = LoopbackPool()
        self.subreaper = become_subreaper()
        self.isolation = isolation
        self.isolation_reason = isolation_reason
        self.nodes = NodeHost([str(datadir), *hide]) if isolation == "namespaces" else None
        self.cgroups = None if self.nodes else CgroupTree.create()
        self.time_scale = time_scale
        # observer(event, activity), event in ("created", "terminated"): sections below listen
        self.observers: list[Callable[[str, Activity], None]] = []
        self._children: dict[int, Activity] = {}  # direct children (pid) -> owner
        self._ordinal = 0

    def create(self, agreement) -> Activity:
        """An activity on an Approved agreement (section 5's `Agreement`)."""
        if agreement.state != "Approved":
            # yagna: core/activity/src/provider/service.rs (docs/yagna-behaviour.md §3)
            raise HttpError(
                400, f"Bad request: Agreement {agreement.id} is not Approved. Current state: {agreement.state}"
            )
        self._ordinal += 1
        faults = ActivityFaults.for_provider(agreement.provider, self.seed, self._ordinal, self.time_scale)
        activity = Activity(self, new_id(), agreement, faults)
        self.activities[activity.activity_id] = activity
        for observer in list(self.observers):
            observer("created", activity)
        return activity

    def get(self, activity_id: str) -> Activity:
        activity = self.activities.get(activity_id)
        if activity is None:
            raise HttpError(404, f"Activity {activity_id} not found")
        return activity

    def by_node(self, net_id: str, ip: str) -> Activity | None:
        """The live activity deployed on VPN `net_id` with address `ip`."""
        for activity in self.activities.values():
            if activity.alive and any(n.get("id") == net_id and n.get("nodeIp") == ip for n in activity.deploy_net):
                return activity
        return None

    # -- processes --

    async def spawn(self, activity: Activity, argv: list[str], env: dict | None):
        """Run one command in the sandbox; return (exit code, stdout, stderr) when *it* exits.

        Output goes to files, not pipes: a daemon started in the background keeps the
        inherited descriptors open, and the command must still return when its own process ends.
        """
        sandbox = activity.sandbox
        node = activity.node
        if node:
            # Inside the VM: its namespaces (nsenter) and its cgroups, from the start.
            argv, environment, preexec = node.command(argv), node.environment(env), node.cgroups.joiner()
        else:
            environment = sandbox.environment(env)
            preexec = _join_cgroup(sandbox.cgroup) if sandbox.cgroup else None
        # Anonymous files (O_TMPFILE): nothing to clean up, nothing for the command to trip over.
        with tempfile.TemporaryFile(dir=sandbox.home) as out, tempfile.TemporaryFile(dir=sandbox.home) as err:
            proc = subprocess.Popen(
                argv,
                cwd=sandbox.home,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=preexec,
            )
            sandbox.sessions.add(proc.pid)
            self._children[proc.pid] = activity
            try:
                status, rusage = await self._wait_child(proc.pid)
            finally:
                self._children.pop(proc.pid, None)
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must never waitpid a reused pid
            sandbox.add_rusage(rusage)
            return proc.returncode, _read_capture(out), _read_capture(err)

    async def _wait_child(self, pid: int):
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pidfd = os.pidfd_open(pid)

        def ready():
            try:
                wpid, status, rusage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, status, rusage = pid, 0, None
            if wpid == 0:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not done.done():
                done.set_result((status, rusage))

        loop.add_reader(pidfd, ready)
        status, rusage = await done
        if rusage is None:
            rusage = _ZeroUsage()
        return status, rusage

    def reap_orphans(self, table: dict[int, ProcInfo] | None = None) -> None:
        """Reap zombie orphans re-parented here (subreaper) that belong to an activity, counting
        their CPU; never touches children the localnet waits for itself."""
        table = read_proc_table() if table is None else table
        me = os.getpid()
        for info in table.values():
            if info.ppid != me or info.state != "Z" or info.pid in self._children:
                continue
            owner = next(
                (
                    a
                    for a in self.activities.values()
                    if info.sid in a.sandbox.sessions or (info.pid, info.start) in a.sandbox.known
                ),
                None,
            )
            if owner is None:
                continue
            try:
                wpid, _status, rusage = os.wait4(info.pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if wpid:
                owner.sandbox.add_rusage(rusage)

    def cpu_seconds(self, activity: Activity) -> Decimal:
        table = read_proc_table()
        self.reap_orphans(table)
        seconds = activity.sandbox.cpu_seconds(table)
        return max(seconds, activity.node.cpu_seconds()) if activity.node else seconds

    async def kill_processes(self, activity: Activity) -> dict[int, ProcInfo]:
        """Kill every process of the sandbox: freeze (SIGSTOP, so none can fork), rescan, SIGKILL,
        until a scan finds none alive; then wait until they are reaped. Returns the last scan."""
        sandbox = activity.sandbox
        me = os.getpid()
        if activity.node:
            await activity.node.shutdown()  # the whole VM, then the nsenters still waiting for it
        if sandbox.cgroup:
            sandbox.cpu_seconds(read_proc_table())  # last look at their CPU before they go
            CgroupTree.kill(sandbox.cgroup)
        for _ in range(50):
            table = read_proc_table()
            if not sandbox.signal_all(table, signal.SIGSTOP):
                if not any(i.ppid == me for i in sandbox.owned(table).values()):
                    return table  # nothing alive and no zombie of ours to reap
                break
            table = read_proc_table()
            sandbox.cpu_seconds(table)  # last look at their CPU before they go
            sandbox.signal_all(table, signal.SIGKILL)
            for sid in sandbox.sessions:
                try:
                    os.killpg(sid, signal.SIGKILL)
                except OSError:
                    pass
            await asyncio.sleep(0.005)
            self.reap_orphans()
        # Wait for the zombies of our direct children and orphans to be reaped.
        for _ in range(200):
            table = read_proc_table()
            self.reap_orphans(table)
            left = [i for i in sandbox.owned(table).values() if i.state != "Z" or i.ppid == me]
            if not left:
                break
            await asyncio.sleep(0.01)
        if sandbox.cgroup:
            CgroupTree.remove(sandbox.cgroup)  # fails while members linger; close() retries
        return table

    # -- ending --

    async def terminate(
        self, activity_id: str, reason: str, error: str | None = None, from_batch: bool = False
    ) -> Activity:
        """Idempotent end of an activity: state Terminated, every process killed, batches closed.
        `from_batch`: called by a command of the running batch, which then reports its own result."""
        activity = self.get(activity_id)
        if not activity.alive:
            await activity.terminated.wait()
            return activity
        activity.state = ["Terminated", None]
        activity.reason = reason
        activity.error_message = error
        for timer in activity._timers:
            timer.cancel()
        if not from_batch:
            activity._worker.cancel()
            activity._current = None
        table = await self.kill_processes(activity)
        activity.final_cpu_seconds = activity.sandbox.cpu_seconds(table)
        if activity.node:
            activity.final_cpu_seconds = max(activity.final_cpu_seconds, activity.node.cpu_seconds())
        activity.final_wall_seconds = activity.wall_seconds()
        if activity.sandbox.loopback_ip:
            self.loopback.release(activity.sandbox.loopback_ip)
        activity.fail_pending(error or f"Activity terminated: {reason}")
        for observer in list(self.observers):
            observer("terminated", activity)
        activity.terminated.set()
        return activity

    async def destroy(self, activity_id: str) -> None:
        """DELETE /activity/{id}: idempotent (golem-core calls it 2-3 times, docs/yagna-behaviour.md §1)."""
        await self.terminate(activity_id, "destroyed by requestor")

    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        """End the agreement's activities; returns once all of them are gone (also those already
        ending), so that what they used is final."""
        await asyncio.gather(*(
            self.terminate(a.activity_id, reason) for a in list(self.activities.values()) if a.agreement_id == agreement_id
        ))

    def inspect(self) -> dict:
        by_state: dict[str, int] = {}
        for activity in self.activities.values():
            by_state[activity.state[0]] = by_state.get(activity.state[0], 0) + 1
        return {
            "isolation": {"mode": self.isolation, "reason": self.isolation_reason,
                          "prefix": self.nodes.prefix if self.nodes else None},
            "activities": {
                "count": len(self.activities),
                "by_state": by_state,
                "items": [
                    {
                        "activityId": a.activity_id,
                        "agreementId": a.agreement_id,
                        "state": a.state_json(),
                        "home": str(a.sandbox.home),
                        "nodeIp": a.sandbox.loopback_ip,
                        "vpnIp": a.sandbox.vpn_ip,
                        "sessions": sorted(a.sandbox.sessions),
                        "cgroup": str(a.sandbox.cgroup) if a.sandbox.cgroup else None,
                        "initPid": a.node.init_pid if a.node else None,
                        "hostname": a.node.name if a.node else None,
                        "nodeCgroups": [str(d) for d in a.node.cgroups.dirs] if a.node else [],
                    }
                    for a in self.activities.values()
                ],
            }
        }

    async def close(self) -> None:
        """Localnet exit (SIGTERM/SIGINT): every activity's processes die with it."""
        await asyncio.gather(
            *(self.terminate(a.activity_id, "local network shut down") for a in list(self.activities.values()) if a.alive)
        )
        self.loopback.close()
        if self.cgroups:
            self.cgroups.close()
        if self.nodes:
            self.nodes.close()

    def network_deleted(self, net_id: str) -> None:
        """DELETE /net/{id}: the VPN's switch goes, its nodes keep only `lo`."""
        if self.nodes:
            self.nodes.drop_bridge(net_id)


def _join_cgroup(group: Path):
    """A preexec_fn: the child enters the activity's cgroup before exec, so even its first fork
    is inside. Only os calls run there (no locks, no imports) between fork and exec."""
    procs = str(group / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    return join


class _ZeroUsage:
    ru_utime = 0.0
    ru_stime = 0.0


def _read_capture(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - CAPTURE_LIMIT_BYTES))
    return f.read().decode("utf-8", errors="replace")



class ActivityRoutes(HttpHandler):
    """The activity API (docs/yagna-behaviour.md §4)."""

    def _activity(self) -> Activity:
        activity = self.net.activities.get(self.params["activity_id"])
        activity.check_answering()
        return activity

    async def post_activity(self) -> Response:
        # golem-core sends the agreement id as a JSON string and wants a string back; yagna
        # answers an object body with an object (docs/yagna-behaviour.md §4).
        body = self.request.json()
        as_object = isinstance(body, dict)
        agreement_id = body.get("agreementId") if as_object else body
        if not isinstance(agreement_id, str) or not agreement_id:
            raise HttpError(400, "request body: expected the agreement id as a JSON string")
        activity = self.net.activities.create(self.net.market.get_agreement(agreement_id))
        return self.ok({"activityId": activity.activity_id} if as_object else activity.activity_id, 201)

    async def get_activities(self) -> Response:
        """`GET /activity?agreementId=`: the ids of the agreement's activities, ended ones too
        (yagna core/activity/src/api.rs `get_activities_for_agreement_web`)."""
        agreement_id = self.request.query.get("agreementId")
        if not agreement_id:
            raise HttpError(400, "agreementId: expected an agreement id")
        self.net.market.get_agreement(agreement_id)  # 404 for an unknown one
        return self.ok([a.activity_id for a in self.net.activities.activities.values() if a.agreement_id == agreement_id])

    async def get_activity_agreement(self) -> Response:
        """`GET /activity/{id}/agreement`: the agreement id as a JSON string (yagna core/activity/src/api.rs)."""
        return self.ok(self.net.activities.get(self.params["activity_id"]).agreement_id)

    async def delete_activity(self) -> Response:
        activity = self.net.activities.get(self.params["activity_id"])
        await self.net.activities.destroy(activity.activity_id)
        return self.ok(None)

    async def get_activity_state(self) -> Response:
        return self.ok(self._activity().state_json())

    async def post_activity_exec(self) -> Response:
        activity = self._activity()
        body = self.request.json_object()
        text = body.get("text")
        if not isinstance(text, str):
            raise HttpError(400, "text: expected the ExeScript as a JSON string")
        try:
            commands = json.loads(text)
        except ValueError as e:
            raise HttpError(400, f"text: malformed ExeScript JSON: {e}") from None
        return self.ok(activity.submit(commands))

    async def get_activity_exec(self) -> Response:
        activity = self._activity()
        timeout = self.request.query_float("timeout", BATCH_POLL_MAX_SECONDS, 0, 1e6)
        index = self.request.query.get("commandIndex")
        command_index = self.request.query_int("commandIndex", 0) if index not in (None, "") else None
        return self.ok(await activity.results(self.params["batch_id"], timeout, command_index))

###############################################################################
# 7. Net ######################################################################
###############################################################################


import base64
import struct

# RFC 6455 §1.3: the GUID every server appends to Sec-WebSocket-Key.
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_MAX_FRAME = 16 << 20
# yagna pings the requestor's socket every 5 s (docs/yagna-behaviour.md §4); a ping also keeps proxies honest.
WS_PING_INTERVAL = 5.0


@dataclasses.dataclass
class VpnNetwork:
    """A requestor's VPN (yagna core/vpn/src/network.rs): a CIDR, the requestor's own addresses
    and the provider nodes with theirs."""

    network_id: str
    network: ipaddress.IPv4Network
    gateway: str | None
    addresses: list = dataclasses.field(default_factory=list)  # the requestor's IPs
    nodes: dict = dataclasses.field(default_factory=dict)  # ip -> node (provider) id

    def json(self) -> dict:
        # `ip` WITH the prefix: without it golem-core sees a /32 and raises NetworkFull (§4).
        return {
            "id": self.network_id,
            "ip": f"{self.network.network_address}/{self.network.prefixlen}",
            "mask": str(self.network.netmask),
            "gateway": self.gateway,
        }

    def _host(self, value, field_name: str) -> str:
        if not isinstance(value, str):
            raise HttpError(400, f"{field_name}: expected an IPv4 address string")
        try:
            ip = ipaddress.IPv4Address(value)
        except ValueError:
            raise HttpError(400, f"{field_name}: {value!r} is not an IPv4 address") from None
        if ip not in self.network:
            raise HttpError(400, f"{field_name}: {value} is outside network {self.network}")
        return str(ip)


class NetRegistry:
    """The net API's networks (docs/yagna-behaviour.md §4); node addresses resolve to activities."""

    def __init__(self):
        self.networks: dict[str, VpnNetwork] = {}

    def create(self, body) -> dict:
        if not isinstance(body, dict):
            raise HttpError(400, "request body: expected a JSON object with ip")
        ip, mask, gateway = body.get("ip"), body.get("mask"), body.get("gateway")
        if not isinstance(ip, str) or not ip:
            raise HttpError(400, "ip: required, the network address with its prefix, e.g. 192.168.0.0/16")
        try:
            if mask is not None:
                if "/" in ip:
                    raise HttpError(400, "ip/mask: give either ip with a /prefix or mask, not both")
                network = ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)
            elif "/" in ip:
                network = ipaddress.IPv4Network(ip, strict=False)
            else:
                # yagna's default for a bare address is a /24 (core/vpn/src/network.rs).
                network = ipaddress.IPv4Network(f"{ip}/24", strict=False)
        except ValueError as e:
            raise HttpError(400, f"ip/mask: {e}") from None
        if network.num_addresses < 4:
            raise HttpError(400, f"ip: network {network} is too small for a requestor and a node")
        vpn = VpnNetwork(new_id(), network, None)
        vpn.gateway = vpn._host(gateway, "gateway") if gateway else str(next(network.hosts()))
        self.networks[vpn.network_id] = vpn
        return vpn.json()

    def get(self, network_id: str) -> VpnNetwork:
        vpn = self.networks.get(network_id)
        if vpn is None:
            raise HttpError(404, f"Network {network_id} not found")
        return vpn

    def delete(self, network_id: str) -> None:
        self.get(network_id)
        del self.networks[network_id]

    def add_address(self, network_id: str, body) -> None:
        vpn = self.get(network_id)
        ip = vpn._host(body.get("ip") if isinstance(body, dict) else None, "ip")
        if ip in vpn.nodes:
            raise HttpError(409, f"IP address {ip} is taken by node {vpn.nodes[ip]}")
        if ip not in vpn.addresses:
            vpn.addresses.append(ip)

    def add_node(self, network_id: str, body) -> None:
        """Idempotent: golem-core's refresh_nodes() re-posts every node (yagna ignores IpAddrTaken)."""
        vpn = self.get(network_id)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            raise HttpError(400, "id: required, the node id")
        ip = vpn._host(body.get("ip"), "ip")
        if ip in vpn.addresses:
            raise HttpError(409, f"IP address {ip} is the requestor's")
        vpn.nodes.setdefault(ip, body["id"])

    def inspect(self) -> dict:
        return {"networks": {"count": len(self.networks),
                             "items": [dict(n.json(), nodes=dict(n.nodes), addresses=list(n.addresses))
                                       for n in self.networks.values()]}}

    def nodes(self, network_id: str) -> list:
        return [{"id": node, "ip": ip} for ip, node in self.get(network_id).nodes.items()]

    def addresses(self, network_id: str) -> list:
        # yagna 0.17.6 answers each address with the network's prefix (`10.7.0.1/16`, tests/test_yagna_net.py)
        vpn = self.get(network_id)
        return [{"ip": f"{ip}/{vpn.network.prefixlen}"} for ip in vpn.addresses]


# --- WebSocket (RFC 6455), server side ---------------------------------------


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key.strip() + _WEBSOCKET_GUID).encode()).digest()).decode()


def websocket_handshake_error(headers) -> str | None:
    """Why a request is not a valid WebSocket upgrade, or None. `headers`: lower-case names."""
    if "websocket" not in (headers.get("upgrade") or "").lower():
        return "expected `Upgrade: websocket`"
    if "upgrade" not in (headers.get("connection") or "").lower():
        return "expected `Connection: Upgrade`"
    if (headers.get("sec-websocket-version") or "").strip() != "13":
        return "expected `Sec-WebSocket-Version: 13`"
    key = headers.get("sec-websocket-key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return "`Sec-WebSocket-Key` must be 16 bytes in base64"
    return None


def websocket_handshake_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n"
    ).encode()


class WebSocket:
    """Frames over an accepted connection. Client frames arrive masked, ours go unmasked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def send(self, opcode: int, payload: bytes = b"") -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.writer.write(header + payload)
        await self.writer.drain()

    async def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise ConnectionError("reserved bits set without an extension")
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        if n > WS_MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes exceeds {WS_MAX_FRAME}")
        if not masked:
            raise ConnectionError("client frames must be masked (RFC 6455 §5.1)")
        mask = await self.reader.readexactly(4)
        data = await self.reader.readexactly(n)
        if n:
            # XOR with the repeated 4-byte mask, as one big-int operation instead of a byte loop.
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return fin, opcode, data

    async def receive(self) -> tuple[int, bytes]:
        """The next data message (TEXT or BINARY, reassembled); answers pings itself.
        Returns (WS_CLOSE, b"") when the peer closes."""
        message, message_opcode = b"", None
        while True:
            try:
                fin, opcode, data = await self._frame()
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                return WS_CLOSE, b""
            if opcode == WS_PING:
                await self.send(WS_PONG, data)
            elif opcode == WS_PONG:
                continue
            elif opcode == WS_CLOSE:
                if not self.closed:
                    self.closed = True
                    await self.send(WS_CLOSE, data[:2])
                return WS_CLOSE, b""
            else:
                if opcode != WS_CONTINUATION:
                    message_opcode = opcode
                message += data
                if fin:
                    return message_opcode or WS_BINARY, message

    async def close(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.send(WS_CLOSE, struct.pack("!H", code))
            except (ConnectionError, OSError):
                pass


async def bridge_websocket_tcp(ws: WebSocket, tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Carry bytes both ways between a WebSocket and a TCP connection until either side ends
    (yagna's /net-api/v1/net/{id}/tcp/{ip}/{port}: raw TCP in binary frames)."""
    tcp_reader, tcp_writer = tcp

    async def ws_to_tcp():
        while True:
            opcode, data = await ws.receive()
            if opcode == WS_CLOSE:
                break
            tcp_writer.write(data)
            await tcp_writer.drain()
        if tcp_writer.can_write_eof():
            tcp_writer.write_eof()

    async def tcp_to_ws():
        while True:
            data = await tcp_reader.read(65536)
            if not data:
                break
            await ws.send(WS_BINARY, data)
        await ws.close()

    async def keepalive():
        while True:
            await asyncio.sleep(WS_PING_INTERVAL)
            await ws.send(WS_PING, b"")

    tasks = [asyncio.ensure_future(c) for c in (ws_to_tcp(), tcp_to_ws(), keepalive())]
    try:
        # Either direction finishing ends the bridge (half-close is not carried by yagna either).
        await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tcp_writer.close()
        await ws.close()



class NetRoutes(HttpHandler):
    """The net API (docs/yagna-behaviour.md §4) and its TCP-over-WebSocket bridge."""

    async def post_net(self) -> Response:
        return self.ok(self.net.vpn.create(self.request.json()))

    async def get_nets(self) -> Response:
        return self.ok([n.json() for n in self.net.vpn.networks.values()])

    async def get_net(self) -> Response:
        return self.ok(self.net.vpn.get(self.params["net_id"]).json())

    async def delete_net(self) -> Response:
        self.net.vpn.delete(self.params["net_id"])
        self.net.activities.network_deleted(self.params["net_id"])
        return self.ok(None)

    async def post_net_address(self) -> Response:
        self.net.vpn.add_address(self.params["net_id"], self.request.json())
        return self.ok(None)

    async def get_net_addresses(self) -> Response:
        return self.ok(self.net.vpn.addresses(self.params["net_id"]))

    async def post_net_node(self) -> Response:
        self.net.vpn.add_node(self.params["net_id"], self.request.json())
        return self.ok(None)

    async def get_net_nodes(self) -> Response:
        return self.ok(self.net.vpn.nodes(self.params["net_id"]))

    async def get_net_tcp(self) -> Response:
        """WebSocket to `ip:port` of a node: raw TCP bytes in binary frames (RoG's SSH path)."""
        vpn = self.net.vpn.get(self.params["net_id"])
        ip = vpn._host(self.params["ip"], "ip")
        try:
            port = int(self.params["port"])
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise HttpError(400, f"port: expected 1..65535, got {self.params['port']!r}")
        problem = websocket_handshake_error(self.request.headers)
        if problem:
            raise HttpError(400, f"WebSocket upgrade required: {problem}")
        activity = self.net.activities.by_node(vpn.network_id, ip)
        if activity is None:
            raise HttpError(404, f"No node with address {ip} in network {vpn.network_id}")
        activity.check_answering()
        if port == 22 and activity.faults.sshd_never_answers:
            # The provider's fault: the activity runs, the WebSocket opens, but its sshd never
            # answers (as behind a VPN that drops the node's packets): ssh waits for a banner.
            await self._swallow()
            return Response(101, upgraded=True)
        try:
            if activity.node:
                # From inside the node's network namespace: the only way in, as through yagna.
                sock = await asyncio.get_running_loop().run_in_executor(
                    None, self.net.activities.nodes.connect_inside, activity.node.init_pid, ip, port)
                tcp = await asyncio.open_connection(sock=sock)
            else:
                tcp = await asyncio.open_connection(activity.sandbox.loopback_ip, port)
        except OSError as e:
            raise HttpError(502, f"cannot connect to {ip}:{port}: {e.strerror or e}") from None
        reader, writer = self.request.connection
        writer.write(websocket_handshake_response(self.request.headers["sec-websocket-key"]))
        await writer.drain()
        await bridge_websocket_tcp(WebSocket(reader, writer), tcp)
        return Response(101, upgraded=True)

    async def _swallow(self) -> None:
        """Accept the WebSocket, read what the client sends until it closes, send nothing back."""
        reader, writer = self.request.connection
        writer.write(websocket_handshake_response(self.request.headers["sec-websocket-key"]))
        await writer.drain()
        ws = WebSocket(reader, writer)
        try:
            while (await ws.receive())[0] != WS_CLOSE:
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            await ws.close()
            writer.close()

###############################################################################
# 8. Payments #################################################################
###############################################################################

INVOICE_EVENT_TYPES = tuple(f"Invoice{t}Event" for t in ("Received", "Accepted", "Rejected", "Cancelled", "Settled", "Failed"))
DEBIT_NOTE_EVENT_TYPES = tuple(f"DebitNote{t}Event" for t in ("Received", "Accepted", "Rejected", "Cancelled", "Settled", "Failed"))


def decimal_str(value: Decimal) -> str:
    """Amounts are decimal strings (§3); no exponent notation."""
    return format(value.normalize(), "f") if value else "0"


class Allocation:
    """Funds reserved for agreements; `spent` grows as invoices and debit notes are accepted."""

    def __init__(self, address: str, platform: str, total: Decimal, timeout: datetime | None,
                 make_deposit: bool) -> None:
        self.id = str(uuid.uuid4())
        self.address = address
        self.platform = platform
        self.total = total
        self.spent = Decimal(0)
        self.timestamp = utcnow()
        self.timeout = timeout or self.timestamp + timedelta(days=3650)  # yagna: 10 years by default
        self.make_deposit = make_deposit
        self.released = False
        self.updated = self.timestamp  # moved by whoever changes `spent`

    def to_json(self) -> dict:
        return {"allocationId": self.id, "address": self.address, "paymentPlatform": self.platform,
                "totalAmount": decimal_str(self.total), "spentAmount": decimal_str(self.spent),
                "remainingAmount": decimal_str(self.total - self.spent), "timestamp": iso(self.timestamp),
                "timeout": iso(self.timeout), "createdTs": iso(self.timestamp), "updatedTs": iso(self.updated),
                "makeDeposit": self.make_deposit}


class EventLog:
    """A persistent payment event log: not consumed on delivery, filtered by a strict
    `eventDate > afterTimestamp` and by `appSessionId` (docs/yagna-behaviour.md §2)."""

    def __init__(self, clock: Clock, id_key: str, event_types: tuple[str, ...]) -> None:
        self.clock = clock
        self.id_key = id_key
        self.event_types = event_types
        self.events: list[tuple[datetime, str | None, dict]] = []
        self.signal = Signal()

    def add(self, event_type: str, document_id: str, app_session_id: str | None) -> dict:
        # an unknown eventType deserializes without the id and kills golem-core's loop (§2)
        if event_type not in self.event_types:
            raise ValueError(f"unknown payment event type {event_type}")
        date = self.clock.event_now()
        event = {"eventType": event_type, "eventDate": iso(date), self.id_key: document_id}
        self.events.append((date, app_session_id, event))
        self.signal.notify()
        return event

    def after(self, after: datetime | None, app_session_id: str | None, max_events: int) -> list[dict]:
        out = []
        for date, session, event in self.events:
            if after is not None and not date > after:
                continue
            if app_session_id is not None and session != app_session_id:
                continue
            out.append(event)
            if len(out) >= max_events:
                break
        return out


class Payments:
    """Allocations, and the debit-note/invoice documents and event logs that the
    provider side (section 8's generators) fills in."""

    def __init__(self, clock: Clock, identity: Identity, wallet: Decimal = Decimal(1000)) -> None:
        self.clock = clock
        self.identity = identity
        self.wallet = wallet  # the requestor's tGLM: what allocations can reserve and spend
        self.allocations: dict[str, Allocation] = {}
        self.debit_notes: dict[str, dict] = {}
        self.invoices: dict[str, dict] = {}
        self.debit_note_events = EventLog(clock, "debitNoteId", DEBIT_NOTE_EVENT_TYPES)
        self.invoice_events = EventLog(clock, "invoiceId", INVOICE_EVENT_TYPES)

    def accounts(self) -> list[dict]:
        return [{"platform": name, "address": self.identity.node_id, "driver": driver, "network": network,
                 "token": token, "send": True, "receive": False}
                for name, (driver, network, token) in PAYMENT_PLATFORMS.items()]

    def create_allocation(self, body: dict) -> Allocation:
        platform = body.get("paymentPlatform") or DEFAULT_PAYMENT_PLATFORM
        if isinstance(platform, dict):
            # the object form {driver, network, token} of yagna's API
            driver = str(platform.get("driver") or "erc20").lower()
            network = str(platform.get("network") or "local").lower()
            token = platform.get("token")
            token = str(token).lower() if token else ("glm" if network in ("polygon", "mainnet") else "tglm")
            platform = f"{driver}-{network}-{token}"
        if not isinstance(platform, str) or platform not in PAYMENT_PLATFORMS:
            raise HttpError(400, f"paymentPlatform: unknown payment platform {platform!r}; "
                                 f"known: {', '.join(PAYMENT_PLATFORMS)}")
        total_raw = body.get("totalAmount")
        try:
            total = Decimal(str(total_raw))
        except (InvalidOperation, ValueError):
            raise HttpError(400, f"totalAmount: not a decimal amount: {total_raw!r}") from None
        if not total.is_finite() or total < 0:
            raise HttpError(400, f"totalAmount: must be a non-negative amount, got {total_raw!r}")
        address = body.get("address") or self.identity.node_id
        if not isinstance(address, str) or address.lower() != self.identity.node_id:
            raise HttpError(400, f"address: {address} is not an identity of this node")
        timeout_raw = body.get("timeout")
        timeout = parse_iso(timeout_raw, "timeout") if timeout_raw else None
        make_deposit = body.get("makeDeposit", False)
        if not isinstance(make_deposit, bool):
            raise HttpError(400, "makeDeposit: expected a boolean")
        available = self.wallet - self.spent() - sum(
            (a.total - a.spent for a in self.allocations.values() if not a.released), Decimal(0))
        if total > available:
            # yagna's answer when the funds are reserved or spent (core/payment allocations)
            raise HttpError(400, "Insufficient funds to make allocation. Top up your account or release all "
                                 "existing allocations to unlock the funds via `yagna payment release-allocations`")
        allocation = Allocation(address.lower(), platform, total, timeout, make_deposit)
        self.allocations[allocation.id] = allocation
        return allocation

    def spent(self) -> Decimal:
        """What every allocation, released or not, has paid out of the wallet."""
        return sum((a.spent for a in self.allocations.values()), Decimal(0))

    def get_allocation(self, allocation_id: str) -> Allocation:
        allocation = self.allocations.get(allocation_id)
        if allocation is None or allocation.released:
            raise HttpError(404, f"Allocation [{allocation_id}] not found")
        return allocation

    def decorations(self, allocation_ids: list[str]) -> dict:
        """Demand decorations as yagna builds them (allocations/mod.rs:411-477)."""
        platforms: list[str] = []
        for allocation_id in allocation_ids:
            platform = self.get_allocation(allocation_id).platform
            if platform not in platforms:
                platforms.append(platform)
        props = [{"key": f"golem.com.payment.platform.{p}.address", "value": self.identity.node_id} for p in platforms]
        props.append({"key": "golem.com.payment.protocol.version", "value": "3"})
        clauses = [f"(golem.com.payment.platform.{p}.address=*)" for p in platforms]
        # a single clause prints without a wrapper (constraints.rs:71-85)
        first = clauses[0] if len(clauses) == 1 else "(|\n  " + "\n  ".join(clauses) + "\n)"
        return {"properties": props, "constraints": [first, "(golem.com.payment.protocol.version>1)"]}

    def inspect(self) -> dict:
        live = [a for a in self.allocations.values() if not a.released]
        spent = self.spent()
        return {"allocations": {"count": len(live), "released": len(self.allocations) - len(live),
                                "items": [a.to_json() for a in live]},
                "wallet": {"funds": decimal_str(self.wallet), "spent": decimal_str(spent),
                           "balance": decimal_str(self.wallet - spent),
                           "spent_by_allocation": {a.id: decimal_str(a.spent) for a in self.allocations.values()}},
                "debit_notes": len(self.debit_notes), "invoices": len(self.invoices),
                "debit_note_events": len(self.debit_note_events.events),
                "invoice_events": len(self.invoice_events.events)}


class PaymentRoutes(HttpHandler):
    async def get_requestor_accounts(self) -> Response:
        return self.ok(self.net.payments.accounts())

    async def get_provider_accounts(self) -> Response:
        return self.ok([])

    async def post_allocations(self) -> Response:
        allocation = self.net.payments.create_allocation(self.request.json_object())
        return self.ok(allocation.to_json(), 201)

    async def get_allocations(self) -> Response:
        return self.ok([a.to_json() for a in self.net.payments.allocations.values() if not a.released])

    async def get_allocation(self) -> Response:
        return self.ok(self.net.payments.get_allocation(self.params["allocation_id"]).to_json())

    async def delete_allocation(self) -> Response:
        allocation = self.net.payments.allocations.get(self.params["allocation_id"])
        if allocation is None:
            raise HttpError(404, f"Allocation [{self.params['allocation_id']}] not found")
        if allocation.released:
            # yagna 0.17.6's answer to a repeated release; golem-core ignores 404 and 410 (§1)
            raise HttpError(410, f"Allocation {allocation.id} has been already released")
        allocation.released = True
        return self.ok(None)

    async def get_demand_decorations(self) -> Response:
        raw = self.request.query.get("allocationIds", "")
        ids = [i for i in raw.split(",") if i]
        if not ids:
            raise HttpError(400, "allocationIds: expected one or more allocation ids")
        return self.ok(self.net.payments.decorations(ids))

    async def _events(self, log: EventLog) -> Response:
        q = self.request.query
        after = parse_iso(q["afterTimestamp"], "afterTimestamp") if q.get("afterTimestamp") else None
        session = q.get("appSessionId") or None
        timeout = self.request.query_float("timeout", PAYMENT_EVENT_TIMEOUT_S, 0, 1e6)
        max_events = self.request.query_int("maxEvents", MARKET_MAX_EVENTS_MAX, 1, 10**6)
        events = await long_poll(log.signal, lambda: log.after(after, session, max_events),
                                 min(timeout, MAX_LONG_POLL_S))
        return self.ok(events)

    async def get_invoice_events(self) -> Response:
        return await self._events(self.net.payments.invoice_events)

    async def get_debit_note_events(self) -> Response:
        return await self._events(self.net.payments.debit_note_events)

    async def get_invoices(self) -> Response:
        return self.ok(list(self.net.payments.invoices.values()))

    async def get_debit_notes(self) -> Response:
        return self.ok(list(self.net.payments.debit_notes.values()))

    async def get_invoice(self) -> Response:
        invoice = self.net.payments.invoices.get(self.params["invoice_id"])
        if invoice is None:
            raise HttpError(404, f"Invoice [{self.params['invoice_id']}] not found")
        return self.ok(invoice)

    async def get_debit_note(self) -> Response:
        note = self.net.payments.debit_notes.get(self.params["debit_note_id"])
        if note is None:
            raise HttpError(404, f"DebitNote [{self.params['debit_note_id']}] not found")
        return self.ok(note)


from decimal import ROUND_DOWN

# --- debit notes and invoices (provider side) -------------------------------

PROP_USAGE_VECTOR = "golem.com.usage.vector"
PROP_LINEAR_COEFFS = "golem.com.pricing.model.linear.coeffs"
# The provider agent's debit-note interval when the demand names none (yagna agent/provider factory.rs).
DEFAULT_DEBIT_NOTE_INTERVAL = 120
_WEI = Decimal("1e-18")
_MICRO = Decimal("1e-6")
# Why a provider agent breaks an agreement whose debit notes go unaccepted
# (yagna agent/provider BreakReason::DebitNotesDeadline).
DEBIT_NOTE_DEADLINE_REASON = "Requestor isn't accepting DebitNotes in time"


def usage_price(coeffs: list, usage_vector: list, counters: dict) -> tuple[list[Decimal], Decimal]:
    """Linear pricing (docs/yagna-behaviour.md §4): amount = initial + sum(price_i * usage_i), prices in
    usage-vector order and the initial price last. Exact decimals; usage counters rounded down
    to the microsecond first so the requestor recomputes the same amount from the vector."""
    usage = [counters.get(name, Decimal(0)).quantize(_MICRO, ROUND_DOWN) for name in usage_vector]
    prices = [Decimal(str(c)) for c in coeffs]
    amount = prices[-1] + sum((p * u for p, u in zip(prices, usage)), Decimal(0))
    return usage, amount.quantize(_WEI, ROUND_DOWN)


def _amount_str(value: Decimal) -> str:
    return format(value.quantize(_WEI, ROUND_DOWN), "f")


def _parse_amount(value, field_name: str) -> Decimal:
    if not isinstance(value, str):
        raise HttpError(400, f"{field_name}: expected a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise HttpError(400, f"{field_name}: {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise HttpError(400, f"{field_name}: must be a non-negative amount")
    return amount


@dataclasses.dataclass
class Billing:
    """What one agreement's provider bills: its terms, read once from the agreement."""

    agreement: Any
    usage_vector: list
    coeffs: list
    interval: float
    accept_timeout: float
    payment_timeout: float | None
    accepted: Decimal = Decimal(0)  # the highest amount the requestor accepted so far


class ProviderBilling:
    """Provider-side payments: debit notes on the negotiated interval priced from measured usage,
    an invoice when the agreement ends, their acceptance (the allocation spends the increase),
    and the provider breaking the agreement when a debit note is not accepted within the accept
    timeout. Documents and events live in `Payments`, whose routes serve them."""

    def __init__(self, activities: "ActivityEngine", payments: Payments, market: Market) -> None:
        self.activities = activities
        self.payments = payments
        self.market = market
        self._billing: dict[str, Billing] = {}  # agreement id ->
        self._last_note: dict[str, str] = {}  # activity id -> last debit note id
        self._last_payable: dict[str, float] = {}  # activity id -> monotonic time of its last payable note
        self._timers: dict[str, list] = {}  # activity id -> timer handles
        self._invoiced: set[str] = set()
        market.agreement_observers.append(self._agreement_changed)
        activities.observers.append(self._activity_changed)

    # -- terms --

    def billing(self, agreement) -> Billing:
        billing = self._billing.get(agreement.id)
        if billing is None:
            offer, demand = agreement.offer_properties, agreement.demand_properties
            usage_vector = list(offer.get(PROP_USAGE_VECTOR) or USAGE_VECTOR)
            coeffs = list(offer.get(PROP_LINEAR_COEFFS) or [0] * (len(usage_vector) + 1))
            # The provider echoes the requestor's terms (docs/yagna-behaviour.md §3).
            interval = demand.get(DEBIT_NOTE_INTERVAL_KEY) or offer.get(DEBIT_NOTE_INTERVAL_KEY)
            accept = demand.get(ACCEPT_TIMEOUT_KEY) or offer.get(ACCEPT_TIMEOUT_KEY)
            payment_timeout = demand.get(PAYMENT_TIMEOUT_KEY)
            billing = Billing(
                agreement=agreement,
                usage_vector=usage_vector,
                coeffs=coeffs,
                # a profile's `debit_note_interval_s` overrides the agreed interval (tests)
                interval=float(agreement.provider.debit_note_interval_s or interval or DEFAULT_DEBIT_NOTE_INTERVAL),
                accept_timeout=float(agreement.provider.debit_note_accept_timeout_s
                                     or min(accept or ACCEPT_TIMEOUT_S, ACCEPT_TIMEOUT_S)),
                payment_timeout=float(payment_timeout) if payment_timeout else None,
            )
            self._billing[agreement.id] = billing
        return billing

    def usage(self, activity: "Activity") -> dict[str, Decimal]:
        if activity.final_cpu_seconds is None:
            cpu, wall = self.activities.cpu_seconds(activity), activity.wall_seconds()
        else:
            cpu, wall = activity.final_cpu_seconds, activity.final_wall_seconds
        inflate = Decimal(str(activity.agreement.provider.inflate_billing))
        if inflate != 1:  # a misbehaving provider (profile `inflate_billing`) claims more than ran
            cpu, wall = cpu * inflate, wall * inflate
        return {
            "golem.usage.cpu_sec": cpu,
            "golem.usage.cpu-sec": cpu,
            "golem.usage.duration_sec": wall,
            "golem.usage.duration-sec": wall,
        }

    def activity_cost(self, activity: "Activity") -> tuple[list[Decimal], Decimal]:
        billing = self.billing(activity.agreement)
        return usage_price(billing.coeffs, billing.usage_vector, self.usage(activity))

    # -- debit notes --

    def _activity_changed(self, event: str, activity: "Activity") -> None:
        if event == "created":
            self.activity_created(activity)
        elif event == "terminated":
            self.activity_ended(activity)

    def activity_created(self, activity: "Activity") -> None:
        """Schedule the activity's debit notes in real seconds: golem-core checks their pace
        against its own clock (docs/yagna-behaviour.md §4), so the time scale must not speed them up."""
        billing = self.billing(activity.agreement)
        loop = asyncio.get_running_loop()
        self._timers[activity.activity_id] = [loop.call_later(billing.interval, self._tick, activity)]

    def _tick(self, activity: "Activity") -> None:
        if not activity.alive:
            return
        billing = self.billing(activity.agreement)
        if activity.answering():  # a provider that stopped answering sends nothing either
            self.issue_debit_note(activity)
        loop = asyncio.get_running_loop()
        self._timers.setdefault(activity.activity_id, []).append(loop.call_later(billing.interval, self._tick, activity))

    def issue_debit_note(self, activity: "Activity") -> dict:
        billing = self.billing(activity.agreement)
        usage, amount = self.activity_cost(activity)
        note_id = new_id()
        note = {
            "debitNoteId": note_id,
            "previousDebitNoteId": self._last_note.get(activity.activity_id),
            "timestamp": iso(utcnow()),
            "agreementId": activity.agreement.id,
            "activityId": activity.activity_id,
            "totalAmountDue": _amount_str(amount),
            "usageCounterVector": [float(u) for u in usage],
            "status": "RECEIVED",
            **self._parties(activity.agreement),
        }
        last_payable = self._last_payable.get(activity.activity_id)
        if billing.payment_timeout and (last_payable is None or time.monotonic() - last_payable >= billing.payment_timeout):
            # Payable only under mid-agreement payments, and at most one per payment timeout:
            # golem-core rejects more (validate_mid_agreement_payment, docs/yagna-behaviour.md §4).
            note["paymentDueDate"] = iso(utcnow() + timedelta(seconds=billing.payment_timeout))
            self._last_payable[activity.activity_id] = time.monotonic()
        self.payments.debit_notes[note_id] = note
        self._last_note[activity.activity_id] = note_id
        self.payments.debit_note_events.add("DebitNoteReceivedEvent", note_id, activity.agreement.app_session_id)
        loop = asyncio.get_running_loop()
        self._timers.setdefault(activity.activity_id, []).append(
            loop.call_later(billing.accept_timeout, self._check_accepted, activity, note_id)
        )
        return note

    def _check_accepted(self, activity: "Activity", note_id: str) -> None:
        if self.payments.debit_notes[note_id]["status"] != "RECEIVED" or not activity.alive:
            return
        asyncio.ensure_future(self.break_agreement(activity.agreement, f"{DEBIT_NOTE_DEADLINE_REASON}: {note_id}"))

    async def break_agreement(self, agreement, reason: str) -> None:
        """What a provider agent does to a requestor that does not accept debit notes: kill the
        activities and terminate the agreement. golem-core sees it only as the Terminated activity
        state and failing exec calls (docs/yagna-behaviour.md §3)."""
        if agreement.state == "Approved":
            agreement.terminate_reason = {"message": reason, "golem.provider.code": "DebitNotesDeadline"}
            self.market.set_state(agreement, "Terminated")  # -> _agreement_changed -> invoice
        await self.activities.terminate_agreement(agreement.id, reason)

    def activity_ended(self, activity: "Activity") -> None:
        for timer in self._timers.pop(activity.activity_id, []):
            timer.cancel()

    # -- invoices --

    def _agreement_changed(self, agreement, old: str, new: str) -> None:
        if new == "Terminated" and old == "Approved":
            asyncio.ensure_future(self.agreement_ended(agreement))

    async def agreement_ended(self, agreement) -> dict | None:
        """One invoice per agreement after it terminates: the final cost of all its activities."""
        if agreement.id in self._invoiced:
            return None
        self._invoiced.add(agreement.id)
        why = agreement.terminate_reason if isinstance(agreement.terminate_reason, dict) else {}
        if "golem.provider.code" in why:  # the provider broke it (break_agreement)
            reason = str(why.get("message"))
        else:
            reason = "agreement terminated by the requestor"
        await self.activities.terminate_agreement(agreement.id, reason)
        acts = [a for a in self.activities.activities.values() if a.agreement.id == agreement.id]
        if not acts:
            return None  # nothing ran: nothing to bill (yagna sends no invoice either)
        total = sum((self.activity_cost(a)[1] for a in acts), Decimal(0))
        billing = self.billing(agreement)
        invoice_id = new_id()
        invoice = {
            "invoiceId": invoice_id,
            "timestamp": iso(utcnow()),
            "agreementId": agreement.id,
            "activityIds": [a.activity_id for a in acts],
            "amount": _amount_str(total),
            "paymentDueDate": iso(utcnow() + timedelta(seconds=billing.payment_timeout or 86400)),
            "status": "RECEIVED",
            **self._parties(agreement),
        }
        self.payments.invoices[invoice_id] = invoice
        self.payments.invoice_events.add("InvoiceReceivedEvent", invoice_id, agreement.app_session_id)
        return invoice

    # -- accepting --

    def accept_debit_note(self, note_id: str, body) -> None:
        note = self.payments.debit_notes.get(note_id)
        if note is None:
            raise HttpError(404, f"DebitNote [{note_id}] not found")
        if self._accept(note, note["totalAmountDue"], body, f"DebitNote [{note_id}]"):
            self.payments.debit_note_events.add("DebitNoteAcceptedEvent", note_id, None)

    def accept_invoice(self, invoice_id: str, body) -> None:
        invoice = self.payments.invoices.get(invoice_id)
        if invoice is None:
            raise HttpError(404, f"Invoice [{invoice_id}] not found")
        if self._accept(invoice, invoice["amount"], body, f"Invoice [{invoice_id}]"):
            self.payments.invoice_events.add("InvoiceAcceptedEvent", invoice_id, None)

    def _accept(self, document: dict, due: str, body, what: str) -> bool:
        """yagna's acceptance checks: the accepted amount equals the amount due and the allocation
        covers the increase over what this agreement had accepted; the increase is spent.
        Accepting again is a no-op (golem-core retries accept on 408/504)."""
        if not isinstance(body, dict):
            raise HttpError(400, "request body: expected an object with totalAmountAccepted and allocationId")
        accepted = _parse_amount(body.get("totalAmountAccepted"), "totalAmountAccepted")
        if accepted != Decimal(due):
            raise HttpError(400, f"{what}: totalAmountAccepted {accepted} must equal the amount due {due}")
        allocation_id = body.get("allocationId")
        if not isinstance(allocation_id, str) or not allocation_id:
            raise HttpError(400, "allocationId: required")
        allocation = self.payments.get_allocation(allocation_id)
        if document["status"] == "ACCEPTED":
            return False
        billing = self._billing[document["agreementId"]]
        increase = max(Decimal(0), accepted - billing.accepted)
        remaining = allocation.total - allocation.spent
        if increase > remaining:
            raise HttpError(400, f"allocationId: allocation [{allocation_id}] has {remaining} left, {increase} needed")
        allocation.spent += increase
        billing.accepted += increase
        document["status"] = "ACCEPTED"
        return True

    def _parties(self, agreement) -> dict:
        offer, demand = agreement.offer_properties, agreement.demand_properties
        platform = demand.get("golem.com.payment.chosen-platform") or next(
            (k.split(".")[4] for k in offer if k.startswith("golem.com.payment.platform.") and k.endswith(".address")),
            DEFAULT_PAYMENT_PLATFORM,
        )
        requestor = self.market.identity.node_id
        return {
            "issuerId": agreement.provider.node_id,
            "recipientId": requestor,
            "payeeAddr": offer.get(f"golem.com.payment.platform.{platform}.address", agreement.provider.node_id),
            "payerAddr": demand.get(f"golem.com.payment.platform.{platform}.address", requestor),
            "paymentPlatform": platform,
        }

    def inspect(self) -> dict:
        return {"billing": {a: {"accepted": decimal_str(b.accepted)} for a, b in self._billing.items()}}

    def close(self) -> None:
        for timers in self._timers.values():
            for timer in timers:
                timer.cancel()
        self._timers.clear()


class BillingRoutes(HttpHandler):
    async def get_activity_usage(self) -> Response:
        """GET /activity/{id}/usage: the counters of the usage vector right now."""
        activity = self.net.activities.get(self.params["activity_id"])
        activity.check_answering()
        usage = self.net.billing.usage(activity)
        vector = self.net.billing.billing(activity.agreement).usage_vector
        return self.ok({"currentUsage": [float(usage.get(n, 0)) for n in vector], "timestamp": int(time.time())})

    async def post_debit_note_accept(self) -> Response:
        self.net.billing.accept_debit_note(self.params["debit_note_id"], self.request.json())
        return self.ok(None)

    async def post_invoice_accept(self) -> Response:
        self.net.billing.accept_invoice(self.params["invoice_id"], self.request.json())
        return self.ok(None)


###############################################################################
# 9. Routes ###################################################################
###############################################################################


class InspectionRoutes(HttpHandler):
    async def get_localnet_state(self) -> Response:
        return self.ok(self.net.inspect())


class LocalnetHandler(IdentityRoutes, MarketRoutes, ActivityRoutes, NetRoutes, PaymentRoutes, BillingRoutes,
                      InspectionRoutes, RegistryRoutes):
    """The handler class: one method per route, composed from the sections' mixins."""


M, A, P, N = "/market-api/v1", "/activity-api/v1", "/payment-api/v1", "/net-api/v1"
PUBLIC_ROUTES = {"get_version", "get_root", "get_image_info"}  # yagna skips auth for /version/get (§1)

ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/", "get_root"),
    ("GET", "/me", "get_me"),
    ("GET", "/version/get", "get_version"),
    ("GET", "/localnet/v1/state", "get_localnet_state"),
    ("GET", "/v1/image/info", "get_image_info"),  # the Golem registry (section 6)
    # market (docs/yagna-behaviour.md §3)
    ("POST", f"{M}/demands", "post_demands"),
    ("GET", f"{M}/demands", "get_demands"),
    ("DELETE", f"{M}/demands/{{demand_id}}", "delete_demand"),
    ("GET", f"{M}/demands/{{demand_id}}/events", "get_demand_events"),
    ("GET", f"{M}/demands/{{demand_id}}/proposals/{{proposal_id}}", "get_proposal"),
    ("POST", f"{M}/demands/{{demand_id}}/proposals/{{proposal_id}}", "post_counter_proposal"),
    ("POST", f"{M}/demands/{{demand_id}}/proposals/{{proposal_id}}/reject", "post_reject_proposal"),
    ("POST", f"{M}/agreements", "post_agreements"),
    ("GET", f"{M}/agreements", "get_agreements"),
    ("GET", f"{M}/agreements/{{agreement_id}}", "get_agreement"),
    ("POST", f"{M}/agreements/{{agreement_id}}/confirm", "post_agreement_confirm"),
    ("POST", f"{M}/agreements/{{agreement_id}}/wait", "post_agreement_wait"),
    ("POST", f"{M}/agreements/{{agreement_id}}/terminate", "post_agreement_terminate"),
    # payment
    ("GET", f"{P}/requestorAccounts", "get_requestor_accounts"),
    ("GET", f"{P}/providerAccounts", "get_provider_accounts"),
    ("POST", f"{P}/allocations", "post_allocations"),
    ("GET", f"{P}/allocations", "get_allocations"),
    ("GET", f"{P}/allocations/{{allocation_id}}", "get_allocation"),
    ("DELETE", f"{P}/allocations/{{allocation_id}}", "delete_allocation"),
    ("GET", f"{P}/demandDecorations", "get_demand_decorations"),
    ("GET", f"{P}/invoiceEvents", "get_invoice_events"),
    ("GET", f"{P}/debitNoteEvents", "get_debit_note_events"),
    ("GET", f"{P}/invoices", "get_invoices"),
    ("GET", f"{P}/debitNotes", "get_debit_notes"),
    ("GET", f"{P}/invoices/{{invoice_id}}", "get_invoice"),
    ("GET", f"{P}/debitNotes/{{debit_note_id}}", "get_debit_note"),
    # spec endpoints golem-core 0.7.8 never calls: 501 with a JSON message (§1)
    ("GET", f"{M}/agreementEvents", "not_implemented"),
    ("POST", f"{M}/agreements/{{agreement_id}}/cancel", "not_implemented"),
    ("POST", f"{M}/agreements/{{agreement_id}}/terminate/reason", "not_implemented"),
    ("POST", f"{M}/demands/{{demand_id}}/propertyQuery/{{query_id}}", "not_implemented"),
    ("POST", f"{M}/scan", "not_implemented"),
    ("GET", f"{M}/scan/{{scan_id}}/events", "not_implemented"),
    ("DELETE", f"{M}/scan/{{scan_id}}", "not_implemented"),
    ("PUT", f"{P}/allocations/{{allocation_id}}", "not_implemented"),
    ("POST", f"{P}/invoices/{{invoice_id}}/reject", "not_implemented"),
    ("POST", f"{P}/debitNotes/{{debit_note_id}}/reject", "not_implemented"),
    ("GET", f"{P}/payments", "not_implemented"),
    ("GET", f"{P}/payments/{{payment_id}}", "not_implemented"),
    ("GET", f"{P}/invoices/{{invoice_id}}/payments", "not_implemented"),
    ("GET", f"{P}/debitNotes/{{debit_note_id}}/payments", "not_implemented"),
    ("GET", f"{P}/payments/status", "not_implemented"),
    # activity (section 6): docs/yagna-behaviour.md §4
    ("POST", f"{A}/activity", "post_activity"),
    ("GET", f"{A}/activity", "get_activities"),
    ("DELETE", f"{A}/activity/{{activity_id}}", "delete_activity"),
    ("GET", f"{A}/activity/{{activity_id}}/state", "get_activity_state"),
    ("GET", f"{A}/activity/{{activity_id}}/usage", "get_activity_usage"),
    ("POST", f"{A}/activity/{{activity_id}}/exec", "post_activity_exec"),
    ("GET", f"{A}/activity/{{activity_id}}/exec/{{batch_id}}", "get_activity_exec"),
    ("GET", f"{A}/activity/{{activity_id}}/command", "not_implemented"),
    ("GET", f"{A}/activity/{{activity_id}}/agreement", "get_activity_agreement"),
    ("POST", f"{A}/activity/{{activity_id}}/encrypted", "not_implemented"),
    # net (section 7): docs/yagna-behaviour.md §4
    ("POST", f"{N}/net", "post_net"),
    ("GET", f"{N}/net", "get_nets"),
    ("GET", f"{N}/net/{{net_id}}", "get_net"),
    ("DELETE", f"{N}/net/{{net_id}}", "delete_net"),
    ("POST", f"{N}/net/{{net_id}}/addresses", "post_net_address"),
    ("GET", f"{N}/net/{{net_id}}/addresses", "get_net_addresses"),
    ("POST", f"{N}/net/{{net_id}}/nodes", "post_net_node"),
    ("GET", f"{N}/net/{{net_id}}/nodes", "get_net_nodes"),
    ("DELETE", f"{N}/net/{{net_id}}/nodes/{{node_id}}", "not_implemented"),
    ("GET", f"{N}/net/{{net_id}}/tcp", "not_implemented"),
    ("GET", f"{N}/net/{{net_id}}/tcp/{{ip}}/{{port}}", "get_net_tcp"),
    # payment acceptance (section 8)
    ("POST", f"{P}/debitNotes/{{debit_note_id}}/accept", "post_debit_note_accept"),
    ("POST", f"{P}/invoices/{{invoice_id}}/accept", "post_invoice_accept"),
]


class Localnet:
    """The whole simulated network: its parts, the HTTP server and the dispatcher."""

    def __init__(self, app_key: str, population: Population, clock: Clock, datadir: str | None = None,
                 isolation: str = "sandbox", isolation_reason: str | None = None, hide: Iterable[str] = ()) -> None:
        self.clock = clock
        self.population = population
        self.identity = Identity(app_key, population.seed)
        self.market = Market(clock, population, self.identity)
        self.payments = Payments(clock, self.identity, wallet_funds(population.profile))
        self.activities = ActivityEngine(datadir or tempfile.mkdtemp(prefix="golem-localnet-"), population.seed,
                                         clock.time_scale, isolation, isolation_reason, hide)
        self.vpn = NetRegistry()
        self.registry = ImageRegistry()
        self.billing = ProviderBilling(self.activities, self.payments, self.market)
        self.parts: list[Any] = [self.market, self.payments, self.activities, self.vpn, self.billing]
        self.router = Router(ROUTES)
        self.http = HttpServer(self.dispatch, self.authorize)
        self.handler_class = LocalnetHandler

    def authorize(self, request: Request) -> None:
        """The app key, before routing or reading a body (HttpError 401): without it nobody learns
        which paths exist. yagna skips it for its public routes (docs/yagna-behaviour.md §1)."""
        try:
            name, _ = self.router.match(request.method, request.path)
        except HttpError:
            name = None
        if name not in PUBLIC_ROUTES:
            self.identity.check(request)

    async def dispatch(self, request: Request) -> Response:
        """One error path: HttpError -> its status; anything else -> 500, both as
        JSON {"message": ...} and never a traceback to the client. The key was checked (`authorize`)."""
        try:
            name, params = self.router.match(request.method, request.path)
            handler = self.handler_class(self, request, params)
            return await getattr(handler, name)()
        except HttpError as e:
            return Response(e.status, {"message": e.message}, headers=e.headers)
        except RecursionError:  # json: a body nested deeper than the interpreter's recursion limit
            return Response(400, {"message": "request body: malformed JSON: nested too deeply"})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: say so without leaking internals
            print(f"golem-localnet: internal error on {request.method} {request.path}: {e!r}", file=sys.stderr)
            return Response(500, {"message": f"internal error: {type(e).__name__}"})

    def inspect(self) -> dict:
        state: dict[str, Any] = {"version": VERSION, "time_scale": self.clock.time_scale,
                                 "started_at": iso(self.clock.started_at)}
        for part in self.parts:
            if hasattr(part, "inspect"):
                state.update(part.inspect())
        return state

    async def close(self) -> None:
        await self.http.close()
        for part in reversed(self.parts):
            closer = getattr(part, "close", None)
            if closer is not None:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result


###############################################################################
# 10. CLI #####################################################################
###############################################################################


def _write_state_file(datadir: str, url: str, isolation: str = "sandbox", isolation_reason: str | None = None,
                      time_scale: float = 1.0) -> None:
    """DIR/localnet.json: where and who, what its nodes and its clock are, no secrets (docs/internals.md)."""
    path = os.path.join(datadir, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"url": url, "pid": os.getpid(), "started_at": iso(utcnow()), "isolation": isolation,
                   "isolation_reason": isolation_reason, "time_scale": time_scale}, f)
    os.replace(tmp, path)


async def serve(args: argparse.Namespace, population: Population) -> int:
    os.makedirs(args.datadir, mode=0o700, exist_ok=True)
    isolation, reason = choose_isolation(args.isolation)
    if isolation is None:
        print(f"golem_localnet.py: error: --isolation namespaces: {reason}", file=sys.stderr)
        return 2
    if reason:  # said once: auto fell back to the shared-loopback sandbox
        print(f"golem-localnet: isolation: sandbox (shared loopback), no VM-like nodes: {reason}",
              file=sys.stderr, flush=True)
    app_key = load_app_key(args.datadir)
    # Never visible to a node: our data dir (app key) and the requestor's (webserver token).
    hide = [*args.hide, os.environ.get("RAY_ON_GOLEM_DATADIR", ""),
            os.path.join(os.path.expanduser("~"), ".local", "share", "ray_on_golem")]
    net = Localnet(app_key, population, Clock(args.time_scale), datadir=args.datadir,
                   isolation=isolation, isolation_reason=reason, hide=hide)
    try:
        port = await net.http.start(args.host, args.port)
    except OSError as e:
        print(f"golem-localnet: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    url = f"http://{args.host}:{port}"
    _write_state_file(args.datadir, url, isolation, reason, net.clock.time_scale)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE.format(url=url), flush=True)
    await stop.wait()
    await net.close()
    return 0


def _print_population(population: Population, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"seed": population.seed, "providers": population.describe()}, indent=1))
        return
    print(f"{'#':>4}  {'name':<16} {'node id':<14} {'thr':>3} {'mem':>5} {'disk':>6} "
          f"{'cpu/h':>8} {'dur/h':>8} {'start':>8}  behaviour")
    for p in population.providers:
        print(f"{p.index:>4}  {p.name:<16} {p.node_id[:12]+'..':<14} {p.cpu_threads:>3} {p.mem_gib:>5g} "
              f"{p.storage_gib:>6g} {p.cpu_sec_price*3600:>8.4f} {p.duration_sec_price*3600:>8.4f} "
              f"{p.start_price:>8.4f}  {p.behaviour}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _int_in(lo: int, hi: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{what} must be in {lo}..{hi if hi is not None else ''}: {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="golem_localnet.py", description="The local Golem network.")
    sub = parser.add_subparsers(dest="command", required=True)

    def population_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--providers", type=_int_in(0, None, "a provider count"), help="population size (default: the profile's)")
        p.add_argument("--seed", type=int, help="population seed (default: the profile's)")
        p.add_argument("--profile", help="population profile, JSON or YAML (format: section 3 of this file)")

    serve_p = sub.add_parser("serve", help="run the yagna-compatible daemon")
    serve_p.add_argument("--port", type=_int_in(0, 65535, "a port number"), required=True, help="TCP port; 0 picks a free one")
    serve_p.add_argument("--datadir", required=True, help="directory for the app key and localnet.json")
    serve_p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1)")
    serve_p.add_argument("--time-scale", type=_positive_float, default=1.0,
                         help="simulated seconds per real second for provider behaviour")
    serve_p.add_argument("--isolation", choices=ISOLATION_MODES, default="auto",
                         help="namespaces: every activity is a VM-like machine (own network on its VPN, mount, "
                              "PID, UTS namespaces, cgroup limits; needs root); sandbox: process groups on "
                              "shared loopback addresses; auto (default): namespaces where possible")
    serve_p.add_argument("--hide", action="append", default=[], metavar="DIR",
                         help="a directory nodes must not see (repeatable); the data dir always is")
    population_args(serve_p)
    pop_p = sub.add_parser("population", help="print the provider population a seed and profile give")
    population_args(pop_p)
    pop_p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        population = Population(load_profile(args.profile), seed=args.seed, providers=args.providers)
    except ProfileError as e:
        print(f"golem_localnet.py: error: {e}", file=sys.stderr)
        return 2
    if args.command == "population":
        try:
            _print_population(population, args.json)
            sys.stdout.flush()
        except BrokenPipeError:  # `population | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("golem_localnet.py: error: --host must be a loopback address", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args, population))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
