#!/usr/bin/env python3
"""`ray up` until the head is ready and until 2 workers are ready: Ray on Golem on the
local network against a baseline that starts the same Ray nodes locally, without the
market (bench/local_provider.py), measured in the same run.

    python bench/ray_up.py [--runs 3]

Prints the median of the runs and the ratio to the baseline (target: <= 1.2x). Each
run is a fresh cluster (`ray up -y --no-config-cache`, workers from `min_workers: 2`,
then `ray down -y`); the Golem runs include starting the webserver and the local
network, as a user's first `ray up` does. Then where a Golem run's time goes, from the
nodes' state logs (their numbered steps [n/7], "SSH answers (sshd started in A s, first
answer B s later)", "Tunnel to the webserver up (C s)"): median per step, head and workers.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

import ray_on_golem as rog  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_config(kind: str, workdir: Path, port: int) -> dict:
    config = yaml.safe_load((REPO / "sample-cluster.yaml").read_text())
    config["cluster_name"] = f"bench-{kind}-{port}"
    workers = config["available_node_types"]["ray.worker.default"]
    workers["min_workers"] = workers["max_workers"] = WORKERS
    if kind == "golem":
        params = config["provider"]["parameters"]
        params["webserver_port"] = port
        params["webserver_datadir"] = str(workdir / "datadir")
        # Every offer on the market from the start, as on the real network (hundreds of offers). The
        # sample's population brings 40 % of its 8 offers at the start and the rest over minutes, so a
        # third node waited ~50 s for the next offer: that measured the population, not the path.
        profile = workdir / "market.json"
        profile.write_text(json.dumps({"providers": 8, "seed": 1, "known_at_start": 1.0}))
        params["local_network"] = {"providers": 8, "seed": 1, "profile": str(profile)}
    else:
        config["provider"] = {"type": "external", "module": "local_provider.LocalNodeProvider",
                              "state_dir": str(workdir / "state")}
    return config


def golem_nodes(workdir: Path, port: int, cluster: str) -> list[dict]:
    """The cluster's nodes as the webserver of a Golem run reports them."""
    client = rog.WebserverClient(str(workdir / "datadir"), port)
    try:
        return client.request("GET", f"/clusters/{cluster}/nodes")["nodes"]
    finally:
        client.close()


def ready_workers(kind: str, workdir: Path, port: int, cluster: str) -> int:
    """Workers Ray's updater marked `up-to-date` (their `ray start` finished)."""
    if kind == "golem":
        tags = [n["tags"] for n in golem_nodes(workdir, port, cluster)]
    else:
        try:
            state = json.loads((workdir / "state" / "nodes.json").read_text())
        except (OSError, ValueError):
            return 0
        tags = [n["tags"] for n in state["nodes"].values() if n["state"] == "running"]
    return sum(1 for t in tags if t.get("ray-node-type") == "worker" and t.get("ray-node-status") == "up-to-date")


STEP_NAMES = ("agreement", "activity", "VPN", "deploy", "start", "bootstrap")


def bring_up_steps(node: dict) -> dict[str, float]:
    """Seconds per bring-up step of one running node, from its state log and timestamps."""
    log, at = node["state_log"], node["state_log_at"]
    numbered = {int(m.group(1)): at[i] for i, line in enumerate(log) if (m := re.match(r"\[(\d)/7\]", line))}
    steps = {name: numbered[n + 2] - numbered[n + 1] for n, name in enumerate(STEP_NAMES[:-1]) if n + 2 in numbered}
    text = "\n".join(log)
    ssh = re.search(r"SSH answers \(sshd started in ([\d.]+) s, first answer ([\d.]+) s later\)", text)
    tunnel = re.search(r"Tunnel to the webserver up \(([\d.]+) s\)", text)
    if ssh and 6 in numbered and 7 in numbered:
        steps["sshd start"], steps["first SSH"] = float(ssh.group(1)), float(ssh.group(2))
        if tunnel:
            steps["tunnel up"] = float(tunnel.group(1))
        # Environment script and version check: step 6 without the SSH parts.
        steps["bootstrap"] = numbered[7] - numbered[6] - sum(steps.get(k, 0.0) for k in ("sshd start", "first SSH",
                                                                                          "tunnel up"))
    if 1 in numbered and 7 in numbered:
        steps["node total [1/7]-[7/7]"] = numbered[7] - numbered[1]
    return steps


