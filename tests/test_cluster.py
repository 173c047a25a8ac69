"""Ray clusters end to end on the local Golem network (issue 7).

The acceptance flow runs as a user runs it: the real `ray` CLI with
`module: ray_on_golem.GolemNodeProvider`, the webserver it starts, the local
network the webserver starts, Ray nodes in the local network's sandboxes. Provider
faults come from the local network's profile. Clusters stay small (head + <= 2
workers with one CPU each): the machine has 2 cores shared with other work.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_CLUSTER, cli_env

import ray_on_golem as rog

RAY_BIN = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(not RAY_BIN.exists(), reason=f"the ray CLI is not installed next to {sys.executable}")


# --- helpers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_cluster_yaml(path: Path, datadir: Path, port: int, edit=None) -> Path:
    """sample-cluster.yaml with this test's webserver port and data dir, plus `edit(config)`."""
    import yaml

    config = yaml.safe_load(SAMPLE_CLUSTER.read_text())
    config["cluster_name"] = f"t-{port}"
    params = config["provider"]["parameters"]
    params["webserver_port"] = port
    params["webserver_datadir"] = str(datadir)
    if edit:
        edit(config)
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; the test fails naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def processes_mentioning(needles: list[str]) -> list[str]:
    """Command lines of live processes that contain any of `needles` (by /proc, no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            found.append(f"{entry}: {cmdline[:200]}")
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RaySession:
    """A user's shell for one cluster: the ray CLI and the webserver's HTTP API, cleaned up by PID."""

    def __init__(self, tmp_path: Path, datadir: Path, port: int):
        self.tmp_path = tmp_path
        self.datadir = datadir
        self.port = port
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)
        (tmp_path / "tmp").mkdir(exist_ok=True)
        self.env = cli_env(datadir, self.home, {
            "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp"),
            "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        self.node_ips: set[str] = set()
        self.up = False

    def ray(self, *args: str, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(RAY_BIN), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp_path, env=self.env, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
        return proc

    def rog(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp_path, env=self.env, stdin=subprocess.DEVNULL)

    def api(self, method: str, path: str, body: dict | None = None):
        client = rog.WebserverClient(str(self.datadir), self.port, timeout=30)
        try:
            return client.request(method, path, body)
        finally:
            client.close()

    def nodes(self, cluster: str) -> list[dict]:
        nodes = self.api("GET", f"/clusters/{cluster}/nodes")["nodes"]
        self.node_ips |= {n["internal_ip"] for n in nodes if n["internal_ip"]}
        return nodes

    def db(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.datadir / "ray_on_golem.sqlite3") as conn:
            return conn.execute(sql, args).fetchall()

    def localnet_state(self) -> dict:
        state = json.loads((self.datadir / "localnet" / "localnet.json").read_text())
        key = (self.datadir / "localnet" / "appkey").read_text().strip()
        status, data = rog.http_request("GET", state["url"] + "/localnet/v1/state", token=key)
        assert status == 200, data
        return data

    def daemon_pids(self) -> list[int]:
        pids = []
        for name in ("webserver.json", "localnet/localnet.json"):
            try:
                pids.append(int(json.loads((self.datadir / name).read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                pass
        return pids

    def stop_with(self, networks=()) -> None:
        """A test's own teardown: `ray down` if still up, the webserver (it terminates the nodes),
        then the local networks the test started itself (FaultNetwork)."""
        if self.up and self.config is not None:
            self.ray("down", "-y", str(self.config), timeout=300)
            self.up = False
        self.rog("stop", "--force", "--kill", "--datadir", str(self.datadir), "--port", str(self.port), timeout=200)
        for network in networks:
            network.stop()

    def close(self, config: Path | None) -> None:
        """`ray down` if still up, stop the webserver; then nothing of the cluster may be left."""
        pids = self.daemon_pids()
        if self.up and config is not None:
            self.ray("down", "-y", str(config), timeout=300)
        if (self.datadir / "webserver.json").exists():
            self.rog("stop", "--force", "--kill", "--datadir", str(self.datadir), "--port", str(self.port), timeout=200)
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), 30, what=f"daemon pid {pid} to exit")
        needles = [f"node-ip-address={ip}" for ip in self.node_ips] + [f"node_ip_address={ip}" for ip in self.node_ips]
        needles.append(str(self.datadir))
        wait_for(lambda: not processes_mentioning(needles), 30, what="no process of the cluster left")


@pytest.fixture
def session(tmp_path: Path):
    datadir = tmp_path / "datadir"
    s = RaySession(tmp_path, datadir, free_port())
    s.config = None
    yield s
    s.close(s.config)


# --- pure parts: no processes ---------------------------------------------------------


@pytest.mark.parametrize("tags, tag_filter, expected", [
    ({"a": "1", "b": "2"}, {}, True),
    ({"a": "1", "b": "2"}, {"a": "1"}, True),
    ({"a": "1", "b": "2"}, {"a": "1", "b": "2"}, True),
    ({"a": "1"}, {"a": "1", "b": "2"}, False),  # the original matched this (missing key ignored)
    ({"a": "1", "b": "3"}, {"b": "2"}, False),
])
def test_tag_filter_needs_every_key(tags, tag_filter, expected):
    assert rog.tags_match(tags, tag_filter) is expected


def test_diagnosis_names_the_filter_nothing_passed():
    funnel = rog.Funnel(["Initial", "Not blacklisted", "Passed Reject if start price exceeds `max_start_price` = 0.001",
                         "Negotiation initialized", "Negotiated successfully"])
    for _ in range(48):
        funnel.passed("Initial")
        funnel.passed("Not blacklisted")
    assert rog.diagnose_funnel(funnel) == (
        "0 of 48 offers passed `Reject if start price exceeds `max_start_price` = 0.001`")
    empty = rog.Funnel(["Initial", "Negotiated successfully"])
    assert rog.diagnose_funnel(empty).startswith("no offer matched the demand")


# --- Ray: the user's session -------------------------------------------------------------


def attach_and_type(session: RaySession, config: Path, line: str) -> str:
    """`ray attach` driven by a pseudo-terminal: type `line`, then `exit`; what the terminal showed."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: ray attach on the pty
        os.chdir(session.tmp_path)
        os.execve(str(RAY_BIN), [str(RAY_BIN), "attach", str(config)], session.env)
    shown, sent, deadline = b"", False, time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                shown += chunk
            if not sent and (b"# " in shown[-200:] or b"$ " in shown[-200:]):
                os.write(fd, f"{line}; exit\n".encode())
                sent = True
        return shown.decode(errors="replace")
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)


