"""The local network's market, payment and identity API, driven by the unmodified golem-core.

Every test runs against a real `golem_localnet.py serve` process (fixtures in conftest.py).
The silent-killer tests follow the checklist of docs/yagna-behaviour.md §2, one test per item this
part of the network owns (the `POST /activity` and `POST /net` answers belong to the activity and net tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from copy import deepcopy
from datetime import datetime, timedelta, timezone

import pytest

from conftest import MARKET_TEST_PROFILE, REPO, pid_alive, start_localnet, stop_localnet

M, P = "/market-api/v1", "/payment-api/v1"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")
FAST_PROFILE = {"latency_s": [0.01, 0.05]}


def run(coro):
    return asyncio.run(coro)


def golem_node(ln):
    from golem.node import GolemNode

    return GolemNode(app_key=ln.app_key, api_url=ln.url)


def vm_payload(**kwargs):
    from golem.payload import VmPayload

    return VmPayload(package_url="hash:sha3:00:http://127.0.0.1:1/image.gvmi", **kwargs)


def negotiators():
    from golem.managers import MidAgreementPaymentsNegotiator, PaymentPlatformNegotiator

    return [PaymentPlatformNegotiator(), MidAgreementPaymentsNegotiator()]


async def counter(proposal, with_negotiators=True):
    """Counter a provider proposal the way golem-core's NegotiatingPlugin does."""
    demand_data = deepcopy(await proposal.demand.get_demand_data())
    if not with_negotiators:
        return await proposal.respond()
    proposal_data = await proposal.get_proposal_data()
    for negotiator in negotiators():
        await negotiator(demand_data, proposal_data)
    return await proposal.respond(demand_data.properties, demand_data.constraints)


async def collect_initial(demand, count, timeout=30.0):
    """Initial proposals until `count` arrived (the market test profile offers all at once)."""
    proposals = []

    async def gather():
        async for proposal in demand.initial_proposals():
            proposals.append(proposal)
            if len(proposals) >= count:
                return

    await asyncio.wait_for(gather(), timeout)
    return proposals


async def by_name(proposals):
    return {await p.get_provider_name(): p for p in proposals}


async def market_of_the_test_profile(node, payload=None):
    """An allocation, a demand and its 8 initial offers by provider name (MARKET_TEST_PROFILE)."""
    allocation = await node.create_allocation(1.0, network="local")
    demand = await node.create_demand(payload or vm_payload(), allocations=[allocation])
    return allocation, demand, await by_name(await collect_initial(demand, 8))


def raw_demand(ln, props=None, constraints="(&(golem.runtime.name=vm))"):
    now_ms = int(time.time() * 1000)
    properties = {"golem.srv.comp.expiration": now_ms + 3600_000, "golem.node.debug.subnet": "public",
                  "golem.com.payment.platform.erc20-local-tglm.address": "0x" + "11" * 20,
                  "golem.com.payment.protocol.version": "3",
                  "golem.com.payment.debit-notes.accept-timeout?": 240,
                  "golem.com.scheme.payu.debit-note.interval-sec?": 180,
                  "golem.com.scheme.payu.payment-timeout-sec?": 43200}
    properties.update(props or {})
    status, demand_id = ln.call("POST", f"{M}/demands", {"properties": properties, "constraints": constraints})
    assert status == 201, demand_id
    return demand_id, properties, constraints


def poll_events(ln, demand_id, want, timeout=5, max_polls=40):
    """Poll until `want` events arrived in total (or max_polls)."""
    events = []
    for _ in range(max_polls):
        status, batch = ln.call("GET", f"{M}/demands/{demand_id}/events?timeout={timeout}&maxEvents=10")
        assert status == 200, batch
        events += batch
        if len(events) >= want:
            break
    return events


# ---- process, CLI, population -----------------------------------------------


def test_serve_writes_private_app_key_and_state_file_and_reuses_the_key(tmp_path):
    ln = start_localnet(tmp_path / "ln", providers=3)
    try:
        key_file = tmp_path / "ln" / "appkey"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        info = json.loads((tmp_path / "ln" / "localnet.json").read_text())
        assert info["url"] == ln.url and info["pid"] == ln.pid and RFC3339.match(info["started_at"])
        assert ln.app_key not in (tmp_path / "ln" / "localnet.json").read_text()
        assert ln.app_key not in " ".join(open(f"/proc/{ln.pid}/cmdline").read().split("\0"))
        first_key = ln.app_key
    finally:
        assert stop_localnet(ln) == 0
    again = start_localnet(tmp_path / "ln", providers=3)
    try:
        assert again.app_key == first_key
        assert again.call("GET", "/me")[0] == 200
    finally:
        assert stop_localnet(again) == 0


def test_yagna_appkey_from_environment_is_used_and_not_written(localnet_factory):
    ln = localnet_factory(providers=1, env={"YAGNA_APPKEY": "env-key-123"})
    assert not (ln.datadir / "appkey").exists()
    assert ln.call("GET", "/me", key="env-key-123")[0] == 200
    assert ln.call("GET", "/me", key="something-else")[0] == 401


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly_even_with_a_long_poll_in_flight(tmp_path, sig):
    ln = start_localnet(tmp_path / "ln", providers=0)
    demand_id, _, _ = raw_demand(ln)
    results = []
    poller = threading.Thread(target=lambda: results.append(
        _safe_call(ln, "GET", f"{M}/demands/{demand_id}/events?timeout=10&maxEvents=10")))
    poller.start()
    time.sleep(0.3)  # let the poll reach the server
    assert stop_localnet(ln, sig) == 0
    poller.join(20)
    assert not poller.is_alive()


def _safe_call(ln, *args):
    try:
        return ln.call(*args)
    except OSError as e:  # the server closed the connection on shutdown
        return e


