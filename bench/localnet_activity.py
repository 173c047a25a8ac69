#!/usr/bin/env python3
"""Benchmark of the local network's activities, driven by the unmodified golem-core.

    /work/venv/bin/python bench/localnet_activity.py [--runs 20] [--concurrent 100] [--idle-seconds 10]

Measures both isolation modes in the same run (`--isolation sandbox`: process groups on shared
loopback; `--isolation namespaces`: VM-like nodes, needs root) and prints one table, a column each:
  - create -> deploy (on a VPN) -> start -> first `run` result, as golem-core sees it (median, p90
    of --runs), against two baselines measured in the same run: one HTTP round trip to the localnet
    and one bare `/bin/sh -c true` started from this process; the same chain over raw HTTP;
  - --concurrent activities doing that chain at once (errors, distinct node IPs, wall time, the
    localnet's peak RSS and CPU during the burst);
  - CPU of the localnet process while those activities sit idle (Ready, nothing running),
    median of 3 windows, against the same localnet idle before any activity existed.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# The tests' localnet process handle and golem-core helpers.
from conftest import start_localnet, stop_localnet  # noqa: E402
from test_localnet_activity import PROFILE, golem_node, rent  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int, children: bool = False) -> int:
    """utime + stime of `pid`; with `children`, plus those of its children it has reaped (the
    helpers a VM-like node costs: unshare, mount, ip, nsenter)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b") ", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)


async def idle_cpu_percent(pid: int, seconds: float, windows: int = 3) -> float:
    """Median CPU of `pid` over `windows` windows, in % of one core."""
    shares = []
    for _ in range(windows):
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        await asyncio.sleep(seconds / windows)
        shares.append((cpu_ticks(pid) - c0) / CLK_TCK / (time.monotonic() - t0) * 100)
    return statistics.median(shares)


