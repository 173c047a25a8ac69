"""`ray-on-golem network-stats` against a real local Golem network with a known population.

Each test starts `golem_localnet.py serve` with a seeded profile, runs the CLI as a
user would (a subprocess), and checks what the user sees against counts computed here,
independently, from the population the local network prints (`population --json`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_env, pid_alive, start_localnet, stop_localnet

ROG = REPO / "ray_on_golem.py"
TIME_SCALE = 50  # provider latencies 0.5-2 simulated s -> 10-40 ms real
RESPONSE_TIMEOUT_S = 2  # `no_answer` providers fail after this; everyone else answers well within it
SCAN_MINUTES = 0.05  # every offer is on the market at start (known_at_start: 1)

# A market with every behaviour and prices wide enough for budgets to bite.
PROFILE = {
    "providers": 30,
    "seed": 11,
    "prices": {"cpu_per_hour": [0.01, 0.6], "duration_per_hour": [0.0, 0.6], "start": [0.0, 0.6]},
    "latency_s": [0.5, 2.0],
    "slow_latency_s": [5.0, 10.0],
    "known_at_start": 1.0,
    "discovery_s": 1.0,
    "behaviours": {"busy": 0.1, "outbound_rules": 0.1, "no_answer": 0.1, "unreachable": 0.1,
                   "reject_agreement": 0.1, "slow": 0.1},
}

# The exact strings of the issue / real providers (docs/yagna-behaviour.md §3), not our code's.
BUSY = "No capacity available. Reached Agreements limit: 1"
NO_ANSWER = "Failed to receive proposal response!"
UNREACHABLE = ('Failed to send proposal response! 500: {"message":"Failed to send response for Proposal '
               '[***]. Error: Countering Proposal [***] GSB error: GSB failure: Net: error forwarding '
               'message: Connection timed out.."}')
OUTBOUND = ("Outbound rejected because: Everyone rule didn't match whitelist ; Audited-Payload rule "
            "requires manifest signature ; Partner rule requires node descriptor ; ")
LABELS = {
    "max_cost": "Reject if per cpu expected cost exceeds `max_cost` = {}",
    "max_start_price": "Reject if start price exceeds `max_start_price` = {}",
    "max_cpu_per_hour_price": "Reject if cpu per hour price exceeds `max_cpu_per_hour_price` = {}",
    "max_env_per_hour_price": "Reject if env per hour price exceeds `max_env_per_hour_price` = {}",
}


# --- processes ----------------------------------------------------------------------


@pytest.fixture
def population(localnet):
    return localnet.population()


@pytest.fixture
def localnet(datadir):
    """The seeded local network at `<datadir>/localnet`, where the CLI finds it
    (docs/internals.md: `localnet.json`, `appkey`) instead of starting its own."""
    net = start_localnet(datadir / "localnet", profile=PROFILE, time_scale=TIME_SCALE,
                         env={"YAGNA_APPKEY": ""})
    try:
        yield net
    finally:
        assert stop_localnet(net) == 0


def write_cluster(path: Path, node_config: dict, payment_network="local", **parameters) -> Path:
    node_config = {**node_config, "demand": {"image_tag": "golem/ray-on-golem:test",
                                             **node_config.get("demand", {})}}
    config = {
        "cluster_name": "stats",
        "provider": {"type": "external", "module": "ray_on_golem.GolemNodeProvider",
                     "use_internal_ips": True,
                     "parameters": {"payment_network": payment_network, "node_config": node_config,
                                    **parameters}},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}},
            "ray.worker.default": {"resources": {}, "node_config": {}},
        },
        "head_node_type": "ray.head.default",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def scan(run_cli, cluster, *extra):
    return run_cli("network-stats", cluster, "--duration", SCAN_MINUTES, "--response-timeout",
                   RESPONSE_TIMEOUT_S, *extra)


# --- the expected funnel, computed from the population alone ---------------------------


def expected_funnel(population, budget: dict, *, manifest=False, blocked=()):
    """(stage lines, error counts) the issue's rules give for this population and budget."""
    usage = budget.get("per_cpu_expected_usage") or {}
    limits = [(key, value) for key, value in (
        ("max_cost", usage.get("max_cost")), ("max_start_price", budget.get("max_start_price")),
        ("max_cpu_per_hour_price", budget.get("max_cpu_per_hour_price")),
        ("max_env_per_hour_price", budget.get("max_env_per_hour_price"))) if value is not None]

    def price(provider, key):
        cpu_sec, env_sec, start = provider["coeffs"]
        cpus = provider["cpu_threads"]
        if key == "max_cost":
            duration_s = usage["duration_hours"] * 3600
            return start / cpus + env_sec / cpus * duration_s + cpu_sec * usage["cpu_load"] * duration_s
        return {"max_start_price": start, "max_cpu_per_hour_price": cpu_sec * 3600,
                "max_env_per_hour_price": env_sec * 3600}[key]

    stages = {"Initial": len(population)}
    survivors = [p for p in population if p["node_id"] not in blocked]
    stages["Not blacklisted"] = len(survivors)
    for key, limit in limits:
        for p in survivors:  # the test is only meaningful away from the limits
            assert abs(price(p, key) - limit) > 1e-9 * max(limit, 1), (p["name"], key)
        survivors = [p for p in survivors if price(p, key) <= limit]
        stages["Passed " + LABELS[key].format(limit)] = len(survivors)
    stages["Negotiation initialized"] = len(survivors)
    errors = {}
    outcome = {"busy": BUSY, "no_answer": NO_ANSWER, "unreachable": UNREACHABLE,
               "outbound_rules": OUTBOUND if manifest else None}
    for p in survivors:
        reason = outcome.get(p["behaviour"])
        if reason:
            errors[reason] = errors.get(reason, 0) + 1
    stages["Negotiated successfully"] = len(survivors) - sum(errors.values())
    return stages, errors