@pytest.mark.parametrize("args, message", [
    (["serve", "--port", "0", "--datadir", "X", "--time-scale", "0"], "--time-scale"),
    (["serve", "--port", "70000", "--datadir", "X"], "--port"),
    (["serve", "--port", "0"], "--datadir"),
    (["serve", "--port", "0", "--datadir", "X", "--host", "0.0.0.0"], "--host"),
    (["population", "--providers", "-3"], "--providers"),
    (["population", "--profile", "PROFILE"], "sizes"),
    (["population", "--profile", "MISSING"], "profile"),
])
def test_bad_command_lines_exit_2_naming_the_argument(tmp_path, args, message):
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps({"sizes": []}))
    args = [a.replace("PROFILE", str(profile)).replace("MISSING", str(tmp_path / "nope.json"))
            .replace("X", str(tmp_path / "d")) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "golem_localnet.py"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_population_is_reproducible_and_resembles_a_testnet(tmp_path):
    def population(*args):
        out = subprocess.run([sys.executable, str(REPO / "golem_localnet.py"), "population", "--json", *args],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)["providers"]

    default = population()
    assert default == population()
    assert population("--seed", "2") != default
    assert 24 <= len(default) <= 60  # "a few dozen"
    assert len({p["node_id"] for p in default}) == len(default)
    assert len({p["cpu_threads"] for p in default}) >= 3
    assert len({tuple(p["coeffs"]) for p in default}) == len(default)
    behaviours = {p["behaviour"] for p in default}
    assert {"ok", "busy", "no_answer", "unreachable", "reject_agreement", "outbound_rules"} <= behaviours
    assert all(re.fullmatch(r"0x[0-9a-f]{40}", p["node_id"]) for p in default)
    yaml_profile = tmp_path / "p.yaml"
    yaml_profile.write_text("providers: 5\nbehaviours: {busy: 0.4}\n")
    small = population("--profile", str(yaml_profile))
    assert len(small) == 5 and sum(p["behaviour"] == "busy" for p in small) == 2


# ---- the matcher: golem-core's grammar, yagna's semantics (docs/yagna-behaviour.md §3) ----------

OFFER = {"golem.inf.cpu.threads": 4, "golem.node.debug.subnet": "public", "golem.srv.caps.multi-activity": True,
         "golem.runtime.capabilities": ["inet", "vpn"], "golem.runtime.name": "vm"}


@pytest.mark.parametrize("constraints, result", [
    ("(&)", True),
    ("(golem.inf.cpu.threads>=4)", True),
    ("(golem.inf.cpu.threads>4)", False),
    ("(golem.inf.cpu.threads=four)", False),
    ("(golem.runtime.capabilities=vpn)", True),  # lists: = means contains
    ("(golem.runtime.capabilities<vpn)", False),  # ordering is false on lists
    ("(golem.node.debug.subnet=pub*)", True),
    ("(golem.node.debug.subnet>private)", True),  # strings order lexicographically
    ("(golem.srv.caps.multi-activity=true)", True),
    ("(golem.com.payment.platform.erc20-local-tglm.address=*)", None),  # missing: undefined
    ("(golem.runtime.name=*)", True),
    ("(&(golem.runtime.name=vm)(golem.missing=1))", None),
    ("(&(golem.runtime.name=docker)(golem.missing=1))", False),
    ("(|(golem.runtime.name=docker)(golem.missing=1))", None),
    ("(|(golem.runtime.name=vm)(golem.missing=1))", True),
    ("(!(golem.runtime.name=vm))", False),
    ("(!(golem.missing=1))", None),
    ("(&\n\t(golem.runtime.name=vm)\n\t(golem.inf.cpu.threads<=8))", True),
])
def test_constraint_matching(constraints, result):
    import golem_localnet as gl

    assert gl.evaluate(gl.parse_constraints(constraints), OFFER) is result


@pytest.mark.parametrize("constraints", ["", "()", "(a<>1)", "(a=x@y)", "(&(a=1)", "(a=1))", "(!(a=1)(b=2))"])
def test_constraints_outside_golem_cores_grammar_are_refused(constraints):
    import golem_localnet as gl

    with pytest.raises(gl.ConstraintError):
        gl.parse_constraints(constraints)


def test_golem_core_constraints_all_parse():
    """Whatever golem-core serializes (payloads with capabilities, RoG's extra clauses) parses here."""
    import golem_localnet as gl
    from golem.payload import Constraint, Constraints, ManifestVmPayload

    async def build():
        payloads = [vm_payload(min_cpu_threads=2, capabilities=["vpn", "inet"]), ManifestVmPayload(manifest="e30=")]
        return [(await p.build_properties_and_constraints())[1] for p in payloads]

    extra = Constraints([Constraint("golem.inf.cpu.threads", "<=", 8),
                         Constraints([Constraint("golem.node.debug.subnet", "=", "public")], operator="|")])
    profile = {**gl.load_profile(None), "providers": 1, "explicit": [{"cpu_threads": 8}]}
    offer = gl.Population(profile).providers[0].offer_properties(0)
    for constraints in run(build()) + [extra]:
        assert gl.evaluate(gl.parse_constraints(constraints.serialize()), offer) is True


# ---- HTTP: auth and errors ----------------------------------------------------


def test_every_route_but_version_needs_the_bearer_key(localnet):
    status, body = localnet.call("GET", "/me", key=None)
    assert status == 401 and body == {"message": "Missing application key"}
    status, body = localnet.call("GET", f"{M}/demands", key="wrong")
    assert status == 401 and body == {"message": "Invalid application key"}
    assert localnet.call("GET", f"/me?authToken={localnet.app_key}", key=None)[0] == 200
    status, body = localnet.call("GET", "/version/get", key=None)
    assert status == 200 and body["current"]["version"] == "0.17.6"
    status, me = localnet.call("GET", "/me")
    assert status == 200 and set(me) == {"identity", "name", "role"} and me["role"] == "manager"


@pytest.mark.parametrize("method, path, raw, status", [
    ("GET", "/no/such/thing", None, 404),
    ("PUT", "/me", None, 405),
    ("POST", f"{M}/demands", b"{not json", 400),
    ("POST", f"{M}/demands", b"[1, 2]", 400),
    ("POST", f"{M}/demands", b'{"properties": {}, "constraints": "(a<>1)"}', 400),
    ("POST", f"{M}/demands", b'{"properties": [], "constraints": "(&)"}', 400),
    ("GET", f"{M}/demands/nope/events", None, 404),
    ("DELETE", f"{M}/demands/nope", None, 404),
    ("GET", f"{M}/agreements/nope", None, 404),
    ("POST", f"{M}/agreements/nope/terminate", b"{}", 404),
    ("POST", f"{M}/agreements", b'{"validTo": "2030-01-01T00:00:00Z"}', 400),
    ("POST", f"{M}/agreements", b'{"proposalId": "nope", "validTo": "yesterday"}', 400),
    ("GET", f"{M}/agreementEvents", None, 501),
    ("GET", f"{M}/agreements?state=Signed", None, 400),
    ("GET", f"{M}/agreements?beforeDate=never", None, 400),
    ("GET", "/activity-api/v1/activity", None, 400),
    ("GET", "/activity-api/v1/activity?agreementId=nope", None, 404),
    ("GET", "/activity-api/v1/activity/nope/agreement", None, 404),
    ("GET", f"{P}/allocations/nope", None, 404),
    ("DELETE", f"{P}/allocations/nope", None, 404),
    ("POST", f"{P}/allocations", b'{"totalAmount": "lots"}', 400),
    ("POST", f"{P}/allocations", b'{"totalAmount": "-1"}', 400),
    ("POST", f"{P}/allocations", b'{"totalAmount": "1", "address": 7}', 400),
    ("POST", f"{P}/allocations", b'{"totalAmount": "1", "address": "0x0000000000000000000000000000000000000001"}', 400),
    ("POST", f"{P}/allocations", b'{"totalAmount": "1", "timeout": 12}', 400),
    ("POST", f"{P}/allocations", b'{"totalAmount": "1", "paymentPlatform": "erc20-moon-tglm"}', 400),
    ("GET", f"{P}/demandDecorations?allocationIds=nope", None, 404),
    ("GET", f"{P}/demandDecorations", None, 400),
    ("GET", f"{P}/invoiceEvents?timeout=soon", None, 400),
    ("GET", f"{P}/debitNoteEvents?afterTimestamp=never", None, 400),
    ("GET", f"{P}/invoices/nope", None, 404),
    ("GET", f"{P}/payments", None, 501),
])
def test_errors_are_json_messages(localnet, method, path, raw, status):
    got, body = localnet.call(method, path, raw=raw, timeout=10)
    assert got == status
    assert isinstance(body, dict) and isinstance(body["message"], str) and body["message"]


# ---- golem-core flows -----------------------------------------------------------


def test_golem_node_allocation_create_release_and_decorations(localnet):
    async def main():
        async with golem_node(localnet) as node:
            local = await node.create_allocation(2.5, network="local")
            holesky = await node.create_allocation(1.0)  # golem-core's default network
            data = await local.get_data()
            assert data.payment_platform == "erc20-local-tglm"
            assert data.total_amount == "2.5" and data.remaining_amount == "2.5" and data.spent_amount == "0"
            assert data.timestamp.tzinfo is not None
            spec = await local.get_demand_spec()
            props, constraints = spec._properties, spec._constraints
            assert str(constraints.serialize()).count("erc20-local-tglm.address=*") == 1
            assert props["golem.com.payment.platform.erc20-local-tglm.address"] == (await node_me(localnet))
            assert props["golem.com.payment.protocol.version"] == "3"
            assert {a["allocationId"] for a in localnet.state()["allocations"]["items"]} == {local.id, holesky.id}
            await local.release()
            await local.release()  # releasing twice is harmless (§2.1)
        return local.id

    run(main())
    assert localnet.state()["allocations"]["count"] == 0  # aclose released the rest


async def node_me(ln):
    return ln.call("GET", "/me")[1]["identity"]


def test_demand_gets_each_matching_offer_once_with_the_offer_properties(localnet):
    population = localnet.population()

    async def main():
        async with golem_node(localnet) as node:
            allocation = await node.create_allocation(1.0, network="local")
            demand = await node.create_demand(vm_payload(), allocations=[allocation])
            proposals = await collect_initial(demand, len(population))
            await asyncio.sleep(0.5)  # nothing else may arrive: no duplicates
            assert demand._event_collecting_task is not None and not demand._event_collecting_task.done()
            return [(p.id, p.data) for p in proposals]

    proposals = run(main())
    assert len({pid for pid, _ in proposals}) == len(proposals) == len(population)
    assert {data.issuer_id for _, data in proposals} == {p["node_id"] for p in population}
    for _, data in proposals:
        assert data.state == "Initial" and data.timestamp.tzinfo is not None


def test_constraints_are_matched_both_ways(localnet_factory):
    ln = localnet_factory(providers=30, seed=5, profile={**FAST_PROFILE, "known_at_start": 1.0, "behaviours": {}})
    population = ln.population()
    # demand -> offer: only providers with >= 8 threads
    expected = sum(p["cpu_threads"] >= 8 for p in population)
    demand_id, _, _ = raw_demand(ln, constraints="(&(golem.runtime.name=vm)(golem.inf.cpu.threads>=8))")
    events = poll_events(ln, demand_id, expected, timeout=1, max_polls=10)
    assert len(events) == expected
    assert all(e["proposal"]["properties"]["golem.inf.cpu.threads"] >= 8 for e in events)
    # offer -> demand: the offers require the demand's subnet to be theirs
    other_subnet, _, _ = raw_demand(ln, props={"golem.node.debug.subnet": "elsewhere"})
    assert poll_events(ln, other_subnet, 1, timeout=1, max_polls=2) == []
    # a demand without an expiration is "undefined" for the offer's constraint: no match
    no_expiry, _, _ = raw_demand(ln, props={"golem.srv.comp.expiration": None})
    status, body = ln.call("GET", f"{M}/demands/{no_expiry}/events?timeout=1")
    assert status == 200 and body == []
    state = ln.state()
    unmatched = {d["id"]: d["offers_unmatched"] for d in state["demands"]["items"]}
    assert unmatched[demand_id] == len(population) - expected
    assert unmatched[other_subnet] == len(population)


def test_negotiation_agreement_approved_and_terminated(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            ours = await counter(offers["ok-1"])
            draft = await asyncio.wait_for(ours.responses().__anext__(), 10)
            assert draft.data.state == "Draft" and draft.data.prev_proposal_id == ours.id
            for key in ("golem.com.scheme.payu.debit-note.interval-sec?",
                        "golem.com.scheme.payu.payment-timeout-sec?"):
                assert draft.data.properties[key] == (await ours.get_data()).properties[key]
            # the requestor's negotiators are satisfied by the echo: the draft is final
            demand_data = deepcopy(await demand.get_demand_data())
            demand_data.properties.update((await ours.get_data()).properties)
            before = deepcopy(demand_data)
            for negotiator in negotiators():
                await negotiator(demand_data, await draft.get_proposal_data())
            assert demand_data == before
            agreement = await draft.create_agreement()
            await agreement.confirm()
            assert await agreement.wait_for_approval() is True
            data = await agreement.get_data(force=True)
            assert data.state == "Approved" and data.app_session_id == node.app_session_id
            assert data.approved_date.tzinfo is not None
            assert data.offer.provider_id == draft.data.issuer_id
            assert data.offer.properties["golem.com.pricing.model"] == "linear"
            await agreement.terminate("done")
            await agreement.terminate("again")  # golem-core swallows the 410 "from Terminated"
            status, body = localnet.call("POST", f"{M}/agreements/{agreement.id}/terminate", {"message": "x"})
            assert status == 410 and body["message"] == "Can't update Agreement state from Terminated to Terminated."
            assert (await agreement.get_data(force=True)).state == "Terminated"
            return agreement.id

    agreement_id = run(main())
    assert localnet.state()["agreements"]["by_state"] == {"Terminated": 1}
    assert agreement_id in {a["id"] for a in localnet.state()["agreements"]["items"]}


@pytest.mark.parametrize("provider, payload_kwargs, use_negotiators, message", [
    ("busy", {}, True, "No capacity available. Reached Agreements limit: 1"),
    ("outbound", {"manifest": "e30="}, True,
     "Outbound rejected because: Everyone rule didn't match whitelist ; Audited-Payload rule requires "
     "manifest signature ; Partner rule requires node descriptor ; "),
    ("ok-1", {}, False, "Missing fields: /golem/com/payment/chosen-platform"),
])
def test_provider_rejects_counter_proposal_with_the_real_reason(localnet, provider, payload_kwargs,
                                                               use_negotiators, message):
    from golem.payload import ManifestVmPayload
    from golem.resources.proposal.exceptions import ProposalRejected

    async def main():
        async with golem_node(localnet) as node:
            payload = (ManifestVmPayload(**payload_kwargs) if payload_kwargs else vm_payload())
            _, _, offers = await market_of_the_test_profile(node, payload)
            ours = await counter(offers[provider], with_negotiators=use_negotiators)
            with pytest.raises(ProposalRejected) as info:
                await asyncio.wait_for(ours.responses().__anext__(), 10)
            return str(info.value)

    assert run(main()).endswith(f"Reason: `{message}`")


def test_outbound_rules_only_bite_demands_asking_for_outbound(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            ours = await counter(offers["outbound"])
            draft = await asyncio.wait_for(ours.responses().__anext__(), 10)
            return draft.data.state

    assert run(main()) == "Draft"


def test_silent_provider_never_answers(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            ours = await counter(offers["silent"])
            with pytest.raises(asyncio.TimeoutError):  # golem-core: "Failed to receive proposal response!"
                await asyncio.wait_for(ours.responses().__anext__(), 2)
            return ours.id

    counter_id = run(main())
    state = localnet.state()
    assert state["proposals"] == 8 + 1  # the offers and our counter, no answer
    assert counter_id.startswith("R-")


def test_unreachable_provider_fails_the_counter_with_a_gsb_500(localnet):
    from ya_market import ApiException

    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            with pytest.raises(ApiException) as info:
                await counter(offers["unreachable"])
            return info.value

    error = run(main())
    assert error.status == 500
    message = json.loads(error.body)["message"]
    assert message.startswith("Failed to send response for Proposal [")
    assert "GSB error: GSB failure: Net: error forwarding message" in message


def test_rejected_agreement_wait_returns_false_and_terminate_is_swallowed(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            draft = await asyncio.wait_for((await counter(offers["rejecter"])).responses().__anext__(), 10)
            agreement = await draft.create_agreement()
            await agreement.confirm()
            assert await agreement.wait_for_approval() is False
            status, body = localnet.call("POST", f"{M}/agreements/{agreement.id}/wait?timeout=1")
            assert status == 410 and body == {"message": "Rejected"}
            await agreement.terminate()  # 410 "from Rejected": swallowed by golem-core (§2.7)
            return (await agreement.get_data(force=True)).state

    assert run(main()) == "Rejected"


def test_agreement_limit_and_rematch_after_termination(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, first, offers = await market_of_the_test_profile(node)
            draft = await asyncio.wait_for((await counter(offers["ok-2"])).responses().__anext__(), 10)
            agreement = await draft.create_agreement()
            await agreement.confirm()
            assert await agreement.wait_for_approval()
            # the provider is now at its limit of 1 agreement, on any demand
            second = await node.create_demand(vm_payload(), allocations=[allocation])
            again = await by_name(await collect_initial(second, 8))
            refused = await counter(again["ok-2"])
            from golem.resources.proposal.exceptions import ProposalRejected
            with pytest.raises(ProposalRejected, match="Reached Agreements limit: 1"):
                await asyncio.wait_for(refused.responses().__anext__(), 10)
            await agreement.terminate()
            # after termination the offer matches the first demand again (docs/yagna-behaviour.md §5)
            seen = {p.id for p in offers.values()}
            rematched = [p for p in await collect_initial(first, 9) if p.id not in seen]
            assert [p.data.issuer_id for p in rematched] == [draft.data.issuer_id]

    run(main())


def test_requestor_reject_and_agreement_creation_errors(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            valid_to = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
            status, body = localnet.call("POST", f"{M}/agreements",
                                         {"proposalId": offers["ok-1"].id, "validTo": valid_to})
            assert status == 400 and "No negotiation with Provider took place" in body["message"]
            draft = await asyncio.wait_for((await counter(offers["ok-1"])).responses().__anext__(), 10)
            first = localnet.call("POST", f"{M}/agreements", {"proposalId": draft.id, "validTo": valid_to})
            assert first[0] == 200 and isinstance(first[1], str)
            status, body = localnet.call("POST", f"{M}/agreements", {"proposalId": draft.id, "validTo": valid_to})
            assert status == 409 and body["message"] == f"Can't create second Agreement for Proposal [{draft.id}]."
            other = await asyncio.wait_for((await counter(offers["ok-2"])).responses().__anext__(), 10)
            await other.reject("no thanks")  # 204
            status, body = localnet.call("GET", f"{M}/demands/{demand.id}/proposals/{other.id}")
            assert status == 200 and body["state"] == "Rejected"

    run(main())


def test_rog_like_manager_stack_gets_an_approved_agreement(localnet):
    """The managers RoG uses, with every behaviour in the market: the negotiation plugin
    must survive all the rejection paths and end with an approved agreement."""
    from golem.managers import (DefaultAgreementManager, DefaultPaymentManager, DefaultProposalManager,
                                NegotiatingPlugin, ProposalBuffer, RefreshingDemandManager)

    async def main():
        async with golem_node(localnet) as node:
            payment = DefaultPaymentManager(node, budget=1.0, network="local")
            demand = RefreshingDemandManager(node, payment.get_allocation, [vm_payload()])
            proposals = DefaultProposalManager(node, demand.get_initial_proposal, plugins=[
                NegotiatingPlugin(proposal_negotiators=negotiators(), proposal_response_timeout=timedelta(seconds=2)),
                ProposalBuffer(min_size=2, max_size=4, fill_concurrency_size=4),
            ])
            agreements = DefaultAgreementManager(node, proposals.get_draft_proposal)
            await payment.start()
            await demand.start()
            await proposals.start()
            got = []
            try:
                # golem-core hands out a rejected agreement too (docs/yagna-behaviour.md §3): ask until approved
                while not got or got[-1][0] != "Approved":
                    agreement = await asyncio.wait_for(agreements.get_agreement(), 60)
                    data = await agreement.get_data(force=True)
                    got.append((data.state, data.offer.properties["golem.node.id.name"]))
                    assert len(got) <= 3, got
                return got
            finally:
                await proposals.stop()
                await demand.stop()
                await agreements.stop()

    got = run(main())
    # only these can sign: ok-1/ok-2, outbound (no manifest asked); rejecter signs nothing
    assert got[-1][0] == "Approved" and got[-1][1] in ("ok-1", "ok-2", "outbound")
    assert all(outcome == ("Rejected", "rejecter") for outcome in got[:-1])
    assert localnet.state()["agreements"]["by_state"].get("Approved", 0) == 0  # all closed on exit


# ---- silent killers (docs/yagna-behaviour.md §2) --------------------------------------------


def test_killer_01_long_polls_block_until_their_timeout(localnet_factory):
    ln = localnet_factory(providers=0)
    demand_id, _, _ = raw_demand(ln)
    for path in (f"{M}/demands/{demand_id}/events?timeout=1&maxEvents=10",
                 f"{P}/invoiceEvents?timeout=1&afterTimestamp=2020-01-01T00:00:00Z",
                 f"{P}/debitNoteEvents?timeout=1"):
        started = time.monotonic()
        status, body = ln.call("GET", path)
        assert status == 200 and body == []
        assert time.monotonic() - started >= 1.0  # an empty answer only at the deadline
    started = time.monotonic()
    assert ln.call("GET", f"{P}/invoiceEvents")[1] == []  # yagna's default: 5 s
    assert time.monotonic() - started >= 5.0


def test_killer_02_timestamps_are_aware_microsecond_and_after_is_strict(localnet):
    import golem_localnet as gl

    demand_id, _, _ = raw_demand(localnet)
    events = poll_events(localnet, demand_id, 8, timeout=2)
    stamps = [e["eventDate"] for e in events] + [e["proposal"]["timestamp"] for e in events]
    stamps += [d["timestamp"] for d in localnet.call("GET", f"{M}/demands")[1]]
    status, allocation = localnet.call("POST", f"{P}/allocations", {"totalAmount": "1"})
    stamps += [allocation["timestamp"], allocation["timeout"]]
    assert all(RFC3339.match(s) for s in stamps), stamps
    # strict afterTimestamp, with the timestamp golem-core echoes (isoformat, µs)
    log = gl.EventLog(gl.Clock(), "invoiceId", gl.INVOICE_EVENT_TYPES)
    first = log.add("InvoiceReceivedEvent", "inv-1", "session")
    second = log.add("InvoiceReceivedEvent", "inv-2", "session")
    assert first["eventDate"] < second["eventDate"]  # never two events in one microsecond
    echoed = datetime.fromisoformat(first["eventDate"].replace("Z", "+00:00")).isoformat()
    after_first = log.after(gl.parse_iso(echoed, "afterTimestamp"), "session", 10)
    assert [e["invoiceId"] for e in after_first] == ["inv-2"]
    assert log.after(None, "other-session", 10) == []


def test_killer_03_proposal_events_are_delivered_exactly_once(localnet):
    demand_id, _, _ = raw_demand(localnet)
    events = poll_events(localnet, demand_id, 8, timeout=2)
    ids = [e["proposal"]["proposalId"] for e in events]
    assert len(ids) == len(set(ids)) == 8
    status, more = localnet.call("GET", f"{M}/demands/{demand_id}/events?timeout=1&maxEvents=10")
    assert status == 200 and more == []
    # maxEvents is respected
    second, _, _ = raw_demand(localnet)
    status, batch = localnet.call("GET", f"{M}/demands/{second}/events?timeout=1&maxEvents=3")
    assert len(batch) == 3


def test_killer_04_rejections_always_carry_a_reason_message(localnet):
    demand_id, props, constraints = raw_demand(localnet)
    events = poll_events(localnet, demand_id, 8, timeout=2)
    busy = next(e["proposal"] for e in events if e["proposal"]["properties"]["golem.node.id.name"] == "busy")
    status, counter_id = localnet.call("POST", f"{M}/demands/{demand_id}/proposals/{busy['proposalId']}",
                                       {"properties": {**props, "golem.com.payment.chosen-platform": "erc20-local-tglm"},
                                        "constraints": constraints})
    assert status == 200
    rejected = poll_events(localnet, demand_id, 1, timeout=5)
    assert rejected == [{"eventType": "ProposalRejectedEvent", "eventDate": rejected[0]["eventDate"],
                         "proposalId": counter_id,
                         "reason": {"message": "No capacity available. Reached Agreements limit: 1",
                                    "golem.proposal.rejection.is-final": False}}]


def test_killer_05_every_model_golem_core_reads_deserializes(localnet):
    run(_deserialize_everything(localnet))


async def _deserialize_everything(localnet):
    import ya_market
    import ya_payment

    market, payment = ya_market.ApiClient(), ya_payment.ApiClient()

    def load(client, data, model):
        return client._ApiClient__deserialize(data, model)

    demand_id, props, constraints = raw_demand(localnet)
    events = load(market, poll_events(localnet, demand_id, 8, timeout=2), "list[Event]")
    assert {type(e).__name__ for e in events} == {"ProposalEvent"}
    assert {e.proposal.state for e in events} == {"Initial"}
    ok = next(e.proposal for e in events if e.proposal.properties["golem.node.id.name"] == "ok-1")
    _, counter_id = localnet.call("POST", f"{M}/demands/{demand_id}/proposals/{ok.proposal_id}",
                                  {"properties": {**props, "golem.com.payment.chosen-platform": "erc20-local-tglm"},
                                   "constraints": constraints})
    draft = load(market, poll_events(localnet, demand_id, 1, timeout=5), "list[Event]")[0].proposal
    assert draft.state == "Draft" and draft.prev_proposal_id == counter_id
    load(market, localnet.call("GET", f"{M}/demands/{demand_id}/proposals/{counter_id}")[1], "Proposal")
    assert len(load(market, localnet.call("GET", f"{M}/demands")[1], "list[Demand]")) == 1
    valid_to = (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()
    _, agreement_id = localnet.call("POST", f"{M}/agreements", {"proposalId": draft.proposal_id, "validTo": valid_to})
    for step in ("confirm?appSessionId=s1", "wait?timeout=5"):
        assert localnet.call("POST", f"{M}/agreements/{agreement_id}/{step}")[0] == 204
    agreement = load(market, localnet.call("GET", f"{M}/agreements/{agreement_id}")[1], "Agreement")
    assert agreement.state == "Approved" and agreement.app_session_id == "s1"
    accounts = load(payment, localnet.call("GET", f"{P}/requestorAccounts")[1], "list[Account]")
    assert {"erc20-local-tglm", "erc20-holesky-tglm", "erc20-polygon-glm"} <= {a.platform for a in accounts}
    _, allocation = localnet.call("POST", f"{P}/allocations",
                                  {"allocationId": "", "totalAmount": "1", "spentAmount": "", "remainingAmount": "",
                                   "paymentPlatform": {"driver": "erc20", "network": "holesky"}, "makeDeposit": False})
    allocation = load(payment, allocation, "Allocation")
    assert allocation.payment_platform == "erc20-holesky-tglm"
    load(payment, localnet.call("GET", f"{P}/demandDecorations?allocationIds={allocation.allocation_id}")[1],
         "MarketDecoration")
    for path, model in ((f"{P}/invoiceEvents?timeout=0", "list[InvoiceEvent]"),
                        (f"{P}/debitNoteEvents?timeout=0", "list[DebitNoteEvent]"),
                        (f"{P}/invoices", "list[Invoice]"), (f"{P}/debitNotes", "list[DebitNote]")):
        assert load(payment, localnet.call("GET", path)[1], model) == []


def test_killer_06_payment_event_types_are_only_the_known_ones():
    run(_payment_event_types())


async def _payment_event_types():
    import golem_localnet as gl
    import ya_payment

    client = ya_payment.ApiClient()
    log = gl.EventLog(gl.Clock(), "debitNoteId", gl.DEBIT_NOTE_EVENT_TYPES)
    for event_type in gl.DEBIT_NOTE_EVENT_TYPES:
        event = client._ApiClient__deserialize(log.add(event_type, "dn-1", None), "DebitNoteEvent")
        assert event.debit_note_id == "dn-1"  # golem-core reads it; a base model would lack it
    with pytest.raises(ValueError, match="DebitNotePaymentOkEvent"):
        log.add("DebitNotePaymentOkEvent", "dn-1", None)


def test_killer_09_error_bodies_parse_where_golem_core_parses_them(localnet):
    from ya_payment import ApiException

    async def main():
        async with golem_node(localnet) as node:
            with pytest.raises(ApiException) as info:
                await node.create_allocation(-1, network="local")
            return info.value

    error = run(main())
    assert error.status == 400 and "totalAmount" in json.loads(error.body)["message"]


def test_killer_10_repeated_closes_are_idempotent(localnet):
    async def main():
        async with golem_node(localnet) as node:
            allocation, demand, offers = await market_of_the_test_profile(node)
            draft = await asyncio.wait_for((await counter(offers["ok-1"])).responses().__anext__(), 10)
            agreement = await draft.create_agreement()
            await agreement.confirm()
            await agreement.wait_for_approval()
            for _ in range(3):
                await agreement.terminate()
                await allocation.release()
            await demand.unsubscribe()
            await demand.unsubscribe()  # 404 as yagna answers: ignored by golem-core
            return demand.id, allocation.id
        # aclose repeats every close once more

    demand_id, allocation_id = run(main())
    # the answers yagna 0.17.6 gives to repeated deletes (see the fidelity test)
    status, body = localnet.call("DELETE", f"{M}/demands/{demand_id}")
    assert status == 404 and body["message"] == f"Demand [{demand_id}] not found."
    status, body = localnet.call("DELETE", f"{P}/allocations/{allocation_id}")
    assert status == 410 and body["message"] == f"Allocation {allocation_id} has been already released"


@pytest.mark.slow
def test_killer_11_agreement_wait_answers_before_golem_core_gives_up(localnet):
    demand_id, props, constraints = raw_demand(localnet)
    events = poll_events(localnet, demand_id, 8, timeout=2)
    ok = next(e["proposal"] for e in events if e["proposal"]["properties"]["golem.node.id.name"] == "ok-1")
    _, counter_id = localnet.call("POST", f"{M}/demands/{demand_id}/proposals/{ok['proposalId']}",
                                  {"properties": {**props, "golem.com.payment.chosen-platform": "erc20-local-tglm"},
                                   "constraints": constraints})
    draft = poll_events(localnet, demand_id, 1, timeout=5)[0]["proposal"]
    valid_to = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    _, agreement_id = localnet.call("POST", f"{M}/agreements", {"proposalId": draft["proposalId"], "validTo": valid_to})
    # never confirmed, so never decided: wait must still answer 408 before golem-core's 16 s
    started = time.monotonic()
    status, body = localnet.call("POST", f"{M}/agreements/{agreement_id}/wait?timeout=60", timeout=30)
    assert status == 408 and "message" in body
    assert time.monotonic() - started < 16


def test_killer_12_offers_carry_linear_pricing_and_mid_agreement_terms(localnet_factory):
    ln = localnet_factory(providers=40, profile={**FAST_PROFILE, "known_at_start": 1.0})
    demand_id, _, _ = raw_demand(ln)
    events = poll_events(ln, demand_id, 40, timeout=2)
    assert len(events) == 40
    for event in events:
        props = event["proposal"]["properties"]
        assert props["golem.com.pricing.model"] == "linear"
        coeffs, vector = props["golem.com.pricing.model.linear.coeffs"], props["golem.com.usage.vector"]
        assert len(coeffs) == len(vector) + 1 and all(isinstance(c, float) for c in coeffs)
        assert set(vector) <= {"golem.usage.cpu_sec", "golem.usage.duration_sec"}
        assert props["golem.com.scheme.payu.debit-note.interval-sec?"] > 0
        assert props["golem.com.scheme.payu.payment-timeout-sec?"] > 0
        assert "golem.com.payment.platform.erc20-local-tglm.address" in props
        for key in ("golem.inf.cpu.threads", "golem.inf.mem.gib", "golem.inf.storage.gib", "golem.node.id.name"):
            assert key in props


# ---- the funnel, predicted from `population --json` ------------------------------


def test_negotiation_outcomes_match_the_population_behaviours(localnet_factory):
    """Counter every offer of the default testnet-like profile (a 5-minute discovery window at
    x1000) and check each provider answers as its published behaviour says."""
    ln = localnet_factory(seed=11, time_scale=1000)
    population = {p["node_id"]: p for p in ln.population()}
    demand_id, props, constraints = raw_demand(ln)
    offers = poll_events(ln, demand_id, len(population), timeout=2, max_polls=60)
    assert len(offers) == len(population)
    outcome, counters = {}, {}
    for event in offers:
        proposal = event["proposal"]
        status, body = ln.call("POST", f"{M}/demands/{demand_id}/proposals/{proposal['proposalId']}",
                               {"properties": {**props, "golem.com.payment.chosen-platform": "erc20-local-tglm"},
                                "constraints": constraints})
        if status == 500:
            outcome[proposal["issuerId"]] = "unreachable"
        else:
            counters[body] = proposal["issuerId"]
    answers = poll_events(ln, demand_id, len(counters), timeout=1, max_polls=10)
    drafts = {}
    for event in answers:
        if event["eventType"] == "ProposalRejectedEvent":
            outcome[counters[event["proposalId"]]] = event["reason"]["message"]
        else:
            drafts[event["proposal"]["issuerId"]] = event["proposal"]["proposalId"]
    valid_to = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    for issuer, draft_id in drafts.items():
        _, agreement_id = ln.call("POST", f"{M}/agreements", {"proposalId": draft_id, "validTo": valid_to})
        ln.call("POST", f"{M}/agreements/{agreement_id}/confirm?appSessionId=funnel")
        status, body = ln.call("POST", f"{M}/agreements/{agreement_id}/wait?timeout=10")
        outcome[issuer] = "approved" if status == 204 else body["message"]
    expected_by_behaviour = {
        "ok": "approved", "slow": "approved", "outbound_rules": "approved",
        "busy": "No capacity available. Reached Agreements limit: 1",
        "unreachable": "unreachable", "reject_agreement": "Rejected", "no_answer": None,
    }
    for node_id, provider in population.items():
        assert outcome.get(node_id) == expected_by_behaviour[provider["behaviour"]], provider


# ---- fidelity: the same golem-core scenario on the real yagna 0.17.6 and on localnet ----

SCENARIO = REPO / "tests" / "fidelity_scenario.py"
FIDELITY_PROFILE = {"providers": 1, "known_at_start": 1.0, "latency_s": [0.01, 0.05], "behaviours": {},
                    "explicit": [{"name": "fidelity-provider"}]}
TIMING_DEPENDENT = ("/payment-api/v1/invoiceEvents", "/payment-api/v1/debitNoteEvents")


def _yagna_binary():
    return shutil.which("yagna", path=os.path.dirname(sys.executable)) or shutil.which("yagna")


@pytest.fixture
def loopback_netns():
    """A network namespace with only `lo` up (docs/yagna-behaviour.md §5), or None without root."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    name = f"lnm-{os.getpid()}-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        yield None
        return
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _route(path):
    return "/".join("{id}" if len(seg) >= 20 else seg for seg in path.split("/"))


def _fields(obj, prefix=""):
    """Dotted key paths of a JSON value; property maps are opaque (their keys are data)."""
    out = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.add(prefix + key)
            if key != "properties":
                out |= _fields(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for item in obj:
            out |= _fields(item, prefix + "[].")
    return out


def _field_sets(trace):
    sets = {}
    for call in trace:
        if call["path"] in TIMING_DEPENDENT or (call["path"].endswith("/events") and call["status"] == 404):
            continue  # polls in flight at shutdown: recorded or not depending on timing
        key = (call["method"], _route(call["path"]), call["status"])
        sets.setdefault(key, set()).update(_fields(call["response"]))
    return sets


def _negotiation_events(trace):
    """Demand event types (with proposal state) received before the agreement was created."""
    events = []
    for call in trace:
        if call["method"] == "POST" and call["path"].endswith("/agreements"):
            break
        if call["method"] == "GET" and call["path"].endswith("/events"):
            events += [f"{e['eventType']}:{e.get('proposal', {}).get('state')}" for e in call["response"]]
    return events


@pytest.mark.yagna
@pytest.mark.slow
def test_fidelity_same_negotiation_on_real_yagna_and_localnet(localnet_factory, loopback_netns, tmp_path):
    binary = _yagna_binary()
    if binary is None:
        pytest.skip("the yagna binary (PyPI golem-node 0.17.6) is not installed")
    if loopback_netns is None:
        pytest.skip("needs root and `ip netns` for a loopback-only network namespace (docs/yagna-behaviour.md §5)")
    ydir = tmp_path / "yagna"
    ydir.mkdir()
    try:
        real_run = subprocess.run(["ip", "netns", "exec", loopback_netns, sys.executable, str(SCENARIO), "yagna",
                                   str(ydir)], env={**os.environ, "YAGNA_BINARY": binary},
                                  capture_output=True, text=True, timeout=300)
    finally:
        pids = [int(p) for p in (ydir / "yagna.pids").read_text().split()] if (ydir / "yagna.pids").exists() else []
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert not [pid for pid in pids if pid_alive(pid)], "a yagna daemon was left running"
    assert real_run.returncode == 0, real_run.stderr[-4000:]
    real = json.loads(real_run.stdout)
    (tmp_path / "trace-yagna.json").write_text(real_run.stdout)  # kept for a failing run

    ln = localnet_factory(profile=FIDELITY_PROFILE)
    fake_run = subprocess.run([sys.executable, str(SCENARIO), "localnet", ln.url],
                              env={**os.environ, "YAGNA_APPKEY": ln.app_key}, capture_output=True, text=True,
                              timeout=300)
    assert fake_run.returncode == 0, fake_run.stderr[-4000:]
    fake = json.loads(fake_run.stdout)
    (tmp_path / "trace-localnet.json").write_text(fake_run.stdout)

    assert _negotiation_events(real) == ["ProposalEvent:Initial", "ProposalEvent:Draft"]
    assert _negotiation_events(fake) == _negotiation_events(real)
    assert _field_sets(fake) == _field_sets(real)


def test_unsubscribe_ends_the_polls_in_flight_with_yagnas_404(localnet):
    demand_id, _, _ = raw_demand(localnet)
    poll_events(localnet, demand_id, 8, timeout=2)  # drain the offers
    answers = []
    poller = threading.Thread(target=lambda: answers.append(
        localnet.call("GET", f"{M}/demands/{demand_id}/events?timeout=15&maxEvents=10")))
    poller.start()
    time.sleep(0.3)  # the poll is parked on the server
    assert localnet.call("DELETE", f"{M}/demands/{demand_id}")[0] == 204
    poller.join(10)  # well before the poll's own 15 s
    assert not poller.is_alive()
    assert answers == [(404, {"message": f"Subscription [{demand_id}] not found. Could be unsubscribed."})]


def test_offers_reach_the_market_over_time_in_broadcast_order(localnet_factory):
    """With nothing known at start, offers arrive as the simulated P2P broadcasts reach the
    node, in the order `population --json` publishes (offer_at_s); x60 makes 5 min 5 s."""
    ln = localnet_factory(providers=20, seed=3, time_scale=60,
                          profile={**FAST_PROFILE, "known_at_start": 0.0, "discovery_s": 300, "behaviours": {}})
    population = ln.population()
    assert all(p["offer_at_s"] > 0 for p in population)
    demand_id, _, _ = raw_demand(ln)
    events = poll_events(ln, demand_id, 20, timeout=5)
    assert len(events) == 20
    expected = [p["node_id"] for p in sorted(population, key=lambda p: (p["offer_at_s"], p["index"]))]
    assert [e["proposal"]["issuerId"] for e in events] == expected


def test_time_scale_speeds_up_provider_latency(localnet_factory):
    """The `slow` provider answers after 30 simulated seconds: at x100 golem-core gets its Draft."""
    ln = localnet_factory(profile=MARKET_TEST_PROFILE, time_scale=100)

    async def main():
        async with golem_node(ln) as node:
            _, _, offers = await market_of_the_test_profile(node)
            ours = await counter(offers["slow"])
            draft = await asyncio.wait_for(ours.responses().__anext__(), 30)
            return draft.data.state

    assert run(main()) == "Draft"
    assert [p["latency_s"] for p in ln.population() if p["name"] == "slow"] == [30.0]


def _counter_raw(ln, props_update, drop=()):
    """Counter the `ok-1` offer of a fresh demand over REST; return the first answer event."""
    demand_id, props, constraints = raw_demand(ln)
    ok = next(e["proposal"] for e in poll_events(ln, demand_id, 8, timeout=2)
              if e["proposal"]["properties"]["golem.node.id.name"] == "ok-1")
    body = {**props, "golem.com.payment.chosen-platform": "erc20-local-tglm", **props_update}
    if body["golem.srv.comp.expiration"] == "just past":
        started = datetime.fromisoformat(ln.state()["started_at"].replace("Z", "+00:00"))
        body["golem.srv.comp.expiration"] = int(started.timestamp() * 1000) + 1
    for key in drop:
        body.pop(key)
    status, counter_id = ln.call("POST", f"{M}/demands/{demand_id}/proposals/{ok['proposalId']}",
                                 {"properties": body, "constraints": constraints})
    assert status == 200, counter_id
    return poll_events(ln, demand_id, 1, timeout=5)[0]


@pytest.mark.parametrize("update, drop, message", [
    ({"golem.com.scheme.payu.debit-note.interval-sec?": 100000}, (),
     "Demand DebitNote interval 1day 3h 46m 40s not in acceptable range of [1s; 1day]"),
    ({"golem.srv.comp.expiration": 2_000_000_000_000}, ("golem.com.payment.debit-notes.accept-timeout?",),
     "Proposal expires at: 2033-05-18 03:33:20 UTC which is less than 5m or more than 30m from now"),
    ({"golem.com.payment.debit-notes.accept-timeout?": 300}, (),
     "DebitNote acceptance deadline should be less than 4m."),
    ({"golem.com.payment.debit-notes.accept-timeout?": 3}, (), "To low DebitNotes timeout: 3s"),
    ({"golem.com.scheme.payu.payment-timeout-sec?": 0}, (),
     "Demand DebitNote payment timeout 0s not in acceptable range of [1s; 1day]"),
    # after the offers were made (so the match holds) but before now
    ({"golem.srv.comp.expiration": "just past"}, (), "Proposal expires at: {expiration} which is less than 5m or "
     "more than 100years from now"),
    ({"golem.srv.comp.expiration": 2_000_000_000_000}, ("golem.com.scheme.payu.payment-timeout-sec?",),
     "Expiration time 2033-05-18T03:33:20+00:00 exceeds the 10h threshold of enforcing mid-agreement payments "
     "but the required property 'golem.com.scheme.payu.payment-timeout-sec?' was not present in the Demand"),
])
def test_mid_agreement_terms_are_checked_like_the_provider_agent(localnet, update, drop, message):
    event = _counter_raw(localnet, update, drop)
    assert event["eventType"] == "ProposalRejectedEvent"
    if "{expiration}" in message:
        ms = event["reason"]["message"].split("at: ")[1].split(" which")[0]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3})? UTC", ms)
        message = message.format(expiration=ms)
    # only "too far in the future" may be retried later (expiration.rs)
    final = "30m from now" not in message
    assert event["reason"] == {"message": message, "golem.proposal.rejection.is-final": final}


def test_draft_echoes_or_drops_the_mid_agreement_terms(localnet):
    echoed = _counter_raw(localnet, {"golem.com.scheme.payu.debit-note.interval-sec?": 600})["proposal"]
    assert echoed["properties"]["golem.com.scheme.payu.debit-note.interval-sec?"] == 600
    assert echoed["properties"]["golem.com.scheme.payu.payment-timeout-sec?"] == 43200
    dropped = _counter_raw(localnet, {}, drop=("golem.com.scheme.payu.debit-note.interval-sec?",
                                               "golem.com.scheme.payu.payment-timeout-sec?"))["proposal"]
    assert "golem.com.scheme.payu.debit-note.interval-sec?" not in dropped["properties"]
    assert "golem.com.scheme.payu.payment-timeout-sec?" not in dropped["properties"]


@pytest.mark.parametrize("raw, status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"POST /market-api/v1/demands HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
    (b"POST /market-api/v1/demands HTTP/1.1\r\nContent-Length: many\r\n\r\n", 400),
])
def test_malformed_http_gets_a_json_error_and_the_server_lives_on(localnet, raw, status):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(localnet.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert json.loads(body)["message"]
    assert localnet.call("GET", "/me")[0] == 200


def test_population_table_piped_into_head_ends_quietly():
    proc = subprocess.run(f"{sys.executable} {REPO / 'golem_localnet.py'} population --providers 2000 | head -1",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split()[:2] == ["#", "name"]
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr
