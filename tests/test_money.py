"""Money: payments under a hard budget, the spending ledger, costs (issue 8).

The end-to-end tests run the real local network and the real webserver (golem-core
unmodified, real sqlite) and rent nodes through the webserver's node routes, as Ray's
node provider does, without starting Ray (the bootstrap is plain shell).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import NODE_CONFIG, REPO, cli_env, pid_alive, start_localnet, stop_localnet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ray_on_golem as rog

# ---- the pure acceptance logic (hypothesis) ---------------------------------------------

TERMS = rog.PriceTerms(usage_vector=("golem.usage.cpu_sec", "golem.usage.duration_sec"),
                       prices=(Decimal("0.000025"), Decimal("0.000005")), start=Decimal("0.001"), cpu_threads=4)

prices = st.decimals(min_value=0, max_value=Decimal("0.01"), places=18)
amounts = st.decimals(min_value=0, max_value=Decimal("1000"), places=18)


@st.composite
def agreement_histories(draw):
    """Prices, a budget and a series of debit notes (then an invoice) of a few agreements, some inflated."""
    terms = rog.PriceTerms(usage_vector=("golem.usage.cpu_sec", "golem.usage.duration_sec"),
                           prices=(draw(prices), draw(prices)), start=draw(prices),
                           cpu_threads=draw(st.integers(1, 32)))
    budget = draw(st.decimals(min_value=Decimal("0.000001"), max_value=Decimal("50"), places=6))
    documents = []
    for agreement in range(draw(st.integers(1, 3))):
        elapsed = 0.0
        for note in range(draw(st.integers(0, 6))):
            elapsed += draw(st.floats(0.5, 600, allow_nan=False))
            load = draw(st.decimals(min_value=0, max_value=1, places=3))
            wall = Decimal(str(round(elapsed, 6)))
            counters = [wall * terms.cpu_threads * load, wall]
            factor = draw(st.sampled_from([1, 1, 1, 2, 10]))  # 2 and 10: an inflating provider
            counters = [c * factor for c in counters]
            amount = terms.cost(counters).quantize(Decimal("1e-18"))
            if draw(st.booleans()) and factor == 1:
                amount += draw(st.decimals(min_value=0, max_value=1, places=18))  # amount above its counters
            documents.append(("debit_note", f"a{agreement}", "act", amount, [float(c) for c in counters], elapsed))
        elapsed += draw(st.floats(0, 60, allow_nan=False))
        documents.append(("invoice", f"a{agreement}", None, draw(amounts) if draw(st.booleans())
                          else terms.max_cost(elapsed).quantize(Decimal("1e-18")), None, elapsed))
    return terms, budget, documents


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(agreement_histories())
def test_acceptance_never_overspends_and_accepts_only_what_the_agreement_allows(history):
    terms, budget, documents = history
    spending = rog.Spending(budget)
    latest: dict[tuple, Decimal] = {}
    for kind, agreement, activity, amount, counters, elapsed in documents:
        verdict = spending.decide(terms, kind, agreement, activity, amount, counters, elapsed)
        assert spending.spent <= budget  # never overspent, whatever the provider sends
        if not verdict.accept:
            assert verdict.reason and verdict.spend == 0
            continue
        # every accepted amount is consistent with its agreement: prices × time on our clock
        assert amount <= terms.max_cost(Decimal(str(elapsed)) + rog.BILLING_GRACE_S) + Decimal(rog.AMOUNT_TOLERANCE)
        if counters is not None:
            assert amount <= terms.cost([Decimal(str(c)) for c in counters]) + Decimal(rog.AMOUNT_TOLERANCE)
            assert Decimal(str(counters[1])) <= Decimal(str(elapsed)) + rog.BILLING_GRACE_S
        # what it adds is the increase over the agreement's accepted total, never negative
        previous = latest.get((agreement, activity)) if kind == "debit_note" else sum(
            (v for (a, _), v in latest.items() if a == agreement), Decimal(0))
        assert verdict.spend == amount - (previous or 0) >= 0
        if kind == "invoice":
            latest = {k: v for k, v in latest.items() if k[0] != agreement}
        latest[(agreement, activity)] = amount
    assert spending.spent == sum(latest.values(), Decimal(0))


@given(st.floats(1, 3600, allow_nan=False), st.decimals(min_value=0, max_value=1, places=3))
def test_an_honest_debit_note_within_the_budget_is_accepted(elapsed, load):
    wall = Decimal(str(round(elapsed, 6)))
    counters = [wall * TERMS.cpu_threads * load, wall]
    amount = TERMS.cost(counters).quantize(Decimal("1e-18"))
    verdict = rog.Spending(Decimal(1000)).decide(TERMS, "debit_note", "a", "act", amount,
                                                 [float(c) for c in counters], elapsed)
    assert verdict.accept and verdict.spend == amount and not verdict.breach


@pytest.mark.parametrize("counters, amount, why", [
    (["4", "10"], "0.00115", "counter golem.usage.duration_sec = 10 is impossible"),  # 10 s after 3 s
    (["1", "3"], "0.5", "the agreed prices give 0.00104"),  # amount above its own counters
    (["1", "3", "7"], "0.001", "3 usage counters for a usage vector of 2"),
    (["999", "3"], "0.026", "counter golem.usage.cpu_sec = 999"),  # more CPU than 4 threads in 8 s
])
def test_an_inflated_debit_note_is_a_breach_with_the_reason(counters, amount, why):
    verdict = rog.Spending(Decimal(1000)).decide(TERMS, "debit_note", "a", "act", Decimal(amount),
                                                 [float(c) for c in counters], 3.0)
    assert not verdict.accept and verdict.breach and why in verdict.reason, verdict


def test_a_note_beyond_the_budget_is_refused_without_blaming_the_provider():
    spending = rog.Spending(Decimal("0.002"))
    first = spending.decide(TERMS, "debit_note", "a", "act", Decimal("0.0015"), None, 60)
    second = spending.decide(TERMS, "debit_note", "a", "act", Decimal("0.0021"), None, 120)
    assert first.accept and not second.accept and not second.breach
    assert "would spend 0.0021 of total_budget 0.002" in second.reason and spending.spent == Decimal("0.0015")


def test_price_terms_come_exactly_from_offer_properties():
    props = {"golem.com.pricing.model": "linear", "golem.com.usage.vector": ["golem.usage.cpu_sec",
                                                                             "golem.usage.duration_sec"],
             "golem.com.pricing.model.linear.coeffs": [2.7777777777777776e-05, 1e-06, 0.01],
             "golem.inf.cpu.threads": 4, "golem.com.scheme.payu.debit-note.interval-sec?": 180}
    terms = rog.PriceTerms.from_properties(props)
    assert terms.prices == (Decimal("0.000027777777777777776"), Decimal("0.000001")) and terms.start == Decimal("0.01")
    assert terms.max_cost(Decimal(10)) == Decimal("0.01") + Decimal("0.000027777777777777776") * 40 + Decimal("0.00001")
    assert rog.PriceTerms.from_json(json.loads(json.dumps(terms.to_json()))) == terms
    for broken, why in (({"golem.com.pricing.model": "fixed"}, "not linear"),
                        ({"golem.com.pricing.model.linear.coeffs": [1e-6, 0.01]}, "do not match"),
                        ({"golem.inf.cpu.threads": 0}, "without golem.inf.cpu.threads")):
        with pytest.raises(ValueError, match=why):
            rog.PriceTerms.from_properties({**props, **broken})


# ---- the local network and the webserver ---------------------------------------------

CPU_SEC, DURATION_SEC, START = 0.0005, 0.01, 0.01  # at most 0.011 GLM/s per 2-thread node


def provider(name: str, **extra) -> dict:
    return {"name": name, "cpu_threads": 2, "behaviour": "ok", "cpu_sec_price": CPU_SEC,
            "duration_sec_price": DURATION_SEC, "start_price": START, "debit_note_interval_s": 3, **extra}


def profile(*providers: dict) -> dict:
    return {"providers": len(providers), "known_at_start": 1.0, "latency_s": [0.01, 0.05], "behaviours": {},
            "explicit": list(providers)}


class Money:
    """A webserver on a local network, as a node provider sees it, plus the Store for the ledger."""

    def __init__(self, datadir: Path, localnet, proc: subprocess.Popen, port: int):
        self.datadir, self.localnet, self.proc, self.port = datadir, localnet, proc, port

    def call(self, method: str, path: str, body=None, timeout: float = 60):
        token = (self.datadir / "webserver.token").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def request_node(self, cluster: str, kind: str, budget: float) -> dict:
        status, body = self.call("POST", f"/clusters/{cluster}/nodes", {
            "provider_parameters": {"payment_network": "local", "total_budget": budget, "node_start_timeout": 90},
            "node_config": NODE_CONFIG, "tags": {"ray-node-type": kind, "ray-user-node-type": kind}, "count": 1})
        assert status == 200, body
        return body["nodes"][0]

    def node(self, cluster: str, node_id: str) -> dict:
        status, body = self.call("GET", f"/clusters/{cluster}/nodes/{node_id}")
        assert status == 200, body
        return body

    def wait_node(self, cluster: str, node_id: str, states: tuple, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.node(cluster, node_id)
            if node["state"] in states:
                return node
            time.sleep(0.3)
        raise AssertionError(f"{node_id} not {states} in {timeout} s: {node}")

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`ray-on-golem ARGS` as a user runs it against this webserver's data dir."""
        home = self.datadir.parent / "home"
        proc = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), *args], capture_output=True, text=True,
                              timeout=60, env=cli_env(self.datadir, home), stdin=subprocess.DEVNULL)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.datadir / "ray_on_golem.sqlite3", timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def ledger(self, cluster: str) -> list[dict]:
        with self.db() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM ledger WHERE cluster_name = ? ORDER BY created_at",
                                                  (cluster,))]

    def wait_ledger(self, cluster: str, done, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.ledger(cluster)
            if done(rows):
                return rows
            time.sleep(0.5)
        raise AssertionError(f"ledger of {cluster} never got there: {rows}")


@pytest.fixture
def money_factory(tmp_path):
    """Start a local network with a profile and a webserver that adopts it; both stopped by PID."""
    started: list[Money] = []

    def start(net_profile: dict | None, after: Money | None = None) -> Money:
        """A webserver on a new local network, or (`after`) on the data dir and network of a dead one."""
        datadir = after.datadir if after else tmp_path / f"datadir{len(started)}"
        localnet = after.localnet if after else start_localnet(
            datadir / "localnet", profile=net_profile, isolation=None)  # nodes need sshd: VM-like (auto)
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        log = open(tmp_path / f"webserver{len(started)}.out", "w")
        proc = subprocess.Popen([sys.executable, str(REPO / "ray_on_golem.py"), "webserver", "--port", "0",
                                 "--datadir", str(datadir), "--network", "local"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=cli_env(None, home))
        log.close()
        money = Money(datadir, localnet, proc, 0)
        started.append(money)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / f"webserver{len(started) - 1}.out").read_text()
            try:
                money.port = json.loads((datadir / "webserver.json").read_text())["port"]
                if money.call("GET", "/status", timeout=5)[1]["state"] == "running":
                    return money
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.2)
        raise AssertionError("the webserver did not start")

    yield start
    for money in started:
        if money.proc.poll() is None:
            money.proc.send_signal(signal.SIGTERM)  # graceful: terminates nodes, settles payments
            try:
                money.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                money.proc.kill()
                money.proc.wait()
        assert not pid_alive(money.proc.pid)
    for localnet in {id(m.localnet): m.localnet for m in started}.values():
        assert stop_localnet(localnet) == 0


