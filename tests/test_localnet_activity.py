"""The local network's activities, VPN/TCP bridge and provider-side payments, end to end.

Every test drives a real `golem_localnet.py serve` process with the unmodified golem-core
(docs/yagna-behaviour.md §2-§4) and checks the processes of the sandboxes through /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from copy import deepcopy
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import pid_alive, start_localnet, stop_localnet

A, N, P = "/activity-api/v1", "/net-api/v1", "/payment-api/v1"
MARKER = b"GOLEM_LOCALNET_ACTIVITY="
# Prices per second with exact decimal representations (GLM), cpu first (usage-vector order).
CPU_PRICE, DURATION_PRICE, START_PRICE = "0.001", "0.0001", "0.01"
PROFILE = {
    "providers": 5,
    "known_at_start": 1.0,
    "latency_s": [0.01, 0.02],
    "behaviours": {},
    "explicit": [
        {"name": "ok-1", "cpu_sec_price": float(CPU_PRICE), "duration_sec_price": float(DURATION_PRICE),
         "start_price": float(START_PRICE)},
        {"name": "ok-2"},
        {"name": "bad-image", "deploy_fails": 1.0},
        {"name": "dies", "dies_after_s": 1.0},
        {"name": "mute", "stops_answering_after_s": 1.0},
    ],
}


def sandbox_processes(home: str) -> list[int]:
    """Every live process whose environment or working directory says it belongs to `home`'s
    activity, whatever it did to its session or parent (setsid, double fork)."""
    activity_id = Path(home).name.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b") ", 1)[1][:1] == b"Z":
                    continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if MARKER + activity_id in env or cwd.startswith(home):
            found.append(int(name))
    return found


@pytest.fixture
def localnet(localnet_factory):
    """A localnet with PROFILE (this module's providers); after SIGTERM no sandbox process is left."""
    ln = localnet_factory(profile=PROFILE, isolation="sandbox")  # VM-like nodes: test_localnet_isolation.py
    yield ln
    homes = [item["home"] for item in ln.state()["activities"]["items"]]
    assert stop_localnet(ln) == 0
    leftovers = [pid for home in homes for pid in sandbox_processes(home)]
    assert leftovers == [], f"sandbox processes outlived the localnet: {leftovers}"


# ---- golem-core helpers ---------------------------------------------------------


def golem_node(ln, **kwargs):
    from golem.node import GolemNode

    return GolemNode(app_key=ln.app_key, api_url=ln.url, **kwargs)


async def rent(node, name: str, *, interval: int = 120, accept_timeout: int = 240, payment_timeout: int = 600,
               autoclose: bool = True):
    """An approved agreement with provider `name` whose debit notes come every `interval` s."""
    from golem.managers import MidAgreementPaymentsNegotiator, PaymentPlatformNegotiator
    from golem.payload import VmPayload

    allocation = await node.create_allocation(Decimal(100), autoclose=autoclose)
    demand = await node.create_demand(VmPayload(package_url="hash:sha3:00:http://127.0.0.1:1/image.gvmi"),
                                      allocations=[allocation], autoclose=autoclose)

    async def offer():
        async for proposal in demand.initial_proposals():
            if (await proposal.get_proposal_data()).properties["golem.node.id.name"] == name:
                return proposal

    proposal = await asyncio.wait_for(offer(), 30)
    demand_data = deepcopy(await demand.get_demand_data())
    for negotiator in (PaymentPlatformNegotiator(), MidAgreementPaymentsNegotiator()):
        await negotiator(demand_data, await proposal.get_proposal_data())
    demand_data.properties.update({
        "golem.com.scheme.payu.debit-note.interval-sec?": interval,
        "golem.com.scheme.payu.payment-timeout-sec?": payment_timeout,
        "golem.com.payment.debit-notes.accept-timeout?": accept_timeout,
    })
    ours = await proposal.respond(demand_data.properties, demand_data.constraints)
    draft = await asyncio.wait_for(ours.responses().__anext__(), 10)
    agreement = await draft.create_agreement(autoclose=autoclose)
    await agreement.confirm()
    assert await agreement.wait_for_approval()
    return allocation, agreement, draft.data.issuer_id


async def run(activity, *commands, **kwargs):
    batch = await activity.execute_commands(*commands, **kwargs)
    await batch.wait(timeout=60)
    return batch.events


async def until_terminated(activity):
    """The activity's state once the provider side has ended it (polled like RoG's monitor)."""
    for _ in range(400):
        state = await activity.get_state()
        if state.state[0] == "Terminated":
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"activity still {state.state}")


