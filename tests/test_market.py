"""Market pieces: filter labels and maths, scoring, Funnel, demand (its image from the local
network's registry), the pipeline signing drafts.

The end-to-end behaviour (exact funnel counts against a seeded local network,
no agreement, blacklist, Ctrl-C) is in tests/test_network_stats.py.
"""

import asyncio
from datetime import datetime, timezone

import pytest

import ray_on_golem as rog

EXAMPLE_BUDGET = {
    "per_cpu_expected_usage": {"cpu_load": 0.8, "duration_hours": 0.5, "max_cost": 1.5},
    "max_start_price": 0.5,
    "max_cpu_per_hour_price": 0.5,
    "max_env_per_hour_price": 0.5,
}


def offer(cpu_sec=0.0001, duration_sec=0.00005, start=0.2, threads=4, **extra):
    """Offer properties as a VM provider advertises them (docs/yagna-behaviour.md §3)."""
    props = {
        "golem.com.pricing.model": "linear",
        "golem.com.pricing.model.linear.coeffs": [cpu_sec, duration_sec, start],
        "golem.com.usage.vector": ["golem.usage.cpu_sec", "golem.usage.duration_sec"],
        "golem.inf.cpu.threads": threads,
    }
    props.update(extra)
    return proposal_data(props)


def proposal_data(props):
    from golem.payload import Constraints, Properties
    from golem.resources import ProposalData

    return ProposalData(properties=Properties(props), constraints=Constraints(), proposal_id="p1",
                        issuer_id="0x" + "ab" * 20, state="Initial",
                        timestamp=datetime.now(timezone.utc), prev_proposal_id=None)


LOCAL_IMAGE = "golem/ray-on-golem:local"  # an image the local network's registry knows


def filters_for(budget_control):
    budget = rog.BudgetControl.from_node_config({"budget_control": budget_control})
    return budget, rog.budget_filters(budget, rog.Pricing(budget))


def test_budget_filter_labels_are_exact_and_in_order():
    _, filters = filters_for(EXAMPLE_BUDGET)
    assert [f.label for f in filters] == [
        "Reject if per cpu expected cost exceeds `max_cost` = 1.5",
        "Reject if start price exceeds `max_start_price` = 0.5",
        "Reject if cpu per hour price exceeds `max_cpu_per_hour_price` = 0.5",
        "Reject if env per hour price exceeds `max_env_per_hour_price` = 0.5",
    ]


@pytest.mark.parametrize("budget_control, labels", [
    ({}, []),
    ({"max_start_price": 0.1}, ["Reject if start price exceeds `max_start_price` = 0.1"]),
    ({"max_env_per_hour_price": 2, "per_cpu_expected_usage": {"cpu_load": 1, "duration_hours": 1}},
     ["Reject if env per hour price exceeds `max_env_per_hour_price` = 2"]),
])
def test_only_the_limits_that_are_set_filter(budget_control, labels):
    _, filters = filters_for(budget_control)
    assert [f.label for f in filters] == labels


def test_expected_cost_is_the_per_cpu_formula_of_the_issue():
    budget, _ = filters_for(EXAMPLE_BUDGET)
    cpu_sec, env_sec, start, cpus = 0.0001, 0.00005, 0.2, 4
    duration_s = 0.5 * 3600
    expected = start / cpus + env_sec / cpus * duration_s + cpu_sec * 0.8 * duration_s
    cost = rog.Pricing(budget).expected_cost(offer(cpu_sec, env_sec, start, cpus))
    assert cost == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("which, props, rejected", [
    (0, dict(cpu_sec=0.001), True),  # 0.2/4 + 0.00005/4*1800 + 0.001*0.8*1800 = 1.5 + ... > 1.5
    (0, dict(cpu_sec=0.0001), False),
    (1, dict(start=0.51), True),
    (1, dict(start=0.5), False),
    (2, dict(cpu_sec=0.6 / 3600), True),
    (2, dict(cpu_sec=0.4 / 3600), False),
    (3, dict(duration_sec=0.6 / 3600), True),
    (3, dict(duration_sec=0.4 / 3600), False),
])
def test_each_filter_rejects_above_its_limit(which, props, rejected):
    _, filters = filters_for(EXAMPLE_BUDGET)
    reason = filters[which].rejection(offer(**props))
    assert (reason is not None) is rejected
    if rejected:
        assert reason.startswith(filters[which].label + " (offered ")


