"""A restart keeps the cluster (issue 13): `kill -9` of the webserver (or `stop --keep-clusters`), then
`ray-on-golem start`.

The new webserver re-adopts every node still alive from what the dead one recorded (same node
ids, same providers), settles the debit notes that came meanwhile without paying any twice, and
ends and reports the nodes that died meanwhile (a provider terminates an agreement whose debit
notes are not accepted in time). Real processes: the local network, the webserver, Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from test_cluster import (RAY_BIN, RaySession, FaultNetwork, _provider, fault_session, pid_alive, processes_mentioning,  # noqa: F401
                          request_worker, session, wait_for, wait_node, write_cluster_yaml)
from test_faults import netns_list, settle_and_check_money

# Debit notes every 3 real seconds, so some come while no webserver runs.
STEADY = [_provider(f"steady-{i}", 0.02 + i / 1000, debit_note_interval_s=3) for i in range(3)]


def kill_webserver(session: RaySession) -> int:
    """kill -9 by the PID in the data dir's runtime file: no shutdown hook runs."""
    pid = json.loads((session.datadir / "webserver.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 30, what="the killed webserver to be gone")
    return pid


def restart_webserver(session: RaySession, cluster: str) -> None:
    """`ray-on-golem start`; then wait while its node routes answer 503 (it re-adopts the clusters)."""
    import ray_on_golem as rog

    started = session.rog("start", "--datadir", str(session.datadir), "--port", str(session.port), "--network", "local")
    assert started.returncode == 0, started.stdout + started.stderr

    def readopted():
        try:
            return session.api("GET", f"/clusters/{cluster}/nodes") is not None
        except rog.ServiceUnavailable:
            return False

    wait_for(readopted, 120, what="the restarted webserver to re-adopt its clusters")


def test_spending_rebuilt_from_the_ledger_pays_only_the_increase():
    """A restarted webserver's Spending (ClusterPayments.readopt_allocation): the accepted documents
    come back from the ledger, so the next debit note of an activity pays only what it adds, an
    older one is refused, and an invoice pays what its debit notes did not."""
    import ray_on_golem as rog

    terms = rog.PriceTerms(("golem.usage.cpu_sec", "golem.usage.duration_sec"), (Decimal("0.001"), Decimal("0.001")),
                           Decimal(0), 2)
    spending = rog.Spending(Decimal(1), spent=Decimal("0.05"))
    spending.restore("debit_note", "agr", "act", Decimal("0.05"))
    again = spending.decide(terms, "debit_note", "agr", "act", Decimal("0.05"), None, 60.0)
    assert again.accept and again.spend == 0
    older = spending.decide(terms, "debit_note", "agr", "act", Decimal("0.04"), None, 60.0)
    assert not older.accept and "less than the 0.05 accepted before" in older.reason
    newer = spending.decide(terms, "debit_note", "agr", "act", Decimal("0.07"), None, 60.0)
    assert newer.accept and newer.spend == Decimal("0.02") and spending.spent == Decimal("0.07")
    invoice = spending.decide(terms, "invoice", "agr", None, Decimal("0.08"), None, 60.0)
    assert invoice.accept and invoice.spend == Decimal("0.01") and spending.spent == Decimal("0.08")
    rebuilt = rog.Spending(Decimal(1), spent=Decimal("0.08"))
    for kind, activity, amount in (("debit_note", "act", "0.07"), ("invoice", None, "0.08")):
        rebuilt.restore(kind, "agr", activity, Decimal(amount))
    assert not rebuilt.decide(terms, "invoice", "agr", None, Decimal("0.08"), None, 60.0).accept  # never twice


def stop_keeping_clusters(session: RaySession) -> None:
    """`ray-on-golem stop --keep-clusters`: a clean stop that leaves the clusters to the next start."""
    stopped = session.rog("stop", "--keep-clusters", "--datadir", str(session.datadir), "--port", str(session.port))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "`ray-on-golem start` re-adopts them" in stopped.stdout, stopped.stdout
    status = session.rog("status", "--datadir", str(session.datadir), "--port", str(session.port))
    assert "the webserver is gone but left running" in status.stdout and "1 node" in status.stdout, status.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stop", [kill_webserver, stop_keeping_clusters], ids=["kill-9", "stop-keep-clusters"])
def test_restart_readopts_the_live_node_and_pays_what_came_meanwhile(fault_session, stop):
    session = fault_session({"providers": 3, "known_at_start": 1.0, "behaviours": {}, "explicit": STEADY})
    node = request_worker(session, "keep")
    before = wait_node(session, "keep", node["node_id"], {"running"})
    [(agreement_id,)] = session.db("SELECT agreement_id FROM agreements WHERE terminated_at IS NULL")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE status = 'accepted'")[0][0] >= 1, 30,
             what="a first debit note accepted")
    # `ray-on-golem autostop` changes the cluster's setting; the restart keeps it (not the YAML's).
    session.api("POST", "/clusters/keep/autostop", {"idle_minutes": 90.0, "down": False})
    stop(session)
    notes_before = session.localnet_state()["debit_notes"]
    wait_for(lambda: session.localnet_state()["debit_notes"] >= notes_before + 2, 30,
             what="debit notes issued while no webserver runs")

    restart_webserver(session, "keep")
    after = wait_node(session, "keep", node["node_id"], {"running", "terminated"}, timeout=60)
    assert after["state"] == "running", after["state_log"]
    assert (after["provider_id"], after["internal_ip"]) == (before["provider_id"], before["internal_ip"])
    assert after["state_log"][-1].startswith("Re-adopted after the webserver restarted")
    assert [n["node_id"] for n in session.api("GET", "/clusters/keep/nodes")["nodes"]] == [node["node_id"]]
    autostop = session.api("GET", "/status")["autostop"]["keep"]
    assert (autostop["idle_minutes"], autostop["down"]) == (90, False), autostop
    # The notes that came meanwhile are settled, and the next ones too: every note the network
    # issued is in the ledger, accepted, and none paid twice (the ledger equals the wallet).
    notes_after = session.localnet_state()["debit_notes"]
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'debit_note' AND status = 'accepted'")[0][0]
             >= notes_after, 30, what="every debit note accepted")
    assert session.db("SELECT COUNT(*) FROM ledger WHERE status != 'accepted'") == [(0,)]

    session.api("DELETE", f"/clusters/keep/nodes/{node['node_id']}")
    wait_node(session, "keep", node["node_id"], {"terminated"})
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'invoice' AND status = 'accepted'") == [(1,)],
             60, what="the invoice accepted")
    spent = settle_and_check_money(session)
    assert spent == sum((Decimal(r[0]) for r in session.db("SELECT spent FROM ledger WHERE agreement_id = ?",
                                                            agreement_id)), Decimal(0))