def localnet_paid(money: Money, agreement_ids) -> Decimal:
    """What the local network recorded as accepted for these agreements (its providers' view)."""
    billing = money.localnet.state()["billing"]
    return sum((Decimal(billing[a]["accepted"]) for a in agreement_ids if a in billing), Decimal(0))


@pytest.mark.slow
def test_a_budget_running_out_stops_workers_newest_first_then_the_head(money_factory):
    money = money_factory(profile(provider("p-1"), provider("p-2"), provider("p-3")))
    # Each node may bill 0.01 + 0.011 GLM/s. Its agreement bills every 180 s, so a running node
    # is covered 20 s ahead plus 15 s for a stop and 5 s of grace: three nodes need 1.35 GLM
    # at once; 1.4 GLM lasts a few seconds, the second stop comes ~20 s later, the head's ~40 s
    # after that (the nodes that ended no longer need covering, only paying).
    budget = 1.4
    head = money.request_node("c1", "head", budget)
    older = money.request_node("c1", "worker", budget)
    newer = money.request_node("c1", "worker", budget)

    ended = {n["node_id"]: money.wait_node("c1", n["node_id"], ("terminated",), timeout=180)
             for n in (newer, older, head)}
    for node in ended.values():
        assert "stopped by the budget: total_budget 1.4 GLM cannot cover the running nodes" in node["error"]
    assert any(line.startswith("Budget warning: ") for node in ended.values() for line in node["state_log"])

    with money.db() as conn:
        stopped = {r["node_id"]: r["terminated_at"] for r in conn.execute(
            "SELECT node_id, terminated_at FROM agreements WHERE cluster_name = 'c1'")}
        agreement_ids = [r[0] for r in conn.execute("SELECT agreement_id FROM agreements WHERE cluster_name = 'c1'")]
    assert stopped[newer["node_id"]] < stopped[older["node_id"]] < stopped[head["node_id"]]

    # The autoscaler asking for more is refused: the budget is used up.
    status, body = money.call("POST", "/clusters/c1/nodes", {
        "provider_parameters": {"payment_network": "local", "total_budget": budget},
        "node_config": NODE_CONFIG, "tags": {"ray-node-type": "worker"}, "count": 1})
    assert status == 409 and "stopped by the budget" in body["error"], body

    # Every agreement's invoice settles; the ledger equals what the providers were paid.
    rows = money.wait_ledger("c1", lambda rows: sum(r["kind"] == "invoice" and r["status"] == "accepted"
                                                    for r in rows) == 3)
    assert {r["status"] for r in rows} == {"accepted"}, [r for r in rows if r["status"] != "accepted"]
    assert sum(r["kind"] == "debit_note" for r in rows) >= 3  # notes every 3 s were accepted on the way
    spent = sum((Decimal(r["spent"]) for r in rows), Decimal(0))
    assert spent == localnet_paid(money, agreement_ids)
    wallet = money.localnet.state()["wallet"]
    assert spent == Decimal(wallet["spent"]) == Decimal(wallet["funds"]) - Decimal(wallet["balance"])
    assert Decimal(0) < spent <= Decimal(str(budget))

    status, report = money.call("GET", "/status")
    assert report["budgets"]["c1"]["spent"] == rog.glm(spent)
    assert "stopped by the budget" in report["budgets"]["c1"]["warning"]
    status, costs = money.call("GET", "/costs?cluster=c1")
    (cluster,) = costs["clusters"]
    assert Decimal(cluster["cost"]) == spent and cluster["total_budget"] == "1.4"
    assert sum((Decimal(n["cost"]) for n in cluster["nodes"]), Decimal(0)) == spent
    assert {n["provider_name"] for n in cluster["nodes"]} == {"p-1", "p-2", "p-3"}
    assert all(n["prices"] == {"start": "0.01", "cpu_per_hour": "1.8", "env_per_hour": "36", "cpu_threads": 2}
               for n in cluster["nodes"])

    # What a user sees: `status` per cluster, `costs` per node, amounts rounded to what matters.
    status = money.cli("status")
    assert status.returncode == 0, status.stderr
    shown = rog.format_budget(report["budgets"]["c1"])
    assert shown["reserved"] == "0 GLM" and len(shown["spent"].split()[0]) <= len("0.123456")
    assert f"budget 1.4 GLM: {shown['spent']} spent, 0 GLM reserved, {shown['remaining']} remaining" in status.stdout
    assert "warning: stopped by the budget" in status.stdout
    table = money.cli("costs", "c1")
    assert table.returncode == 0, table.stderr
    node_costs, total, _ = rog.format_glm_sum([n["cost"] for n in cluster["nodes"]])
    assert f"{total} of total_budget 1.4 GLM" in table.stdout
    assert all(f" {c.split()[0]}\n" in table.stdout or table.stdout.endswith(f" {c.split()[0]}") for c in node_costs)
    assert all(n["node_id"] in table.stdout for n in (head, older, newer)) and "p-1" in table.stdout

    assert money.call("GET", "/costs?cluster=nope")[0] == 404

    # `ray up` again with a raised total_budget: a new head gets a new allocation and budget.
    again = money.request_node("c1", "head", 2.5)
    assert again["state"] == "pending"
    deadline = time.monotonic() + 60
    while money.call("GET", "/status")[1]["budgets"]["c1"]["total_budget"] != "2.5":
        assert time.monotonic() < deadline, money.call("GET", "/status")[1]["budgets"]
        time.sleep(0.3)

    # The ledger outlives the webserver: `costs` reads the same figures from the Store alone.
    assert money.call("POST", "/shutdown", {"force": True})[0] == 200
    money.proc.wait(timeout=90)
    after = money.cli("costs", "c1", "--json")
    assert after.returncode == 0, after.stderr
    (cluster,) = json.loads(after.stdout)["clusters"]
    rows = money.ledger("c1")
    assert Decimal(cluster["cost"]) == sum((Decimal(r["spent"]) for r in rows), Decimal(0)) >= spent
    assert "budget" not in cluster and len(cluster["nodes"]) == 4


