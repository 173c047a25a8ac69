"""`ray-on-golem reputation ...` and the Store under it: blocks, expiry, scores, concurrency."""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

import ray_on_golem as rog
from conftest import REPO, cli_env

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
CAROL = "0x" + "C3" * 20  # mixed case on input, lower case in the store


def listing(run_cli, *args) -> list[dict]:
    proc = run_cli("reputation", "list", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["providers"]


def test_block_list_unblock(run_cli, datadir):
    proc = run_cli("reputation", "block", ALICE, "--reason", "deploy failed twice", "--for", "2h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Node {ALICE} blocked on local, holesky, polygon until ")
    assert proc.stdout.rstrip().endswith("(2h): deploy failed twice.")

    rows = listing(run_cli)
    assert [(r["node_id"], r["network"]) for r in rows] == [(ALICE, n) for n in ("holesky", "local", "polygon")]
    assert all(r["blocked"] and r["reason"] == "deploy failed twice" and r["blocked_by"] == "user" for r in rows)
    assert all(7190 < r["blocked_until"] - time.time() <= 7200 for r in rows)

    table = run_cli("reputation", "list")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0] == "Provider reputation on local, holesky, polygon"
    assert lines[1].split() == ["NODE", "ID", "NAME", "NETWORK", "SCORE", "SUCCESS", "UPTIME", "LAST", "SEEN",
                                "BLOCKED"]
    assert ALICE in lines[2] and "yes until" in lines[2] and lines[2].endswith(": deploy failed twice")
    assert lines[-1] == "3 records found."

    proc = run_cli("reputation", "unblock", ALICE, "--network", "holesky")
    assert (proc.returncode, proc.stdout) == (0, f"Node {ALICE} unblocked on holesky.\n")
    assert [r["network"] for r in listing(run_cli, "--blocked")] == ["local", "polygon"]

    proc = run_cli("reputation", "unblock", ALICE)
    assert proc.stdout == f"Node {ALICE} unblocked on local, polygon.\n"
    proc = run_cli("reputation", "unblock", ALICE)
    assert (proc.returncode, proc.stdout) == (0, f"Node {ALICE} was not blocked on local, holesky, polygon.\n")
    assert listing(run_cli) == []


def test_block_forever_on_one_network(run_cli):
    proc = run_cli("reputation", "block", CAROL, "--network", "polygon")
    assert proc.stdout == f"Node {CAROL.lower()} blocked on polygon until unblocked.\n"
    (row,) = listing(run_cli, "--blocked")
    assert (row["node_id"], row["network"], row["blocked_until"], row["reason"]) == (CAROL.lower(), "polygon",
                                                                                      None, None)
    assert listing(run_cli, "--network", "holesky") == []
    assert "forever" in run_cli("reputation", "list", "--network", "polygon").stdout


@pytest.mark.parametrize("bad_id, why", [
    ("0x12", "expected 0x followed by 40 hex digits"),
    ("a1" * 20, "missing the 0x prefix"),
    ("0x" + "g1" * 20, "expected 0x followed by 40 hex digits"),
    ("0x" + "a1" * 21, "expected 0x followed by 40 hex digits"),
])
@pytest.mark.parametrize("command", ["block", "unblock", "list"])
def test_invalid_node_id(run_cli, datadir, bad_id, why, command):
    proc = run_cli("reputation", command, bad_id)
    assert proc.returncode == 2
    assert proc.stderr == f"ray-on-golem: error: invalid node id '{bad_id}': {why}\n"
    assert not datadir.exists()  # rejected before the store is touched


