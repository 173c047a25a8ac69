"""Every node of the local network is a machine of its own, like a Golem VM (`--isolation namespaces`).

A real `golem_localnet.py serve` driven by the unmodified golem-core; what a node sees is checked
from inside it (ExeScript `run`, OpenSSH through `ray-on-golem ssh-proxy`), what it leaves behind
from the host (`ip netns`, `ip link`, cgroup directories, /proc). The test process itself never
connects to a VPN address: only the net API's WebSocket bridge does, from inside the node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, pid_alive, start_localnet, stop_localnet
from test_localnet_activity import golem_node, rent, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="VM-like nodes need root (namespaces, cgroups)")

N = "/net-api/v1"
A = "/activity-api/v1"
GIB = 1 << 30
PROFILE = {
    "providers": 3,
    "known_at_start": 1.0,
    "latency_s": [0.01, 0.02],
    "behaviours": {},
    "explicit": [
        {"name": "node-a", "cpu_threads": 1, "mem_gib": 1},
        {"name": "node-b", "cpu_threads": 2, "mem_gib": 2},
        {"name": "node-c", "cpu_threads": 1, "mem_gib": 1},
    ],
}


# ---- what the host sees ------------------------------------------------------------


def host_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def host_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


def node_cgroups(localnet_pid: int) -> list[str]:
    """Cgroup directories of a local network's nodes, in every hierarchy mounted here."""
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if d.startswith(f"golem-localnet-{localnet_pid}-nodes"):
                found.append(os.path.join(root, d))
        dirs[:] = [d for d in dirs if d.startswith(("golem-localnet-", "system", "user")) or root == "/sys/fs/cgroup"]
    return found


def node_inits() -> list[int]:
    """PIDs of node init processes (PID 1 of a node), machine-wide."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if b"golem-node-init" in cmdline and b"unshare" not in cmdline:
                pids.append(int(name))
    return pids


def assert_nothing_left(ln_pid: int, netns_before: set[str], links_before: set[str], inits_before: list[int]) -> None:
    for _ in range(100):
        leftovers = ([n for n in host_netns() - netns_before if n.startswith(f"gln{ln_pid}-")],
                     node_cgroups(ln_pid), sorted(set(node_inits()) - set(inits_before)))
        if not any(leftovers):
            break
        time.sleep(0.05)
    assert leftovers == ([], [], []), f"left behind: netns, cgroups, init processes: {leftovers}"
    assert host_links() == links_before
    assert "192.168." not in host_addresses()


@pytest.fixture
def isolated(tmp_path):
    """An isolated local network; when stopped, nothing of its nodes is left on the host."""
    netns_before, links_before, inits_before = host_netns(), host_links(), node_inits()
    ln = start_localnet(tmp_path / "localnet", profile=PROFILE, isolation="namespaces")
    try:
        yield ln
    finally:
        assert stop_localnet(ln) == 0
    assert_nothing_left(ln.pid, netns_before, links_before, inits_before)


async def rent_node(node, network, name: str, ip: str | None = None):
    """An activity of provider `name`, deployed on `network` and started; (activity, VPN IP)."""
    from golem.resources import Deploy, Start

    _, agreement, provider_id = await rent(node, name)
    activity = await agreement.create_activity()
    vpn_ip = await network.create_node(provider_id, ip) if ip else await network.create_node(provider_id)
    await run(activity, Deploy({"net": [network.deploy_args(vpn_ip)]}), Start())
    return activity, vpn_ip


async def sh(activity, command: str) -> str:
    from golem.resources import Run

    events = await run(activity, Run(command))
    return events[-1].stdout or ""


def through_bridge(ln, network_id: str, ip: str, port: int, request: bytes, tmp_path: Path) -> bytes:
    """A TCP conversation with a node, as a user's tools have it: `ray-on-golem ssh-proxy` on stdio."""
    env = {**os.environ, "YAGNA_APPKEY": ln.app_key, "YAGNA_API_URL": ln.url,
           "RAY_ON_GOLEM_DATADIR": str(tmp_path / "requestor")}
    done = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), "ssh-proxy", network_id, ip, str(port)],
                          input=request, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


