"""Baseline for bench/ray_up.py: the same Ray nodes started locally, without any market.

A minimal external NodeProvider (as Ray's own `local` provider, ray/autoscaler/_private/local/node_provider.py): nodes are process groups on
this machine with their own HOME, loopback IP, temp dir and the same environment
file and start commands as Ray on Golem nodes (ray_on_golem.node_environment_script),
but created at once: no webserver, no agreement, no activity. Commands run by `/bin/sh`
(no sshd per node), files move as tar archives, `ray stop` is scoped to the node: the
helpers below are what Ray on Golem used before its nodes became machines of their own.
These nodes share this machine, so each also gets a Ray temp dir of its own (`RAY_TMPDIR`,
short: Ray's unix sockets must stay under 107 bytes) and this Python first on its PATH.
State lives in a JSON file under `provider.state_dir`, guarded by flock, so the
`ray up` process and the head's autoscaler share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import io
import re
import time

import ray_on_golem as rog
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider


# --- nodes sharing this machine: environment, node-scoped `ray stop`, file archives ----------

RAY_TMPDIR_PREFIX = "/tmp/rog-"  # a node's Ray temp dir: /tmp/rog-XXXXXXXX
_RAY_STOP_RE = re.compile(r"(?<![\w./-])ray stop(?=$|[\s;&|)])[^;&|\n)]*")
NODE_RAY_STOP = f"python3 {os.path.abspath(__file__)} stop-node"


def localize_command(command: str, local_network: bool) -> str:
    """What a node runs for one of Ray's commands: its environment first, from $HOME."""
    if local_network:
        command = _RAY_STOP_RE.sub(NODE_RAY_STOP, command)
    env = f'"$HOME/{rog.NODE_STATE_DIR}/env"'
    return f'if [ -f {env} ]; then . {env}; fi; cd "$HOME" && {command}'


def _excluded(name: str, patterns: list) -> bool:
    import fnmatch

    base = os.path.basename(name.rstrip("/"))
    return any(fnmatch.fnmatch(base, p) or fnmatch.fnmatch(name, p) for p in patterns)


def pack_for_upload(source: str, target: str, exclude: list | None = None) -> tuple[str, bytes]:
    """(node directory, gzip tar) reproducing rsync's `source target` semantics.

    A directory source (Ray passes `dir/` on both sides) copies its contents into
    `target`; a file source becomes the file `target` (or `target/<name>` when
    `target` ends with `/`).
    """
    import io as _io
    import tarfile as _tarfile
    exclude = list(exclude or [])
    buf = _io.BytesIO()
    with _tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if os.path.isdir(source):
            directory = target.rstrip("/") or "/"
            for entry in sorted(os.listdir(source)):
                if not _excluded(entry, exclude):
                    tar.add(
                        os.path.join(source, entry),
                        arcname=entry,
                        filter=lambda info: None if _excluded(info.name, exclude) else info,
                    )
        elif os.path.exists(source):
            if target.endswith("/"):
                directory, name = target.rstrip("/") or "/", os.path.basename(source)
            else:
                directory, name = os.path.dirname(target) or ".", os.path.basename(target)
            tar.add(source, arcname=name)
        else:
            raise rog.UsageError(f"cannot upload {source!r}: no such file or directory")
    data = buf.getvalue()
    if len(data) > (1 << 30):
        raise rog.UsageError(
            f"cannot upload {source!r}: {len(data)} bytes compressed, above the "
            f"{(1 << 30)} byte limit of the command channel; put large data "
            "in the node image or fetch it from the node"
        )
    return directory, data


