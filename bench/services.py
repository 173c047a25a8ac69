#!/usr/bin/env python3
"""Benchmark of the background services (issue 6): prints a table, asserts nothing.

    python bench/services.py [--runs 5] [--duration 5] [--clients 100]

1. `start` until ready on the local network (then `stop`), vs the local network alone
   until its ready line and a bare `python -c pass`.
2. `status` wall time (webserver running), vs `python -c pass`.
3. The status route under 100 concurrent keep-alive clients: p50/p99 latency and
   requests/s, vs a minimal asyncio server that answers a constant response (the
   floor of asyncio streams + this client on this machine), measured in the same run.

Targets (issue 6): start <= 1.5 s, status <= 60 ms, p99 <= 10 ms, >= 2,000 requests/s on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# What pip's `ray-on-golem` console script runs (no runpy, unlike `-m`), with the bytecode of install_modules.
CLI = [sys.executable, "-c", "import sys; from ray_on_golem import main; sys.exit(main())"]

import ray_on_golem as rog  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_modules(tmp: str) -> str:
    """Copy both modules with their bytecode into `tmp/lib`, as pip installs them.

    A checkout run with PYTHONDONTWRITEBYTECODE (set on this machine) compiles the
    3,000-line module on every start (~80 ms): not what a user's install does.
    """
    import py_compile
    import shutil

    lib = os.path.join(tmp, "lib")
    os.makedirs(lib)
    for name in ("ray_on_golem.py", "golem_localnet.py"):
        py_compile.compile(shutil.copy(os.path.join(ROOT, name), lib), doraise=True)
    return lib


def clean_env(home: str, lib: str = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ON_GOLEM_", "YAGNA_", "XDG_"))}
    env["HOME"] = home
    env["PYTHONPATH"] = lib
    return env


CPU: dict[str, list[float]] = {}  # row name -> CPU seconds (user + sys) of the command, per run


def timed(cmd: list[str], env: dict[str, str], row: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one run; its CPU time goes to CPU[row] (robust on a busy machine, unlike wall time)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if row:
        CPU.setdefault(row, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed, done


def localnet_alone(tmp: str, env: dict[str, str]) -> float:
    """Spawn the local network, time until its ready line (internals.md), stop it by PID."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "golem_localnet", "serve", "--port", "0",
                             "--datadir", tmp], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    assert line.startswith("golem-localnet listening on"), line
    proc.terminate()
    proc.wait(30)
    return elapsed


def bench_start(runs: int, tmp: str, env: dict[str, str]) -> dict[str, list[float]]:
    out = {"python -c pass": [], "localnet alone (ready line)": [], "start (local network, until ready)": [],
           "stop (graceful, process gone)": []}  # fmt: skip
    for i in range(runs):
        out["python -c pass"].append(timed([sys.executable, "-c", "pass"], env)[0])
        out["localnet alone (ready line)"].append(localnet_alone(os.path.join(tmp, f"ln{i}"), env))
        datadir, port = os.path.join(tmp, f"start{i}"), free_port()
        elapsed, done = timed([*CLI, "start", "--datadir", datadir, "-p", str(port)], env)
        assert done.returncode == 0, done.stdout + done.stderr
        out["start (local network, until ready)"].append(elapsed)
        elapsed, done = timed([*CLI, "stop", "--datadir", datadir], env)
        assert done.returncode == 0, done.stdout + done.stderr
        out["stop (graceful, process gone)"].append(elapsed)
    return out


def bench_status(runs: int, datadir: str, env: dict[str, str]) -> dict[str, list[float]]:
    out = {"python -c pass": [], "status (webserver running)": [], "status --json": []}
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "status (webserver running)": [*CLI, "status", "--datadir", datadir],
                "status --json": [*CLI, "status", "--json", "--datadir", datadir]}  # fmt: skip
    for _ in range(runs):
        for name, cmd in commands.items():
            out[name].append(timed(cmd, env, name)[0])
    return out