CONNECT = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
           " print('connected')\nexcept OSError as e:\n print(type(e).__name__)\n")


async def try_connect(activity, host: str, port: int) -> str:
    return (await sh(activity, f"python -c \"$(cat <<'EOF'\n{CONNECT}EOF\n)\" {host} {port}")).strip()


# ---- acceptance ----------------------------------------------------------------------


def test_two_nodes_in_one_vpn_are_machines_of_their_own(isolated, tmp_path):
    ln = isolated
    host_port = int(ln.url.rsplit(":", 1)[1])
    # Something of the requestor's on the host's loopback, as the webserver is.
    webserver = socket.socket()
    webserver.bind(("127.0.0.1", 0))
    webserver.listen()
    webserver_port = webserver.getsockname()[1]
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    async def main():
        async with golem_node(ln) as node:
            network = await node.create_network("192.168.0.1/16")
            a, ip_a = await rent_node(node, network, "node-a")
            b, ip_b = await rent_node(node, network, "node-b")
            for activity in (a, b):
                await sh(activity, "python -m http.server 6379 >/dev/null 2>&1 &")
            for activity in (a, b):
                await sh(activity, "for i in $(seq 100); do python -c \"import socket; "
                                   "socket.create_connection(('127.0.0.1', 6379))\" 2>/dev/null && break; "
                                   "sleep 0.05; done")
            # Each reaches the other by its VPN address, on the same port both listen on.
            fetch = "python -c \"import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).status)\""
            assert (await sh(a, f"{fetch} http://{ip_b}:6379/")).strip() == "200"
            assert (await sh(b, f"{fetch} http://{ip_a}:6379/")).strip() == "200"
            # Neither reaches the host: not the webserver, not the local network's API.
            for activity in (a, b):
                assert await try_connect(activity, "127.0.0.1", webserver_port) == "ConnectionRefusedError"
                assert await try_connect(activity, "127.0.0.1", host_port) == "ConnectionRefusedError"
                routes = await sh(activity, "ip -4 route")
                assert routes.strip() == f"192.168.0.0/16 dev eth0 proto kernel scope link src " \
                                         f"{ip_a if activity is a else ip_b}", routes
            # The requestor reaches both only through the WebSocket bridge.
            assert "192.168." not in host_addresses()
            for ip in (ip_a, ip_b):
                reply = through_bridge(ln, network.id, ip, 6379, b"GET / HTTP/1.0\r\n\r\n", tmp_path)
                assert reply.startswith(b"HTTP/1.0 200"), reply[:200]
            # SSH into node-a as the original image's bring-up does: key by `run`, `service ssh start`.
            pub = Path(f"{key}.pub").read_text().strip()
            await sh(a, f"mkdir -p /root/.ssh && echo '{pub}' >> /root/.ssh/authorized_keys && service ssh start")
            known_hosts = tmp_path / "known_hosts"
            ssh = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                   "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
                   "-o", f"ProxyCommand={sys.executable} {REPO / 'ray_on_golem.py'} ssh-proxy {network.id} %h %p",
                   f"root@{ip_a}"]
            env = {**os.environ, "YAGNA_APPKEY": ln.app_key, "YAGNA_API_URL": ln.url}
            done = subprocess.run([*ssh, "hostname; echo ---; ps ax; echo ---; nproc; echo ---; free -m; echo ---; "
                                         "command -v python3 ray pip; python3 -c 'import sys, ray; "
                                         "print(sys.prefix, ray.__version__)'; echo ---; cat $(command -v ray)"],
                                  capture_output=True, text=True, env=env, timeout=120)
            assert done.returncode == 0, done.stderr
            hostname, ps, nproc, free, image, ray_command = done.stdout.split("---\n")
            assert hostname.strip() == "node-a"
            commands = [line.split(None, 4)[4] for line in ps.strip().splitlines()[1:]]
            assert commands[0].startswith("/bin/sh -s golem-node-init")  # PID 1 of the node
            assert not [c for c in commands if "golem_localnet" in c or "pytest" in c], commands
            assert any("http.server 6379" in c for c in commands) and any("sshd" in c for c in commands)
            pids = [int(line.split()[0]) for line in ps.strip().splitlines()[1:]]
            assert max(pids) < 1000 and pids[0] == 1
            assert nproc.strip() == "1"
            assert free.splitlines()[1].split()[1] == "1024"  # Mem: total, MiB
            # A plain login's PATH finds the image's Python and Ray (the local network's Python) in the
            # node's own /usr/local/bin, as on the python:3.10 based Golem image; the host's has none of it.
            import ray

            assert image.splitlines() == ["/usr/local/bin/python3", "/usr/local/bin/ray", "/usr/local/bin/pip",
                                          f"{sys.prefix} {ray.__version__}"], image
            assert ray_command == f'#!/bin/sh\nexec {Path(sys.executable).parent}/ray "$@"\n'
            host_ray = Path("/usr/local/bin/ray")
            assert not host_ray.exists() or host_ray.read_text(errors="replace") != ray_command
            # A password is never enough (root login by key only), and the host key is the node's own.
            denied = subprocess.run([*ssh[:-1], "-o", "PreferredAuthentications=password", ssh[-1], "true"],
                                    capture_output=True, text=True, env=env, timeout=60)
            assert denied.returncode == 255
            node_key = known_hosts.read_text().split()[-1]
            host_keys = " ".join(Path(p).read_text() for p in Path("/etc/ssh").glob("ssh_host_*_key.pub"))
            assert node_key not in host_keys
            # What the image's bring-up writes to /etc stays on the node.
            await sh(a, "echo 'NODE_IP=x' >> /etc/environment")
            assert "NODE_IP=x" not in Path("/etc/environment").read_text()
            for activity in (a, b):
                await activity.destroy()

    try:
        asyncio.run(main())
    finally:
        webserver.close()
    state = ln.state()
    assert state["isolation"]["mode"] == "namespaces"
    assert all(item["state"]["state"][0] == "Terminated" for item in state["activities"]["items"])
    # Destroyed: every node's processes and cgroups are gone while the local network still runs.
    assert node_cgroups(ln.pid) in ([], [p for p in node_cgroups(ln.pid) if p.endswith("-nodes")])
    assert not [pid for pid in node_inits() if pid in {i["initPid"] for i in state["activities"]["items"]}]


