"""Shared fixtures: a private data dir, the CLI run as a user runs it (a real subprocess), the local network.

Every fixture that starts a process stops it by PID and checks nothing is left (see docs/internals.md).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The node_config of a node requested over the webserver's API: the sample YAML's image (the local
# network's registry knows every golem/ray-on-golem tag).
NODE_CONFIG = {"demand": {"image_tag": "golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3"}}
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


@pytest.fixture(scope="module")
def netns():
    """A network namespace with only `lo` up: the real yagna there cannot reach anything else (docs/yagna-behaviour.md §5)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("the loopback-only network namespace needs root and iproute2")
    name = f"rogsvc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


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


def pytest_configure(config):
    for marker, text in (
        ("slow", "takes more than a few seconds"),
        ("yagna", "needs the real yagna binary (golem-node)"),
        ("ray", "starts Ray clusters"),
    ):
        config.addinivalue_line("markers", f"{marker}: {text}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# ---- localnet: a real `golem_localnet.py serve` process ---------------------

# A small, fully predictable population: one provider per behaviour, all offers on the
# market from the start, quick answers. Tests that need a bigger or slower market pass
# their own profile to `localnet_factory`.
MARKET_TEST_PROFILE = {
    "providers": 8,
    "known_at_start": 1.0,
    "latency_s": [0.01, 0.05],
    "slow_latency_s": [30.0, 30.0],
    "behaviours": {},
    "explicit": [
        {"name": "ok-1", "behaviour": "ok"},
        {"name": "ok-2", "behaviour": "ok"},
        {"name": "busy", "behaviour": "busy"},
        {"name": "outbound", "behaviour": "outbound_rules"},
        {"name": "silent", "behaviour": "no_answer"},
        {"name": "unreachable", "behaviour": "unreachable"},
        {"name": "rejecter", "behaviour": "reject_agreement"},
        {"name": "slow", "behaviour": "slow"},
    ],
}


class Localnet:
    """Handle on a running localnet: URL, app key, PID and a tiny JSON HTTP client."""

    def __init__(self, proc: subprocess.Popen, url: str, datadir: Path, app_key: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.url = url
        self.datadir = datadir
        self.app_key = app_key

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None,
             key: str | None = "default", timeout: float = 30, headers: dict | None = None):
        """Return (status, parsed JSON or text). Never raises on HTTP errors."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {self.app_key if key == 'default' else key}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        text = payload.decode()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def state(self) -> dict:
        status, body = self.call("GET", "/localnet/v1/state")
        assert status == 200, body
        return body

    def population(self) -> list[dict]:
        """The population as `golem_localnet.py population --json` prints it for the same args."""
        out = subprocess.run([sys.executable, str(REPO / "golem_localnet.py"), "population", "--json",
                              *self.population_args], check=True, capture_output=True, text=True).stdout
        return json.loads(out)["providers"]

    population_args: list[str] = []


def start_localnet(datadir: Path, *, providers: int | None = None, seed: int | None = None,
                   profile: dict | None = None, time_scale: float | None = None,
                   env: dict | None = None, isolation: str | None = "sandbox") -> Localnet:
    """A `golem_localnet.py serve` on a free port. `isolation`: the sandbox unless a test asks for
    VM-like nodes ("namespaces", tests/test_localnet_isolation.py) or None (the daemon's `auto`)."""
    datadir.mkdir(parents=True, exist_ok=True)
    pop_args: list[str] = []
    if providers is not None:
        pop_args += ["--providers", str(providers)]
    if seed is not None:
        pop_args += ["--seed", str(seed)]
    if profile is not None:
        profile_path = datadir.parent / f"{datadir.name}-profile.json"
        profile_path.write_text(json.dumps(profile))
        pop_args += ["--profile", str(profile_path)]
    cmd = [sys.executable, str(REPO / "golem_localnet.py"), "serve", "--port", "0", "--datadir", str(datadir),
           *pop_args]
    if time_scale is not None:
        cmd += ["--time-scale", str(time_scale)]
    if isolation is not None:
        cmd += ["--isolation", isolation]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line.startswith("golem-localnet listening on http://127.0.0.1:"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"localnet did not start: {line!r} {proc.stderr.read()}")
    url = line.split()[-1]
    app_key = (env or {}).get("YAGNA_APPKEY") or (datadir / "appkey").read_text().strip()
    ln = Localnet(proc, url, datadir, app_key)
    ln.population_args = pop_args
    return ln


def stop_localnet(ln: Localnet, sig: int = signal.SIGTERM) -> int:
    """Stop by PID; return the exit code. Kills if it does not go within 15 s."""
    if ln.proc.poll() is None:
        os.kill(ln.pid, sig)
        try:
            ln.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(ln.pid, signal.SIGKILL)
            ln.proc.wait()
    for stream in (ln.proc.stdout, ln.proc.stderr):
        stream.close()
    assert not pid_alive(ln.pid), f"localnet {ln.pid} is still running"
    return ln.proc.returncode


@pytest.fixture
def localnet_factory(tmp_path):
    """Start localnets with any population arguments; all are stopped at teardown."""
    started: list[Localnet] = []

    def start(**kwargs) -> Localnet:
        ln = start_localnet(tmp_path / f"localnet{len(started)}", **kwargs)
        started.append(ln)
        return ln

    yield start
    codes = [stop_localnet(ln) for ln in started]
    assert all(code == 0 for code in codes), f"localnet exit codes: {codes}"


@pytest.fixture
def localnet(localnet_factory) -> Localnet:
    """A localnet with MARKET_TEST_PROFILE: one provider of each behaviour."""
    return localnet_factory(profile=MARKET_TEST_PROFILE)


# ---- end of localnet fixtures ------------------------------------------------