def unpack_download(archive: bytes, is_dir: bool, source: str, target: str) -> None:
    """Write what `download` returned to `target` with rsync's semantics (see pack_for_upload)."""
    import io as _io
    import tarfile as _tarfile
    with _tarfile.open(fileobj=_io.BytesIO(archive), mode="r:gz") as tar:
        if is_dir:
            os.makedirs(target, exist_ok=True)
            tar.extractall(target, filter="data")
            return
        member = tar.getmembers()[0]
        if target.endswith("/") or os.path.isdir(target):
            os.makedirs(target, exist_ok=True)
            dest = os.path.join(target, os.path.basename(source.rstrip("/")))
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            dest = target
        extracted = tar.extractfile(member)
        if extracted is None:
            raise rog.UsageError(f"cannot download {source!r}: not a regular file")
        with open(dest, "wb") as f:
            f.write(extracted.read())


def stop_ray_on_this_node() -> int:
    """`ray stop` for one node of the local network (section 7 substitutes it).

    Ray's own `ray stop` kills Ray processes by name on the whole machine, i.e.
    every node of the local network. A node's Ray processes are those naming its
    own temp dir or IP on their command line, plus all their descendants (workers
    and agents rename themselves with setproctitle, so only the tree finds them).
    """
    import signal

    temp_dir, node_ip = os.environ.get("RAY_TMPDIR"), os.environ.get("NODE_IP")
    if not temp_dir or not node_ip:
        print("ray stop: not inside a Ray on Golem node (RAY_TMPDIR/NODE_IP unset)", file=sys.stderr)
        return 1
    ip_arg = re.compile(r"[=\s]" + re.escape(node_ip) + r"(?![\d.])")

    def processes() -> dict[int, tuple[int, str]]:
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            table[int(entry)] = (ppid, cmdline)
        return table

    def ours(table) -> set[int]:
        me = {os.getpid(), os.getppid()}
        found = {pid for pid, (_, cmd) in table.items()
                 if pid not in me and "ray" in cmd and (temp_dir in cmd or ip_arg.search(cmd))}
        while True:
            more = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found | me}
            if not more:
                return found
            found |= more

    deadline = time.monotonic() + 15.0
    sig = signal.SIGTERM
    stopped = 0
    while True:
        pids = ours(processes())
        if not pids:
            break
        stopped = max(stopped, len(pids))
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.5)
    print(f"Stopped all {stopped} Ray processes of this node." if stopped else "Did not find any active Ray processes.")
    return 0



class LocalNodeProvider(NodeProvider):
    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.state_dir = provider_config["state_dir"]
        os.makedirs(self.state_dir, exist_ok=True)
        self.path = os.path.join(self.state_dir, "nodes.json")

    @contextlib.contextmanager
    def _state(self, write: bool = False):
        with open(os.path.join(self.state_dir, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.path) as f:
                    state = json.load(f)
            except FileNotFoundError:
                state = {"next": 1, "nodes": {}}
            yield state
            if write:
                with open(self.path + ".tmp", "w") as f:
                    json.dump(state, f)
                os.replace(self.path + ".tmp", self.path)

    def non_terminated_nodes(self, tag_filters):
        with self._state() as state:
            return [i for i, n in state["nodes"].items()
                    if n["state"] == "running" and rog.tags_match(n["tags"], tag_filters)]

    def is_running(self, node_id):
        with self._state() as state:
            return state["nodes"][node_id]["state"] == "running"

    def is_terminated(self, node_id):
        return not self.is_running(node_id)

    def node_tags(self, node_id):
        with self._state() as state:
            return dict(state["nodes"][node_id]["tags"])

    def internal_ip(self, node_id):
        with self._state() as state:
            return state["nodes"][node_id]["ip"]

    external_ip = internal_ip

    def set_node_tags(self, node_id, tags):
        with self._state(write=True) as state:
            state["nodes"][node_id]["tags"].update(tags)

    def create_node(self, node_config, tags, count):
        created = []
        with self._state(write=True) as state:
            for _ in range(count):
                number = state["next"]
                state["next"] += 1
                node_id = f"local{number}"
                home = os.path.join(self.state_dir, node_id)
                os.makedirs(home, exist_ok=True)
                state["nodes"][node_id] = {"tags": dict(tags), "state": "running", "home": home,
                                           "ip": f"127.77.{number // 250}.{number % 250 + 2}"}
                created.append(node_id)
        for node_id in created:  # the bootstrap step of a Golem node: write the environment file
            self.get_command_runner("", node_id, {}, self.cluster_name, subprocess, True)._bootstrap()
        return {node_id: {} for node_id in created}

    def terminate_node(self, node_id):
        runner = self.get_command_runner("", node_id, {}, self.cluster_name, subprocess, True)
        with contextlib.suppress(Exception):
            runner.run("ray stop", with_output=True)
        with self._state(write=True) as state:
            node = state["nodes"][node_id]
            node["state"] = "terminated"
        shutil.rmtree(node["home"], ignore_errors=True)
        if node.get("ray_tmpdir", "").startswith(RAY_TMPDIR_PREFIX):
            shutil.rmtree(node["ray_tmpdir"], ignore_errors=True)

    def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner,
                           use_internal_ip, docker_config=None):
        with self._state() as state:
            node = state["nodes"][node_id]
        return LocalCommandRunner(self, node_id, node)

    @staticmethod
    def bootstrap_config(cluster_config):
        return cluster_config