def home_of(ln, activity_id: str) -> str:
    return next(i for i in ln.state()["activities"]["items"] if i["activityId"] == activity_id)["home"]


# ---- ExeScript -------------------------------------------------------------------


def test_deploy_start_run_returns_exit_code_stdout_and_stderr(localnet):
    from golem.resources import BatchError, Deploy, Run, Start

    async def main():
        async with golem_node(localnet) as node:
            _, agreement, _ = await rent(node, "ok-1")
            activity = await agreement.create_activity()
            events = await run(activity, Deploy(), Start(), Run("echo out; echo err >&2; echo $HOME $TMPDIR $NODE_IP"))
            assert [e.result for e in events] == ["Ok", "Ok", "Ok"]
            assert events[-1].is_batch_finished and not events[0].is_batch_finished
            out = events[-1].stdout.splitlines()
            home, tmp, ip = out[1].split()
            assert out[0] == "out" and events[-1].stderr == "err\n"
            assert tmp == f"{home}/tmp" and Path(home).is_dir() and ip.startswith("127.")
            assert (await activity.get_state()).state == ["Ready", None]
            # entry point with arguments, and the app key never reaches the sandbox
            events = await run(activity, Run(["/usr/bin/env"]))
            assert "HOME=" + home in events[0].stdout and "YAGNA_APPKEY" not in events[0].stdout
            assert localnet.app_key not in events[0].stdout
            with pytest.raises(BatchError, match="ExeScript command exited with code 3"):
                await run(activity, Run("echo before; exit 3"))
            # a command the local network does not run: a clear error result, not a hang
            status, batch_id = localnet.call("POST", f"{A}/activity/{activity.id}/exec",
                                             {"text": json.dumps([{"sign": {}}, {"start": {}}])})
            assert status == 200
            status, results = localnet.call("GET", f"{A}/activity/{activity.id}/exec/{batch_id}?timeout=5")
            assert results == [{"index": 0, "eventDate": results[0]["eventDate"], "result": "Error", "stdout": None,
                                "stderr": None, "isBatchFinished": True,
                                "message": "ExeScript command `sign` is not supported by the local network"}]
            # the venv of the localnet is the image: its python comes first on PATH
            events = await run(activity, Run("command -v python"))
            assert events[0].stdout.strip() == str(Path(sys.executable).parent / "python")
            await activity.destroy()
            await activity.destroy()  # idempotent: golem-core repeats it at shutdown (§2.1)
            assert (await activity.get_state()).state[0] == "Terminated"

    asyncio.run(main())


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", f"{A}/activity", "nope", 404, "Agreement [nope] not found."),
    ("POST", f"{A}/activity", {"x": 1}, 400, "request body: expected the agreement id as a JSON string"),
    ("GET", f"{A}/activity/nope/state", None, 404, "Activity nope not found"),
    ("POST", f"{N}/net", {"ip": "300.1.1.1/16"}, 400, "ip/mask:"),
    ("POST", f"{N}/net", {}, 400, "ip: required"),
    ("POST", f"{P}/debitNotes/nope/accept", {"totalAmountAccepted": "1", "allocationId": "a"}, 404,
     "DebitNote [nope] not found"),
])
def test_bad_requests_get_json_errors(localnet, method, path, body, status, message):
    got_status, got = localnet.call(method, path, body)
    assert got_status == status and got["message"].startswith(message)


def test_exec_rejects_malformed_scripts(localnet):
    async def main():
        async with golem_node(localnet) as node:
            _, agreement, _ = await rent(node, "ok-1")
            activity = await agreement.create_activity()
            for body, message in [({"text": "[{"}, "text: malformed ExeScript JSON"),
                                  ({"text": "{}"}, "text: the ExeScript must be a non-empty JSON list"),
                                  ({"nope": 1}, "text: expected the ExeScript as a JSON string")]:
                status, got = localnet.call("POST", f"{A}/activity/{activity.id}/exec", body)
                assert status == 400 and got["message"].startswith(message)

    asyncio.run(main())


