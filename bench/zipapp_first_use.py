#!/usr/bin/env python3
"""First use of the zipapp's bundle: a command that needs golem-core, on a fresh cache and warm.

    python bench/zipapp_first_use.py [--runs 5] [--zipapp dist/ray-on-golem.pyz] [--build]

Two commands, each run three ways with the same interpreter, interleaved, median of --runs runs:
- `pyz, fresh cache`: `python -I -S ray-on-golem.pyz ...` with an empty ~/.cache (the bundle is
  extracted first: what a new user's first such command pays once per version);
- `pyz, warm cache`: the same with the bundle already extracted (checked, not extracted);
- `pip install` (the baseline): `pip install --no-deps --target` of this checkout, run through its
  `ray-on-golem` console script by this (virtualenv's) Python, which holds golem-core & co.

The commands: `import golem-core` (`import ray_on_golem, golem.node, golem.managers`: the extraction and
import alone) and `network-stats sample-cluster.yaml --duration 0.01` (a real command: it starts the
local network, imports golem-core, scans the market for 0.6 s, stops the network).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
IMPORT_GOLEM = "import ray_on_golem, golem.node, golem.managers"


def timed(argv: list[str], env: dict, cwd: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per variant (>= 3)")
    parser.add_argument("--zipapp", type=Path, default=HERE / "dist" / "ray-on-golem.pyz")
    parser.add_argument("--build", action="store_true", help="(re)build the zipapp first")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs: at least 3")
    if args.build or not args.zipapp.exists():
        subprocess.run([sys.executable, str(HERE / "build_zipapp.py"), "--output", str(args.zipapp)], check=True)
    zipapp = str(args.zipapp.resolve())

    with tempfile.TemporaryDirectory(prefix="rog-bench-") as tmp:
        target = os.path.join(tmp, "pip-target")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", target, str(HERE)], check=True, capture_output=True)
        config = os.path.join(tmp, "cluster.yaml")
        shutil.copy(HERE / "sample-cluster.yaml", config)
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_ON_GOLEM_", "YAGNA_", "XDG_", "PYTHON"))}
        pip_env = {**base_env, "PYTHONPATH": target}
        script = os.path.join(target, "bin", "ray-on-golem")
        variants = {
            "pyz, fresh cache": ([sys.executable, "-I", "-S", zipapp], [sys.executable, "-I", "-S", "-c",
                                  f"import sys; sys.path.insert(0, {zipapp!r}); {IMPORT_GOLEM}"], True),
            "pyz, warm cache": ([sys.executable, "-I", "-S", zipapp], [sys.executable, "-I", "-S", "-c",
                                 f"import sys; sys.path.insert(0, {zipapp!r}); {IMPORT_GOLEM}"], False),
            "pip install (baseline)": ([sys.executable, script], [sys.executable, "-c", IMPORT_GOLEM], False),
        }
        commands = {"import golem-core": None, "network-stats --duration 0.01": ["network-stats", config,
                                                                                  "--duration", "0.01", "--json"]}
        warm_home = os.path.join(tmp, "warm-home")
        os.makedirs(warm_home)
        samples: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs + 1):  # run 0 warms the page cache and the warm variant's cache
            for command, cli_args in commands.items():
                for number, (variant, (cli, probe, fresh)) in enumerate(variants.items()):
                    home = os.path.join(tmp, f"home-{run}-{number}") if fresh else warm_home
                    os.makedirs(home, exist_ok=True)
                    # a fresh data dir for every run of every variant: all pay the same first-run setup
                    env = {**(pip_env if variant.startswith("pip") else base_env), "HOME": home,
                           "RAY_ON_GOLEM_DATADIR": os.path.join(tmp, f"datadir-{command[:6]}-{run}-{number}")}
                    argv_ = probe if cli_args is None else cli + cli_args
                    elapsed = timed(argv_, env, tmp)
                    if run:
                        samples.setdefault((command, variant), []).append(elapsed)
                    if fresh:
                        shutil.rmtree(home)

    print(f"first use of the bundle, {args.runs} runs each, median (min); {sys.executable} "
          f"({sys.version.split()[0]}), zipapp {args.zipapp.stat().st_size / 1e6:.1f} MB")
    print(f"{'command':32} {'variant':24} {'wall s':>7} {'(min)':>7} {'vs pip':>7}")
    for command in commands:
        base = statistics.median(samples[(command, "pip install (baseline)")])
        for variant in variants:
            runs = samples[(command, variant)]
            wall = statistics.median(runs)
            print(f"{command:32} {variant:24} {wall:7.2f} {min(runs):7.2f} {wall / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