@pytest.mark.slow
def test_an_inflated_debit_note_is_rejected_recorded_and_its_provider_blocked(money_factory):
    money = money_factory(profile(provider("greedy", inflate_billing=10)))
    head = money.request_node("c2", "head", 5.0)
    node = money.wait_node("c2", head["node_id"], ("terminated",), timeout=120)
    assert "provider greedy" in node["error"] and "billed more than agreed" in node["error"], node

    rows = money.wait_ledger("c2", lambda rows: any(r["kind"] == "invoice" for r in rows))
    notes = [r for r in rows if r["kind"] == "debit_note"]
    assert notes and notes[0]["status"] == "rejected" and notes[0]["spent"] == "0"
    assert "counter golem.usage.duration_sec" in notes[0]["reason"] and "is impossible" in notes[0]["reason"]
    assert all(r["status"] == "rejected" for r in rows)  # the inflated invoice too
    with money.db() as conn:
        (agreement_id, provider_id), = conn.execute("SELECT agreement_id, provider_id FROM agreements")
        block = conn.execute("SELECT source, reason FROM blacklist WHERE node_id = ?", (provider_id,)).fetchone()
        kinds = [r[0] for r in conn.execute("SELECT kind FROM provider_events WHERE node_id = ?", (provider_id,))]
    assert block["source"] == "auto" and block["reason"].startswith("billed more than agreed: debit note ")
    assert "billing_breach" in kinds
    assert localnet_paid(money, [agreement_id]) == 0  # not a wei went to the greedy provider

    for bad, why in (("lots", "'lots' is not a decimal amount"), (-1, "-1 is not a non-negative amount"),
                     (0, "expected an amount > 0, got 0"), (True, "True is not an amount")):
        status, body = money.call("POST", "/clusters/c2/nodes", {
            "provider_parameters": {"payment_network": "local", "total_budget": bad}, "count": 1})
        assert status == 400 and body["error"] == f"provider_parameters.total_budget: {why}", body