def assert_dashboard_forward(session: RaySession, config: Path) -> None:
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([str(RAY_BIN), "dashboard", "--port", str(port), str(config)], cwd=session.tmp_path,
                            env=session.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                    return json.load(r)
            except OSError:
                return None
        assert "ray_version" in wait_for(answers, 120, what="the dashboard through `ray dashboard`")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def assert_connect_lines(session: RaySession, up_output: str, head: dict, hostname: str) -> None:
    """The two lines `ray up` ends with work: a Ray client runs a task on the head, the dashboard answers."""
    import urllib.request

    # Ray's cli_logger prefixes each line with time and source when stdout is not a terminal.
    client = re.search(r' ray\.init\("ray://127\.0\.0\.1:(\d+)"\)$', up_output, re.M)
    dashboard = re.search(r" Dashboard: (http://127\.0\.0\.1:\d+)$", up_output, re.M)
    assert client and dashboard, up_output[-3000:]
    client_port, dashboard = int(client.group(1)), dashboard.group(1)
    assert {"client": client_port, "dashboard": int(dashboard.rsplit(":", 1)[1])} == head["local_ports"]
    with urllib.request.urlopen(f"{dashboard}/api/version", timeout=30) as answer:
        assert "ray_version" in json.load(answer)
    driver = ("import socket, ray\n"
              f"ray.init('ray://127.0.0.1:{client_port}')\n"
              "print('ON', ray.get(ray.remote(lambda: socket.gethostname()).remote()))\n")
    for attempt in range(3):
        run = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=180,
                             cwd=session.tmp_path, env=session.env, stdin=subprocess.DEVNULL)
        # Ray's proxier on the head gives each client a server process of its own and gives up if that
        # one is slow to start (ray/util/client/server/proxier.py) - on a busy 2-core machine, at times:
        # a new client is what a user would try. Any other failure fails at once.
        if run.returncode == 0 or "Starting Ray client server failed" not in run.stderr:
            break
    assert run.returncode == 0 and f"ON {hostname}" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