@pytest.mark.slow
def test_restart_after_the_acceptance_window_reports_the_node_terminated(fault_session):
    # Each debit note must be accepted within 4 s: the providers end the agreement while no webserver runs.
    strict = [dict(p, debit_note_accept_timeout_s=4) for p in STEADY]
    session = fault_session({"providers": 3, "known_at_start": 1.0, "behaviours": {}, "explicit": strict})
    node = request_worker(session, "lapsed")
    before = wait_node(session, "lapsed", node["node_id"], {"running"})
    kill_webserver(session)
    wait_for(lambda: "Approved" not in session.localnet_state()["agreements"]["by_state"], 30,
             what="the provider to terminate the unpaid agreement")

    restart_webserver(session, "lapsed")
    ended = wait_node(session, "lapsed", node["node_id"], {"terminated"}, timeout=60)
    found = [line for line in ended["state_log"] if line.startswith("Found dead after the webserver restarted: ")]
    assert found and "Terminated" in found[0], ended["state_log"]
    assert ended["state_log"][-1] == "Terminated" and ended["provider_id"] == before["provider_id"]
    assert "Re-adopted" not in " ".join(ended["state_log"])
    assert session.api("GET", "/clusters/lapsed/nodes")["nodes"] == []  # Ray sees it gone
    assert session.db("SELECT kind FROM provider_events WHERE kind = 'activity_died'") == [("activity_died",)]
    wait_for(lambda: session.db("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL") == [(0,)], 60,
             what="the allocation released")
    assert session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)]
    state = session.localnet_state()
    assert set(state["activities"]["by_state"]) <= {"Terminated"}, state["activities"]