def test_exescript_terminate_ends_the_activity_and_its_processes(localnet):
    from golem.resources import Deploy, Run, Start

    async def main():
        async with golem_node(localnet) as node:
            _, agreement, _ = await rent(node, "ok-2")
            activity = await agreement.create_activity()
            await run(activity, Deploy(), Start(), Run("sleep 1000 & echo $! > daemon.pid"))
            home = home_of(localnet, activity.id)
            daemon = int(Path(home, "daemon.pid").read_text())
            status, batch_id = localnet.call("POST", f"{A}/activity/{activity.id}/exec",
                                             {"text": json.dumps([{"terminate": {}}, {"run": {"entry_point": "true"}}])})
            status, results = localnet.call("GET", f"{A}/activity/{activity.id}/exec/{batch_id}?timeout=5")
            assert [(r["result"], r["isBatchFinished"]) for r in results] == [("Ok", False), ("Error", True)]
            assert results[1]["message"] == f"Activity {activity.id} is terminated"
            assert (await activity.get_state()).state[0] == "Terminated"
            assert not pid_alive(daemon) and sandbox_processes(home) == []
            status, got = localnet.call("POST", f"{A}/activity/{activity.id}/exec", {"text": "[{\"start\": {}}]"})
            assert status == 400 and got["message"] == f"Activity {activity.id} is terminated"

    asyncio.run(main())


# ---- sandboxes ----------------------------------------------------------------------


def test_background_daemon_survives_its_run_and_dies_on_destroy(localnet):
    from golem.resources import Deploy, Run, Start

    async def main():
        async with golem_node(localnet) as node:
            _, agreement, _ = await rent(node, "ok-1")
            activity = await agreement.create_activity()
            # a plain background daemon, and one that double-forks into a session of its own
            await run(activity, Deploy(), Start(),
                      Run("sleep 1000 & echo $! > daemon.pid; setsid sh -c 'sleep 1001 & echo $! > escaped.pid' &"))
            home = home_of(localnet, activity.id)
            await asyncio.sleep(0)  # the run returned while its daemons run on
            for _ in range(100):
                if Path(home, "escaped.pid").exists() and Path(home, "escaped.pid").read_text().strip():
                    break
                await asyncio.sleep(0.05)
            daemon = int(Path(home, "daemon.pid").read_text())
            escaped = int(Path(home, "escaped.pid").read_text())
            assert pid_alive(daemon) and pid_alive(escaped)
            assert {daemon, escaped} <= set(sandbox_processes(home))
            await activity.destroy()
            assert not pid_alive(daemon) and not pid_alive(escaped)
            assert sandbox_processes(home) == []

    asyncio.run(main())


async def _serve_name_on_port(activity, port: int, name: str):
    from golem.resources import Run

    server = (f"import socket,os\ns=socket.socket()\ns.bind((os.environ['NODE_IP'],{port}))\ns.listen()\n"
              f"while True:\n c,_=s.accept()\n c.sendall(b'{name}')\n c.close()\n")
    await run(activity, Run(f"cat > server.py <<'EOF'\n{server}EOF\n{sys.executable} server.py >/dev/null 2>&1 &"))


def _read_from(ip: str, port: int) -> bytes:
    import socket

    for _ in range(100):
        try:
            with socket.create_connection((ip, port), timeout=5) as s:
                s.shutdown(socket.SHUT_WR)
                return s.recv(100)
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {ip}:{port}")


def test_two_activities_serve_the_same_port_on_their_own_loopback_ips(localnet):
    from golem.resources import Deploy, Start

    async def main():
        async with golem_node(localnet) as node:
            network = await node.create_network("192.168.0.1/16")
            ips = []
            for name in ("ok-1", "ok-2"):
                _, agreement, provider_id = await rent(node, name)
                activity = await agreement.create_activity()
                vpn_ip = await network.create_node(provider_id)
                await run(activity, Deploy({"net": [network.deploy_args(vpn_ip)]}), Start())
                await _serve_name_on_port(activity, 18080, name)
                item = next(i for i in localnet.state()["activities"]["items"] if i["activityId"] == activity.id)
                assert item["vpnIp"] == vpn_ip
                ips.append(item["nodeIp"])
            assert ips[0] != ips[1]
            assert [_read_from(ip, 18080) for ip in ips] == [b"ok-1", b"ok-2"]

    asyncio.run(main())