async def chain(agreement, command: str, network=None, provider_id: str | None = None):
    """create -> deploy (on `network` when given) -> start -> run; returns (seconds, stdout, activity)."""
    from golem.resources import Deploy, Run, Start

    t0 = time.perf_counter()
    activity = await agreement.create_activity()
    deploy = Deploy({"net": [network.deploy_args(await network.create_node(provider_id))]}) if network else Deploy()
    for step in (deploy, Start()):
        await (await activity.execute_commands(step)).wait(timeout=60)
    batch = await activity.execute_commands(Run(command))
    await batch.wait(timeout=60)
    return time.perf_counter() - t0, batch.events[-1].stdout, activity


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of `pid`, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RawClient:
    """One keep-alive HTTP connection: the server's share of the chain, without golem-core."""

    def __init__(self, url: str, app_key: str) -> None:
        self.conn = http.client.HTTPConnection(url.split("//", 1)[1])
        self.headers = {"Authorization": f"Bearer {app_key}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body=None):
        self.conn.request(method, path, None if body is None else json.dumps(body), self.headers)
        response = self.conn.getresponse()
        data = response.read()
        assert 200 <= response.status < 300, (response.status, data)
        return json.loads(data) if data else None

    def chain(self, agreement_id: str) -> float:
        a = "/activity-api/v1/activity"
        t0 = time.perf_counter()
        activity_id = self.call("POST", a, agreement_id)
        for command in ({"deploy": {}}, {"start": {}}, {"run": {"entry_point": "/bin/sh", "args": ["-c", "true"]}}):
            batch_id = self.call("POST", f"{a}/{activity_id}/exec", {"text": json.dumps([command])})
            assert self.call("GET", f"{a}/{activity_id}/exec/{batch_id}?timeout=5")[-1]["result"] == "Ok"
        seconds = time.perf_counter() - t0
        self.call("DELETE", f"{a}/{activity_id}")
        return seconds


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


async def measure(mode: str, args, tmp: str) -> list[tuple[str, str]]:
    """The figures of one isolation mode: (measure, value) rows."""
    rows: list[tuple[str, str]] = []
    ln = start_localnet(Path(tmp) / f"localnet-{mode}", profile=PROFILE, isolation=mode)
    try:
        async with golem_node(ln) as node:
            network = await node.create_network("192.168.0.1/16")
            _, agreement, provider_id = await rent(node, "ok-1")  # one agreement, many activities on it
            idle_base = await idle_cpu_percent(ln.pid, args.idle_seconds)

            raw = RawClient(ln.url, ln.app_key)
            http, raw_chains = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                raw.call("GET", "/version/get")
                http.append(time.perf_counter() - t0)
                raw_chains.append(raw.chain(agreement.id))
            spawn = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                subprocess.run(["/bin/sh", "-c", "true"], check=True)
                spawn.append(time.perf_counter() - t0)
            chains, activities = [], []
            for _ in range(args.runs):
                seconds, _, activity = await chain(agreement, "true", network, provider_id)
                chains.append(seconds)
                activities.append(activity)
            await asyncio.gather(*(a.destroy() for a in activities))
            (m, p90), (hm, _), (sm, _) = quantiles(chains), quantiles(http), quantiles(spawn)
            rm, rp90 = quantiles(raw_chains)
            rows += [
                (f"create->deploy->start->run via golem-core, median / p90 of {args.runs}",
                 f"{m * 1000:.1f} / {p90 * 1000:.1f} ms"),
                ("same chain, 7 raw keep-alive HTTP calls (no VPN), median / p90",
                 f"{rm * 1000:.1f} / {rp90 * 1000:.1f} ms"),
                ("  baseline: one keep-alive HTTP round trip (median)", f"{hm * 1000:.2f} ms"),
                ("  baseline: bare /bin/sh -c true (median)", f"{sm * 1000:.2f} ms"),
                ("  ratio golem-core chain / (7 round trips + 1 bare spawn)", f"{m / (7 * hm + sm):.1f}x"),
            ]

            rss_before = rss_kib(ln.pid, "VmRSS")
            t0, c0, k0 = time.perf_counter(), cpu_ticks(ln.pid), cpu_ticks(ln.pid, children=True)
            results = await asyncio.gather(
                *(chain(agreement, "echo $NODE_IP", network, provider_id) for _ in range(args.concurrent)),
                return_exceptions=True)
            wall = time.perf_counter() - t0
            burst_cpu = (cpu_ticks(ln.pid) - c0) / CLK_TCK / wall * 100
            burst_cpu_all = (cpu_ticks(ln.pid, children=True) - k0) / CLK_TCK / wall * 100
            errors = [r for r in results if isinstance(r, BaseException)]
            ips = {r[1].strip() for r in results if not isinstance(r, BaseException)}
            rows += [
                (f"{args.concurrent} concurrent chains: errors", f"{len(errors)}" + (f" ({errors[0]!r})" if errors else "")),
                (f"{args.concurrent} concurrent chains: distinct node IPs", f"{len(ips)}"),
                (f"{args.concurrent} concurrent chains: wall time", f"{wall:.2f} s"),
                (f"{args.concurrent} concurrent chains: localnet CPU during the burst", f"{burst_cpu:.0f} % of a core"),
                ("  same, with its reaped helper processes", f"{burst_cpu_all:.0f} % of a core"),
                (f"localnet RSS before / peak with {args.concurrent} live activities",
                 f"{rss_before / 1024:.0f} / {rss_kib(ln.pid) / 1024:.0f} MiB"),
            ]
            idle = await idle_cpu_percent(ln.pid, args.idle_seconds)
            live = ln.state()["activities"]["by_state"].get("Ready", 0)
            rows += [
                (f"localnet CPU, {live} idle activities (median of 3 windows)", f"{idle:.2f} % of a core"),
                ("  baseline: same localnet, no activity yet", f"{idle_base:.2f} % of a core"),
            ]
    finally:
        code = stop_localnet(ln)
    rows.append(("localnet exit code after SIGTERM", str(code)))
    return rows


async def main(args) -> tuple[list[str], list[tuple[str, list[str]]]]:
    modes = ["sandbox"] + (["namespaces"] if os.geteuid() == 0 else [])
    with tempfile.TemporaryDirectory(prefix="bench-localnet-activity-") as tmp:
        columns = [await measure(mode, args, tmp) for mode in modes]
    names = [name for name, _ in columns[0]]
    return modes, [(name, [dict(c)[name] for c in columns]) for name in names]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    modes, rows = asyncio.run(main(args))
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  " + "  ".join(f"{m:<22}" for m in modes))
    for name, values in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{v:<22}" for v in values))