def test_a_node_sees_its_own_files_not_the_requestors(tmp_path):
    # Data dirs where a node's private /tmp and /root do not cover them: only hiding does.
    import shutil
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="rog-i11-", dir="/var/tmp"))
    requestor = outside / "requestor"
    requestor.mkdir()
    (requestor / "webserver.token").write_text("token-of-the-requestor")
    ln = start_localnet(outside / "requestor" / "localnet", profile=PROFILE, isolation="namespaces",
                        env={"RAY_ON_GOLEM_DATADIR": str(requestor)})
    try:
        async def main():
            async with golem_node(ln) as node:
                network = await node.create_network("192.168.0.1/24")
                a, _ = await rent_node(node, network, "node-a")
                b, _ = await rent_node(node, network, "node-c")
                await sh(a, "echo mine > /tmp/file; echo mine > /root/file; echo mine > /dev/shm/file")
                assert (await sh(b, "cat /tmp/file /root/file /dev/shm/file 2>&1 || true")).count("No such file") == 3
                seen = await sh(a, f"ls -A {requestor} {requestor}/localnet 2>&1; "
                                   f"cat {requestor}/webserver.token {requestor}/localnet/appkey 2>&1 || true")
                assert "token-of-the-requestor" not in seen and ln.app_key not in seen
                assert seen.count("No such file") == 3, seen
                assert "ray" in await sh(a, "python -c 'import ray; print(ray.__name__)'")  # the image's Ray
                # The image is the host's files, read-only but for copy-on-write layers: what a node
                # writes (the bring-up's /etc, a `pip install` into the image's Python) stays on it.
                probe = f"rog-i11-probe-{os.getpid()}"
                wrote = await sh(a, f"touch /{probe} 2>&1; touch /usr/local/{probe} {sys.prefix}/{probe} "
                                    f"/etc/{probe} && echo written")
                assert "Read-only file system" in wrote and "written" in wrote, wrote
                assert "written" not in await sh(b, f"ls /usr/local/{probe} 2>/dev/null && echo written || true")
                assert not [p for p in (f"/{probe}", f"/usr/local/{probe}", f"{sys.prefix}/{probe}", f"/etc/{probe}")
                            if os.path.exists(p)]
                for activity in (a, b):
                    await activity.destroy()

        asyncio.run(main())
    finally:
        assert stop_localnet(ln) == 0
        shutil.rmtree(outside)


