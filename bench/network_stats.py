#!/usr/bin/env python3
"""Benchmark of the market pipeline (what `network-stats` and node starts run).

A local Golem network with 1,000 providers at a fast time scale; every run is a fresh
requestor process (so peak RSS is its own) that scans until every proposal has been
classified and every negotiation has ended. Figures, median of --runs:

  wall s         start of the scan -> last negotiation ended
  bound s        what the providers allow: offers' arrival and answer latencies on
                 `concurrency` negotiators (a list-scheduling simulation of the population)
  CPU ms/prop    requestor CPU time / proposals
  peak RSS MB    requestor's ru_maxrss

Baseline, measured in the same run: a requestor that only receives the same proposals
through golem-core (demand + event loop, no filters, no scoring, no negotiation).

    /work/venv/bin/python bench/network_stats.py [--providers 1000] [--runs 3] [--time-scale 100]
"""

import argparse
import asyncio
import heapq
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --- the requestor side: one measured run (a child process) ----------------------------


async def measured_run(mode: str, url: str, app_key: str, providers: int, concurrency: int,
                       response_timeout: float) -> dict:
    import ray_on_golem as rog
    from golem.node import GolemNode

    node = GolemNode(app_key=app_key, api_url=url, collect_payment_events=False)
    await node.start()
    spec = rog.DemandSpec.from_node_config({"demand": {"image_tag": "golem/ray-on-golem:bench"}}, "local", url)
    pipeline = rog.MarketPipeline(node, spec, rog.BudgetControl(), concurrency=concurrency,
                                  response_timeout=response_timeout)
    cpu0, t0 = time.process_time(), time.monotonic()
    if mode == "receive":
        # golem-core alone: allocation, demand, initial proposals counted as they arrive
        from golem.resources import Allocation, Demand

        allocation = await Allocation.create_any_account(node, rog._decimal(1), "local", "erc20")
        builder = await spec.build(allocation)
        demand = await Demand.create_from_properties_constraints(node, builder.properties, builder.constraints)
        demand.start_collecting_events()
        seen = 0
        async for _ in demand.initial_proposals():
            seen += 1
            if seen == providers:
                break
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await demand.unsubscribe()
        await allocation.release()
    else:
        # our own share of the CPU: the filter chain and scoring of each proposal
        classify, classify_cpu = pipeline.classify, [0.0]

        def timed_classify(proposal):
            started = time.process_time()
            try:
                return classify(proposal)
            finally:
                classify_cpu[0] += time.process_time() - started

        pipeline.classify = timed_classify
        await pipeline.start()
        while pipeline.funnel.counts[rog.STAGE_INITIAL] < providers:
            await asyncio.sleep(0.01)
        await pipeline.settle()
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await pipeline.stop()
        seen = pipeline.funnel.counts[rog.STAGE_INITIAL]
    await node.aclose()
    return {"mode": mode, "proposals": seen, "wall_s": wall, "cpu_s": cpu,
            "classify_cpu_s": classify_cpu[0] if mode == "pipeline" else 0.0,
            "negotiated": pipeline.funnel.counts[rog.STAGE_NEGOTIATED],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- the driver -------------------------------------------------------------------------


def provider_bound(population: list[dict], time_scale: float, concurrency: int,
                   response_timeout: float) -> float:
    """Makespan if our code took no time: offers arrive at `offer_at_s`, each negotiation
    takes the provider's latency (the response timeout for `no_answer`, nothing for
    `unreachable`), `concurrency` at a time, in order of arrival."""
    jobs = sorted(
        (p["offer_at_s"] / time_scale,
         {"no_answer": response_timeout, "unreachable": 0.0}.get(p["behaviour"], p["latency_s"] / time_scale))
        for p in population)
    free = [0.0] * concurrency
    end = 0.0
    for arrival, duration in jobs:
        start = max(arrival, heapq.heappop(free))
        heapq.heappush(free, start + duration)
        end = max(end, start + duration)
    return end


def run_child(mode, url, app_key, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YAGNA_")}
    env["BENCH_APPKEY"] = app_key  # secrets go through the environment, never argv
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--url", url, "--providers", str(args.providers),
         "--concurrency", str(args.concurrency), "--response-timeout", str(args.response_timeout)],
        capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--response-timeout", type=float, default=2.0)
    parser.add_argument("--child", choices=("receive", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(measured_run(args.child, args.url, os.environ["BENCH_APPKEY"], args.providers,
                                          args.concurrency, args.response_timeout))
        print(json.dumps(result))
        return 0

    localnet_py = os.path.join(ROOT, "golem_localnet.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("YAGNA_")}
    with tempfile.TemporaryDirectory() as datadir:
        # Every offer on the market from the start: each run sees the same market, and the
        # bound is the providers' answer latencies alone (the default profile's behaviours).
        profile = os.path.join(datadir, "profile.json")
        with open(profile, "w") as f:
            json.dump({"known_at_start": 1.0}, f)
        population = json.loads(subprocess.run(
            [sys.executable, localnet_py, "population", "--providers", str(args.providers), "--profile",
             profile, "--json"], capture_output=True, text=True, check=True, env=env).stdout)["providers"]
        bound = provider_bound(population, args.time_scale, args.concurrency, args.response_timeout)
        localnet = subprocess.Popen(
            [sys.executable, localnet_py, "serve", "--port", "0", "--datadir", datadir, "--profile", profile,
             "--providers", str(args.providers), "--time-scale", str(args.time_scale)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            url = localnet.stdout.readline().strip().rsplit(" ", 1)[1]
            with open(os.path.join(datadir, "appkey")) as f:
                app_key = f.read().strip()
            results = {"receive": [], "pipeline": []}
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                for mode in results:
                    results[mode].append(run_child(mode, url, app_key, args))
        finally:
            localnet.send_signal(signal.SIGTERM)
            localnet.wait(timeout=30)
            localnet.stdout.close()

    def median(mode, key):
        return statistics.median(r[key] for r in results[mode])

    print(f"market pipeline: {args.providers} providers, time scale {args.time_scale:g}, "
          f"concurrency {args.concurrency}, response timeout {args.response_timeout:g} s, "
          f"median of {args.runs} runs")
    print(f"{'':34} {'wall s':>8} {'bound s':>8} {'CPU ms/prop':>12} {'peak RSS MB':>12}")
    for mode, label in (("receive", "golem-core receive only (base)"), ("pipeline", "pipeline (filter+score+negotiate)")):
        n = median(mode, "proposals")
        row_bound = f"{bound:8.2f}" if mode == "pipeline" else f"{'-':>8}"
        print(f"{label:34} {median(mode, 'wall_s'):8.2f} {row_bound} "
              f"{median(mode, 'cpu_s') / n * 1000:12.3f} {median(mode, 'peak_rss_mb'):12.1f}")
    negotiated = median("pipeline", "negotiated")
    print(f"negotiated successfully: {negotiated:g} of {median('pipeline', 'proposals'):g} proposals")
    print(f"CPU per proposal: filters+scoring (our code) "
          f"{median('pipeline', 'classify_cpu_s') / args.providers * 1000:.3f} ms; pipeline over baseline "
          f"{(median('pipeline', 'cpu_s') - median('receive', 'cpu_s')) / args.providers * 1000:.3f} ms "
          f"(mostly golem-core's counter-proposal POST and Draft event per negotiation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