def one_run(kind: str) -> tuple[float, float, dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"rog-bench-{kind}-"))
    port = free_port()
    config = cluster_config(kind, workdir, port)
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    (workdir / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(workdir / "tmp"), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(REPO)]))
    env.pop("RAY_ON_GOLEM_DATADIR", None)
    try:
        started, started_wall = time.monotonic(), time.time()
        up = subprocess.run([RAY, "up", "-y", "--no-config-cache", str(path)], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=900)
        head = time.monotonic() - started
        if up.returncode != 0:
            raise SystemExit(f"{kind}: ray up failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")
        deadline = started + 900
        while ready_workers(kind, workdir, port, config["cluster_name"]) < WORKERS:
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind}: {WORKERS} workers not ready within 900 s")
            time.sleep(0.25)
        workers = time.monotonic() - started
        steps: dict = {"head": {}, "worker": collections.defaultdict(list)}
        if kind == "golem":
            for node in golem_nodes(workdir, port, config["cluster_name"]):
                found = bring_up_steps(node)
                if node["tags"].get("ray-node-type") == "head":
                    found["ray up start -> [1/7] (services, market)"] = node["state_log_at"][0] - started_wall
                    found["[7/7] -> ray up done (Ray's setup, ray start)"] = started_wall + head - node["state_log_at"][-1]
                    steps["head"] = found
                else:
                    for name, value in found.items():
                        steps["worker"][name].append(value)
        return head, workers, steps
    finally:
        subprocess.run([RAY, "down", "-y", str(path)], env=env, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=600)
        if kind == "golem":
            subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), "stop", "--force", "--kill",
                            "--datadir", str(workdir / "datadir"), "--port", str(port)],
                           env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per variant (default 3)")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"baseline": [], "golem": []}
    head_steps, worker_steps = collections.defaultdict(list), collections.defaultdict(list)
    for i in range(args.runs):  # interleaved, so machine load hits both alike
        for kind in ("baseline", "golem"):
            head, workers, steps = one_run(kind)
            results[kind].append((head, workers))
            for name, value in steps["head"].items():
                head_steps[name].append(value)
            for name, values in steps["worker"].items():
                worker_steps[name].extend(values)
            print(f"run {i + 1}/{args.runs} {kind:8}  head {head:6.1f} s  {WORKERS} workers {workers:6.1f} s",
                  file=sys.stderr, flush=True)
    base_head = statistics.median(h for h, _ in results["baseline"])
    base_workers = statistics.median(w for _, w in results["baseline"])
    print(f"ray up on this machine, median of {args.runs} runs ({os.cpu_count()} CPUs)")
    print(f"{'variant':<28}{'head ready':>12}{'ratio':>8}{f'{WORKERS} workers ready':>20}{'ratio':>8}")
    for kind, label in (("baseline", "baseline (local, no market)"), ("golem", "Ray on Golem (local network)")):
        head = statistics.median(h for h, _ in results[kind])
        workers = statistics.median(w for _, w in results[kind])
        print(f"{label:<28}{head:>10.1f} s{head / base_head:>7.2f}x{workers:>18.1f} s{workers / base_workers:>7.2f}x")
    print(f"\nRay on Golem bring-up steps, median (head of {args.runs} runs, workers of all runs)")
    print(f"{'step':<48}{'head':>10}{'worker':>10}")
    for name in [*STEP_NAMES, "sshd start", "first SSH", "tunnel up", "node total [1/7]-[7/7]",
                 *[n for n in head_steps if n.startswith(("ray up", "[7/7]"))]]:
        cells = [f"{statistics.median(d[name]):>8.2f} s" if d.get(name) else f"{'-':>10}"
                 for d in (head_steps, worker_steps)]
        print(f"{name:<48}{cells[0]:>10}{cells[1]:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
