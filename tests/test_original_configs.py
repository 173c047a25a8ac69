"""The original project's cluster YAMLs and module path, and the Ray of its public image (2.9.3)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ray_on_golem as rog
from conftest import REPO, cli_env

ORIGINAL_CONFIGS = REPO / "tests" / "data" / "original-configs"
NAMES = ["golem-cluster", "golem-cluster.mini", "golem-cluster.full"]
ALIAS = "ray_on_golem.provider.node_provider.GolemNodeProvider"


def local_copy(name: str, tmp_path: Path, **parameters) -> Path:
    """The original YAML with `payment_network: local` (the one edit a user makes) plus `parameters`."""
    config = yaml.safe_load((ORIGINAL_CONFIGS / f"{name}.yaml").read_text())
    config["provider"]["parameters"].update(payment_network="local", **parameters)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ray_pythons() -> list:
    """The Pythons to load the provider with: ours (the pinned Ray) and a venv with the image's Ray."""
    def venv_python(requirement):
        from test_zipapp import ray_venv

        return str(ray_venv(requirement) / "bin" / "python")

    return [pytest.param(lambda: sys.executable, id="ray-pinned"),
            pytest.param(lambda: venv_python("ray[default]==2.9.3"), id="ray-2.9.3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", NAMES)
def test_original_config_validates_with_payment_network_local(run_cli, tmp_path, name):
    proc = run_cli("validate", "--json", str(local_copy(name, tmp_path)))
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["provider"]["parameters"]["payment_network"] == "local"
    head = resolved["node_types"]["ray.head.default"]["node_config"]
    assert head["demand"]["image_tag"] == "golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3"
    # Keys we do not use are named in a warning, never silently taken.
    full = name.endswith(".full")
    assert [w.split(" is not used")[0] for w in resolved["warnings"]] == (
        ["provider.parameters.ray_gcs_expose_port"] if full else []), resolved["warnings"]
    if name != "golem-cluster.mini":
        assert head["demand"]["outbound_urls"] == ["https://pypi.dev.golem.network"]
        assert head["budget_control"]["per_cpu_expected_usage"] == {"cpu_load": 0.8, "duration_hours": 0.5,
                                                                    "max_cost": 1.5}
    if full:
        assert resolved["node_types"]["ray.head.default"]["max_workers"] == 0
        assert head["budget_control"]["payment_interval_hours"]["minimal"] == 12


def test_alias_module_is_our_provider_and_imports_ray_lazily(tmp_path):
    code = ("import sys, ray_on_golem.provider.node_provider as alias; print('ray' in sys.modules); "
            "import ray_on_golem; print(alias.GolemNodeProvider is ray_on_golem.GolemNodeProvider); "
            "print(ray_on_golem.provider.__path__)\n"
            "try: alias.GolemCommandRunner\n"
            "except AttributeError as e: print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(None, tmp_path, {"PYTHONPATH": str(REPO)}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False", "True", "[]",
        "module 'ray_on_golem.provider.node_provider' has no attribute 'GolemCommandRunner'"]
    # Unrelated submodules stay unknown.
    proc = subprocess.run([sys.executable, "-c", "import ray_on_golem.nothing"], capture_output=True, text=True,
                          cwd=tmp_path, env=cli_env(None, tmp_path, {"PYTHONPATH": str(REPO)}), timeout=120)
    assert "No module named 'ray_on_golem.nothing'" in proc.stderr


# Ray's own steps before the `ray up` prompt (ray/autoscaler/_private/commands.py::_bootstrap_config):
# load the provider class from `provider.module`, fill out node types, Ray's schema check, then our
# bootstrap_config. ON_GOLEM_NETWORK=1 (as on a head node) keeps it from starting the services.
PRE_PROMPT = """
import json, sys, yaml
from ray.autoscaler._private.providers import _get_node_provider_cls
from ray.autoscaler._private.util import prepare_config, validate_config
import ray
config = prepare_config(yaml.safe_load(open(sys.argv[1])))
cls = _get_node_provider_cls(config["provider"])
config = cls.fillout_available_node_types_resources(config)
validate_config(config)
config = cls.bootstrap_config(config)
print(json.dumps({"ray": ray.__version__, "class": cls.__module__ + "." + cls.__name__,
                  "payment_network": config["provider"]["parameters"]["payment_network"],
                  "legacy": sorted(k for k in ("head_node", "worker_nodes") if k in config),
                  "head_start": config["head_start_ray_commands"]}))
"""


@pytest.mark.parametrize("python", ray_pythons())
@pytest.mark.parametrize("name", NAMES)
def test_original_config_passes_rays_pre_prompt_checks(tmp_path, name, python):
    python = python()
    proc = subprocess.run([python, "-c", PRE_PROMPT, str(local_copy(name, tmp_path))], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300,
                          env=cli_env(tmp_path / "datadir", tmp_path, {"PYTHONPATH": str(REPO), "ON_GOLEM_NETWORK": "1"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["class"] == "ray_on_golem.GolemNodeProvider"
    assert result["ray"] == ("2.9.3" if "ray-default-2.9.3" in python else __import__("ray").__version__)
    assert result["payment_network"] == "local"
    assert result["legacy"] == []  # the original's `head_node: true` is dropped before Ray's schema check
    assert result["head_start"][0].startswith("ray start --head --node-ip-address $NODE_IP")  # the user's own


def test_version_mismatch_names_both_and_what_to_use():
    message = rog.version_mismatch({"python": "3.11.7", "ray": "2.60.0"}, ["3.10.13", "2.9.3"],
                                   "golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3")
    assert "Python 3.10.13 with Ray 2.9.3" in message and "Python 3.11.7 with Ray 2.60.0" in message
    assert "golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3" in message
    assert "pip install 'ray[default]==2.9.3'" in message and "-py3.11.*-ray2.60.0" in message
    assert rog.version_mismatch({"python": "3.11.7", "ray": "2.60.0"}, ["3.11.2", "2.60.0"], None) is None
    assert "Python - with Ray -" in rog.version_mismatch({"python": "3.11.7", "ray": "2.60.0"}, ["-", "-"], None)


# --- the version check at bring-up, through the webserver (HTTP, no Ray cluster) ---------------------

from test_cluster import RaySession, request_worker, session, wait_node  # noqa: E402,F401 (fixture)


@pytest.mark.slow
def test_a_node_of_other_versions_ends_naming_both(session: RaySession):
    import platform

    import ray

    started = session.rog("start", "--datadir", str(session.datadir), "--port", str(session.port),
                          "--network", "local")
    assert started.returncode == 0, started.stdout + started.stderr
    # The local network `start` runs is this Python: its nodes' image has this Python and its Ray.
    ours = {"python": platform.python_version(), "ray": ray.__version__}

    def node(cluster: str, versions: dict) -> dict:
        config = rog.load_cluster_config(str(ORIGINAL_CONFIGS / "golem-cluster.yaml"))
        params = dict(json.loads(json.dumps(config.parameters)), payment_network="local", node_start_timeout=120)
        body = {"provider_parameters": params, "node_config": config.node_types["ray.worker.default"].node_config,
                "tags": {"ray-node-type": "worker", "ray-user-node-type": "ray.worker.default"}, "count": 1,
                "requestor_versions": versions}
        first = session.api("POST", f"/clusters/{cluster}/nodes", body)["nodes"][0]
        return wait_node(session, cluster, first["node_id"], {"running", "terminated"}, timeout=150)

    other = node("versions-other", {"python": "3.10.13", "ray": "2.9.3"})
    assert other["state"] == "terminated", other
    assert other["error"] == (
        f"version mismatch: the node (image golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3) runs Python "
        f"{ours['python']} with Ray {ours['ray']}, this machine Python 3.10.13 with Ray 2.9.3; use an image_tag "
        f"carrying Python 3.10 and Ray 2.9.3 (golem/ray-on-golem:*-py3.10.*-ray2.9.3), or run `ray up` from "
        f"Python {'.'.join(ours['python'].split('.')[:2])} with `pip install 'ray[default]=={ours['ray']}'`")
    assert any("version mismatch" in line for line in other["state_log"])
    # The image is the user's choice, not the provider's fault: no penalty, nothing left rented.
    assert session.db("SELECT COUNT(*) FROM provider_events WHERE kind NOT IN ('agreement_ok')") == [(0,)]
    assert session.db("SELECT COUNT(*) FROM blacklist") == [(0,)]

    same = node("versions-same", ours)
    assert same["state"] == "running", same
    session.api("DELETE", f"/clusters/versions-same/nodes/{same['node_id']}")
    from test_cluster import wait_for

    wait_for(lambda: session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)], 60,
             what="agreements terminated")
    session.rog("stop", "--force", "--datadir", str(session.datadir), "--port", str(session.port), timeout=200)


# --- `ray up` with the original's golem-cluster.yaml, with the pinned Ray and the image's Ray 2.9.3 ------

RAY_OF_THE_IMAGE = "ray[default]==2.9.3"


def requestor_bin_dirs() -> list:
    """Where `ray` and `python` come from: a venv a user of the original makes for the image's Ray with
    `pip install 'ray[default]==2.9.3' golem-core` (our module by PYTHONPATH). The pinned Ray runs the
    same path with the sample YAML (tests/test_cluster.py) and the pyz (tests/test_zipapp.py); one run
    of this journey is enough for the CI's time."""
    def pip_venv():
        from test_zipapp import ray_venv

        return ray_venv(RAY_OF_THE_IMAGE, "golem-core==0.7.8", "setuptools<81") / "bin"

    return [pytest.param(pip_venv, id="ray-2.9.3")]


class VenvRaySession(RaySession):
    """A RaySession whose `ray` (hence the webserver, the local network and its nodes' Python) is
    the one of `bin_dir`."""

    def __init__(self, tmp_path: Path, datadir: Path, port: int, bin_dir: Path):
        super().__init__(tmp_path, datadir, port)
        self.bin_dir = bin_dir
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env['PATH']}"

    def ray(self, *args: str, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ray"), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.tmp_path, env=self.env, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="namespaced local nodes (sshd on each) need root")
@pytest.mark.parametrize("bin_dir", requestor_bin_dirs())
def test_ray_up_exec_submit_down_with_the_originals_golem_cluster_yaml(tmp_path: Path, bin_dir):
    """The original's golem-cluster.yaml with `payment_network: "local"` as the only edit: its module
    path, its image tag, its default webserver port, its head and worker start commands, min_workers 1."""
    from test_cluster import processes_mentioning, wait_for

    bin_dir = bin_dir()
    text = (ORIGINAL_CONFIGS / "golem-cluster.yaml").read_text()
    config = tmp_path / "golem-cluster.yaml"
    config.write_text(text.replace('payment_network: "holesky"', 'payment_network: "local"', 1))
    assert config.read_text() != text
    session = VenvRaySession(tmp_path, tmp_path / "datadir", rog.DEFAULT_WEBSERVER_PORT, bin_dir)
    version = subprocess.run([str(bin_dir / "python"), "-c", "import ray; print(ray.__version__)"],
                             capture_output=True, text=True, env=session.env, timeout=120).stdout.strip()
    assert version == ("2.9.3" if "2.9.3" in str(bin_dir) else __import__("ray").__version__)
    cluster = "golem-cluster"
    try:
        up = session.ray("up", "-y", "--no-config-cache", str(config))
        session.up = True
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        head, = session.nodes(cluster)
        assert head["state"] == "running" and head["internal_ip"].startswith("10.")
        assert session.api("GET", "/status")["tunnels"][cluster][head["node_id"]]["state"] == "up"

        # min_workers: 1 — the head's autoscaler (the original's module path, this ray_on_golem
        # first on its import path) asks the webserver through the tunnel; the worker joins with
        # the YAML's `ray start --address $RAY_HEAD_IP:6379`.
        def worker_joined():
            status = session.ray("exec", "--no-config-cache", str(config), "ray status", timeout=180)
            return status if status.returncode == 0 and " 1 ray.worker.default" in status.stdout else None

        status = wait_for(worker_joined, 420, 5, "the YAML's one worker in `ray status`")
        assert " 1 ray.head.default" in status.stdout
        submit = session.ray("submit", "--no-config-cache", str(config), str(REPO / "examples" / "fan_out.py"),
                             "--", "4", "2")
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert re.search(r"^NODES [12]$", submit.stdout, re.M), submit.stdout
        assert f"(Ray {version})" in session.ray("exec", str(config), "python -c 'import ray; "
                                                 "print(f\"(Ray {ray.__version__})\")'").stdout

        down = session.ray("down", "-y", str(config), timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        session.up = False
        assert session.nodes(cluster) == []
        assert session.db("SELECT COUNT(*) FROM agreements WHERE terminated_at IS NULL") == [(0,)]
        state = session.localnet_state()
        assert set(state["agreements"]["by_state"]) <= {"Terminated", "Rejected"}
        assert set(state["activities"]["by_state"]) == {"Terminated"}
        wait_for(lambda: not processes_mentioning([f"root@{ip}" for ip in session.node_ips]
                                                  + [f" {ip} 22" for ip in session.node_ips]), 30,
                 what="no ssh process to a node left")
    finally:
        session.close(config)  # `ray down` if still up, the webserver stopped; then nothing left
