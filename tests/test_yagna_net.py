"""The real yagna's net API as our SSH path uses it, offline (issue 12, item 6).

`yagna service run` in a loopback-only network namespace (the `netns` fixture; the recipe of
`yagna_loopback_env`), started by the webserver for `payment_network: holesky`. What yagna can do
offline is checked against its answers: the app key the webserver stores for `ssh-proxy`, the
VPN calls golem-core makes for a node (create the network, add a provider's node), and the
WebSocket `ssh-proxy` opens. What it cannot do offline: reach a provider, so the WebSocket to a
node's port ends in yagna's 504 (no provider answers on the VPN) rather than in bytes of an sshd;
nor look images up in the Golem registry (registry.golem.network is on the internet: the local
network serves that API, tests/test_localnet_isolation.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from test_services import MODULE, ROOT, _make_services, _teardown

import ray_on_golem as rog

pytestmark = pytest.mark.yagna

PROVIDER_ID = "0x" + "ab" * 20  # a provider that is not on this (empty) network


def test_ssh_proxy_finds_the_app_key_and_url_and_the_net_api_answers_as_we_expect(tmp_path, netns):
    svc = _make_services(tmp_path, "holesky", netns)
    try:
        started = svc.start()
        assert started.returncode == 0, started.stdout + started.stderr
        # The app key the webserver uses, stored for ssh-proxy: 0600, the key yagna holds by our app name.
        key_file = os.path.join(svc.datadir, rog.YAGNA_APPKEY_FILE)
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        listed = subprocess.run(["ip", "netns", "exec", netns, "yagna", "app-key", "list", "--json"],
                                capture_output=True, text=True, env=svc.env, timeout=60)
        assert listed.returncode == 0, listed.stderr
        keys = {k["name"]: k["key"] for k in json.loads(listed.stdout)}
        with open(key_file) as f:
            assert f.read().strip() == keys[rog.DEFAULT_YAGNA_APPNAME]
        api_url = svc.runtime()["yagna"]["url"]
        assert api_url == svc.env["YAGNA_API_URL"]

        # Ray runs ssh (and so ssh-proxy) in the user's shell: no YAGNA_APPKEY, no YAGNA_API_URL.
        shell = {k: v for k, v in svc.env.items() if k not in ("YAGNA_APPKEY", "YAGNA_API_URL")}
        probe = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c",
             "import json, sys, ray_on_golem as rog; d = sys.argv[1]; "
             "print(json.dumps([rog.vpn_app_key(d), "
             "rog.vpn_net_api_url(d, (rog.read_runtime(d).get('yagna') or {}).get('url'))]))", svc.datadir],
            capture_output=True, text=True, env={**shell, "PYTHONPATH": ROOT}, timeout=60)
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout) == [keys[rog.DEFAULT_YAGNA_APPNAME], f"{api_url}/net-api/v1"]

        # golem-core's VPN calls as the webserver makes them for a cluster and a node, then the
        # WebSocket of ssh-proxy (run as Ray runs it), against the real yagna.
        script = tmp_path / "net_calls.py"
        script.write_text(NET_CALLS)
        calls = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(script), svc.datadir, MODULE,
                                PROVIDER_ID], capture_output=True, text=True, timeout=180,
                               env={**shell, "PYTHONPATH": ROOT})
        assert calls.returncode == 0, calls.stdout + calls.stderr
        seen = json.loads(calls.stdout.splitlines()[-1])
        # create_network("10.N.0.0/16") as Cluster.ensure_vpn: yagna's network, the requestor at .1
        assert seen["network"]["ip"] == "10.7.0.0/16" and seen["network"]["mask"] == "255.255.0.0"
        assert {a["ip"] for a in seen["addresses"]} == {"10.7.0.1/16"}
        # create_node(provider): the node at the next free address, the deploy's `net` entry for it
        assert seen["node_ip"] == "10.7.0.2"
        assert seen["nodes"] == {"10.7.0.2": PROVIDER_ID}
        assert seen["deploy"]["id"] == seen["network"]["id"] and seen["deploy"]["nodeIp"] == "10.7.0.2"
        # ssh-proxy with the key and URL from the data dir: yagna takes the WebSocket path and key,
        # and tries the node through the VPN; offline no provider answers (504), never a 401 or 404.
        proxy = seen["ssh_proxy"]
        assert proxy["code"] != 0 and "the net API refused the connection: HTTP/1.1 504" in proxy["stderr"], proxy
        assert "Traceback" not in proxy["stderr"]
        wrong_key = seen["ssh_proxy_wrong_key"]
        assert wrong_key["code"] != 0 and "HTTP/1.1 401" in wrong_key["stderr"], wrong_key
        # yagna's answers where the local network says more (its 404s name the missing network or node):
        # an unknown network is 403 with no body, an address no node holds is 504 like a silent node.
        no_such_net = seen["ssh_proxy_no_such_network"]
        assert no_such_net["code"] != 0 and "HTTP/1.1 403" in no_such_net["stderr"], no_such_net
        assert seen["get_no_such_network"] == [403, None]
        assert "HTTP/1.1 504" in seen["ssh_proxy_no_such_node"]["stderr"]
        # golem-core deleted the network on close: nothing left on yagna
        assert seen["networks_after"] == []
        assert svc.stop().returncode == 0
    finally:
        _teardown(svc)


NET_CALLS = r'''
import asyncio, json, os, subprocess, sys
import ray_on_golem as rog
from golem.node import GolemNode

datadir, module, provider_id = sys.argv[1:4]
key = rog.vpn_app_key(datadir)
api_url = rog.read_runtime(datadir)["yagna"]["url"]
net_url = rog.vpn_net_api_url(datadir, api_url)


def get(path):
    status, data = rog.http_request("GET", net_url + path, token=key, timeout=30)
    assert status == 200, (path, status, data)
    return data


def ssh_proxy(network_id, ip, extra_env=None):
    done = subprocess.run([sys.executable, module, "ssh-proxy", "--datadir", datadir, network_id, ip, "22"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(extra_env or {})})
    return {"code": done.returncode, "stderr": done.stderr[-600:]}


async def main():
    seen = {}
    async with GolemNode(app_key=key, api_url=api_url) as golem:
        network = await golem.create_network("10.7.0.0/16")
        seen["node_ip"] = await network.create_node(provider_id)
        seen["deploy"] = network.deploy_args(seen["node_ip"])
        seen["network"] = get(f"/net/{network.id}")
        seen["addresses"] = get(f"/net/{network.id}/addresses")
        seen["nodes"] = {n["ip"]: n["id"] for n in get(f"/net/{network.id}/nodes")}
        loop = asyncio.get_running_loop()
        seen["ssh_proxy"] = await loop.run_in_executor(None, ssh_proxy, network.id, seen["node_ip"])
        seen["ssh_proxy_wrong_key"] = await loop.run_in_executor(
            None, ssh_proxy, network.id, seen["node_ip"], {"YAGNA_APPKEY": "not-the-key"})
        seen["ssh_proxy_no_such_network"] = await loop.run_in_executor(None, ssh_proxy, "f" * 32, "10.7.0.2")
        seen["get_no_such_network"] = rog.http_request("GET", f"{net_url}/net/{'f' * 32}", token=key, timeout=30)
        seen["ssh_proxy_no_such_node"] = await loop.run_in_executor(None, ssh_proxy, network.id, "10.7.0.9")
    seen["networks_after"] = get("/net")
    print(json.dumps(seen))


asyncio.run(main())
'''