@pytest.mark.parametrize("props", [
    {"golem.com.pricing.model": "fixed"},
    {"golem.com.pricing.model": "linear", "golem.com.pricing.model.linear.coeffs": [0.1],
     "golem.com.usage.vector": ["golem.usage.cpu_sec"], "golem.inf.cpu.threads": 2},
])
def test_unpriceable_offers_are_rejected_when_a_cost_limit_is_set(props):
    _, filters = filters_for(EXAMPLE_BUDGET)
    assert {f.rejection(proposal_data(props)) for f in filters} == {rog.REASON_UNPRICEABLE}


def test_expected_cost_needs_the_cpu_count():
    budget, filters = filters_for(EXAMPLE_BUDGET)
    no_threads = offer()
    del no_threads.properties["golem.inf.cpu.threads"]
    assert filters[0].rejection(no_threads) == rog.REASON_UNPRICEABLE
    assert filters[1].rejection(no_threads) is None  # the start price needs no CPU count


def test_score_prefers_cheap_and_reputable_and_is_reproducible():
    reputations = {"good": 1.0, "bad": 0.0}
    first = rog.Scorer(reputations.get, cost_reference=1.0, seed=7)
    again = rog.Scorer(reputations.get, cost_reference=1.0, seed=7)
    scores = [first.score("good", 0.1), first.score("bad", 0.1), first.score("x", 5.0)]
    assert scores == [again.score("good", 0.1), again.score("bad", 0.1), again.score("x", 5.0)]
    # reputation 1 vs 0 moves the score by 1/2.1; the random part by at most 0.1/2.1
    assert scores[0] > scores[1]
    # unknown reputation and no price: judged on what is known, always within [0, 1]
    only_random = first.score("unknown", None)
    assert 0.0 <= only_random <= 1.0
    cheap, dear = rog.Scorer(lambda _: None, 1.0, seed=1), rog.Scorer(lambda _: None, 1.0, seed=1)
    assert cheap.score("a", 0.01) > dear.score("a", 100.0)


def test_funnel_report_shape_sorts_errors_and_masks_ids():
    stages = ["Initial", "Not blacklisted", "Negotiation initialized", "Negotiated successfully"]
    funnel = rog.Funnel(stages)
    for stage, n in zip(stages, (5, 4, 4, 1)):
        for _ in range(n):
            funnel.passed(stage)
    funnel.failed("No capacity available. Reached Agreements limit: 1")
    for proposal in ("ab12", "cd34"):
        funnel.failed('Failed to send proposal response! 500: {"message":"Failed to send response '
                      f'for Proposal [{proposal}]. Error: GSB failure"}}')
    funnel.failed("Failed to receive proposal response!")
    assert funnel.report_lines() == [
        "Proposals count:",
        "Initial: 5",
        "Not blacklisted: 4",
        "Negotiation initialized: 4",
        "Negotiated successfully: 1",
        "",
        "Negotiation errors:",
        'Failed to send proposal response! 500: {"message":"Failed to send response for Proposal '
        '[***]. Error: GSB failure"}: 2',
        "Failed to receive proposal response!: 1",
        "No capacity available. Reached Agreements limit: 1: 1",
    ]
    assert funnel.as_dict()["funnel"][0] == {"stage": "Initial", "count": 5}