@pytest.mark.slow
def test_a_restart_after_kill_9_readopts_what_the_dead_webserver_left(money_factory):
    """A restart keeps the cluster (tests/test_restart.py has the rest): the live head goes on with its
    allocation; only `stop --force` ends it, and then the wallet is no longer reserved."""
    money = money_factory(profile(provider("p-1")))
    head = money.request_node("c4", "head", 5.0)
    money.wait_node("c4", head["node_id"], ("running",))
    assert money.localnet.state()["allocations"]["count"] == 1
    money.proc.kill()  # kill -9: no shutdown hook ran
    money.proc.wait()

    again = money_factory(None, after=money)
    deadline = time.monotonic() + 60
    while (answer := again.call("GET", f"/clusters/c4/nodes/{head['node_id']}"))[0] == 503:  # re-adopting
        assert time.monotonic() < deadline, answer
        time.sleep(0.3)
    node = again.wait_node("c4", head["node_id"], ("running", "terminated"))
    assert node["state"] == "running" and node["state_log"][-1].startswith("Re-adopted"), node["state_log"]
    assert again.localnet.state()["allocations"]["count"] == 1  # the same allocation pays on
    with again.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL").fetchone()[0] == 1
    refused = again.cli("stop")
    assert refused.returncode != 0  # a live node holds it up
    stopped = again.cli("stop", "--force")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    again.proc.wait(timeout=90)
    with again.db() as conn:
        assert conn.execute("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL").fetchone()[0] == 0
    assert again.localnet.state()["allocations"]["count"] == 0  # the wallet is no longer reserved


