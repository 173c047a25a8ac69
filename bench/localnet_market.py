#!/usr/bin/env python3
"""Benchmark of the local network's market with a large population.

Figures (median of --runs runs, each on a fresh localnet process):
  - proposals/s delivered to one golem-core demand (Demand.initial_proposals), against a
    baseline measured in the same run: a bare stdlib client polling the same endpoint
    with golem-core's requests (timeout=5, maxEvents=10): what the server alone delivers;
  - CPU ms per proposal spent by golem-core and by the localnet during the golem-core run;
  - peak RSS of the localnet process (VmHWM) after the golem-core run;
  - CPU used by the localnet while --polls idle long-polls wait on an empty demand,
    against a baseline of the same window with no poll open.

    /work/venv/bin/python bench/localnet_market.py [--providers 5000] [--runs 3]

Targets (issue 3): <= 300 MB peak RSS, >= 2,000 proposals/s, an idle long-poll costs no CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROFILE = {"known_at_start": 1.0, "behaviours": {}}  # every offer on the market at once


class Localnet:
    def __init__(self, providers: int, datadir: str) -> None:
        profile = Path(datadir) / "profile.json"
        profile.write_text(json.dumps(PROFILE))
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "golem_localnet.py"), "serve", "--port", "0", "--datadir",
             str(Path(datadir) / "ln"), "--providers", str(providers), "--profile", str(profile)],
            stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.stop()
            raise SystemExit(f"localnet did not start: {line!r}")
        self.url = line.split()[-1]
        self.key = (Path(datadir) / "ln" / "appkey").read_text().strip()

    def call(self, method: str, path: str, body=None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {self.key}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def demand_body(unmatchable: bool = False) -> dict:
    now_ms = int(time.time() * 1000)
    return {"properties": {"golem.srv.comp.expiration": now_ms + 3600_000, "golem.node.debug.subnet": "public"},
            "constraints": "(golem.runtime.name=nothing)" if unmatchable else "(golem.runtime.name=vm)"}


def raw_rate(ln: Localnet, providers: int) -> float:
    demand_id = ln.call("POST", "/market-api/v1/demands", demand_body())
    got, started = 0, time.perf_counter()
    while got < providers:
        # golem-core's request shape (demand.py: timeout=5, maxEvents=10)
        got += len(ln.call("GET", f"/market-api/v1/demands/{demand_id}/events?timeout=5&maxEvents=10"))
    rate = got / (time.perf_counter() - started)
    ln.call("DELETE", f"/market-api/v1/demands/{demand_id}")
    return rate


def golem_core_rate(ln: Localnet, providers: int) -> tuple[float, float, float]:
    """(proposals/s, golem-core CPU ms per proposal, localnet CPU ms per proposal)."""
    from golem.node import GolemNode
    from golem.payload import VmPayload

    async def main() -> tuple[float, float, float]:
        async with GolemNode(app_key=ln.key, api_url=ln.url) as node:
            payload = VmPayload(package_url="hash:sha3:00:http://127.0.0.1:1/image.gvmi")
            started, cpu, server_cpu = time.perf_counter(), time.process_time(), ln.cpu_seconds()
            demand = await node.create_demand(payload)
            got = 0
            async for _ in demand.initial_proposals():
                got += 1
                if got >= providers:
                    break
            return (got / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / got,
                    1000 * (ln.cpu_seconds() - server_cpu) / got)

    return asyncio.run(main())


def idle_cpu(ln: Localnet, polls: int, window: float) -> tuple[float, float]:
    """(CPU s per s with `polls` idle long-polls open, the same with none)."""
    before = ln.cpu_seconds()
    time.sleep(window)
    baseline = (ln.cpu_seconds() - before) / window
    demand_id = ln.call("POST", "/market-api/v1/demands", demand_body(unmatchable=True))
    ln.call("GET", f"/market-api/v1/demands/{demand_id}/events?timeout=2&maxEvents=100")  # drain the matching
    stop = threading.Event()

    def poller() -> None:
        while not stop.is_set():
            ln.call("GET", f"/market-api/v1/demands/{demand_id}/events?timeout=5&maxEvents=10")

    threads = [threading.Thread(target=poller, daemon=True) for _ in range(polls)]
    for t in threads:
        t.start()
    time.sleep(1)  # every poll parked on the server
    before = ln.cpu_seconds()
    time.sleep(window)
    with_polls = (ln.cpu_seconds() - before) / window
    stop.set()
    for t in threads:
        t.join(10)
    return with_polls, baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--polls", type=int, default=50, help="idle long-polls held open at once")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of CPU measurement")
    args = parser.parse_args()

    raw, core, rss, client_ms, server_ms = [], [], [], [], []
    cpu_polls = cpu_base = 0.0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            ln = Localnet(args.providers, tmp)
            try:
                raw_rate(ln, args.providers)  # warm-up: builds every offer once, as a long-running net has
                raw.append(raw_rate(ln, args.providers))
                rate, client, server = golem_core_rate(ln, args.providers)
                core.append(rate)
                client_ms.append(client)
                server_ms.append(server)
                rss.append(ln.peak_rss_mb())
                if run == args.runs - 1:
                    cpu_polls, cpu_base = idle_cpu(ln, args.polls, args.window)
            finally:
                ln.stop()
    med = statistics.median
    print(f"golem-localnet market, {args.providers} providers, median of {args.runs} runs")
    print(f"{'figure':<52} {'value':>12} {'baseline':>12} {'ratio':>7}")
    print(f"{'proposals/s to one golem-core demand':<52} {med(core):>12.0f} {med(raw):>12.0f} "
          f"{med(core) / med(raw):>7.2f}   (baseline: bare stdlib client, same requests)")
    print(f"{'CPU ms per proposal: golem-core / localnet':<52} {med(client_ms):>12.3f} {med(server_ms):>12.3f} "
          f"{'':>7}   (golem-core's own deserialization bounds its rate)")
    print(f"{'peak RSS of the localnet (MB)':<52} {med(rss):>12.1f} {'':>12} {'':>7}")
    print(f"{'localnet CPU s/s, ' + str(args.polls) + ' idle long-polls open':<52} {cpu_polls:>12.4f} "
          f"{cpu_base:>12.4f} {'':>7}   (baseline: no poll open; {args.window:.0f} s windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