def assert_no_secret_in_argv(session: RaySession) -> None:
    secrets = [(session.datadir / rog.WEBSERVER_TOKEN_FILE).read_text().strip(),
               (session.datadir / "localnet" / "appkey").read_text().strip()]
    assert not processes_mentioning(secrets)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_up_exec_submit_autoscale_down(session: RaySession, tmp_path: Path):
    def small(config):
        config["idle_timeout_minutes"] = 0.5
        config["provider"]["parameters"]["node_start_timeout"] = "3m"

    config = session.config = write_cluster_yaml(tmp_path / "cluster.yaml", session.datadir, session.port, small)
    cluster = f"t-{session.port}"

    up = session.ray("up", "-y", "--no-config-cache", str(config))
    session.up = True
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "[7/7] Ready on" in up.stdout + up.stderr
    heads = session.nodes(cluster)
    assert [n["tags"]["ray-node-type"] for n in heads] == ["head"]
    head = heads[0]
    assert head["state"] == "running" and head["internal_ip"].startswith("10.")
    assert head["state_log"][0] == "[1/7] Getting an agreement..."
    assert head["provider_id"].startswith("0x") and head["price"]["start"] is not None

    status = session.ray("exec", "--no-config-cache", str(config), "ray status")
    assert status.returncode == 0, status.stderr[-3000:]
    assert "1 ray.head.default" in status.stdout
    # Ray's own SSH runner reaches the head at its VPN address (ssh-proxy), the head's Ray listens there.
    head_ip = session.ray("get-head-ip", str(config))
    assert head_ip.returncode == 0 and head_ip.stdout.strip().splitlines()[-1] == head["internal_ip"], head_ip.stderr
    assert session.api("GET", "/status")["tunnels"][cluster][head["node_id"]]["state"] == "up"
    hostname = session.ray("exec", str(config), "hostname").stdout.strip().splitlines()[-1]
    assert hostname in attach_and_type(session, config, "hostname")
    # `ray up` ended with how to connect: the webserver's forwards on free ports of 127.0.0.1.
    assert_connect_lines(session, up.stdout + up.stderr, head, hostname)
    assert "ray.init(" not in status.stdout + status.stderr  # only `ray up` prints it
    # rsync-up then rsync-down round-trip 20 MiB byte for byte.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * 1024 * 1024))
    up_big = session.ray("rsync-up", str(config), str(big), "~/big.bin")
    assert up_big.returncode == 0, up_big.stderr[-2000:]
    down_big = session.ray("rsync-down", str(config), "~/big.bin", str(tmp_path / "big.back"))
    assert down_big.returncode == 0, down_big.stderr[-2000:]
    assert (tmp_path / "big.back").read_bytes() == big.read_bytes()
    # `ray dashboard` forwards a free local port (127.0.0.1) to the head's dashboard.
    assert_dashboard_forward(session, config)
    assert_no_secret_in_argv(session)

    # 6 one-CPU tasks of 15 s on a 1-CPU head: the head's autoscaler adds workers, which
    # join well before the head alone could finish (90 s).
    submit = session.ray("submit", "--no-config-cache", str(config), str(REPO / "examples" / "fan_out.py"),
                         "--", "6", "15")
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    used = int(re.search(r"^NODES (\d+)$", submit.stdout, re.M).group(1))
    assert used >= 2, submit.stdout
    worker_ips = session.ray("get-worker-ips", str(config))
    assert worker_ips.returncode == 0, worker_ips.stderr[-2000:]
    printed = set(re.findall(r"^\d+\.\d+\.\d+\.\d+$", worker_ips.stdout, re.M))
    session.nodes(cluster)
    assert printed and printed <= session.node_ips, worker_ips.stdout
    assert_no_secret_in_argv(session)
    # Files come back by rsync over SSH (Ray's SSHCommandRunner.run_rsync_down).
    fetched = tmp_path / "fetched.py"
    down_file = session.ray("rsync-down", str(config), "~/fan_out.py", str(fetched))
    assert down_file.returncode == 0, down_file.stderr[-2000:]
    assert fetched.read_text() == (REPO / "examples" / "fan_out.py").read_text()
    workers = [n for n in session.nodes(cluster) if n["tags"]["ray-node-type"] == "worker"]
    assert 1 <= len(workers) <= 2
    assert all(n["tags"]["ray-user-node-type"] == "ray.worker.default" for n in workers)

    # Idle workers go away after idle_timeout_minutes (0.5) through terminate_nodes.
    wait_for(lambda: all(n["tags"]["ray-node-type"] == "head" for n in session.nodes(cluster)), 240,
             interval=5, what="idle workers to be terminated")

    down = session.ray("down", "-y", str(config), timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    session.up = False
    assert "Stopped all" in down.stdout + down.stderr  # Ray's own `ray stop`: the head is a machine of its own
    assert session.nodes(cluster) == []
    # Every agreement terminated, every activity gone, every invoice accepted.
    assert session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)]
    agreements = session.db("SELECT agreement_id FROM agreements")
    assert len(agreements) >= 2
    state = session.localnet_state()
    assert set(state["agreements"]["by_state"]) <= {"Terminated", "Rejected"}
    assert set(state["activities"]["by_state"]) == {"Terminated"}
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'invoice' AND status = 'accepted'")[0][0]
             == len(agreements), 60, what="every invoice accepted")
    assert session.db("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL") == [(0,)]
    # No ssh (Ray's, ssh-proxy, the tunnel) to any node left.
    wait_for(lambda: not [a for a in processes_mentioning([f"root@{ip}" for ip in session.node_ips]
                                                          + [f" {ip} 22" for ip in session.node_ips])], 30,
             what="no ssh process to a node left")