def test_nodes_of_another_vpn_are_unreachable(isolated):
    ln = isolated

    async def main():
        async with golem_node(ln) as node:
            first = await node.create_network("192.168.0.1/24")
            second = await node.create_network("192.168.0.1/24")
            a, ip_a = await rent_node(node, first, "node-a", "192.168.0.2")
            c, ip_c = await rent_node(node, second, "node-c", "192.168.0.3")
            await sh(c, "python -m http.server 6379 >/dev/null 2>&1 &")
            await sh(c, "for i in $(seq 100); do python -c \"import socket; "
                        "socket.create_connection(('127.0.0.1', 6379))\" 2>/dev/null && break; sleep 0.05; done")
            assert await try_connect(c, ip_c, 6379) == "connected"
            assert await try_connect(a, ip_c, 6379) in ("OSError", "TimeoutError", "socket.timeout")
            for activity in (a, c):
                await activity.destroy()

    asyncio.run(main())


def test_a_node_offered_1_gib_cannot_hold_2_gib(isolated):
    from golem.resources import BatchError, Run

    ln = isolated

    async def main():
        async with golem_node(ln) as node:
            network = await node.create_network("192.168.0.1/24")
            a, _ = await rent_node(node, network, "node-a")
            assert (await sh(a, "python -c \"b = b'x' * (512 << 20); print(len(b) >> 20)\"")).strip() == "512"
            with pytest.raises(BatchError) as failed:
                await run(a, Run("python -c \"b = b'x' * (2 << 30); print(len(b))\""))
            assert "exited with code" in str(failed.value) or "Error" in str(failed.value)
            limit = await sh(a, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null "
                                "|| cat /sys/fs/cgroup/memory.max")
            assert int(limit) == 1 * GIB
            # Ray's own autodetection reports the offer (resources: {} works).
            detected = await sh(a, "RAY_DISABLE_DOCKER_CPU_WARNING=1 python -c 'import ray._private.utils as u; "
                                   "print(u.get_num_cpus(), u.get_system_memory())' 2>/dev/null")
            assert detected.split() == ["1", str(GIB)]
            await a.destroy()

    asyncio.run(main())


def test_100_concurrent_activities_leave_nothing_behind(isolated):
    import aiohttp

    ln = isolated
    headers = {"Authorization": f"Bearer {ln.app_key}"}

    async def main():
        async with golem_node(ln) as node, aiohttp.ClientSession(ln.url, headers=headers) as http:
            network = await node.create_network("192.168.0.1/16")
            _, agreement, provider_id = await rent(node, "node-b")

            async def call(method, path, body=None):
                async with http.request(method, path, json=body) as response:
                    assert response.status < 300, await response.text()
                    return await response.json()

            async def one(i: int) -> str:
                activity_id = await call("POST", f"{A}/activity", agreement.id)
                ip = f"192.168.1.{i + 2}"
                await call("POST", f"{N}/net/{network.id}/nodes", {"id": provider_id, "ip": ip})
                script = [{"deploy": {"net": [{"id": network.id, "ip": "192.168.0.0", "mask": "255.255.0.0",
                                               "nodeIp": ip}]}}, {"start": {}},
                          {"run": {"entry_point": "/bin/sh", "args": ["-c", "ip -4 -o addr show eth0"]}}]
                batch = await call("POST", f"{A}/activity/{activity_id}/exec", {"text": json.dumps(script)})
                for _ in range(200):
                    results = await call("GET", f"{A}/activity/{activity_id}/exec/{batch}?timeout=5")
                    if results and results[-1]["isBatchFinished"]:
                        break
                assert [r["result"] for r in results] == ["Ok", "Ok", "Ok"], results
                await call("DELETE", f"{A}/activity/{activity_id}")
                return results[-1]["stdout"].split()[3]

            addresses = await asyncio.gather(*(one(i) for i in range(100)))
            assert len(set(addresses)) == 100
            await call("DELETE", f"{N}/net/{network.id}")

    asyncio.run(main())
    # While the local network still runs: no node namespace, cgroup or init process is left.
    assert not [n for n in host_netns() if n.startswith(f"gln{ln.pid}-")]
    assert [p for p in node_cgroups(ln.pid) if not p.endswith("-nodes")] == []
    items = ln.state()["activities"]["items"]
    assert len(items) == 100 and not [p for p in node_inits() if p in {i["initPid"] for i in items}]


