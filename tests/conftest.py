"""Shared fixtures: a private data dir and the CLI run as a user runs it (a real subprocess).

Every fixture that starts a process stops it by PID and checks nothing is left (see docs/internals.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CLUSTER = REPO / "sample-cluster.yaml"

sys.path.insert(0, str(REPO))  # `import ray_on_golem` from the checkout, whatever the cwd


def cli_env(datadir: Path | None, home: Path, extra: dict | None = None) -> dict:
    """The environment of a CLI run: no inherited ray-on-golem/yagna settings, a private HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ON_GOLEM_", "YAGNA_", "XDG_")) and k not in ("NO_COLOR", "PYTHONPATH")}
    env["HOME"] = str(home)
    if datadir is not None:
        env["RAY_ON_GOLEM_DATADIR"] = str(datadir)
    env.update(extra or {})
    return env


@pytest.fixture
def datadir(tmp_path: Path) -> Path:
    """A fresh data dir, as `$RAY_ON_GOLEM_DATADIR` points at it (created by the CLI on first use)."""
    return tmp_path / "datadir"


@pytest.fixture
def run_cli(datadir: Path, tmp_path: Path):
    """`run_cli("reputation", "list", env={...})` -> CompletedProcess of `python ray_on_golem.py ...`."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def run(*args: str, env: dict | None = None, timeout: float = 120, check_clean: bool = True):
        proc = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env=cli_env(datadir, home, env), stdin=subprocess.DEVNULL)
        if check_clean:  # whatever happens, the user never sees a traceback
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run


@pytest.fixture
def spawn_cli(datadir: Path, tmp_path: Path):
    """Start CLI processes without waiting (concurrency tests); all are reaped, by PID, at teardown."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    started: list[subprocess.Popen] = []

    def spawn(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(REPO / "ray_on_golem.py"), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                env=cli_env(datadir, home), stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert all(p.returncode is not None for p in started)