@pytest.mark.slow
def test_a_deadline_while_the_provider_approves_leaves_no_agreement_signed(money_factory):
    # The provider answers the counter-proposal after 8 s and the agreement 8 s after its
    # confirmation: the 12 s node_start_timeout passes while the agreement awaits approval.
    money = money_factory(profile(provider("slow-1", latency_s=8)))
    status, body = money.call("POST", "/clusters/c5/nodes", {
        "provider_parameters": {"payment_network": "local", "total_budget": 1, "node_start_timeout": 12},
        "node_config": NODE_CONFIG, "tags": {"ray-node-type": "head"}, "count": 1})
    assert status == 200, body
    node = money.wait_node("c5", body["nodes"][0]["node_id"], ("terminated",))
    assert "node_start_timeout of 12s reached" in node["error"], node
    deadline = time.monotonic() + 60  # the provider approves later: the agreement is ended then
    while {"Pending", "Approved"} & set((agreements := money.localnet.state()["agreements"])["by_state"]):
        assert time.monotonic() < deadline, agreements
        time.sleep(0.5)
    assert agreements["count"] == 1 and agreements["by_state"] == {"Terminated": 1}, agreements


def test_costs_reads_the_ledger_when_no_webserver_runs(tmp_path, run_cli, datadir):
    """`costs` after the webserver is gone: the Store alone answers (the ledger survives restarts)."""
    with rog.Store(str(datadir)) as store:
        now = store.clock()
        terms = rog.PriceTerms(("golem.usage.cpu_sec", "golem.usage.duration_sec"),
                               (Decimal("0.0025"), Decimal("0.005")), Decimal("0.01"), 2)
        with store.transaction() as conn:
            conn.execute("INSERT INTO clusters (name, network, state, config, total_budget, created_at, updated_at) "
                         "VALUES ('c3', 'local', 'stopped', '{}', '1.5', ?, ?)", (now, now))
            conn.execute("INSERT INTO nodes (node_id, cluster_name, node_type, state, created_at, updated_at) "
                         "VALUES ('node7', 'c3', 'worker', 'terminated', ?, ?)", (now - 100, now))
            conn.execute("INSERT INTO agreements (agreement_id, cluster_name, node_id, provider_id, network, state, "
                         "created_at, terminated_at, pricing) VALUES ('ag', 'c3', 'node7', ?, 'local', "
                         "'terminated', ?, ?, ?)", ("0x" + "ab" * 20, now - 90, now - 30, json.dumps(terms.to_json())))
        store.record_provider("0x" + "ab" * 20, "p-9")
        ledger = rog.Ledger(store)
        for doc, kind, amount, spent in (("d1", "debit_note", "0.1", "0.1"), ("i1", "invoice", "0.300000000000000001",
                                                                              "0.200000000000000001")):
            ledger.received(doc, kind, "ag", None, "node7", "c3", "alloc", amount)
            ledger.update(doc, "accepted", spent=Decimal(spent))
    proc = run_cli("costs", "c3", "--json")
    assert proc.returncode == 0, proc.stderr
    (cluster,) = json.loads(proc.stdout)["clusters"]
    (node,) = cluster["nodes"]
    assert cluster["cost"] == node["cost"] == "0.300000000000000001"  # exact, not a float
    assert node["provider_name"] == "p-9" and node["runtime_s"] == 60.0 and node["prices"]["cpu_per_hour"] == "9"
    table = run_cli("costs")
    assert table.returncode == 0 and "node7" in table.stdout
    assert "0.3 GLM of total_budget 1.5 GLM" in table.stdout and "0.300000000000000001" not in table.stdout  # for people
    assert "1m" in table.stdout  # the runtime, for people
    missing = run_cli("costs", "nope")
    assert missing.returncode == 1 and "no cluster named 'nope'" in missing.stderr