@pytest.mark.ray
def test_bad_yaml_stops_ray_up_before_the_prompt(session: RaySession, tmp_path: Path):
    def bad(config):
        config["provider"]["parameters"]["total_budget"] = -5

    config = write_cluster_yaml(tmp_path / "cluster.yaml", session.datadir, session.port, bad)
    up = session.ray("up", "--no-config-cache", str(config), stdin="y\n", timeout=120)
    out = up.stdout + up.stderr
    assert up.returncode != 0
    assert "provider.parameters.total_budget" in out
    assert "Traceback" not in out
    assert "Confirm" not in out and "[y/N]" not in out
    assert not (session.datadir / "webserver.json").exists()  # nothing started, nothing spent


@pytest.mark.ray
@pytest.mark.slow
def test_no_matching_offer_ends_ray_up_with_the_diagnosis(session: RaySession, tmp_path: Path):
    def hopeless(config):
        params = config["provider"]["parameters"]
        params["node_start_timeout"] = "20s"
        params["node_config"]["budget_control"]["max_cpu_per_hour_price"] = 0.000001

    config = session.config = write_cluster_yaml(tmp_path / "cluster.yaml", session.datadir, session.port, hopeless)
    started = time.monotonic()
    up = session.ray("up", "-y", "--no-config-cache", str(config), timeout=300)
    out = up.stdout + up.stderr
    assert up.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    assert re.search(r"node_start_timeout of 20s reached .*: 0 of \d+ offers passed `Reject if cpu per hour price "
                     r"exceeds `max_cpu_per_hour_price` = 1e-06`", out), out[-3000:]
    assert time.monotonic() - started < 200
    assert session.db("SELECT COUNT(*) FROM agreements") == [(0,)]
    assert session.db("SELECT state FROM nodes") == [("terminated",)]


# --- provider faults from the local network's profile (HTTP, no Ray) -------------------------