@pytest.mark.parametrize("args, message", [
    (["block", ALICE, "--for", "2x"], "--for: expected a duration like 90s, 10m, 2h or 1d, found '2x'"),
    (["block", ALICE, "--for", "0m"], "--for: expected a positive duration"),
    (["block", ALICE, "--network", "mumbai"], "--network: expected one of local, holesky, polygon, all, found "
                                              "'mumbai': mumbai was shut down"),
    (["list", "--network", "holsky"], "did you mean `holesky`?"),
    (["update", "--from", "scores.json"], "--network: --from needs one payment network"),
])
def test_bad_arguments(run_cli, datadir, args, message):
    proc = run_cli("reputation", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not datadir.exists()


def test_argparse_usage_errors_exit_2(run_cli):
    assert run_cli("reputation").returncode == 2
    assert run_cli("reputation", "bogus").returncode == 2
    assert run_cli("reputation", "block").returncode == 2
    proc = run_cli("no-such-command")
    assert proc.returncode == 2 and "ray-on-golem: error:" in proc.stderr


def test_expiry_with_an_injected_clock(run_cli, datadir):
    # A block written "3 hours ago" for 2 hours has expired for the CLI, which uses the real clock.
    past = rog.Store(str(datadir), clock=lambda: time.time() - 3 * 3600)
    past.block(BOB, ["holesky"], reason="activity died", duration=2 * 3600)
    past.close()
    assert listing(run_cli, "--blocked") == []
    (row,) = listing(run_cli)  # still listed, as history, but not blocked
    assert (row["node_id"], row["blocked"], row["reason"]) == (BOB, False, None)
    assert run_cli("reputation", "unblock", BOB).stdout == f"Node {BOB} was not blocked on local, holesky, polygon.\n"

    # A block from the CLI for 2h holds one hour later and is gone three hours later.
    assert run_cli("reputation", "block", ALICE, "--for", "2h", "--network", "local").returncode == 0
    now = time.time()
    with rog.Store(str(datadir), clock=lambda: now + 3600) as later:
        assert later.is_blocked(ALICE, "local") and ALICE in later.blocked_node_ids("local")
        assert not later.is_blocked(ALICE, "holesky")
    with rog.Store(str(datadir), clock=lambda: now + 3 * 3600) as much_later:
        assert not much_later.is_blocked(ALICE, "local")
        assert much_later.score(ALICE, "local") == 0.0
        assert much_later.purge_expired_blocks() == 1  # Alice's (`unblock` already removed Bob's)
    assert listing(run_cli) == []


def test_concurrent_blocks_all_land(spawn_cli, run_cli, datadir):
    """Eight processes on a fresh data dir: the schema is created once and every block lands."""
    ids = ["0x" + f"{i:02x}" * 20 for i in range(1, 8)]
    procs = [spawn_cli("reputation", "block", node_id, "--reason", f"r{n}") for n, node_id in enumerate(ids)]
    procs.append(spawn_cli("reputation", "block", ids[0], "--network", "holesky", "--reason", "again"))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    rows = listing(run_cli, "--blocked")
    assert {r["node_id"] for r in rows} == set(ids)
    assert len(rows) == 3 * len(ids)
    with rog.Store(str(datadir)) as store:
        assert store.schema_version == len(rog.MIGRATIONS)


def test_store_file(run_cli, datadir):
    assert run_cli("reputation", "list").returncode == 0
    db = datadir / "ray_on_golem.sqlite3"
    assert stat.S_IMODE(datadir.stat().st_mode) == 0o700
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(rog.MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"providers", "reputation", "provider_events", "blacklist", "clusters", "nodes", "allocations",
            "agreements", "activities", "ledger"} <= tables
    conn.close()


def test_newer_schema_is_refused(run_cli, datadir):
    assert run_cli("reputation", "list").returncode == 0
    conn = sqlite3.connect(datadir / "ray_on_golem.sqlite3")
    conn.execute(f"PRAGMA user_version = {len(rog.MIGRATIONS) + 1}")
    conn.close()
    proc = run_cli("reputation", "block", ALICE)
    assert proc.returncode == 1
    assert "newer than this ray-on-golem" in proc.stderr


def test_update_merges_registry_scores(run_cli, tmp_path):
    registry = {"providers": [
        {"providerId": ALICE, "scores": {"successRate": 0.9, "uptime": 0.6}},
        {"providerId": BOB, "scores": {"uptime": 1.0}},
        {"providerId": "not-an-id", "scores": {"uptime": 1.0}},
        {"providerId": CAROL},
        {"scores": {"uptime": 0.5}},
        {"providerId": CAROL, "scores": {"uptime": 7}},
    ]}
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(registry))
    proc = run_cli("reputation", "update", "--from", path, "--network", "holesky")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("Reputation DB updated. Total scores=6 (added=2, updated=0, "
                                           "unchanged=0, ignored=4).")
    rows = {r["node_id"]: r for r in listing(run_cli, "--network", "holesky")}
    assert set(rows) == {ALICE, BOB}
    assert rows[ALICE]["score"] == pytest.approx((0.6 + 0.9 * 0.5) / 1.5)
    assert rows[BOB]["score"] == pytest.approx(1.0 / 1.5)  # missing success rate counts as 0
    assert listing(run_cli, "--network", "polygon") == []

    registry["providers"][0]["scores"]["uptime"] = 0.7
    path.write_text(json.dumps(registry))
    proc = run_cli("reputation", "update", "--from", path, "--network", "holesky")
    assert "(added=0, updated=1, unchanged=1, ignored=4)" in proc.stdout


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"scores": []}', "expected the reputation registry format"),
])
def test_update_rejects_bad_files(run_cli, tmp_path, content, message):
    path = tmp_path / "scores.json"
    path.write_text(content)
    proc = run_cli("reputation", "update", "--from", path, "--network", "local")
    assert proc.returncode == 2
    assert f"--from {path}: " in proc.stderr and message in proc.stderr
    proc = run_cli("reputation", "update", "--from", tmp_path / "missing.json", "--network", "local")
    assert proc.returncode == 2 and "cannot be read" in proc.stderr