def report_of(stages: dict, errors: dict) -> list[str]:
    """The text of the issue's output shape, for these counts."""
    lines = ["Proposals count:"] + [f"{stage}: {count}" for stage, count in stages.items()]
    lines += ["", "Negotiation errors:"]
    ranked = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [f"{reason}: {count}" for reason, count in ranked] or ["(none)"]
    return lines


BUDGETS = {
    "no budget": ({}, {}),
    "sample budget": ({"per_cpu_expected_usage": {"cpu_load": 0.8, "duration_hours": 0.5, "max_cost": 1.5},
                       "max_start_price": 0.5, "max_cpu_per_hour_price": 0.5, "max_env_per_hour_price": 0.5}, {}),
    "tight budget": ({"per_cpu_expected_usage": {"cpu_load": 1.0, "duration_hours": 2, "max_cost": 0.45},
                      "max_start_price": 0.45, "max_cpu_per_hour_price": 0.4}, {}),
    "outbound + env limit": ({"max_env_per_hour_price": 0.3},
                             {"outbound_urls": ["https://pypi.dev.golem.network"]}),
}


@pytest.mark.parametrize("budget, demand", BUDGETS.values(), ids=BUDGETS.keys())
def test_funnel_counts_and_error_groups_match_the_population(localnet, run_cli, tmp_path, population,
                                                            budget, demand):
    cluster = write_cluster(tmp_path / "cluster.yaml", {"budget_control": budget, "demand": demand})
    done = scan(run_cli, cluster, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    stages, errors = expected_funnel(population, budget, manifest=bool(demand))
    assert [(s["stage"], s["count"]) for s in report["funnel"]] == list(stages.items())
    assert {e["reason"]: e["count"] for e in report["errors"]} == errors
    assert len(report["providers"]) == len(population)
    # the scan signs nothing and gives back what it reserved
    state = localnet.state()
    assert state["agreements"]["count"] == 0
    assert state["allocations"]["count"] == 0 and state["allocations"]["released"] == 1
    assert state["demands"]["unsubscribed"] == 1


def test_text_output_has_the_exact_shape_of_the_issue(localnet, run_cli, datadir, tmp_path, population):
    budget = BUDGETS["sample budget"][0]
    cluster = write_cluster(tmp_path / "cluster.yaml", {"budget_control": budget})
    done = scan(run_cli, cluster)
    assert done.returncode == 0, done.stderr
    stages, errors = expected_funnel(population, budget)
    assert done.stdout.splitlines() == [
        f"Gathering stats data for {SCAN_MINUTES:g} minutes...",
        "Gathering stats data done",
        "",
        *report_of(stages, errors),
    ]
    assert "elapsed" not in done.stderr  # no progress line without a terminal
    # golem-core's own complaints go to the log, and a clean scan leaves none there
    log = (datadir / "network-stats.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log, log


def test_providers_table_lists_every_provider_with_its_outcome(localnet, run_cli, tmp_path, population):
    cluster = write_cluster(tmp_path / "cluster.yaml", {})
    done = scan(run_cli, cluster, "--providers")
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split() == ["PROVIDER", "NAME", "CPU", "MEM", "GiB", "START", "CPU/H", "ENV/H", "EXP.",
                                "COST", "SCORE", "OUTCOME"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == {p["node_id"] for p in population}
    for p in population:
        outcome = {"busy": BUSY, "no_answer": NO_ANSWER}.get(p["behaviour"], "negotiated")
        if p["behaviour"] != "unreachable":
            assert rows[p["node_id"]].endswith(outcome), rows[p["node_id"]]


def test_blacklisted_providers_are_never_negotiated(localnet, run_cli, tmp_path, population):
    blocked = [p["node_id"] for p in population if p["behaviour"] in ("busy", "unreachable")]
    for node_id in blocked:
        done = run_cli("reputation", "block", node_id, "--network", "local", "--reason", "test")
        assert done.returncode == 0, done.stderr
    cluster = write_cluster(tmp_path / "cluster.yaml", {})
    done = scan(run_cli, cluster, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    stages, errors = expected_funnel(population, {}, blocked=set(blocked))
    assert [(s["stage"], s["count"]) for s in report["funnel"]] == list(stages.items())
    assert {e["reason"]: e["count"] for e in report["errors"]} == errors
    assert {p["id"] for p in report["providers"] if p["outcome"] == "blacklisted"} == set(blocked)
    # the local network saw no counter-proposal to a blocked provider: its proposals are the
    # offers, one counter per negotiated provider and one draft per provider that answered yes
    negotiated = [p for p in population if p["node_id"] not in blocked]
    answered = [p for p in negotiated if p["behaviour"] not in ("no_answer",)]
    assert localnet.state()["proposals"] == len(population) + len(negotiated) + len(answered)


def test_ctrl_c_ends_the_scan_early_and_still_prints(localnet, datadir, tmp_path):
    cluster = write_cluster(tmp_path / "cluster.yaml", {})
    process = subprocess.Popen([sys.executable, str(ROG), "network-stats", str(cluster), "--duration", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_env(datadir, tmp_path))
    try:
        assert process.stdout.readline() == "Gathering stats data for 5 minutes...\n"
        while localnet.state()["demands"]["count"] == 0:  # scanning: the demand is on the market
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Received CTRL-C, exiting..." in err and "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == "Gathering stats data done"
    assert lines[2] == "Proposals count:" and lines[3].startswith("Initial: ")
    assert "Negotiation errors:" in lines
    state = localnet.state()
    assert state["agreements"]["count"] == 0
    assert state["allocations"]["count"] == 0
    assert state["demands"]["unsubscribed"] == 1


def test_starts_a_local_network_when_none_runs_and_stops_it_after(run_cli, datadir, tmp_path):
    # the YAML's local_network block shapes the market it starts (profile relative to the YAML)
    (tmp_path / "market.json").write_text(json.dumps({"known_at_start": 1.0, "behaviours": {}}))
    cluster = write_cluster(tmp_path / "cluster.yaml", {}, local_network={
        "providers": 5, "seed": 3, "time_scale": TIME_SCALE, "profile": "market.json"})
    done = run_cli("network-stats", cluster, "--duration", SCAN_MINUTES, "--response-timeout", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "Initial: 5" in lines and "Negotiated successfully: 5" in lines
    started = json.loads((datadir / "localnet" / "localnet.json").read_text())
    assert not pid_alive(started["pid"])


def test_progress_line_only_on_a_terminal(localnet, datadir, tmp_path):
    import pty
    import threading

    cluster = write_cluster(tmp_path / "cluster.yaml", {})
    leader, follower = pty.openpty()
    terminal = []

    def drain():  # read as it comes: a full pty buffer would block the child
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen(
            [sys.executable, str(ROG), "network-stats", str(cluster), "--duration", "0.03",
             "--response-timeout", str(RESPONSE_TIMEOUT_S)],
            stdout=subprocess.PIPE, stderr=follower, text=True, env=cli_env(datadir, tmp_path))
        os.close(follower)
        out, _ = process.communicate(timeout=120)
        reader.join(timeout=30)
    finally:
        os.close(leader)
    seen = b"".join(terminal)
    assert process.returncode == 0
    assert b"\r\x1b[2K" in seen and b"elapsed" in seen and b"left: " in seen
    assert "elapsed" not in out  # the report itself stays clean


@pytest.mark.parametrize("case, expected", [
    ("missing file", "no such file"),
    ("bad yaml", "cluster config"),
    ("negative price", "budget_control.max_start_price"),
    ("unknown node type", "--node-type: node type `ray.nope` is not in available_node_types"),
    ("zero duration", "--duration: must be a positive number"),
])
def test_bad_input_exits_2_with_the_field(run_cli, datadir, tmp_path, case, expected):
    cluster = tmp_path / "cluster.yaml"
    args = ["network-stats", cluster]
    if case == "bad yaml":
        cluster.write_text("provider: [unclosed\n")
    elif case == "negative price":
        write_cluster(cluster, {"budget_control": {"max_start_price": -1}})
    elif case != "missing file":
        write_cluster(cluster, {})
    if case == "unknown node type":
        args += ["--node-type", "ray.nope"]
    if case == "zero duration":
        args += ["--duration", "0"]
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (datadir / "localnet").exists()  # nothing was started


def test_unreachable_yagna_exits_1_with_what_to_do(run_cli, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    cluster = write_cluster(tmp_path / "cluster.yaml", {}, payment_network="holesky")
    done = run_cli("network-stats", cluster, "--duration", "0.01",
                   env={"YAGNA_API_URL": f"http://127.0.0.1:{closed_port}", "YAGNA_PATH": str(tmp_path / "no-yagna")})
    assert done.returncode == 1
    assert "ray-on-golem start" in done.stderr and "Traceback" not in done.stderr


def test_wrong_app_key_exits_1_with_what_to_do(localnet, run_cli, tmp_path):
    cluster = write_cluster(tmp_path / "cluster.yaml", {})
    done = run_cli("network-stats", cluster, "--duration", "0.01", env={"YAGNA_APPKEY": "not-the-key"})
    assert done.returncode == 1
    assert "rejected the app key" in done.stderr and "YAGNA_APPKEY" in done.stderr
    assert "not-the-key" not in done.stderr + done.stdout  # never echo a secret
    assert localnet.state()["demands"]["count"] == 0


# --- the real yagna, offline (loopback-only network namespace, docs/yagna-behaviour.md §5) -----


def _processes_with_env(marker: str) -> list[int]:
    """PIDs whose environment mentions `marker` (our private yagna data dir): a check, never a kill list."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return [pid for pid in found if pid_alive(pid)]


@pytest.fixture
def offline_yagna_env(netns, tmp_path):
    """Environment and a loopback image registry for a CLI run inside the namespace."""
    import ray_on_golem as rog

    try:
        yagna = rog.require_yagna()
    except rog.RayOnGolemError:
        pytest.skip("the yagna binary (PyPI golem-node) is not installed")
    registry = tmp_path / "registry"
    (registry / "v1" / "image").mkdir(parents=True)
    (registry / "v1" / "image" / "info").write_text(json.dumps(
        {"sha3": "a" * 56, "http": "http://127.0.0.1:9/ray-on-golem.gvmi"}))
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-u", "-m", "http.server", "0",
                               "--bind", "127.0.0.1", "--directory", str(registry)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = server.stdout.readline().split(" port ")[1].split()[0]
        yagna_dir = str(tmp_path / "yagna")
        env = {**rog.yagna_loopback_env(yagna_dir, 27464), "RAY_ON_GOLEM_REGISTRY_URL": f"http://127.0.0.1:{port}",
               "PATH": os.path.dirname(yagna) + os.pathsep + os.environ.get("PATH", "")}
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stdout.close()
    assert _processes_with_env(yagna_dir) == [], "a yagna started by network-stats is still running"


def run_in_netns(netns, datadir, tmp_path, env, *args):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(ROG), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=cli_env(datadir, home, env))


@pytest.mark.yagna
def test_scan_on_the_real_yagna_subscribes_and_releases(netns, offline_yagna_env, datadir, tmp_path):
    # 0.17.6 only: allocate without the on-chain balance check (docs/yagna-behaviour.md §5)
    env = {**offline_yagna_env, "YAGNA_DEV_SKIP_ALLOCATION_VALIDATION": "1"}
    cluster = write_cluster(tmp_path / "cluster.yaml", {}, payment_network="holesky")
    done = run_in_netns(netns, datadir, tmp_path, env, "network-stats", cluster, "--duration", "0.05")
    assert done.returncode == 0, done.stderr
    # the faucet is tried on a testnet and fails fast offline; the scan goes on
    assert "warning: could not top up the holesky wallet" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["Gathering stats data for 0.05 minutes...", "Gathering stats data done", "",
                         "Proposals count:"]
    assert "Initial: 0" in lines and "Negotiated successfully: 0" in lines  # nobody else on this market


@pytest.mark.yagna
def test_real_yagna_without_funds_exits_1_and_stops_what_it_started(netns, offline_yagna_env, datadir, tmp_path):
    cluster = write_cluster(tmp_path / "cluster.yaml", {}, payment_network="holesky")
    done = run_in_netns(netns, datadir, tmp_path, offline_yagna_env, "network-stats", cluster, "--duration", "0.05")
    assert done.returncode == 1
    assert "could not allocate 5.0 GLM on holesky" in done.stderr and "Traceback" not in done.stderr
    assert "Server is unreachable" in done.stderr  # yagna's own reason, then what to do
    assert "`yagna payment status --network holesky`" in done.stderr


@pytest.mark.yagna
@pytest.mark.parametrize("network, asks_the_faucet", [("holesky", True), ("polygon", False)])
def test_only_testnet_wallets_are_topped_up(netns, offline_yagna_env, tmp_path, network, asks_the_faucet):
    """With no daemon the real `yagna payment fund` fails at once: a warning proves it ran."""
    snippet = ("import sys, ray_on_golem as rog; service = rog.YagnaService(sys.argv[1], sys.argv[2]); "
               "print(repr(rog.top_up_testnet_wallet(service, sys.argv[1])))")
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", snippet, network, str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          env=cli_env(None, tmp_path, offline_yagna_env))
    assert done.returncode == 0, done.stderr
    if asks_the_faucet:
        assert done.stdout.startswith("'could not top up the holesky wallet: `yagna payment fund --network holesky")
    else:
        assert done.stdout.strip() == "None"


def test_ctrl_c_also_stops_the_local_network_it_started(datadir, tmp_path):
    import urllib.request

    (tmp_path / "market.json").write_text(json.dumps({"known_at_start": 1.0}))
    cluster = write_cluster(tmp_path / "cluster.yaml", {}, local_network={
        "providers": 5, "time_scale": TIME_SCALE, "profile": "market.json"})
    process = subprocess.Popen([sys.executable, str(ROG), "network-stats", str(cluster), "--duration", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_env(datadir, tmp_path))
    try:
        assert process.stdout.readline() == "Gathering stats data for 5 minutes...\n"
        record = datadir / "localnet" / "localnet.json"
        demands = 0
        while not demands:  # the local network it started has our demand: the scan runs
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
            if record.exists() and (datadir / "localnet" / "appkey").exists():
                url = json.loads(record.read_text())["url"]
                key = (datadir / "localnet" / "appkey").read_text().strip()
                request = urllib.request.Request(f"{url}/localnet/v1/state",
                                                 headers={"Authorization": f"Bearer {key}"})
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        demands = json.loads(response.read())["demands"]["count"]
                except OSError:
                    pass
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "Proposals count:" in out.splitlines()
    assert not pid_alive(json.loads(record.read_text())["pid"])