@pytest.mark.ray
@pytest.mark.slow
def test_kill_9_during_ray_submit_keeps_the_cluster(session: RaySession, tmp_path: Path):
    """The acceptance: a task runs through `kill -9` of the webserver and `ray-on-golem start`,
    on the same nodes; the next `ray submit` works; the ledger has no gap and pays nothing twice;
    `ray down` leaves nothing."""
    namespaces_before = netns_list()
    network = FaultNetwork(session.datadir, {"providers": 3, "known_at_start": 1.0, "behaviours": {},
                                             "explicit": STEADY}, session.env)

    def small(config):
        config["max_workers"] = 0
        config["provider"]["parameters"]["node_start_timeout"] = "3m"

    config = session.config = write_cluster_yaml(tmp_path / "cluster.yaml", session.datadir, session.port, small)
    cluster = f"t-{session.port}"
    try:
        up = session.ray("up", "-y", "--no-config-cache", str(config))
        session.up = True
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        [head] = session.nodes(cluster)

        job = tmp_path / "job.py"
        job.write_text("import ray, sys, time\nray.init(address='auto')\n"
                       "@ray.remote\ndef work(seconds):\n    print('STARTED', flush=True)\n    time.sleep(seconds)\n"
                       "    return ray.get_runtime_context().get_node_id()\n"
                       "print('RESULT', ray.get(work.remote(float(sys.argv[1]))), flush=True)\n")
        out = tmp_path / "submit.out"
        with open(out, "w") as f:
            submit = subprocess.Popen([str(RAY_BIN), "submit", "--no-config-cache", str(config), str(job), "60"],
                                      stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, env=session.env,
                                      stdin=subprocess.DEVNULL)
        wait_for(lambda: "STARTED" in out.read_text(), 120, what="the task to start on the head")
        assert submit.poll() is None, out.read_text()[-3000:]
        killed_at = time.monotonic()
        kill_webserver(session)
        notes = session.localnet_state()["debit_notes"]
        wait_for(lambda: session.localnet_state()["debit_notes"] > notes, 30,
                 what="a debit note issued while no webserver runs")
        # Down longer than Ray's autoscaler tolerates failed updates in a row: its provider must wait.
        from ray.autoscaler._private.constants import AUTOSCALER_MAX_NUM_FAILURES, AUTOSCALER_UPDATE_INTERVAL_S

        time.sleep(max(0.0, killed_at + AUTOSCALER_UPDATE_INTERVAL_S * (AUTOSCALER_MAX_NUM_FAILURES + 2)
                       - time.monotonic()))
        restart_webserver(session, cluster)
        assert submit.wait(timeout=240) == 0, out.read_text()[-3000:]
        [ray_node] = re.findall(r"^RESULT (\w+)$", out.read_text(), re.M)
        # No gap: every debit note the network issued, those of the downtime too, is accepted.
        issued = session.localnet_state()["debit_notes"]
        wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'debit_note' AND status = 'accepted'")
                 [0][0] >= issued, 30, what="every debit note accepted")
        assert session.db("SELECT COUNT(*) FROM ledger WHERE status != 'accepted'") == [(0,)]
        [again] = session.nodes(cluster)
        assert (again["node_id"], again["provider_id"]) == (head["node_id"], head["provider_id"])
        assert again["local_ports"] == head["local_ports"]  # what `ray up` printed still connects
        assert any(line.startswith("Re-adopted") for line in again["state_log"])

        second = session.ray("submit", "--no-config-cache", str(config), str(job), "1")
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert re.findall(r"^RESULT (\w+)$", second.stdout, re.M) == [ray_node]  # the same Ray node
        assert [n["node_id"] for n in session.nodes(cluster)] == [head["node_id"]]
        # The head's autoscaler monitor still runs after the restart (v1 or v2 entry point).
        monitor = session.ray("exec", "--no-config-cache", str(config),
                              "pgrep -f 'autoscaler/(_private|v2)/[m]onitor.py'")
        assert monitor.returncode == 0, monitor.stdout[-2000:] + monitor.stderr[-2000:]

        down = session.ray("down", "-y", str(config), timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        session.up = False
        settle_and_check_money(session)  # no gap, nothing paid twice: the ledger is what the network was paid
        assert session.db("SELECT COUNT(*) FROM activities WHERE destroyed_at IS NULL") == [(0,)]
        assert not [p for p in processes_mentioning([str(session.datadir)]) if " ssh" in p or "ssh-proxy" in p]
    finally:
        session.stop_with([network])
    session.close(None)  # nothing of the cluster is left: no process, no daemon
    assert not processes_mentioning([str(session.datadir)])
    assert netns_list() == namespaces_before
