"""The zipapp on a Python with no site-packages at all (`python -I -S`), as dropped on a bare host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

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
                     "golem_localnet.pyc", "bundled-versions.json", "bundle.zip"}
    assert {"yaml/__init__.py", "yaml/__init__.pyc", "golem/payload/parser.tx", "pkg_resources/__init__.py",
            "aiohttp/http_parser.pyc"} <= bundled_names
    assert not [n for n in bundled_names if n.endswith((".so", ".pyd"))]
    assert bundled["golem-core"] == "0.7.8" and bundled["PyYAML"] == "6.0.3"
    assert int(bundled["setuptools"].split(".")[0]) < 81
    assert "ray" not in {k.lower() for k in bundled}
    assert os.access(zipapp, os.X_OK)