class LocalCommandRunner(CommandRunnerInterface):
    def __init__(self, provider: LocalNodeProvider, node_id: str, node: dict):
        self.provider = provider
        self.node_id = node_id
        self.node = node

    def _env(self) -> dict:
        env = dict(os.environ, HOME=self.node["home"], NODE_IP=self.node["ip"])
        here = os.path.dirname(os.path.abspath(__file__))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.path.dirname(rog.__file__), env.get("PYTHONPATH")) if p)
        return env

    def _bootstrap(self) -> None:
        """The Golem node's environment file, plus what a node sharing this machine needs: a Ray
        temp dir of its own (`ray stop` finds the node's processes by it) and this Python first."""
        import tempfile

        script = rog.node_environment_script(self.node_id, self.node["ip"])
        subprocess.run(["/bin/sh", "-c", script], env=self._env(), cwd=self.node["home"], check=True,
                       capture_output=True, text=True)
        ray_tmpdir = tempfile.mkdtemp(prefix=os.path.basename(RAY_TMPDIR_PREFIX), dir=os.path.dirname(RAY_TMPDIR_PREFIX))
        with open(os.path.join(self.node["home"], rog.NODE_STATE_DIR, "env"), "a") as env:
            env.write(f"export RAY_TMPDIR={ray_tmpdir}\n"
                      f'export PATH={os.path.dirname(sys.executable)}:"$PATH"\n')
        with self.provider._state(write=True) as state:
            state["nodes"][self.node_id]["ray_tmpdir"] = ray_tmpdir

    def run(self, cmd=None, timeout=120, exit_on_fail=False, port_forward=None, with_output=False,
            environment_variables=None, run_env="auto", ssh_options_override_ssh_key="",
            shutdown_after_run=False, silent=False):
        if environment_variables:
            cmd = _with_environment_variables(cmd, environment_variables)
        proc = subprocess.run(["/bin/sh", "-c", localize_command(cmd, True)], env=self._env(),
                              cwd=self.node["home"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if not silent and not with_output:
            sys.stdout.write(proc.stdout)
        if not silent:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=proc.returncode, command=cmd)
        return proc.stdout.encode() if with_output else ""

    def _local(self, path: str) -> str:
        return os.path.join(self.node["home"], path[2:]) if path == "~" or path.startswith("~/") else path

    def run_rsync_up(self, source, target, options=None):
        directory, archive = pack_for_upload(source, target, (options or {}).get("rsync_exclude"))
        directory = self._local(directory)
        os.makedirs(directory, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(directory, filter="data")

    def run_rsync_down(self, source, target, options=None):
        source = self._local(source)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)

    def remote_shell_command_str(self):
        return f"cd {self.node['home']} && $SHELL"


if __name__ == "__main__" and sys.argv[1:] == ["stop-node"]:
    sys.exit(stop_ray_on_this_node())