# ---- VPN and the TCP bridge ------------------------------------------------------------


def test_network_keeps_its_prefix_and_nodes_are_idempotent(localnet):
    async def main():
        async with golem_node(localnet) as node:
            network = await node.create_network("192.168.0.1/16")
            status, data = localnet.call("GET", f"{N}/net/{network.id}")
            assert data["ip"] == "192.168.0.0/16" and data["mask"] == "255.255.0.0"
            ip = await network.create_node("0x" + "ab" * 20)
            await network.refresh_nodes()  # re-posts every node (docs/yagna-behaviour.md §4)
            assert localnet.call("GET", f"{N}/net/{network.id}/nodes")[1] == [{"id": "0x" + "ab" * 20, "ip": ip}]
            status, got = localnet.call("POST", f"{N}/net/{network.id}/nodes", {"id": "0x1", "ip": "10.0.0.1"})
            assert status == 400 and "outside network 192.168.0.0/16" in got["message"]

    asyncio.run(main())


def test_tcp_bridge_carries_an_echo_conversation(localnet):
    import aiohttp
    from golem.resources import Deploy, Run, Start

    echo = ("import socket,os\ns=socket.socket()\ns.bind((os.environ['NODE_IP'],2222))\ns.listen()\n"
            "while True:\n c,_=s.accept()\n while True:\n  d=c.recv(65536)\n  if not d: break\n"
            "  c.sendall(d.upper())\n c.close()\n")

    async def main():
        async with golem_node(localnet) as node:
            network = await node.create_network("192.168.0.1/16")
            _, agreement, provider_id = await rent(node, "ok-1")
            activity = await agreement.create_activity()
            ip = await network.create_node(provider_id)
            await run(activity, Deploy({"net": [network.deploy_args(ip)]}), Start(),
                      Run(f"cat > echo.py <<'EOF'\n{echo}EOF\n{sys.executable} echo.py >/dev/null 2>&1 &"))
            home = home_of(localnet, activity.id)
            node_ip = next(i for i in localnet.state()["activities"]["items"] if i["activityId"] == activity.id)["nodeIp"]
            _read_from(node_ip, 2222)  # until the echo server listens
            url = f"{localnet.url}/net-api/v1/net/{network.id}/tcp/{ip}/2222".replace("http://", "ws://")
            headers = {"Authorization": f"Bearer {localnet.app_key}"}
            async with aiohttp.ClientSession() as session:
                # heartbeat: aiohttp pings and closes the socket if no pong comes back in time
                async with session.ws_connect(url, headers=headers, heartbeat=0.2) as ws:
                    big = os.urandom(200_000)
                    for message in (b"hello", b"golem", big):
                        await ws.send_bytes(message)
                        got = b""
                        while len(got) < len(message):
                            got += (await ws.receive_bytes(timeout=10))
                        assert got == message.upper()
                    await asyncio.sleep(1)  # several pings answered
                    await ws.send_bytes(b"still there")
                    assert await ws.receive_bytes(timeout=10) == b"STILL THERE"
                # without the key there is no bridge
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await session.ws_connect(url)
                assert e.value.status == 401
            await activity.destroy()
            assert sandbox_processes(home) == []

    asyncio.run(main())


# ---- payments --------------------------------------------------------------------------