# ---- the end of a local network ---------------------------------------------------------


def test_a_killed_localnet_takes_its_nodes_and_the_next_one_reaps_the_rest(tmp_path):
    netns_before, links_before, inits_before = host_netns(), host_links(), node_inits()
    first = start_localnet(tmp_path / "first", profile=PROFILE, isolation="namespaces")

    async def main():
        node = golem_node(first)
        await node.start()
        network = await node.create_network("192.168.0.1/24")
        a, _ = await rent_node(node, network, "node-a")
        await sh(a, "setsid sleep 1000 >/dev/null 2>&1 &")
        init_pid = first.state()["activities"]["items"][0]["initPid"]
        assert pid_alive(init_pid) and [n for n in host_netns() if n.startswith(f"gln{first.pid}-")]
        stop_localnet(first, signal.SIGKILL)
        try:
            await node.aclose()  # its clean-up calls find nobody: the local network is gone
        except Exception:
            pass
        return init_pid

    try:
        init_pid = asyncio.run(main())
    finally:
        if first.proc.poll() is None:  # the test failed before the kill: never leave it running
            stop_localnet(first)
    for _ in range(100):  # the node's PID 1 dies with the local network (parent-death signal)
        if not pid_alive(init_pid):
            break
        time.sleep(0.05)
    assert not pid_alive(init_pid)
    second = start_localnet(tmp_path / "second", profile=PROFILE, isolation="namespaces")
    try:
        assert not [n for n in host_netns() if n.startswith(f"gln{first.pid}-")]
        assert node_cgroups(first.pid) == []
    finally:
        assert stop_localnet(second) == 0
    assert_nothing_left(second.pid, netns_before, links_before, inits_before)


def test_terminating_the_agreement_and_a_provider_fault_end_the_node(tmp_path):
    profile = {**PROFILE, "providers": 4,
               "explicit": [*PROFILE["explicit"], {"name": "dies", "dies_after_s": 2.0}]}
    netns_before, links_before, inits_before = host_netns(), host_links(), node_inits()
    ln = start_localnet(tmp_path / "ln", profile=profile, isolation="namespaces")
    try:
        async def main():
            from golem.resources import Deploy, Start

            async with golem_node(ln) as node:
                network = await node.create_network("192.168.0.1/24")
                a, _ = await rent_node(node, network, "node-a")
                await sh(a, "sleep 1000 >/dev/null 2>&1 &")
                await a.agreement.terminate()
                _, agreement, provider_id = await rent(node, "dies")
                d = await agreement.create_activity()
                ip = await network.create_node(provider_id)
                await run(d, Deploy({"net": [network.deploy_args(ip)]}), Start())
                for _ in range(200):
                    if (await d.get_state()).state[0] == "Terminated":
                        break
                    await asyncio.sleep(0.05)

        asyncio.run(main())
        items = ln.state()["activities"]["items"]
        assert [i["state"]["state"][0] for i in items] == ["Terminated", "Terminated"]
        assert not [p for p in node_inits() if p in {i["initPid"] for i in items}]
        assert [p for p in node_cgroups(ln.pid) if not p.endswith("-nodes")] == []
    finally:
        assert stop_localnet(ln) == 0
    assert_nothing_left(ln.pid, netns_before, links_before, inits_before)


# ---- modes and the registry -------------------------------------------------------------


def test_sandbox_mode_is_said_in_the_state(tmp_path):
    ln = start_localnet(tmp_path / "ln", providers=1, isolation="sandbox")
    try:
        assert ln.state()["isolation"] == {"mode": "sandbox", "reason": None, "prefix": None}
        assert json.loads((tmp_path / "ln" / "localnet.json").read_text())["isolation"] == "sandbox"
    finally:
        assert stop_localnet(ln) == 0