def test_demand_from_node_config_carries_resources_payment_terms_and_subnet(localnet):
    import json
    import urllib.request

    node_config = {
        "subnet_tag": "testers",
        "demand": {"image_tag": "golem/ray-on-golem:x", "min_mem_gib": 2, "min_cpu_threads": 2,
                   "max_cpu_threads": 8, "capabilities": ["vpn"]},
        "budget_control": {"payment_interval_hours": {"minimal": 2}},
    }
    spec = rog.DemandSpec.from_node_config(node_config, "local", localnet.url)
    builder = asyncio.run(spec.build(allocation=None))
    props = builder.properties
    # the image as the local network's registry names it (the Golem registry's API)
    with urllib.request.urlopen(f"{localnet.url}/v1/image/info?tag=golem/ray-on-golem:x") as response:
        image = json.loads(response.read())
    assert props["golem.node.debug.subnet"] == "testers"
    assert props["golem.com.scheme.payu.payment-timeout-sec?"] == 2 * 3600
    assert props["golem.com.scheme.payu.debit-note.interval-sec?"] == rog.DEBIT_NOTE_INTERVAL_S
    assert props["golem.com.payment.debit-notes.accept-timeout?"] == rog.DEBIT_NOTE_ACCEPT_TIMEOUT_S
    assert props["golem.srv.comp.task_package"] == f"hash:sha3:{image['sha3']}:{image['http']}"
    constraints = builder.constraints.serialize()
    for clause in ("(golem.node.debug.subnet=testers)", "(golem.runtime.name=vm)",
                   "(golem.runtime.capabilities=vpn)", "(golem.inf.mem.gib>=2)",
                   "(golem.inf.cpu.threads>=2)", "(golem.inf.cpu.threads<=8)"):
        assert clause in constraints


def test_outbound_urls_switch_to_a_manifest_payload(localnet):
    import base64
    import json

    spec = rog.DemandSpec.from_node_config(
        {"demand": {"image_tag": LOCAL_IMAGE, "outbound_urls": ["https://pypi.dev.golem.network"]}}, "local",
        localnet.url)
    builder = asyncio.run(spec.build(allocation=None))
    manifest = json.loads(base64.b64decode(builder.properties["golem.srv.comp.payload"]))
    assert manifest["compManifest"]["net"]["inet"]["out"] == {
        "protocols": ["https"], "urls": ["https://pypi.dev.golem.network"]}
    assert "(golem.runtime.capabilities=manifest-support)" in builder.constraints.serialize()


def test_registry_lookup_errors_are_clear(tmp_path):
    # a closed loopback port: the registry is unreachable, never the internet
    spec = rog.DemandSpec.from_node_config({"demand": {"image_tag": "nope"}}, "holesky",
                                           registry_url="http://127.0.0.1:9")
    with pytest.raises(rog.ServiceUnavailable, match="can't access the Golem registry"):
        spec.resolve_image(timeout=2)


# --- node starts: the same pipeline signs the best draft ---------------------------------

AGREEMENT_PROFILE = {
    "providers": 3,
    "known_at_start": 1.0,
    "latency_s": [0.01, 0.02],
    "behaviours": {},
    # expected cost per CPU-hour at full load = cpu_sec_price * 3600 (no start or env price)
    "explicit": [
        {"name": "rejecter", "behaviour": "reject_agreement", "cpu_sec_price": 0.01 / 3600,
         "duration_sec_price": 0.0, "start_price": 0.0},
        {"name": "ok-cheap", "behaviour": "ok", "cpu_sec_price": 0.3 / 3600,
         "duration_sec_price": 0.0, "start_price": 0.0},
        {"name": "ok-dear", "behaviour": "ok", "cpu_sec_price": 0.9 / 3600,
         "duration_sec_price": 0.0, "start_price": 0.0},
    ],
}