def test_update_recomputes_from_local_events(run_cli, datadir):
    with rog.Store(str(datadir)) as store:
        store.record_provider(ALICE, "alice-node")
        for kind in ("agreement_ok", "deploy_ok", "activity_finished", "deploy_failed"):
            store.record_event(ALICE, "local", kind, detail="test", cluster_name="c1")
        store.merge_registry_scores("local", {"providers": [{"providerId": ALICE,
                                                             "scores": {"successRate": 0.5, "uptime": 0.9}}]})
        with pytest.raises(rog.UsageError, match="unknown provider event kind"):
            store.record_event(ALICE, "local", "deploy_fialed")
    proc = run_cli("reputation", "update", "--network", "local")
    assert proc.stdout == "Scores recomputed from local events for 1 provider record on local.\n"
    (row,) = listing(run_cli)
    assert (row["name"], row["local_ok"], row["local_failed"]) == ("alice-node", 3, 1)
    assert row["success_rate"] == pytest.approx((0.75 + 0.5) / 2)  # local rate blended with the registry's
    assert row["score"] == pytest.approx((0.9 + row["success_rate"] * 0.5) / 1.5)
    assert row["last_seen"] is not None


def test_colour_only_on_a_terminal_and_never_with_no_color(datadir, tmp_path):
    def on_a_tty(extra_env):
        leader, follower = pty.openpty()
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, str(REPO / "ray_on_golem.py"), "reputation", "list", "--blocked"],
                                stdout=follower, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                env=cli_env(datadir, home, extra_env))
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert proc.wait(timeout=60) == 0
        return b"".join(chunks).decode()

    assert "\033[36mBlocked providers" in on_a_tty({"TERM": "xterm"})
    assert "\033[" not in on_a_tty({"TERM": "xterm", "NO_COLOR": "1"})


def test_update_from_a_url(run_cli, tmp_path):
    """The registry can be fetched over http(s); here from a server on loopback, never the internet."""
    import http.server
    import threading

    body = json.dumps({"providers": [{"providerId": ALICE, "scores": {"successRate": 1.0, "uptime": 1.0}}]})

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            payload = body.encode() if self.path.startswith("/v1/providers/scores") else b"{}"
            self.send_response(200 if payload != b"{}" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        proc = run_cli("reputation", "update", "--from", f"{url}/v1/providers/scores?network=polygon",
                       "--network", "polygon")
        assert proc.returncode == 0, proc.stderr
        assert "Total scores=1 (added=1," in proc.stdout
        proc = run_cli("reputation", "update", "--from", f"{url}/missing", "--network", "polygon")
        assert proc.returncode == 1 and "cannot fetch (HTTP Error 404" in proc.stderr
        proc = run_cli("reputation", "update", "--from", "ftp://127.0.0.1/x.json", "--network", "polygon")
        assert proc.returncode == 2 and "expected a file or an http(s) URL" in proc.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    (row,) = listing(run_cli)
    assert (row["network"], row["score"]) == ("polygon", 1.0)


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_rate = st.none() | st.floats(min_value=0, max_value=1)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rate, _rate, st.integers(0, 50), st.integers(0, 50), st.floats(min_value=0, max_value=1))
def test_score_is_bounded_and_rewards_uptime(success, uptime, ok, failed, more):
    _, _, score = rog.Store._combine(success, uptime, ok, failed)
    assert 0.0 <= score <= 1.0
    _, _, better = rog.Store._combine(success, min(1.0, (uptime or 0.0) + more), ok, failed)
    assert better >= score
    _, _, with_success = rog.Store._combine(success, uptime, ok + 1, failed)
    _, _, with_failure = rog.Store._combine(success, uptime, ok, failed + 1)
    assert with_success >= with_failure
