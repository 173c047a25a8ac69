"""One golem-core negotiation scenario, recorded at the HTTP level, for the fidelity test.

    python tests/fidelity_scenario.py yagna DIR      # real yagna in DIR (loopback-only recipe)
    python tests/fidelity_scenario.py localnet URL   # a running localnet; key from YAGNA_APPKEY

Prints one JSON trace on stdout: every call golem-core made (method, path, status, request
and response JSON), through a recording reverse proxy. For yagna the program also plays the
provider over REST with a second identity (docs/yagna-behaviour.md §5) and stops
the daemon by PID before it exits; the daemon PID is written to DIR/yagna.pids first so that
the test can kill it if this program is itself killed.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from urllib.parse import urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import golem_localnet as gl  # noqa: E402  (its HTTP server carries the recording proxy)

API_PORT, GSB_PORT = 17465, 17464
CHAINS = ("MAINNET", "GOERLI", "HOLESKY", "MUMBAI", "POLYGON", "AMOY", "SEPOLIA", "HOODI", "RINKEBY")
PACKAGE = "hash:sha3:00:http://127.0.0.1:1/image.gvmi"


# ---- recording reverse proxy ---------------------------------------------------


class RecordingProxy:
    """Forwards every request to `upstream` and records the exchange."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.trace: list[dict] = []
        self.pool = ThreadPoolExecutor(32)
        self.server = gl.HttpServer(self.dispatch)

    async def start(self) -> str:
        port = await self.server.start("127.0.0.1", 0)
        return f"http://127.0.0.1:{port}"

    def _forward(self, request: gl.Request) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            target = request.path + ("?" + urlencode(request.query) if request.query else "")
            headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type", "accept")}
            conn.request(request.method, target, body=request.body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type") or "application/json"
        finally:
            conn.close()

    async def dispatch(self, request: gl.Request) -> gl.Response:
        loop = asyncio.get_running_loop()
        status, body, ctype = await loop.run_in_executor(self.pool, self._forward, request)
        self.trace.append({"method": request.method, "path": request.path, "query": request.query,
                           "status": status, "request": _json(request.body), "response": _json(body)})
        return gl.Response(status, raw=body, content_type=ctype)

    async def close(self) -> None:
        await self.server.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _json(body: bytes):
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


# ---- the golem-core scenario ------------------------------------------------------


async def scenario(api_url: str, app_key: str) -> None:
    """GolemNode, allocation, demand, first offer, counter, Draft, agreement, approval, terminate."""
    from golem.managers import MidAgreementPaymentsNegotiator, PaymentPlatformNegotiator
    from golem.node import GolemNode
    from golem.payload import VmPayload

    async with GolemNode(app_key=app_key, api_url=api_url) as node:
        allocation = await node.create_allocation(1.0)  # golem-core's defaults: erc20 / holesky
        demand = await node.create_demand(VmPayload(package_url=PACKAGE), allocations=[allocation])
        offer = await asyncio.wait_for(demand.initial_proposals().__anext__(), 60)
        demand_data = deepcopy(await demand.get_demand_data())
        for negotiator in (PaymentPlatformNegotiator(), MidAgreementPaymentsNegotiator()):
            await negotiator(demand_data, await offer.get_proposal_data())
        ours = await offer.respond(demand_data.properties, demand_data.constraints)
        draft = await asyncio.wait_for(ours.responses().__anext__(), 30)
        agreement = await draft.create_agreement()
        await agreement.confirm()
        if not await agreement.wait_for_approval():
            raise SystemExit("agreement not approved")
        await agreement.get_data(force=True)
        await agreement.terminate("fidelity scenario done")
        await demand.unsubscribe()
        await allocation.release()


async def recorded(upstream: str, app_key: str) -> list[dict]:
    proxy = RecordingProxy(upstream)
    url = await proxy.start()
    try:
        await scenario(url, app_key)
    finally:
        await proxy.close()
    return proxy.trace


# ---- the real yagna, loopback only (docs/yagna-behaviour.md §5) -----------------------


def yagna_env(datadir: Path, requestor_key: str, id_secret: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YAGNA_")}
    env.update({
        "YAGNA_DATADIR": str(datadir / "data"), "YAGNA_API_URL": f"http://127.0.0.1:{API_PORT}",
        "GSB_URL": f"tcp://127.0.0.1:{GSB_PORT}", "YA_NET_TYPE": "hybrid",
        "YA_NET_RELAY_HOST": "127.0.0.1:17477", "YA_NET_BIND_URL": "udp://127.0.0.1:17500",
        "CENTRAL_NET_HOST": "127.0.0.1:17478", "YAGNA_METRICS_URL": "http://127.0.0.1:1/",
        "RUST_LOG": "info", "RUST_BACKTRACE": "0", "YAGNA_DEV_SKIP_ALLOCATION_VALIDATION": "1",
        "YAGNA_AUTOCONF_ID_SECRET": id_secret, "YAGNA_AUTOCONF_APPKEY": requestor_key,
        "YAGNA_LOG_DIR": str(datadir / "logs"), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = "http://127.0.0.1:1"
    for chain in CHAINS:
        env[f"{chain}_GETH_ADDR"] = "http://127.0.0.1:1"
    return env


class Yagna:
    def __init__(self, binary: str, datadir: Path) -> None:
        self.binary = binary
        self.datadir = datadir
        self.requestor_key = secrets.token_hex(16)
        self.env = yagna_env(datadir, self.requestor_key, secrets.token_hex(32))
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def start(self) -> None:
        log = open(self.datadir / "yagna-run.log", "a")
        self.proc = subprocess.Popen([self.binary, "service", "run", "--disable-metrics-push"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        with open(self.datadir / "yagna.pids", "a") as f:
            f.write(f"{self.proc.pid}\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{API_PORT}/me", timeout=1)
                return
            except urllib.error.HTTPError:
                return  # 401: the REST API is up
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("yagna exited during start-up")
                time.sleep(0.1)
        raise SystemExit("yagna REST did not come up")

    def stop(self) -> None:
        """SIGINT first, SIGKILL as the fallback (docs/yagna-behaviour.md §5)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FakeProvider(threading.Thread):
    """The provider side over REST with the second identity (docs/yagna-behaviour.md §5)."""

    def __init__(self, key: str, node_id: str) -> None:
        super().__init__(daemon=True)
        self.key = key
        self.node_id = node_id
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def call(self, method: str, path: str, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{API_PORT}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                text = resp.read().decode()
                return resp.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def offer(self) -> dict:
        now_ms = int(time.time() * 1000)
        props = {
            "golem.com.payment.platform.erc20-holesky-tglm.address": self.node_id,
            "golem.com.payment.protocol.version": 3, "golem.com.payment.debit-notes.accept-timeout?": 240,
            "golem.com.pricing.model": "linear", "golem.com.pricing.model.linear.coeffs": [0.0001, 0.00002, 0.0],
            "golem.com.scheme": "payu", "golem.com.scheme.payu.debit-note.interval-sec?": 120,
            "golem.com.scheme.payu.payment-timeout-sec?": 120,
            "golem.com.usage.vector": ["golem.usage.cpu_sec", "golem.usage.duration_sec"],
            "golem.inf.cpu.architecture": "x86_64", "golem.inf.cpu.cores": 4, "golem.inf.cpu.threads": 8,
            "golem.inf.mem.gib": 8.0, "golem.inf.storage.gib": 40.0, "golem.node.debug.subnet": "public",
            "golem.node.id.name": "fidelity-provider", "golem.runtime.name": "vm", "golem.runtime.version": "0.4.2",
            "golem.runtime.capabilities": ["inet", "vpn", "manifest-support", "start-entrypoint"],
            "golem.srv.caps.multi-activity": True, "golem.srv.caps.payload-manifest": True,
        }
        constraints = f"(&(golem.srv.comp.expiration>{now_ms})(golem.node.debug.subnet=public))"
        return {"properties": props, "constraints": constraints}

    def run(self) -> None:
        offer = self.offer()
        status, offer_id = self.call("POST", "/market-api/v1/offers", offer)
        if status != 201:
            self.errors.append(f"offer subscribe: {status} {offer_id}")
            return
        try:
            while not self.stopping.is_set():
                status, events = self.call("GET", f"/market-api/v1/offers/{offer_id}/events?timeout=1&maxEvents=20")
                if status != 200:
                    continue
                for event in events:
                    proposal = event.get("proposal")
                    if proposal and proposal.get("state") == "Draft":
                        props = dict(offer["properties"])
                        for key in ("golem.com.scheme.payu.debit-note.interval-sec?",
                                    "golem.com.scheme.payu.payment-timeout-sec?"):
                            if key in proposal["properties"]:
                                props[key] = proposal["properties"][key]
                        self.call("POST", f"/market-api/v1/offers/{offer_id}/proposals/{proposal['proposalId']}",
                                  {"properties": props, "constraints": offer["constraints"]})
                    agreement = event.get("agreement")
                    if agreement:
                        self.call("POST", f"/market-api/v1/agreements/{agreement['agreementId']}/approve?timeout=5")
        finally:
            self.call("DELETE", f"/market-api/v1/offers/{offer_id}")


def run_against_yagna(datadir: Path) -> list[dict]:
    binary = os.environ.get("YAGNA_BINARY", "yagna")
    yagna = Yagna(binary, datadir)
    try:
        yagna.start()
        provider = json.loads(yagna.cli("id", "create", "provider", "--no-password", "--json"))["Ok"]["nodeId"]
        provider_key = yagna.cli("app-key", "create", "provider-key", "--id", provider).strip()
        yagna.cli("service", "shutdown")
        yagna.proc.wait(30)
        # identities negotiate locally only if both exist when the daemon starts (§4b, §4c)
        yagna.start()
        # payment accounts are registered in the running daemon (docs/yagna-behaviour.md §5)
        yagna.cli("payment", "init", "--sender", "--network", "holesky")
        yagna.cli("payment", "init", "--receiver", "--account", provider, "--network", "holesky")
        fake = FakeProvider(provider_key, provider)
        fake.start()
        try:
            return asyncio.run(recorded(f"http://127.0.0.1:{API_PORT}", yagna.requestor_key))
        finally:
            fake.stopping.set()
            fake.join(30)
            if fake.errors:
                raise SystemExit("; ".join(fake.errors))
    finally:
        yagna.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("yagna", "localnet"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "yagna":
        trace = run_against_yagna(Path(argv[1]))
    else:
        trace = asyncio.run(recorded(argv[1], os.environ["YAGNA_APPKEY"]))
    json.dump(trace, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