def test_agreement_signs_the_best_draft_and_skips_a_provider_that_rejects(localnet_factory):
    """Cost scores 0.99 / 0.77 / 0.53 against a random part of at most 0.1: the order is fixed."""
    from golem.node import GolemNode

    net = localnet_factory(profile=AGREEMENT_PROFILE)
    budget = rog.BudgetControl(cpu_load=1.0, duration_hours=1.0, max_cost=1.0)
    spec = rog.DemandSpec("local", image_tag=LOCAL_IMAGE, registry_url=net.url)

    async def scenario():
        node = GolemNode(app_key=net.app_key, api_url=net.url, collect_payment_events=False)
        await node.start()
        pipeline = rog.MarketPipeline(node, spec, budget, seed=3, response_timeout=10)
        try:
            await pipeline.start()
            while pipeline.funnel.counts[rog.STAGE_NEGOTIATED] < 3:  # every draft in, so order is by score
                await asyncio.sleep(0.02)
            first, best = await asyncio.wait_for(pipeline.agreement(), 60)
            second, other = await asyncio.wait_for(pipeline.agreement(exclude={best.provider_id}), 60)
            names = [best.row["name"], other.row["name"]]
            rejected_row = next(r for r in pipeline.funnel.providers.values() if r["name"] == "rejecter")
            await first.terminate("test done")
            await second.terminate("test done")
            return names, rejected_row["outcome"], dict(pipeline.funnel.errors)
        finally:
            await pipeline.stop()
            await node.aclose()

    names, rejected_outcome, errors = asyncio.run(scenario())
    assert names == ["ok-cheap", "ok-dear"]
    assert rejected_outcome == "Agreement rejected by the provider"
    assert errors == {"Agreement rejected by the provider": 1}
    state = net.state()
    assert state["agreements"]["by_state"] == {"Rejected": 1, "Terminated": 2}
    assert state["allocations"]["count"] == 0


def test_max_drafts_holds_negotiation_until_a_draft_is_taken(localnet_factory):
    from golem.node import GolemNode

    net = localnet_factory(profile={**AGREEMENT_PROFILE, "explicit": [
        {**p, "behaviour": "ok"} for p in AGREEMENT_PROFILE["explicit"]]})

    async def scenario():
        node = GolemNode(app_key=net.app_key, api_url=net.url, collect_payment_events=False)
        await node.start()
        pipeline = rog.MarketPipeline(node, rog.DemandSpec("local", image_tag=LOCAL_IMAGE, registry_url=net.url),
                                      rog.BudgetControl(), max_drafts=1)
        try:
            await pipeline.start()
            counts = pipeline.funnel.counts
            while counts[rog.STAGE_NEGOTIATED] < 1:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # room for a wrong second negotiation to show up
            held = (counts[rog.STAGE_NEGOTIATION_INITIALIZED], counts[rog.STAGE_NEGOTIATED])
            await pipeline.next_draft()  # a node start takes it: the next negotiation may begin
            while counts[rog.STAGE_NEGOTIATED] < 2:
                await asyncio.sleep(0.02)
            return held, counts[rog.STAGE_NEGOTIATION_INITIALIZED]
        finally:
            await pipeline.stop()
            await node.aclose()

    held, initialized_after = asyncio.run(scenario())
    assert held == (1, 1)
    assert initialized_after == 2
    assert net.state()["agreements"]["count"] == 0


def test_a_long_lived_pipeline_subscribes_a_fresh_demand_before_yagna_drops_it(localnet_factory):
    """yagna forgets a demand after an hour; node starts go on for longer (here: every 1 s)."""
    from golem.node import GolemNode

    net = localnet_factory(profile={**AGREEMENT_PROFILE, "explicit": [
        {**p, "behaviour": "ok"} for p in AGREEMENT_PROFILE["explicit"]]})

    async def scenario():
        node = GolemNode(app_key=net.app_key, api_url=net.url, collect_payment_events=False)
        await node.start()
        pipeline = rog.MarketPipeline(node, rog.DemandSpec("local", image_tag=LOCAL_IMAGE, registry_url=net.url),
                                      rog.BudgetControl(), demand_refresh_s=1)
        try:
            await pipeline.start()
            while len(pipeline.demands) < 2 or pipeline.funnel.counts[rog.STAGE_NEGOTIATED] < 6:
                await asyncio.sleep(0.05)
            # drafts negotiated on any of its demands still become agreements
            agreement, candidate = await asyncio.wait_for(pipeline.agreement(), 60)
            await agreement.terminate("test done")
            return len(pipeline.demands), pipeline.funnel.counts[rog.STAGE_INITIAL]
        finally:
            await pipeline.stop()
            await node.aclose()

    demands, initial = asyncio.run(scenario())
    assert demands >= 2 and initial >= 6  # every demand is offered the whole market again
    state = net.state()
    assert state["demands"]["unsubscribed"] == demands
    assert state["agreements"]["by_state"] == {"Terminated": 1}
