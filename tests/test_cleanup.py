"""`ray-on-golem cleanup`: agreements of our app session that no cluster owns are ended (issue 13).

Real local network, unmodified golem-core, the real webserver and CLI. A "leftover" is made the
way a crash makes one: golem-core signs an agreement with this data dir's app session, starts an
activity on it, and nothing records it to a cluster. Another application's agreement is made the
same way with another app session id and must never be touched.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import start_localnet, stop_localnet
from test_localnet_activity import golem_node, rent
from test_money import money_factory, profile, provider  # noqa: F401 - money_factory is a fixture

import ray_on_golem as rog

PROVIDERS = profile(provider("p-1"), provider("p-2"), provider("p-3"), provider("p-4"))


def sign(ln, session: str, name: str) -> tuple[str, str]:
    """An Approved agreement with provider `name` under app session `session`, with a started activity,
    left behind (nothing closes them): (agreement id, activity id)."""
    async def go():
        node = golem_node(ln, app_session_id=session, collect_payment_events=False)
        await node.start()
        try:
            _, agreement, _ = await rent(node, name, autoclose=False)
            activity = await agreement.create_activity(autoclose=False)
            return agreement.id, activity.id
        finally:
            await node.aclose()

    return asyncio.run(go())


def agreement_states(ln) -> dict[str, str]:
    return {a["id"]: a["state"] for a in ln.state()["agreements"]["items"]}


def activity_states(ln) -> dict[str, str]:
    return {a["activityId"]: a["state"]["state"][0] for a in ln.state()["activities"]["items"]}


def api(ln, path: str) -> tuple[int, object]:
    req = urllib.request.Request(ln.url + path, headers={"Authorization": f"Bearer {ln.app_key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.mark.slow
def test_cleanup_through_the_webserver_ends_only_what_no_cluster_owns(money_factory):
    money = money_factory(PROVIDERS)
    ln = money.localnet
    head = money.request_node("c1", "head", 5.0)
    head = money.wait_node("c1", head["node_id"], ("running",))
    with money.db() as conn:
        (head_agreement,), = conn.execute("SELECT agreement_id FROM agreements WHERE node_id = ?", (head["node_id"],))
    free = [p for p in ("p-1", "p-2", "p-3", "p-4") if p != head["provider_name"]]
    ours, our_activity = sign(ln, rog.app_session_id(str(money.datadir)), free[0])
    theirs, their_activity = sign(ln, "another-application", free[1])
    assert {ours, theirs, head_agreement} <= {a for a, s in agreement_states(ln).items() if s == "Approved"}

    # --dry-run lists ours, keeps the head's, never shows the other application's, changes nothing.
    dry = money.cli("cleanup", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "Would end 1 of 1 leftover agreement(s)" in dry.stdout, dry.stdout
    assert ours in dry.stdout and free[0] in dry.stdout and our_activity in dry.stdout and "would end" in dry.stdout
    assert f"Kept {head_agreement}: node {head['node_id']} of cluster c1" in dry.stdout
    assert theirs not in dry.stdout and their_activity not in dry.stdout
    report = json.loads(money.cli("cleanup", "--dry-run", "--json").stdout)
    assert [r["agreement_id"] for r in report["leftovers"]] == [ours]
    assert report["leftovers"][0]["provider_name"] == free[0]
    assert [a["activity_id"] for a in report["leftovers"][0]["activities"]] == [our_activity]
    assert [r["agreement_id"] for r in report["owned"]] == [head_agreement]
    assert agreement_states(ln)[ours] == "Approved" and activity_states(ln)[our_activity] != "Terminated"

    ended = money.cli("cleanup")
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert "Ended 1 of 1 leftover agreement(s)" in ended.stdout and ours in ended.stdout, ended.stdout
    states = agreement_states(ln)
    assert states[ours] == "Terminated"
    assert states[theirs] == "Approved" and activity_states(ln)[their_activity] != "Terminated"  # never another app's
    assert states[head_agreement] == "Approved"  # a live cluster node's
    assert activity_states(ln)[our_activity] == "Terminated"
    assert money.node("c1", head["node_id"])["state"] == "running"
    with money.db() as conn:
        rows = [dict(r) for r in conn.execute("SELECT * FROM cleanups")]
    assert [(r["agreement_id"], r["provider_name"], r["outcome"]) for r in rows] == [(ours, free[0], "ended")]
    assert json.loads(rows[0]["activities"]) == [our_activity]

    again = money.cli("cleanup")
    assert again.returncode == 0 and "No leftover agreements" in again.stdout, again.stdout
    # Bad input: a 400 naming the field, and the CLI's usage error.
    status, body = money.call("POST", "/cleanup", {"dry_run": "yes"})
    assert status == 400 and "dry_run" in body["error"], body
    status, body = money.call("POST", "/cleanup", {"dryrun": True})
    assert status == 400 and "dryrun" in body["error"], body
    bad = money.cli("cleanup", "--bogus")
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_cleanup_without_a_webserver_asks_the_local_network_directly(tmp_path, run_cli, datadir):
    ln = start_localnet(datadir / "localnet", profile=PROVIDERS)
    try:
        session = rog.app_session_id(str(datadir))
        assert session == rog.app_session_id(str(datadir) + "/") != rog.app_session_id(str(tmp_path / "other"))
        ours, our_activity = sign(ln, session, "p-1")
        kept, _ = sign(ln, session, "p-2")
        theirs, _ = sign(ln, "another-application", "p-3")
        # `kept` is recorded to a node still running: a restarted webserver adopts it, cleanup keeps it.
        with rog.Store(str(datadir)) as store:
            rog.ClusterRecords(store).cluster("c2", "local", {})
            with store.transaction() as conn:
                conn.execute("INSERT INTO nodes (node_id, cluster_name, node_type, state, created_at, updated_at) "
                             "VALUES ('node7', 'c2', 'head', 'running', 0, 0)")
                conn.execute("INSERT INTO agreements (agreement_id, cluster_name, node_id, provider_id, network, "
                             "state, created_at) VALUES (?, 'c2', 'node7', 'x', 'local', 'approved', 0)", (kept,))

        # The local network answers yagna's list calls: filtered by session, state and dates, 400 on bad input.
        query = urllib.parse.urlencode({"appSessionId": session, "state": "Approved"})
        status, entries = api(ln, f"/market-api/v1/agreements?{query}")
        assert status == 200 and sorted(e["id"] for e in entries) == sorted([ours, kept])
        assert all(e["role"] == "Requestor" and e["timestamp"] and e["approvedDate"] for e in entries)
        later = urllib.parse.urlencode({"appSessionId": session, "afterDate": "2999-01-01T00:00:00Z"})
        assert api(ln, f"/market-api/v1/agreements?{later}") == (200, [])
        status, body = api(ln, "/market-api/v1/agreements?state=Signed")
        assert status == 400 and "state" in body["message"]
        assert api(ln, f"/activity-api/v1/activity?agreementId={ours}") == (200, [our_activity])
        assert api(ln, f"/activity-api/v1/activity/{our_activity}/agreement") == (200, ours)
        assert api(ln, "/activity-api/v1/activity")[0] == 400

        dry = run_cli("cleanup", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        report = json.loads(dry.stdout)
        assert [r["agreement_id"] for r in report["leftovers"]] == [ours]
        assert [(r["agreement_id"], r["cluster_name"], r["node_id"]) for r in report["owned"]] == [(kept, "c2", "node7")]
        assert agreement_states(ln)[ours] == "Approved"

        ended = run_cli("cleanup")
        assert ended.returncode == 0, ended.stdout + ended.stderr
        assert "Ended 1 of 1" in ended.stdout and "Kept " + kept in ended.stdout, ended.stdout
        states = agreement_states(ln)
        assert (states[ours], states[kept], states[theirs]) == ("Terminated", "Approved", "Approved")
        assert activity_states(ln)[our_activity] == "Terminated"
        conn = sqlite3.connect(datadir / "ray_on_golem.sqlite3")
        assert conn.execute("SELECT agreement_id, outcome FROM cleanups").fetchall() == [(ours, "ended")]
        conn.close()
    finally:
        assert stop_localnet(ln) == 0
    gone = run_cli("cleanup")  # nothing answers any more: a clear error, exit 1
    assert gone.returncode == 1 and "no yagna or local network answers" in gone.stderr, gone.stderr


@pytest.mark.yagna
def test_cleanup_through_the_webserver_on_the_real_yagna(tmp_path, netns):
    """The same list calls against yagna 0.17.6 itself (offline, loopback only): nothing of ours is
    signed there, so nothing is listed and nothing ended."""
    from test_services import _make_services, _teardown

    svc = _make_services(tmp_path, "holesky", netns)
    try:
        started = svc.start()
        assert started.returncode == 0, started.stdout + started.stderr
        dry = svc.cli("cleanup", "--datadir", svc.datadir, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert json.loads(dry.stdout) == {"app_session_id": rog.app_session_id(svc.datadir), "dry_run": True,
                                          "leftovers": [], "owned": []}
        done = svc.cli("cleanup", "--datadir", svc.datadir)
        assert done.returncode == 0 and "No Approved agreements of this data dir's app session." in done.stdout, done
    finally:
        svc.stop("--kill")
        _teardown(svc)


@pytest.mark.slow
def test_the_webserver_ends_our_unrecorded_leftovers_when_it_connects(money_factory):
    """A crash between approval and record leaves an agreement of our session that no row names: the
    next webserver ends it when it connects to yagna (after re-adopting), as `cleanup` would; another
    application's agreement stays."""
    money = money_factory(PROVIDERS)
    ln = money.localnet
    ours, our_activity = sign(ln, rog.app_session_id(str(money.datadir)), "p-1")
    theirs, _ = sign(ln, "another-application", "p-2")
    head = money.request_node("c1", "head", 5.0)  # the webserver's first connection to yagna
    money.wait_node("c1", head["node_id"], ("running",))
    states = agreement_states(ln)
    assert states[ours] == "Terminated" and activity_states(ln)[our_activity] == "Terminated"
    assert states[theirs] == "Approved"
    with money.db() as conn:
        assert [tuple(r) for r in conn.execute("SELECT agreement_id, outcome FROM cleanups")] == [(ours, "ended")]
