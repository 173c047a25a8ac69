#!/usr/bin/env python3
"""Cold start of the zipapp: `--help`, `version` and `reputation list` on a bare Python (`-I -S`).

    python bench/cold_start.py [--runs 15] [--zipapp dist/ray-on-golem.pyz] [--python PYTHON]

Prints the median (and best) wall time and the median peak RSS of each command over --runs runs, against
`python -I -S -c pass` measured in the same run (commands are interleaved, so load on the machine
hits all of them alike), and a zipapp that only builds an argparse parser (the floor of any argparse
CLI started as `python app.pyz`: runpy + argparse). Target (issue 2): <= 40 ms above the baseline and <= 30 MB peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
FLOOR_MAIN = """\
import argparse
parser = argparse.ArgumentParser(prog="floor")
commands = parser.add_subparsers()
for name in ("version", "validate", "reputation"):
    commands.add_parser(name, help=name)
parser.parse_args()
"""


# Forks and times one command. It runs in its own small `python -I -S`: Linux's ru_maxrss of a child
# includes the memory it had before exec, i.e. its parent's; forked from this (bigger) script, every
# command would report at least this script's RSS.
TIMER = """\
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    try:
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def measure(argv: list[str], env: dict, timer_python: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run of `argv` (Linux: ru_maxrss is in KiB)."""
    proc = subprocess.run([timer_python, "-I", "-S", "-c", TIMER, *argv], env=env, capture_output=True, text=True)
    try:
        wall, maxrss_kib, code = proc.stdout.split()
    except ValueError:
        raise SystemExit(f"bench: timer failed: {proc.stderr}") from None
    if int(code) != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({code}): {proc.stderr}")
    return float(wall), int(maxrss_kib) / 1024


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
        # The floor of any argparse CLI in a zipapp: runpy + argparse + a parser with our subcommands.
        floor = Path(tmp) / "argparse-floor.pyz"
        with zipfile.ZipFile(floor, "w") as zf:
            zf.writestr("__main__.py", FLOOR_MAIN)
        commands = {
            "python -I -S -c pass (baseline)": py + ["-c", "pass"],
            "argparse-only zipapp --help": py + [str(floor), "--help"],
            "pyz --help": py + [str(args.zipapp), "--help"],
            "pyz version": py + [str(args.zipapp), "version"],
            "pyz reputation list": py + [str(args.zipapp), "reputation", "list"],
        }
        for argv_ in commands.values():  # warm-up: page cache, and the database is created once
            measure(argv_, env, args.python)
        samples = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv_ in commands.items():
                samples[name].append(measure(argv_, env, args.python))

    base_ms = statistics.median(w for w, _ in samples["python -I -S -c pass (baseline)"]) * 1000
    print(f"cold start, {args.runs} runs each, median; {args.python} "
          f"({sys.version.split()[0]}), zipapp {args.zipapp.stat().st_size / 1e6:.1f} MB")
    best_base_ms = min(w for w, _ in samples["python -I -S -c pass (baseline)"]) * 1000
    print(f"{'command':34} {'wall ms':>8} {'vs base':>8} {'best ms':>8} {'vs base':>8} {'peak RSS MB':>12}  target")
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs) * 1000
        best = min(w for w, _ in runs) * 1000  # the least disturbed run: a hint when the machine is busy
        rss = statistics.median(r for _, r in runs)
        reference = not name.startswith("pyz")  # the baseline and the floor: measured, not judged
        ok = "" if reference else ("ok" if wall - base_ms <= 40 and rss <= 30 else "MISSED")
        delta, best_delta = ("", "") if name.endswith("(baseline)") else (f"+{wall - base_ms:.1f}",
                                                                           f"+{best - best_base_ms:.1f}")
        print(f"{name:34} {wall:8.1f} {delta:>8} {best:8.1f} {best_delta:>8} {rss:12.1f}  {ok}")
    if base_ms > 1.5 * best_base_ms:
        print(f"note: the baseline's median is {base_ms / best_base_ms:.1f}x its best run: the machine is busy, "
              "the medians are inflated (compare the best runs, or rerun on a quiet machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
