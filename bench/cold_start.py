#!/usr/bin/env python3
"""Cold start of the zipapp: `--help`, `version` and `reputation list` on a bare Python (`-I -S`).

    python bench/cold_start.py [--runs 15] [--zipapp dist/ray-on-golem.pyz] [--python PYTHON]

Prints the median wall time and the median peak RSS of each command over --runs runs, against
`python -I -S -c pass` measured in the same run (commands are interleaved, so load on the machine
hits all of them alike). Target (issue 2): <= 40 ms above the baseline and <= 30 MB peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run; RSS from the child's rusage (Linux: ru_maxrss in KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({proc.returncode}): {err}")
    return wall, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per command (>= 10)")
    parser.add_argument("--zipapp", type=Path, default=HERE / "dist" / "ray-on-golem.pyz")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run (default: this one)")
    parser.add_argument("--build", action="store_true", help="(re)build the zipapp first")
    args = parser.parse_args(argv)
    if args.runs < 10:
        parser.error("--runs: at least 10")
    if args.build or not args.zipapp.exists():
        subprocess.run([sys.executable, str(HERE / "build_zipapp.py"), "--output", str(args.zipapp)], check=True)

    with tempfile.TemporaryDirectory(prefix="rog-bench-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp,
               "RAY_ON_GOLEM_DATADIR": os.path.join(tmp, "datadir")}
        py = [args.python, "-I", "-S"]
        commands = {
            "python -I -S -c pass (baseline)": py + ["-c", "pass"],
            "pyz --help": py + [str(args.zipapp), "--help"],
            "pyz version": py + [str(args.zipapp), "version"],
            "pyz reputation list": py + [str(args.zipapp), "reputation", "list"],
        }
        for argv_ in commands.values():  # warm-up: page cache, and the database is created once
            measure(argv_, env)
        samples = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv_ in commands.items():
                samples[name].append(measure(argv_, env))

    base_ms = statistics.median(w for w, _ in samples["python -I -S -c pass (baseline)"]) * 1000
    print(f"cold start, {args.runs} runs each, median; {args.python} "
          f"({sys.version.split()[0]}), zipapp {args.zipapp.stat().st_size / 1e6:.1f} MB")
    print(f"{'command':34} {'wall ms':>8} {'vs base':>8} {'peak RSS MB':>12}  target")
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs) * 1000
        rss = statistics.median(r for _, r in runs)
        baseline = name.endswith("(baseline)")
        ok = "" if baseline else ("ok" if wall - base_ms <= 40 and rss <= 30 else "MISSED")
        delta = "" if baseline else f"+{wall - base_ms:.1f}"
        print(f"{name:34} {wall:8.1f} {delta:>8} {rss:12.1f}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