def test_debit_notes_and_invoice_amounts_follow_the_linear_price_of_measured_usage(localnet):
    from golem.resources import Deploy, Run, Start

    burn = ("import resource,subprocess,sys\n"
            "subprocess.run([sys.executable,'-c','import time\\nt=time.process_time()\\n"
            "while time.process_time()-t<2: pass'])\n"
            "r=[resource.getrusage(w) for w in (resource.RUSAGE_SELF,resource.RUSAGE_CHILDREN)]\n"
            "print(sum(x.ru_utime+x.ru_stime for x in r))\n")
    cpu, duration, start = Decimal(CPU_PRICE), Decimal(DURATION_PRICE), Decimal(START_PRICE)

    async def main():
        async with golem_node(localnet) as node:
            allocation, agreement, _ = await rent(node, "ok-1", interval=4)
            activity = await agreement.create_activity()
            created = time.monotonic()
            events = await run(activity, Deploy(), Start(),
                               Run(f"cat > burn.py <<'EOF'\n{burn}EOF\n{sys.executable} burn.py"))
            burned = Decimal(events[-1].stdout.strip())
            # wait for a note issued after the burn ended (one every 4 s since the activity began)
            needed = int((time.monotonic() - created) / 4) + 2
            while len(activity.debit_notes) < needed:
                await asyncio.sleep(0.1)
            notes = [await dn.get_data(force=True) for dn in activity.debit_notes]
            for note in notes:
                used_cpu, used_wall = (Decimal(str(u)) for u in note.usage_counter_vector)
                assert Decimal(note.total_amount_due) == (start + cpu * used_cpu + duration * used_wall).quantize(
                    Decimal("1e-18"))
                assert note.status == "RECEIVED"
            # mid-agreement payments: the first note is payable, then one per payment timeout (600 s)
            assert [n.payment_due_date is not None for n in notes] == [True] + [False] * (len(notes) - 1)
            last = notes[-1]
            used_cpu, used_wall = (Decimal(str(u)) for u in last.usage_counter_vector)
            assert abs(used_cpu - burned) <= burned * Decimal("0.05"), (used_cpu, burned)
            assert abs(used_wall - 4 * len(notes)) <= 4 * len(notes) * Decimal("0.05"), used_wall
            # acceptance must name the amount due and an allocation
            for body, status, message in [
                ({"totalAmountAccepted": "0", "allocationId": allocation.id}, 400, "must equal the amount due"),
                ({"totalAmountAccepted": "x", "allocationId": allocation.id}, 400, "totalAmountAccepted"),
                ({"totalAmountAccepted": last.total_amount_due, "allocationId": "nope"}, 404, "Allocation [nope]"),
            ]:
                got_status, got = localnet.call("POST", f"{P}/debitNotes/{last.debit_note_id}/accept", body)
                assert got_status == status and message in got["message"], got
            # golem-core validates the note against the agreement and accepts it
            await activity.debit_notes[-1].validate_and_accept(allocation)
            assert (await activity.debit_notes[-1].get_data(force=True)).status == "ACCEPTED"
            spent = Decimal((await allocation.get_data(force=True)).spent_amount)
            assert spent == Decimal(last.total_amount_due)

            status, usage = localnet.call("GET", f"{A}/activity/{activity.id}/usage")
            assert status == 200 and Decimal(str(usage["currentUsage"][0])) >= used_cpu
            assert Decimal(str(usage["currentUsage"][1])) >= used_wall
            await activity.destroy()
            await agreement.terminate("done")
            for _ in range(200):
                if agreement.invoice is not None:
                    break
                await asyncio.sleep(0.05)
            invoice = await agreement.invoice.get_data(force=True)
            final = localnet.state()["activities"]["items"][0]
            assert invoice.activity_ids == [activity.id] and final["state"]["state"][0] == "Terminated"
            amount = Decimal(invoice.amount)
            assert amount >= Decimal(last.total_amount_due)
            # the invoice is the linear price of the final usage: cpu unchanged since the burn
            wall = (amount - start - cpu * used_cpu) / duration
            assert used_wall <= wall <= used_wall + 60
            await agreement.invoice.validate_and_accept(allocation)
            assert Decimal((await allocation.get_data(force=True)).spent_amount) == amount

    asyncio.run(main())


def test_provider_terminates_when_a_debit_note_is_not_accepted_in_time(localnet):
    from golem.resources import BatchError, Deploy, Run, Start

    async def main():
        # a requestor that never looks at its debit notes
        async with golem_node(localnet, collect_payment_events=False) as node:
            # 5 s: the shortest acceptance deadline a provider agrees to (yagna expiration.rs)
            _, agreement, _ = await rent(node, "ok-1", interval=1, accept_timeout=5)
            activity = await agreement.create_activity()
            home = home_of(localnet, activity.id)
            try:
                await run(activity, Deploy(), Start(), Run("sleep 1000 &"))
            except BatchError:
                pass  # on a slow machine the provider may end it even before the daemon starts
            state = await until_terminated(activity)
            assert state.state == ["Terminated", None]
            assert state.reason.startswith("Requestor isn't accepting DebitNotes in time")
            assert (await agreement.get_data(force=True)).state == "Terminated"
            assert sandbox_processes(home) == []
            status, notes = localnet.call("GET", f"{P}/debitNotes")
            statuses = [n["status"] for n in notes if n["activityId"] == activity.id]
            assert statuses and set(statuses) == {"RECEIVED"}

    asyncio.run(main())


