"""The zipapp on a Python with no site-packages at all (`python -I -S`), as dropped on a bare host."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_CLUSTER, cli_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def zipapp(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "ray-on-golem.pyz"
    proc = subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"built {out}: ")
    return out


@pytest.fixture
def bare(tmp_path, datadir):
    """Run `python -I -S ARGS...`: isolated mode, no site module, so no site-packages on sys.path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def run(*args, env=None):
        proc = subprocess.run([sys.executable, "-I", "-S", *map(str, args)], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=cli_env(datadir, home, env), stdin=subprocess.DEVNULL)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run


def test_the_interpreter_really_is_bare(bare):
    proc = bare("-c", "import importlib.util, sys; print(importlib.util.find_spec('yaml'), "
                      "[p for p in sys.path if 'site-packages' in p])")
    assert (proc.returncode, proc.stdout) == (0, "None []\n")


def test_version(bare, zipapp, datadir):
    proc = bare(zipapp, "version")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ray-on-golem 0.1.0"
    assert "golem-core:  0.7.8" in lines and "PyYAML:      6.0.3" in lines
    assert "Ray:         not installed" in lines  # Ray is not bundled: it runs on the head node image
    assert f"Data dir:    {datadir}" in lines
    info = json.loads(bare(zipapp, "version", "--json").stdout)
    assert info["ray-on-golem"] == "0.1.0" and info["golem-core"] == "0.7.8" and info["ray"] is None