class FaultNetwork:
    """A local network with a fault profile in `<datadir>/localnet`, which the webserver reuses."""

    def __init__(self, datadir: Path, profile: dict, env: dict):
        netdir = datadir / "localnet"
        netdir.mkdir(parents=True)
        (netdir / "profile.json").write_text(json.dumps(profile))
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "golem_localnet.py"), "serve", "--port", "0", "--datadir", str(netdir),
             "--profile", str(netdir / "profile.json")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("golem-localnet listening on "), line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def _provider(name: str, price: float, latency_s: float = 0.05, **faults) -> dict:
    """An explicit provider of the profile: `price` GLM per CPU-hour and per hour."""
    return {"name": name, "cpu_threads": 4, "cpu_cores": 4, "mem_gib": 8.0, "storage_gib": 40.0,
            "cpu_sec_price": price / 3600, "duration_sec_price": price / 3600, "start_price": 0.0,
            "behaviour": "ok", "offer_at_s": 0.0, "latency_s": latency_s, **faults}


@pytest.fixture
def fault_session(session: RaySession):
    networks = []

    def start(profile: dict) -> RaySession:
        networks.append(FaultNetwork(session.datadir, profile, session.env))
        started = session.rog("start", "--datadir", str(session.datadir), "--port", str(session.port),
                              "--network", "local")
        assert started.returncode == 0, started.stdout + started.stderr
        return session

    yield start
    session.stop_with(networks)  # the `session` fixture then checks that nothing is left


def request_worker(session: RaySession, cluster: str, timeout: str = "60s") -> dict:
    config = rog.load_cluster_config(str(SAMPLE_CLUSTER))
    params = json.loads(json.dumps(config.parameters))
    params["node_start_timeout"] = rog.parse_duration(timeout)
    body = {"provider_parameters": params, "node_config": config.node_types["ray.worker.default"].node_config,
            "tags": {"ray-node-type": "worker", "ray-user-node-type": "ray.worker.default"}, "count": 1}
    return session.api("POST", f"/clusters/{cluster}/nodes", body)["nodes"][0]


def wait_node(session: RaySession, cluster: str, node_id: str, states: set[str], timeout: float = 90) -> dict:
    return wait_for(lambda: (lambda n: n if n["state"] in states else None)(
        session.api("GET", f"/clusters/{cluster}/nodes/{node_id}")), timeout, what=f"{node_id} in {states}")


@pytest.mark.slow
def test_deploy_failure_replaces_the_provider_and_penalises_it(fault_session):
    # Two cheap providers whose deploys always fail come first (they answer first and
    # their cost score outweighs the random part); two dear, slower ones work.
    profile = {"providers": 4, "known_at_start": 1.0, "behaviours": {}, "explicit": [
        _provider("cheap-broken-1", 0.01, deploy_fails=1.0), _provider("cheap-broken-2", 0.011, deploy_fails=1.0),
        _provider("dear-ok-1", 0.45, latency_s=1.5), _provider("dear-ok-2", 0.46, latency_s=1.5)]}
    session = fault_session(profile)
    first = request_worker(session, "faults")
    assert first["state"] == "pending"  # visible at once, provisioned in the background
    node = wait_node(session, "faults", first["node_id"], {"running", "terminated"})
    assert node["state"] == "running", node
    assert node["provider_name"].startswith("dear-ok")
    failures = [line for line in node["state_log"] if "failed: deploy failed" in line]
    assert len(failures) == 2 and all("cheap-broken" in line for line in failures)
    events = session.db("SELECT kind FROM provider_events WHERE kind = 'deploy_failed'")
    assert len(events) == 2
    # Every rented thing of the failed attempts was released.
    assert session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(1,)]
    # A second node fails on them again: two failures each, both are blacklisted for a while.
    # (another cluster: a new demand, so the market offers the broken providers again)
    second = request_worker(session, "faults-2")
    node2 = wait_node(session, "faults-2", second["node_id"], {"running", "terminated"})
    assert node2["state"] == "running", node2
    blocked = session.db("SELECT reason, expires_at FROM blacklist WHERE source = 'auto'")
    assert len(blocked) == 2 and all("failed node starts" in r and e is not None for r, e in blocked)
    session.api("DELETE", f"/clusters/faults/nodes/{node['node_id']}")
    session.api("DELETE", f"/clusters/faults-2/nodes/{node2['node_id']}")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)], 30,
             what="agreements terminated")