# ---- faults from the profile ------------------------------------------------------------


def test_faults_from_the_profile(localnet):
    from golem.resources import BatchError, Deploy, Run, Start
    from ya_activity.exceptions import ApiException

    async def main():
        async with golem_node(localnet) as node:
            _, agreement, _ = await rent(node, "bad-image")
            activity = await agreement.create_activity()
            with pytest.raises(BatchError, match="Deployment failed"):
                await run(activity, Deploy(), Start())
            assert (await activity.get_state()).state[0] == "Terminated"

            _, agreement, _ = await rent(node, "dies")
            activity = await agreement.create_activity()
            await run(activity, Deploy(), Start(), Run("sleep 1000 &"))
            home = home_of(localnet, activity.id)
            state = await until_terminated(activity)
            assert state.state[0] == "Terminated" and state.error_message == "Activity process exited"
            assert sandbox_processes(home) == []

            _, agreement, _ = await rent(node, "mute")
            activity = await agreement.create_activity()
            await run(activity, Deploy(), Start())
            await asyncio.sleep(1.2)
            with pytest.raises(ApiException) as e:
                await activity.get_state()
            assert e.value.status == 500 and "GSB error" in json.loads(e.value.body)["message"]

    asyncio.run(main())


# ---- the localnet going away --------------------------------------------------------------


def test_sigterm_leaves_no_sandbox_process_behind(tmp_path):
    from golem.resources import Deploy, Run, Start

    ln = start_localnet(tmp_path / "localnet", profile=PROFILE, isolation="sandbox")
    try:
        async def main():
            async with golem_node(ln) as node:  # closes nothing on the localnet: autoclose off
                _, agreement, _ = await rent(node, "ok-1", autoclose=False)
                activity = await agreement.create_activity(autoclose=False)
                await run(activity, Deploy(), Start(),
                          Run("sleep 1000 & echo $! > daemon.pid; setsid sleep 1001 >/dev/null 2>&1 &"))
                home = home_of(ln, activity.id)
                return home, int(Path(home, "daemon.pid").read_text())

        home, daemon = asyncio.run(main())
        assert pid_alive(daemon) and sandbox_processes(home)
    finally:
        code = stop_localnet(ln, signal.SIGTERM)
    assert code == 0
    assert not pid_alive(daemon) and sandbox_processes(home) == []


def test_a_killed_localnet_leaves_its_sandboxes_to_the_next_one(tmp_path):
    """SIGKILL gives the localnet no chance to clean up; with cgroup v2 the next localnet started
    on the machine kills what the dead one's sandboxes left running."""
    from golem.resources import Deploy, Run, Start

    first = start_localnet(tmp_path / "first", profile=PROFILE, isolation="sandbox")
    try:
        async def main():
            async with golem_node(first) as node:
                _, agreement, _ = await rent(node, "ok-1", autoclose=False)
                activity = await agreement.create_activity(autoclose=False)
                await run(activity, Deploy(), Start(), Run("setsid sleep 1000 & echo $! > daemon.pid"))
                item = next(i for i in first.state()["activities"]["items"] if i["activityId"] == activity.id)
                return item, int(Path(item["home"], "daemon.pid").read_text())

        item, daemon = asyncio.run(main())
    finally:
        stop_localnet(first, signal.SIGKILL)
    if item["cgroup"] is None:
        os.kill(daemon, signal.SIGKILL)
        pytest.skip("no writable cgroup v2 here: a SIGKILLed localnet's sandboxes are not recoverable")
    assert pid_alive(daemon)  # orphaned by the kill
    second = start_localnet(tmp_path / "second", profile=PROFILE, isolation="sandbox")
    try:
        assert not pid_alive(daemon) and sandbox_processes(item["home"]) == []
        assert not Path(item["cgroup"]).exists()
    finally:
        assert stop_localnet(second) == 0