def test_help(bare, zipapp):
    proc = bare(zipapp, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: ray-on-golem ")
    assert all(cmd in proc.stdout for cmd in ("version", "validate", "reputation"))


def test_reputation_list_and_block(bare, zipapp, datadir):
    proc = bare(zipapp, "reputation", "list")
    assert (proc.returncode, proc.stdout) == (0, "Provider reputation on local, holesky, polygon\nNo providers found.\n")
    assert (datadir / "ray_on_golem.sqlite3").exists()
    node_id = "0x" + "ab" * 20
    assert bare(zipapp, "reputation", "block", node_id, "--network", "local").returncode == 0
    rows = json.loads(bare(zipapp, "reputation", "list", "--json").stdout)["providers"]
    assert [(r["node_id"], r["network"], r["blocked"]) for r in rows] == [(node_id, "local", True)]
    assert bare(zipapp, "reputation", "block", "0x1").returncode == 2


def test_validate_uses_the_bundled_pyyaml(bare, zipapp, tmp_path):
    proc = bare(zipapp, "validate", SAMPLE_CLUSTER, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cluster_name"] == "golem-cluster"
    bad = tmp_path / "bad.yaml"
    bad.write_text(SAMPLE_CLUSTER.read_text().replace("total_budget: 5.0", "total_budget: -1"))
    proc = bare(zipapp, "validate", bad)
    assert proc.returncode == 2 and "provider.parameters.total_budget: expected a number > 0" in proc.stderr


def test_import_from_pythonpath(zipapp, tmp_path, datadir):
    # -S (no site-packages) but not -I, which would ignore PYTHONPATH.
    code = ("import sys, ray_on_golem; print(ray_on_golem.__file__); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'golem', 'aiohttp', 'ray')))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(datadir, tmp_path, {"PYTHONPATH": str(zipapp)}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{zipapp}/ray_on_golem.pyc", "[]"]  # precompiled; stdlib only


def test_the_originals_module_path_from_the_pyz(zipapp, tmp_path, datadir):
    """Ray's loader finds `ray_on_golem.provider.node_provider.GolemNodeProvider` in the pyz too."""
    code = ("from ray.autoscaler._private.providers import _get_node_provider_cls; import ray_on_golem; "
            "cls = _get_node_provider_cls({'type': 'external', "
            "'module': 'ray_on_golem.provider.node_provider.GolemNodeProvider'}); "
            "print(ray_on_golem.__file__); print(cls is ray_on_golem.GolemNodeProvider)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(datadir, tmp_path, {"PYTHONPATH": str(zipapp)}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{zipapp}/ray_on_golem.pyc", "True"]


def test_golem_core_runs_from_the_bundle(bare, zipapp, tmp_path):
    """golem-core & co import with their pure-Python fallbacks, and the textX grammar files load."""
    code = f"""
import sys
sys.path.insert(0, {str(zipapp)!r})
import ray_on_golem
bundle = ray_on_golem.prepare_bundled_imports()
assert bundle.startswith({str(tmp_path / "home" / ".cache" / "ray-on-golem")!r}), bundle
import golem.node, golem.managers, aiohttp.http_parser as hp, multidict
from golem.payload import PayloadSyntaxParser
constraints = PayloadSyntaxParser.get_instance().parse_constraints("(&(golem.inf.cpu.threads>=2))")
print(constraints.items[0].property_name, constraints.items[0].value)
print(hp.HttpRequestParser is hp.HttpRequestParserPy, type(multidict.MultiDict()).__module__)
stdlib = sys.modules["os"].__file__.rsplit("/", 1)[0]
outside = [m.__file__ for m in list(sys.modules.values())
           if getattr(m, "__file__", None) and not m.__file__.startswith((bundle, {str(zipapp)!r}, stdlib))]
print(outside)
"""
    for attempt in ("extracts", "reuses"):
        proc = bare("-c", code)
        assert proc.returncode == 0, f"{attempt}: {proc.stderr}"
        assert proc.stdout.splitlines() == ["golem.inf.cpu.threads 2", "True multidict._multidict_py", "[]"]


def test_zip_contents(zipapp):
    with zipfile.ZipFile(zipapp) as zf, zf.open("bundle.zip") as inner, zipfile.ZipFile(inner) as bundle:
        names = set(zf.namelist())
        bundled_names = set(bundle.namelist())
        bundled = json.loads(zf.read("bundled-versions.json"))
    # the root stays small: zipimport reads its whole directory on every start
    assert names == {"__main__.py", "__main__.pyc", "ray_on_golem.py", "ray_on_golem.pyc", "golem_localnet.py",
                     "golem_localnet.pyc", "bundled-versions.json", "bundle.zip", "bundle.json"}
    with zipfile.ZipFile(zipapp) as zf:
        manifest = json.loads(zf.read("bundle.json"))
        assert manifest["sha256"] == hashlib.sha256(zf.read("bundle.zip")).hexdigest()
    assert {"yaml", "golem", "aiohttp", "textx", "pkg_resources", "typing_extensions"} <= set(manifest["top_level"])
    assert "ray" not in manifest["top_level"] and not [n for n in manifest["top_level"] if "." in n]
    assert {"yaml/__init__.py", "yaml/__init__.pyc", "golem/payload/parser.tx", "pkg_resources/__init__.py",
            "aiohttp/http_parser.pyc"} <= bundled_names
    assert not [n for n in bundled_names if n.endswith((".so", ".pyd"))]
    assert bundled["golem-core"] == "0.7.8" and bundled["PyYAML"] == "6.0.3"
    assert int(bundled["setuptools"].split(".")[0]) < 81
    assert "ray" not in {k.lower() for k in bundled}
    assert os.access(zipapp, os.X_OK)


# ---- the bundle in the user's cache: once per content hash, concurrent first use, repair ----------------

# What a process that needs golem-core does: imports it (through the bundle's import hook, no explicit
# call) and parses a constraint with the textX grammar files that must be on disk.
USES_GOLEM_CORE = """
import sys
sys.path.insert(0, {zipapp!r})
import ray_on_golem
from golem.payload import PayloadSyntaxParser
import golem, yaml
constraints = PayloadSyntaxParser.get_instance().parse_constraints("(&(golem.inf.cpu.threads>=2))")
assert str(constraints.items[0].value) == "2", constraints
print(golem.__file__.rsplit("/golem/", 1)[0])
"""


def _bundle_manifest(zipapp) -> dict:
    with zipfile.ZipFile(zipapp) as zf:
        return json.loads(zf.read("bundle.json"))


def _assert_complete(directory, zipapp) -> dict:
    """The extraction's marker names this bundle and lists every file with its size, as on disk."""
    marker = json.loads((directory / ".complete").read_text())
    assert marker["sha256"] == _bundle_manifest(zipapp)["sha256"]
    assert len(marker["files"]) > 1000
    assert {name: (directory / name).stat().st_size for name in marker["files"]} == marker["files"]
    return marker


def test_concurrent_first_use_of_a_fresh_cache(zipapp, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(None, home)
    code = USES_GOLEM_CORE.format(zipapp=str(zipapp))
    procs = [subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env) for _ in range(4)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [r[0] for r in results] == [0] * 4, [r[2][-2000:] for r in results]
    cache = home / ".cache" / "ray-on-golem"
    name = f"bundle-0.1.0-{_bundle_manifest(zipapp)['sha256'][:16]}"
    assert {r[1] for r in results} == {f"{cache / name}\n"}  # one directory for all four
    assert sorted(p.name for p in cache.iterdir()) == [name, f"{name}.lock"]  # no temporary leftovers
    _assert_complete(cache / name, zipapp)


def test_a_truncated_or_partial_extraction_is_redone(zipapp, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(None, home)
    code = USES_GOLEM_CORE.format(zipapp=str(zipapp))

    def use() -> Path:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return Path(proc.stdout.strip())

    directory = use()
    marker = _assert_complete(directory, zipapp)
    grammar = directory / "golem" / "payload" / "parser.tx"
    size = grammar.stat().st_size
    # A copy cut short: a grammar file truncated, a module gone (the marker is still there).
    grammar.write_bytes(grammar.read_bytes()[: size // 2])
    (directory / "yaml" / "__init__.py").unlink()
    assert use() == directory
    assert grammar.stat().st_size == size
    assert _assert_complete(directory, zipapp) == marker
    # An extraction interrupted before its marker (e.g. by an older copy of the tool): half the files.
    (directory / ".complete").unlink()
    for path in sorted(directory.rglob("*.py"))[::2]:
        path.unlink()
    assert use() == directory
    assert _assert_complete(directory, zipapp) == marker
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name, f"{directory.name}.lock"]


# ---- the ways in: localnet from the pyz, PYTHONPATH, .pth -----------------------------------------


def test_the_local_network_runs_from_the_pyz(bare, zipapp, tmp_path):
    proc = bare(zipapp, "localnet", "population", "--providers", "3", "--seed", "7", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["providers"]) == 3
    profile = tmp_path / "profile.yaml"  # YAML profiles need PyYAML: the bundled one
    profile.write_text("providers: 2\n")
    proc = bare(zipapp, "localnet", "population", "--profile", profile, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["providers"]) == 2


def test_pythonpath_line_and_pth_file(zipapp, tmp_path, datadir):
    env = cli_env(datadir, tmp_path)
    line = subprocess.run([sys.executable, "-I", "-S", str(zipapp), "pythonpath"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert line.returncode == 0 and line.stdout == f"export PYTHONPATH={zipapp}${{PYTHONPATH:+:$PYTHONPATH}}\n"
    shell = subprocess.run(["bash", "-c", f'{line.stdout.strip()}; exec "$0" -S -c "import ray_on_golem; '
                                          f'print(ray_on_golem.__file__)"', sys.executable],
                           capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert shell.stdout == f"{zipapp}/ray_on_golem.pyc\n", shell.stderr

    venv = tmp_path / "venv"  # a Python with nothing of ours in it
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    probe = [python, "-c", "import ray_on_golem; print(ray_on_golem.__file__)"]
    assert subprocess.run(probe, capture_output=True, env=env, cwd=tmp_path).returncode == 1
    install = subprocess.run([python, str(zipapp), "install-pth"], capture_output=True, text=True, env=env,
                             timeout=60, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    pth = next(venv.glob("lib/python*/site-packages/ray_on_golem.pth"))
    assert install.stdout == f"Wrote {pth}: {python} now imports ray_on_golem from {zipapp}.\n"
    assert pth.read_text() == f"{zipapp}\n"
    used = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert used.stdout == f"{zipapp}/ray_on_golem.pyc\n", used.stderr
    removed = subprocess.run([python, str(zipapp), "install-pth", "--remove"], capture_output=True, text=True,
                             env=env, timeout=60, cwd=tmp_path)
    assert (removed.returncode, removed.stdout) == (0, f"Removed {pth}.\n") and not pth.exists()


# ---- the services on a bare Python: start, status, network-stats, costs, stop ---------------------


def test_services_on_a_bare_python(bare, zipapp, tmp_path, datadir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "cluster.yaml"
    config.write_text(SAMPLE_CLUSTER.read_text().replace("webserver_port: 4578", f"webserver_port: {port}"))
    started = bare(zipapp, "start", "--port", port, "--network", "local", "--timeout", "120")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = json.loads(bare(zipapp, "status", "--port", port, "--json").stdout)
        assert status["running"] and status["webserver"]["yagna"]["kind"] == "localnet"
        pids = [status["pid"], status["webserver"]["yagna"]["pid"]]
        # The webserver and the local network run from the pyz, with the bare Python's executable.
        for pid in pids:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            assert cmdline[:2] == [sys.executable.encode(), str(zipapp).encode()], cmdline
        stats = bare(zipapp, "network-stats", config, "--duration", "0.05", "--json")
        assert stats.returncode == 0, stats.stderr
        funnel = json.loads(stats.stdout)["funnel"]
        assert funnel[0]["stage"] == "Initial" and funnel[0]["count"] > 0
        costs = bare(zipapp, "costs", "--json")
        assert costs.returncode == 0, costs.stderr
        assert json.loads(costs.stdout)["clusters"] == []
    finally:
        stopped = bare(zipapp, "stop", "--port", port, "--kill")
    assert stopped.returncode == 0, stopped.stderr
    assert "Webserver stopped" in stopped.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1][:1]


# ---- acceptance: a host that has only Ray -----------------------------------------------------------

RAY_REQUIREMENT = re.search(r'"(ray\[default\]==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
# The Ray of the public image golem/ray-on-golem:*-ray2.9.3 (README "Ray and Python versions").
RAY_OF_THE_IMAGE = "ray[default]==2.9.3"


@pytest.fixture(scope="session", params=[RAY_REQUIREMENT, RAY_OF_THE_IMAGE], ids=lambda r: r.split("==")[1])
def ray_only_venv(request) -> Path:
    return ray_venv(request.param)


def ray_venv(requirement: str, *more: str) -> Path:
    """A virtualenv holding only `requirement` and `more` (and what they pull in), as a user makes one
    (one pip command: golem-core's certifi pin breaks requests otherwise, see pyproject.toml).

    Kept between runs under `$ROG_TEST_CACHE` (default ~/.cache/ray-on-golem-tests), keyed by the
    requirements and the Python version; made under a lock, marked ready only once pip succeeded.
    """
    import fcntl
    import shutil

    base = Path(os.environ.get("ROG_TEST_CACHE") or Path.home() / ".cache" / "ray-on-golem-tests")
    base.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", "+".join((requirement, *more)))
    venv = base / f"{tag}-py{sys.version_info[0]}{sys.version_info[1]}"
    ready = venv / ".ray-on-golem-test-ready"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement, *more],
                                 capture_output=True, text=True, timeout=1800)
            assert pip.returncode == 0, pip.stderr[-3000:]
            ready.write_text(requirement + "\n")
    return venv


@pytest.mark.ray
def test_ray_cluster_journey_with_only_ray_and_the_pyz(zipapp, ray_only_venv, tmp_path):
    """README "Running a cluster", the pyz way, in a virtualenv that has Ray and nothing of ours."""
    from test_cluster import free_port, pid_alive, processes_mentioning, wait_for

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    pyz = tmp_path / "ray-on-golem.pyz"  # where the user dropped it
    pyz.write_bytes(zipapp.read_bytes())
    port = free_port()
    cluster = f"pyz-{port}"
    config = tmp_path / "sample-cluster.yaml"
    config.write_text(SAMPLE_CLUSTER.read_text().replace("webserver_port: 4578", f"webserver_port: {port}")
                      .replace("cluster_name: golem-cluster", f"cluster_name: {cluster}"))
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "fan_out.py").write_bytes((REPO / "examples" / "fan_out.py").read_bytes())
    env = cli_env(None, home, {"TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"})
    datadir = home / ".local" / "share" / "ray_on_golem"

    def shell(line: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """One command of the user's shell session: the venv activated, the pyz on PYTHONPATH."""
        script = f'. {ray_only_venv}/bin/activate && eval "$(python3 ray-on-golem.pyz pythonpath)" && {line}'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    # The environment really is Ray only: no golem-core, no ray_on_golem, PyYAML only as Ray's.
    probe = subprocess.run([str(ray_only_venv / "bin" / "python"), "-c",
                            "import importlib.util as u, ray, yaml; "
                            "print([m for m in ('golem', 'ray_on_golem', 'textx') if u.find_spec(m)], ray.__version__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert probe.stdout == f"[] {(ray_only_venv / '.ray-on-golem-test-ready').read_text().split('==')[1]}", \
        probe.stderr[-2000:]

    node_ips: set[str] = set()

    def nodes() -> list[dict]:
        import ray_on_golem as rog

        client = rog.WebserverClient(str(datadir), port, timeout=30)
        try:
            found = client.request("GET", f"/clusters/{cluster}/nodes")["nodes"]
        finally:
            client.close()
        node_ips.update(n["internal_ip"] for n in found if n["internal_ip"])
        return found

    daemons: list[int] = []
    up_done = False
    try:
        up = shell("ray up sample-cluster.yaml -y")
        up_done = True
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "[7/7] Ready on" in up.stdout + up.stderr
        state = json.loads((datadir / "webserver.json").read_text())
        daemons = [state["pid"], state["yagna"]["pid"]]
        for pid in daemons:  # both run from the pyz with the venv's Python
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            assert Path(os.fsdecode(cmdline[0])).parent == ray_only_venv / "bin" and cmdline[1] == bytes(pyz), cmdline
        assert [n["tags"]["ray-node-type"] for n in nodes()] == ["head"]

        # 6 one-CPU tasks of 15 s on a 1-CPU head: the head's autoscaler (loading the provider from the
        # pyz too) adds workers through the webserver, which rents them with the bundled golem-core.
        submit = shell("ray submit sample-cluster.yaml examples/fan_out.py 6 15")
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert int(re.search(r"^NODES (\d+)$", submit.stdout, re.M).group(1)) >= 2, submit.stdout
        assert len(nodes()) >= 2

        down = shell("ray down -y sample-cluster.yaml", timeout=300)
        up_done = False
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        stop = shell("python3 ray-on-golem.pyz stop", timeout=200)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "Webserver stopped" in stop.stdout
        log = (datadir / "webserver.log").read_text()
        assert "ModuleNotFoundError" not in log and "Traceback" not in log
    finally:
        if up_done:
            shell("ray down -y sample-cluster.yaml", timeout=300)
        if (datadir / "webserver.json").exists():
            shell("python3 ray-on-golem.pyz stop --force --kill", timeout=200)
    # Nothing is left running: the daemons, the nodes' Ray processes, anything started from the pyz.
    for pid in daemons:
        wait_for(lambda: not pid_alive(pid), 30, what=f"daemon pid {pid} to exit")
    needles = [str(pyz), str(home)] + [f"node-ip-address={ip}" for ip in node_ips] + \
        [f"node_ip_address={ip}" for ip in node_ips]
    wait_for(lambda: not processes_mentioning(needles), 30, what="no process of the cluster left")