def test_the_registry_api_answers_like_the_golem_registry(tmp_path):
    ln = start_localnet(tmp_path / "ln", providers=0, isolation="sandbox")
    try:
        status, info = ln.call("GET", "/v1/image/info?tag=golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3&count=true",
                               key=None)
        assert status == 200
        assert info["tag"] == "golem/ray-on-golem:0.13.0-py3.10.13-ray2.9.3"
        assert len(info["sha3"]) == 56 and int(info["sha3"], 16) >= 0
        assert info["http"] == f"{ln.url}/download/{info['sha3']}" and info["downloads"] == 1
        status, by_hash = ln.call("GET", f"/v1/image/info?hash={info['sha3']}&count=false", key=None)
        assert status == 200 and by_hash["tag"] == info["tag"] and by_hash["downloads"] == 1
        assert ln.call("GET", "/v1/image/info?tag=golem/no-such-image:1&count=false", key=None)[0] == 404
        status, body = ln.call("GET", "/v1/image/info?hash=" + "ab" * 28, key=None)
        assert status == 404 and "does not exist" in body["message"]
        status, body = ln.call("GET", "/v1/image/info", key=None)
        assert status == 400 and "tag" in body["message"]
        # The requestor's demand building looks its image up there on the local network.
        import ray_on_golem as rog

        spec = rog.DemandSpec("local", image_tag=info["tag"], registry_url=ln.url)
        assert spec.resolve_image() == (info["sha3"], info["http"])
        with pytest.raises(rog.ConfigError, match="image tag `golem/no-such-image:1` does not exist"):
            rog.DemandSpec("local", image_tag="golem/no-such-image:1", registry_url=ln.url).resolve_image()
    finally:
        assert stop_localnet(ln) == 0


def test_ssh_proxy_needs_an_app_key_and_never_takes_it_from_argv(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YAGNA_", "RAY_ON_GOLEM_"))}
    env["RAY_ON_GOLEM_DATADIR"] = str(tmp_path / "empty")
    done = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), "ssh-proxy", "net", "192.168.0.2", "22"],
                          capture_output=True, text=True, env=env, input="")
    assert done.returncode == 2 and "no app key: set YAGNA_APPKEY" in done.stderr
    done = subprocess.run([sys.executable, str(REPO / "ray_on_golem.py"), "ssh-proxy", "net", "192.168.0.2", "0"],
                          capture_output=True, text=True, env=env, input="")
    assert done.returncode == 2 and "PORT must be 1..65535" in done.stderr


def test_without_root_auto_falls_back_to_the_sandbox_and_says_so_once():
    """As an unprivileged user (setpriv to nobody) no VM-like node can be made: `auto` runs the
    shared-loopback sandbox and says why once; `namespaces` refuses to start."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rog-i11-nobody-", dir="/var/tmp"))
    base.chmod(0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    serve = [sys.executable, str(REPO / "golem_localnet.py"), "serve", "--port", "0", "--providers", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YAGNA_", "RAY_ON_GOLEM_"))}
    env["TMPDIR"] = str(base)  # the sandbox's loopback locks: root's under /tmp are not nobody's
    try:
        refused = subprocess.run([*nobody, *serve, "--datadir", str(base / "strict"), "--isolation", "namespaces"],
                                 capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == 2
        assert "--isolation namespaces: not root" in refused.stderr
        proc = subprocess.Popen([*nobody, *serve, "--datadir", str(base / "auto"), "--isolation", "auto"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().startswith("golem-localnet listening on http://127.0.0.1:")
            state = json.loads((base / "auto" / "localnet.json").read_text())
            assert state["isolation"] == "sandbox" and state["isolation_reason"].startswith("not root")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        lines = [line for line in proc.stderr.read().splitlines() if "isolation" in line]
        assert lines == ["golem-localnet: isolation: sandbox (shared loopback), no VM-like nodes: not root "
                         "(network namespaces with bridges and cgroup limits need root)"]
        proc.stdout.close()
        proc.stderr.close()
    finally:
        shutil.rmtree(base)