async def load(port: int, token: str | None, clients: int, duration: float, rate: float | None = None
               ) -> tuple[list[float], float]:  # fmt: skip
    """`clients` keep-alive connections sending GET /status; latencies and wall time.

    rate None: closed loop, each client back to back (saturation throughput; latency is
    then queueing, clients / throughput). rate R: open loop, R requests/s in total on a
    fixed schedule, latency counted from the scheduled send time (no coordinated omission).
    """
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()
    latencies: list[float] = []
    start = time.perf_counter()
    stop_at = start + duration
    interval = clients / rate if rate else 0.0

    async def client(i: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        due = start + interval * i / clients
        while time.perf_counter() < stop_at:
            if interval:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = due
                due += interval
            else:
                t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200"), head + body
            latencies.append(time.perf_counter() - t0)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, time.perf_counter() - t0


FLOOR_SERVER = r'''
import asyncio, sys
BODY = b'{"state": "running"}'
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(RESP)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=512)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
'''


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a process has used: /proc/PID/stat fields 14 and 15."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_route(port: int, pid: int, token: str, clients: int, duration: float, runs: int, rate: float | None
                ) -> list[tuple[str, float, float, float, float]]:  # fmt: skip
    """Rows (server, p50, p99, requests/s, server CPU per request): the CPU figure holds on a busy machine."""
    rows = []
    floor_port = free_port()
    floor = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(floor_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert floor.stdout.readline().strip() == "ready"
        for name, target, server_pid, tok in (("floor: constant-answer asyncio server", floor_port, floor.pid, None),
                                              ("webserver GET /status (bearer token)", port, pid, token)):  # fmt: skip
            p50s, p99s, rates, cpus = [], [], [], []
            for _ in range(runs):
                cpu0 = process_cpu(server_pid)
                latencies, wall = asyncio.run(load(target, tok, clients, duration, rate))
                cpus.append((process_cpu(server_pid) - cpu0) / len(latencies))
                p50s.append(percentile(latencies, 0.50))
                p99s.append(percentile(latencies, 0.99))
                rates.append(len(latencies) / wall)
            rows.append((name, statistics.median(p50s), statistics.median(p99s), statistics.median(rates),
                         statistics.median(cpus)))  # fmt: skip
    finally:
        floor.terminate()
        floor.wait(10)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--status-runs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per route run")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="offered load of the open-loop run (req/s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rog-bench-") as tmp:
        os.chdir(tmp)  # `-m ray_on_golem` looks in the cwd first: never pick up a stray checkout
        env = clean_env(tmp, install_modules(tmp))
        print(f"# services bench: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
              f"Python {sys.version.split()[0]}, median of {args.runs} runs (min = best run)")
        print(f"\n{'wall time':<42} {'median':>9} {'min':>9} {'max':>9}")
        for name, values in bench_start(args.runs, tmp, env).items():
            print(f"{name:<42} {statistics.median(values) * 1000:>7.0f}ms {min(values) * 1000:>7.0f}ms "
                  f"{max(values) * 1000:>7.0f}ms")  # fmt: skip

        datadir, port = os.path.join(tmp, "running"), free_port()
        done = subprocess.run([*CLI, "start", "--datadir", datadir, "-p", str(port)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        try:
            print(f"\n{'wall time (CPU = user + sys of the command)':<42} {'median':>9} {'min':>9} {'max':>9} "
                  f"{'CPU med':>9}")  # fmt: skip
            for name, values in bench_status(args.status_runs, datadir, env).items():
                print(f"{name:<42} {statistics.median(values) * 1000:>7.1f}ms {min(values) * 1000:>7.1f}ms "
                      f"{max(values) * 1000:>7.1f}ms {statistics.median(CPU[name]) * 1000:>7.1f}ms")  # fmt: skip
            token = rog.read_token(datadir)
            pid = rog.read_runtime(datadir)["pid"]
            for rate in (None, args.rate):
                mode = f"open loop, {rate:.0f} req/s offered" if rate else "closed loop, back to back"
                print(f"\n{args.clients} keep-alive clients, {mode}, {args.duration:.0f} s per run, "
                      f"median of {args.runs} runs")  # fmt: skip
                print(f"{'server':<42} {'p50':>9} {'p99':>9} {'req/s':>9} {'CPU/req':>9}")
                for name, p50, p99, done_rate, cpu in bench_route(port, pid, token, args.clients, args.duration,
                                                                  args.runs, rate):  # fmt: skip
                    print(f"{name:<42} {p50 * 1000:>7.2f}ms {p99 * 1000:>7.2f}ms {done_rate:>9.0f} {cpu * 1e6:>7.0f}us")
            with open(f"/proc/{pid}/status") as f:
                rss = next(line.split()[1] for line in f if line.startswith("VmRSS"))
            print(f"\nwebserver RSS after the load: {int(rss) / 1024:.1f} MiB")
        finally:
            done = subprocess.run([*CLI, "stop", "--datadir", datadir, "--kill"],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            print(json.dumps({"stop": done.stdout.strip()}) if done.returncode else "", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
