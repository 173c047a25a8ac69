"""Nodes reached by OpenSSH through the VPN, and the head's reverse tunnel (issue 12), without Ray.

The webserver (real process) rents a head on the local network's namespaced nodes, starts sshd
there, pins its host key and opens the tunnel; the test then reaches the node with the same
options Ray's SSHCommandRunner gets (ssh-proxy `@CLUSTER` as ProxyCommand, strict host keys).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_CLUSTER, cli_env
from test_cluster import _provider, fault_session, request_worker, session, wait_for, wait_node  # noqa: F401 - fixtures

import ray_on_golem as rog

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaced local nodes (sshd on each) need root")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argvs() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


@pytest.fixture
def webserver(tmp_path: Path):
    datadir, port = tmp_path / "datadir", _free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(datadir, home, {"PYTHONPATH": str(REPO)})

    def rog_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), args[0], "--datadir", str(datadir), *args[1:]],
                              capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)

    started = rog_cli("start", "--port", str(port), "--network", "local")
    assert started.returncode == 0, started.stdout + started.stderr
    pids = [int(json.loads((datadir / name).read_text())["pid"]) for name in ("webserver.json", "localnet/localnet.json")]
    client = rog.WebserverClient(str(datadir), port, timeout=30)
    yield datadir, port, env, client, rog_cli
    client.close()
    rog_cli("stop", "--force", "--kill", "--port", str(port), timeout=200)
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 30, 0.3, "the daemons to exit")
    wait_for(lambda: not any(str(datadir) in a for a in _argvs()), 30, 0.3, "no process of the data dir left")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(f"gln{pid}-" in netns for pid in pids), netns


def test_head_over_ssh_with_pinned_key_and_a_supervised_tunnel(webserver, tmp_path: Path):
    datadir, port, env, client, rog_cli = webserver
    cluster = "ssh-test"
    keys = rog.ClusterKeys(str(datadir), cluster).ensure()  # what `ray up` does (bootstrap_config)
    config = rog.load_cluster_config(str(SAMPLE_CLUSTER))
    params = json.loads(json.dumps(config.parameters))
    params.update(webserver_port=port, node_start_timeout=120.0)
    body = {"provider_parameters": params, "node_config": config.node_types["ray.head.default"].node_config,
            "tags": {"ray-node-type": "head", "ray-user-node-type": "ray.head.default"}, "count": 1}
    node_id = client.request("POST", f"/clusters/{cluster}/nodes", body)["nodes"][0]["node_id"]
    node = wait_for(lambda: (lambda n: n if n["state"] != "pending" else None)(
        client.request("GET", f"/clusters/{cluster}/nodes/{node_id}")), 150, 0.3, "the head to start")
    assert node["state"] == "running", node
    log = "\n".join(node["state_log"])
    assert "SSH answers" in log and "Tunnel to the webserver up" in log, log
    ip = node["internal_ip"]
    assert ip.startswith("10.") and node["tunnel"] == "up"
    print("\n".join(node["state_log"]))

    # One key pair per cluster, 0600; the node's host key pinned at first contact.
    assert stat.S_IMODE(os.stat(keys.private_key).st_mode) == 0o600
    assert _pinned(keys.known_hosts, ip).startswith("ssh-ed25519 ")

    # What Ray's runner does: ssh-proxy `@CLUSTER` as ProxyCommand, strict host key checking.
    proxy = rog.ssh_proxy_command(str(datadir), "@" + cluster)
    ssh = ["ssh", *rog.ssh_options(keys.private_key, keys.known_hosts, proxy, first_contact=False), f"root@{ip}"]
    # The head reaches the webserver at its own 127.0.0.1:<port> with the copied token: the tunnel.
    probe = ("import json, os, sys, urllib.request\n"
             f"path = os.path.expanduser('~/{rog.NODE_STATE_DIR}/{rog.WEBSERVER_TOKEN_FILE}')\n"
             "print(oct(os.stat(path).st_mode & 0o777))\n"
             f"req = urllib.request.Request('http://127.0.0.1:{port}/status', headers="
             "{'Authorization': 'Bearer ' + open(path).read().strip()})\n"
             "try:\n    print(json.load(urllib.request.urlopen(req, timeout=5))['state'])\n"
             "except OSError as e:\n    print('unreachable', e)\n")

    def on_head(script: str) -> str:
        run = subprocess.run(ssh + ["python3", "-"], input=script, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert on_head(probe).split("\n")[:2] == ["0o600", "running"]
    # The local forwards: free ports of this machine's 127.0.0.1 to the head's dashboard and Ray client ports.
    ports = node["local_ports"]
    assert set(ports) == {"client", "dashboard"} and len(set(ports.values())) == 2, ports
    started = subprocess.run(ssh + [f"mkdir -p ~/web && echo forwarded-{node_id} > ~/web/marker.txt && cd ~/web && "
                                    f"(nohup python3 -m http.server {rog.HEAD_DASHBOARD_PORT} --bind 127.0.0.1 "
                                    ">/dev/null 2>&1 &)"], capture_output=True, text=True, env=env, timeout=60)
    assert started.returncode == 0, started.stderr
    assert wait_for(lambda: _get(f"http://127.0.0.1:{ports['dashboard']}/marker.txt"), 30, 0.3,
                    "the dashboard forward") == f"forwarded-{node_id}"
    hostname = subprocess.run(ssh + ["hostname"], capture_output=True, text=True, env=env, timeout=60)
    assert hostname.returncode == 0 and hostname.stdout.strip(), hostname.stderr
    # `ray-on-golem ssh CLUSTER [NODE] -c COMMAND`: the head by default, a node by id.
    by_cli = rog_cli("ssh", cluster, "-c", "hostname")
    assert by_cli.returncode == 0 and by_cli.stdout == hostname.stdout, by_cli.stderr
    assert rog_cli("ssh", cluster, node_id, "-c", "hostname").stdout == hostname.stdout
    missing = rog_cli("ssh", cluster, "node999", "-c", "true")
    assert missing.returncode != 0 and "has no running node 'node999'" in missing.stderr, missing.stderr
    # rsync as Ray runs it (`--rsh` = the ssh options through subprocess.list2cmdline).
    rsh = subprocess.list2cmdline(["ssh", *rog.ssh_options(keys.private_key, keys.known_hosts, proxy,
                                                            first_contact=False)])
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(1024 * 1024))
    for source, target in ((str(payload), f"root@{ip}:~/payload.bin"), (f"root@{ip}:~/payload.bin", str(tmp_path / "back.bin"))):
        copied = subprocess.run(["rsync", "--rsh", rsh, "-avz", source, target], capture_output=True, text=True,
                                env=env, timeout=120)
        assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()

    # The tunnel killed: the head cannot reach the webserver, then the webserver brings it back.
    # Only this data dir's ssh (its key and ProxyCommand): other clusters on the machine use the same VPN IPs.
    tunnel_pids = [a for a in _argvs() if "-R" in a.split() and f"root@{ip}" in a and str(datadir) in a]
    assert len(tunnel_pids) == 1, tunnel_pids
    pid = next(int(e) for e in os.listdir("/proc") if e.isdigit() and _cmdline(e) == tunnel_pids[0])
    os.kill(pid, 9)
    wait_for(lambda: "unreachable" in on_head(probe), 30, 0.3, "the head to lose the webserver")
    status = wait_for(lambda: (lambda s: s if s["tunnels"][cluster][node_id]["state"] == "up" else None)(
        client.request("GET", "/status")), 60, 0.3, "the tunnel to come back")
    assert status["tunnels"][cluster][node_id]["restarts"] >= 1
    assert on_head(probe).split("\n")[1] == "running"
    # Same local ports after the restart: what `ray up` printed still connects.
    assert status["tunnels"][cluster][node_id]["local_ports"] == ports
    assert _get(f"http://127.0.0.1:{ports['dashboard']}/marker.txt") == f"forwarded-{node_id}"
    shown = rog_cli("status", "--port", str(port))
    assert re.search(rf"tunnel from head {node_id}: up \(\d+ restart", shown.stdout), shown.stdout
    assert f'ray.init("ray://127.0.0.1:{ports["client"]}")' in shown.stdout, shown.stdout
    assert f"Dashboard: http://127.0.0.1:{ports['dashboard']}" in shown.stdout, shown.stdout
    as_json = json.loads(rog_cli("status", "--json", "--port", str(port)).stdout)
    assert as_json["webserver"]["tunnels"][cluster][node_id]["local_ports"] == ports

    # A changed host key is refused with OpenSSH's clear error.
    original = Path(keys.known_hosts).read_text()
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    Path(keys.known_hosts).write_text(f"{ip} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    refused = subprocess.run(ssh + ["true"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr
    Path(keys.known_hosts).write_text(original)

    # Neither the token nor the app key in any process's argv.
    secrets = [(datadir / rog.WEBSERVER_TOKEN_FILE).read_text().strip(),
               (datadir / "localnet" / "appkey").read_text().strip()]
    assert not [a for a in _argvs() if any(s in a for s in secrets)]

    # Ending the node ends its tunnel and ssh processes and forgets its host key.
    client.request("DELETE", f"/clusters/{cluster}/nodes/{node_id}")
    wait_for(lambda: not [a for a in _argvs() if (f"root@{ip}" in a or f" {ip} 22" in a) and str(datadir) in a], 30,
             0.3, "no ssh to the node left")
    wait_for(lambda: not _pinned(keys.known_hosts, ip), 30, 0.3, "the host key forgotten")
    assert _get(f"http://127.0.0.1:{ports['dashboard']}/marker.txt") is None  # the local forwards ended too


def test_tunnel_local_ports_are_free_ports_and_kept_while_free():
    """Two clusters never share a local port: each forward takes a free port, and a recorded port
    another process took meanwhile is replaced before the tunnel (re)starts."""
    import logging
    import socket

    log = logging.getLogger("test")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        kept = _free_port()
        tunnels = [rog.SSHTunnel(lambda *o: ["ssh", *o], {}, log, {
            "webserver": ("remote", 4578, 4578), "client": ("local", 0, rog.HEAD_RAY_CLIENT_PORT),
            "dashboard": ("local", busy, rog.HEAD_DASHBOARD_PORT)}) for _ in range(2)]
        for tunnel in tunnels:
            tunnel.claim_local_ports()
        ports = [p for t in tunnels for p in t.local_ports().values()]
        assert busy not in ports and 0 not in ports and len(set(ports)) == len(ports) == 4, ports
        assert tunnels[0].as_dict()["forwards"]["webserver"] == ["remote", 4578, 4578]
        again = rog.SSHTunnel(lambda *o: ["ssh", *o], {}, log, {"dashboard": ("local", kept, 8265)})
        again.claim_local_ports()
        assert again.local_ports() == {"dashboard": kept}


def _get(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode().strip()
    except OSError:
        return None


def test_sshd_never_answers_is_a_profile_fault_by_provider_or_by_share(tmp_path: Path):
    def population(profile: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "profile.json"
        path.write_text(json.dumps(profile))
        return subprocess.run([sys.executable, str(REPO / "golem_localnet.py"), "population", "--json", "--profile",
                               str(path)], capture_output=True, text=True, timeout=60)

    by_share = json.loads(population({"providers": 20, "activity_faults": {"sshd_never_answers": 0.1}}).stdout)
    assert sorted(p["sshd_never_answers"] for p in by_share["providers"]) == [0.0] * 18 + [1.0] * 2
    explicit = json.loads(population({"providers": 2, "explicit": [_provider("mute-sshd", 0.01, sshd_never_answers=1.0)]}).stdout)
    assert [p["sshd_never_answers"] for p in explicit["providers"]] == [1.0, 0.0]
    bad = population({"providers": 2, "activity_faults": {"sshd_never_answers": 2}})
    assert bad.returncode != 0 and "activity_faults.sshd_never_answers: expected a share in [0, 1]" in bad.stderr


@pytest.mark.slow
def test_a_node_whose_sshd_never_answers_is_replaced_and_its_provider_penalised(fault_session):
    """The cheap provider's node runs, but its sshd never answers (the local network's
    `sshd_never_answers` fault): the node is not declared ready, the provider is left (agreement
    terminated, activity destroyed) and penalised, and a dearer provider's node is ready in time."""
    profile = {"providers": 2, "known_at_start": 1.0, "behaviours": {}, "explicit": [
        _provider("cheap-silent-sshd", 0.01, sshd_never_answers=1.0), _provider("dear-ok", 0.45, latency_s=1.5)]}
    session = fault_session(profile)
    population = subprocess.run([sys.executable, str(REPO / "golem_localnet.py"), "population", "--json", "--profile",
                                 str(session.datadir / "localnet" / "profile.json")], check=True, capture_output=True,
                                text=True).stdout
    ids = {p["name"]: p["node_id"] for p in json.loads(population)["providers"]}
    silent_id, sound_id = ids["cheap-silent-sshd"], ids["dear-ok"]
    first = request_worker(session, "silent", timeout="3m")
    seen = []

    def not_ready_while_silent():
        node = session.api("GET", f"/clusters/silent/nodes/{first['node_id']}")
        seen.append((node["state"], node["provider_name"]))
        return node if node["state"] != "pending" else None

    node = wait_for(not_ready_while_silent, 200, 0.5, "the node to run or end")
    assert node["state"] == "running", node
    # Never ready on the silent provider: pending all the while it held it.
    assert ("pending", "cheap-silent-sshd") in seen and ("running", "cheap-silent-sshd") not in seen, seen
    assert node["provider_name"] == "dear-ok"
    log = "\n".join(node["state_log"])
    failed = [line for line in node["state_log"] if "sshd did not answer within" in line]
    assert len(failed) == 1 and "cheap-silent-sshd" in failed[0], log
    assert log.index(failed[0]) < log.index("SSH answers"), log
    # Penalised as a connection failure; its reputation falls below the sound provider's.
    assert session.db("SELECT node_id, kind FROM provider_events WHERE kind NOT IN ('agreement_ok', 'deploy_ok')") == [
        (silent_id, "connection_failed")]
    updated = session.rog("reputation", "update", "--network", "local", "--datadir", str(session.datadir))
    assert updated.returncode == 0, updated.stderr
    listed = json.loads(session.rog("reputation", "list", "--json", "--network", "local",
                                    "--datadir", str(session.datadir)).stdout)
    scores = {p["node_id"]: p for p in listed["providers"]}
    assert scores[silent_id]["local_failed"] == 1 and scores[sound_id]["local_failed"] == 0, scores
    assert scores[silent_id]["score"] < scores[sound_id]["score"], scores
    # Nothing of the silent attempt is left: its agreement ended, its activity destroyed, no ssh.
    agreements = dict(session.db("SELECT provider_id, terminated_at IS NOT NULL FROM agreements"))
    assert agreements == {silent_id: 1, sound_id: 0}, agreements
    assert session.db("SELECT COUNT(*) FROM activities WHERE destroyed_at IS NULL") == [(1,)]
    state = session.localnet_state()
    assert state["agreements"]["by_state"].get("Approved") == 1, state["agreements"]
    assert not [a for a in _argvs() if a.startswith("ssh ") and str(session.datadir) in a]
    session.api("DELETE", f"/clusters/silent/nodes/{node['node_id']}")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)], 30,
             what="agreements terminated")


def _pinned(known_hosts: str, ip: str) -> str:
    """The key known_hosts holds for `ip` (hashed or not), '' if none."""
    found = subprocess.run(["ssh-keygen", "-F", ip, "-f", known_hosts], capture_output=True, text=True)
    lines = [line for line in found.stdout.splitlines() if line and not line.startswith("#")]
    return " ".join(lines[0].split()[1:]) if lines else ""


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