@pytest.mark.slow
def test_activity_death_ends_the_node_and_records_it(fault_session):
    profile = {"providers": 2, "known_at_start": 1.0, "behaviours": {}, "explicit": [
        _provider("dies-soon-1", 0.01, dies_after_s=6.0), _provider("dies-soon-2", 0.02, dies_after_s=6.0)]}
    session = fault_session(profile)
    node = request_worker(session, "deaths")
    wait_node(session, "deaths", node["node_id"], {"running"})
    ended = wait_node(session, "deaths", node["node_id"], {"terminated"}, timeout=60)
    assert "Activity ended on dies-soon" in " ".join(ended["state_log"])
    assert session.api("GET", "/clusters/deaths/nodes")["nodes"] == []  # Ray sees it gone and replaces it
    assert session.db("SELECT kind FROM provider_events WHERE kind = 'activity_died'") == [("activity_died",)]
    wait_for(lambda: session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)], 30,
             what="the agreement terminated")


def test_node_routes_reject_bad_input(fault_session):
    session = fault_session({"providers": 2, "known_at_start": 1.0})
    for body, message in [
        ({"count": 0}, "count: expected 1..100"),
        ({"count": "2"}, "field 'count' must be int"),
        ({"tags": {"a": 1}}, "tags: values must be strings"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ]:
        with pytest.raises(rog.UsageError, match=re.escape(message)):
            session.api("POST", "/clusters/c/nodes", body)
    with pytest.raises(rog.NotFound, match="no cluster named 'nope'"):
        session.api("GET", "/clusters/nope/nodes/node1")
    assert session.api("GET", "/clusters/nope/nodes") == {"nodes": []}


@pytest.mark.ray
def test_node_provider_is_thread_safe(fault_session):
    """Ray calls the provider from many threads at once (NodeLauncher, updaters, the v2 adapter)."""
    import threading

    session = fault_session({"providers": 6, "known_at_start": 1.0, "behaviours": {}})
    config = rog.load_cluster_config(str(SAMPLE_CLUSTER))
    params = json.loads(json.dumps(config.parameters))
    params.update(webserver_port=session.port, webserver_datadir=str(session.datadir))
    provider = rog.GolemNodeProvider({"type": "external", "module": rog.PROVIDER_MODULE, "parameters": params},
                                     "threads")
    node_config = config.node_types["ray.worker.default"].node_config
    created, errors, stop = [], [], threading.Event()

    def create(i: int):
        try:
            tags = {"ray-node-type": "worker", "ray-user-node-type": "ray.worker.default", "index": str(i)}
            created.extend(provider.create_node_with_resources_and_labels(node_config, tags, 1, {"CPU": 1}, {}))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def poll():
        while not stop.is_set():
            try:
                for node_id in provider.non_terminated_nodes({"ray-node-type": "worker"}):
                    provider.node_tags(node_id)
                    provider.is_running(node_id)
                    provider.set_node_tags(node_id, {f"seen-{threading.get_ident()}": "1"})
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    pollers = [threading.Thread(target=poll) for _ in range(4)]
    creators = [threading.Thread(target=create, args=(i,)) for i in range(3)]
    for t in pollers + creators:
        t.start()
    for t in creators:
        t.join(60)
    wait_for(lambda: all(provider.is_running(n) for n in created), 90, what="3 nodes running")
    stop.set()
    for t in pollers:
        t.join(30)
    assert errors == []
    assert len(set(created)) == 3
    listed = provider.non_terminated_nodes({"ray-node-type": "worker"})
    assert sorted(listed) == sorted(created)
    indexes = sorted(provider.node_tags(n)["index"] for n in listed)
    assert indexes == ["0", "1", "2"]  # every node kept its own tags through concurrent updates
    provider.terminate_nodes(created)
    assert provider.non_terminated_nodes({}) == []
    assert all(provider.is_terminated(n) for n in created)


# --- Autostop (issue 13) -------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_autostop_tears_the_idle_cluster_down(session: RaySession, tmp_path: Path):
    """`autostop: {idle_minutes: 1}` on the local network's time scale: the cluster stays up while
    `ray submit` runs, then goes down by itself (head included), every node paid up."""
    time_scale = 4.0  # idle_minutes 1 -> 15 s; one check every 5 s

    def autostopped(config):
        config["max_workers"] = 0
        params = config["provider"]["parameters"]
        params["node_start_timeout"] = "3m"
        params["local_network"]["time_scale"] = time_scale
        params["autostop"] = {"idle_minutes": 1}

    config = session.config = write_cluster_yaml(tmp_path / "cluster.yaml", session.datadir, session.port, autostopped)
    cluster = f"t-{session.port}"
    idle_s = 60 / time_scale
    interval_s = rog.AUTOSTOP_CHECK_INTERVAL_S / time_scale

    up = session.ray("up", "-y", "--no-config-cache", str(config))
    session.up = True
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    [head] = session.nodes(cluster)
    status = session.rog("status")
    assert f"autostop after 1 idle minute(s) (down, time scale {time_scale:g})" in status.stdout, status.stdout

    # An open `ray exec` (an SSH session with a terminal on the head, no job, no task) keeps it busy.
    import threading

    session_busy = lambda: (session.api("GET", "/status")["autostop"][cluster]["busy"] or "").startswith(  # noqa: E731
        "1 ray exec/submit/attach session(s) open")
    sleeper = threading.Thread(target=session.ray, args=("exec", "--no-config-cache", str(config),
                                                         f"sleep {int(idle_s) + 5}"))
    sleeper.start()
    try:
        wait_for(session_busy, 30, interval=0.5, what="the open ray exec session to count as busy")
    finally:
        sleeper.join()

    # A job longer than the idle time plus two checks: the cluster must not go down under it.
    job = tmp_path / "long_job.py"
    job.write_text("import ray, time\nray.init(address=\"auto\")\n"
                   "@ray.remote\ndef work():\n    time.sleep(%d)\n    return 'ok'\n"
                   "print('RESULT', ray.get(work.remote()))\n" % int(idle_s + 2 * interval_s))
    submit = session.ray("submit", "--no-config-cache", str(config), str(job))
    submitted_at = time.monotonic()
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "RESULT ok" in submit.stdout
    assert [n["node_id"] for n in session.nodes(cluster)] == [head["node_id"]]  # still up after the job

    # Then, idle, it goes down by itself: at most one check to see it idle, the idle time,
    # one more check (and the probe's own run time) after submit ended.
    wait_for(lambda: session.nodes(cluster) == [], idle_s + 2 * interval_s + rog.AUTOSTOP_PROBE_TIMEOUT_S,
             interval=0.5, what="the autostop to end the cluster")
    went_down_s = time.monotonic() - submitted_at
    session.up = False
    assert went_down_s >= idle_s  # never before it was idle for idle_minutes
    # Ray counts a terminating node as gone; its release (and the last log line) follows.
    state_log = lambda: json.loads(session.db("SELECT state_log FROM nodes WHERE node_id = ?",  # noqa: E731
                                              head["node_id"])[0][0])
    wait_for(lambda: state_log()[-1] == "Terminated", 60, interval=0.5, what="the head's release")
    log = state_log()
    warning = next(i for i, line in enumerate(log) if line.startswith("Autostop: idle since"))
    down = next(i for i, line in enumerate(log) if line.startswith("Terminating: autostop, the cluster was idle"))
    assert warning < down and log[-1] == "Terminated"

    # Paid up: every agreement ended and invoiced, the allocation released, `costs` shows it.
    assert session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)]
    agreements = session.db("SELECT agreement_id FROM agreements")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM ledger WHERE kind = 'invoice' AND status = 'accepted'")[0][0]
             == len(agreements), 60, what="every invoice accepted")
    wait_for(lambda: session.db("SELECT COUNT(*) FROM allocations WHERE released_at IS NULL") == [(0,)], 60,
             what="the allocation released")
    costs = session.rog("costs", cluster, "--json")
    assert costs.returncode == 0, costs.stderr
    [entry] = json.loads(costs.stdout)["clusters"]
    [node] = entry["nodes"]
    assert node["node_id"] == head["node_id"] and node["state"] == "terminated" and float(node["cost"]) > 0
    assert cluster not in session.api("GET", "/status")["autostop"]  # nothing left to stop

    # `ray-on-golem autostop` on a cluster that is gone is refused, naming it.
    refused = session.rog("autostop", cluster, "-i", "5", "--port", str(session.port))
    assert refused.returncode == 1 and f"cluster {cluster!r} has no live nodes" in refused.stderr
