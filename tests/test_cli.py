"""The CLI skeleton: entry points, `version`, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, cli_env


def test_version_text(run_cli, datadir):
    proc = run_cli("version", env={"YAGNA_PATH": str(REPO / "no-such-yagna")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ray-on-golem 0.1.0"
    assert lines[1].startswith(f"Python:      {sys.version.split()[0]} ")
    assert "yagna:       not found" in lines
    assert f"Data dir:    {datadir}" in lines
    assert not datadir.exists()  # version only reports


def test_version_json_finds_yagna_next_to_python(run_cli):
    """golem-node puts `yagna` in the venv's bin, which is not on PATH unless the venv is activated."""
    proc = run_cli("version", "--json", env={"PATH": "/usr/bin:/bin"})
    info = json.loads(proc.stdout)
    assert info["ray-on-golem"] == "0.1.0"
    assert info["golem-core"] == "0.7.8" and info["PyYAML"] == "6.0.3" and info["ray"] == "2.60.0"
    yagna = Path(sys.executable).parent / "yagna"  # the [yagna] extra (golem-node) is part of the test setup
    assert info["yagna"]["path"] == str(yagna)
    assert info["yagna"]["version"].startswith("yagna 0.17.6")


def test_entry_points_agree(tmp_path, datadir):
    env = cli_env(datadir, tmp_path)
    by_module = subprocess.run([sys.executable, "-m", "ray_on_golem", "-V"], capture_output=True, text=True,
                               cwd=REPO, env=env, timeout=60)
    by_script = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), "--version"], capture_output=True,
                               text=True, env=env, timeout=60)
    assert by_module.stdout == by_script.stdout == "ray-on-golem 0.1.0\n"


def test_no_command_is_usage_error(run_cli):
    proc = run_cli()
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: ray-on-golem ")


def test_import_touches_the_standard_library_only(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import ray_on_golem; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'golem', 'ray', 'aiohttp', "
            "'argparse', 'sqlite3')))" % str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.stdout == "[]\n", proc.stderr


def test_yagna_version_is_cached_per_binary(run_cli, tmp_path):
    """A fake yagna (a shell script) proves the cache follows the binary: a new binary, a new answer."""
    fake = tmp_path / "bin" / "yagna"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho yagna 9.9.9 '(fake)'\n")
    fake.chmod(0o755)
    env = {"YAGNA_PATH": str(fake)}
    first = json.loads(run_cli("version", "--json", env=env).stdout)["yagna"]
    assert first == {"path": str(fake), "version": "yagna 9.9.9 (fake)"}
    cache = tmp_path / "home" / ".cache" / "ray-on-golem" / "yagna-version.json"
    assert json.loads(cache.read_text())["version"] == "yagna 9.9.9 (fake)"
    fake.write_text("#!/bin/sh\necho yagna 10.0.0-longer '(fake)'\n")  # another size: another binary
    second = json.loads(run_cli("version", "--json", env=env).stdout)["yagna"]
    assert second["version"] == "yagna 10.0.0-longer (fake)"
