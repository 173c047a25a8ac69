#!/usr/bin/env python3
"""The local Golem network: a yagna-compatible REST daemon and a simulated provider population.

Runs as its own process (`python golem_localnet.py serve ...`). The unmodified
golem-core must not be able to tell it from yagna; see
../shared/reference/yagna-api.md. `ray_on_golem.py` never imports this file, it
only starts it. Standard library only on the server side.

Sections, in dependency order:

    1.  Constants and clock         time scale, timestamps
    2.  HTTP                        asyncio HTTP/1.1 server, handler class, JSON errors
    3.  Population                  seeded provider profiles, offers, behaviours
    4.  Identity                    /me, app key
    5.  Market                      demands, offers, proposals, negotiation, agreements
    6.  Activities                  sandboxed process groups, ExeScript
    7.  Net                         VPN networks, TCP-over-WebSocket bridge
    8.  Payments                    allocations, debit notes, invoices
    9.  Routes                      the route table: method + path -> handler method
    10. CLI                         `serve`
"""

from __future__ import annotations

import sys

###############################################################################
# 1. Constants and clock ######################################################
###############################################################################


###############################################################################
# 2. HTTP #####################################################################
###############################################################################


###############################################################################
# 3. Population ###############################################################
###############################################################################


###############################################################################
# 4. Identity #################################################################
###############################################################################


###############################################################################
# 5. Market ###################################################################
###############################################################################


###############################################################################
# 6. Activities ###############################################################
###############################################################################


# Section-local imports: kept here (not in the header) so that the parallel
# branches editing sections 1-5 do not conflict on the import block.
import asyncio as _asyncio
import ctypes as _ctypes
import fcntl as _fcntl
import hashlib as _hashlib
import os as _os
import random as _random
import signal as _signal
import subprocess as _subprocess
import tempfile as _tempfile
import time as _time
import uuid as _uuid
from dataclasses import dataclass as _dataclass, field as _field
from datetime import datetime as _datetime, timezone as _timezone
from decimal import Decimal as _Decimal
from pathlib import Path as _Path

ACTIVITY_MARKER_ENV = "GOLEM_LOCALNET_ACTIVITY"
# The exe-unit's batch-result long-poll never holds longer than this (yagna-api.md §2.0:
# golem-core's client timeout for it is 5.5 s).
BATCH_POLL_MAX_SECONDS = 5.0
# stdout/stderr of one `run` returned in its result (the tail beyond is dropped).
CAPTURE_LIMIT_BYTES = 1 << 20
_CLK_TCK = _os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36


class ActivityApiError(Exception):
    """A request the activity/net/payment engines refuse: carries the HTTP status for the route."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _iso_now() -> str:
    """Timezone-aware, microsecond timestamp (yagna-api.md §3.5: naive or ns timestamps kill loops)."""
    return _datetime.now(_timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _new_id() -> str:
    return _uuid.uuid4().hex


# --- the process table ------------------------------------------------------


@_dataclass(frozen=True)
class ProcInfo:
    """One line of /proc/<pid>/stat, the fields process ownership and pricing need."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    ticks: int  # utime + stime + cutime + cstime: own CPU plus that of reaped children
    start: int  # start time in ticks since boot: (pid, start) names a process, immune to PID reuse


def read_proc(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        sid=int(fields[3]),
        ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
        start=int(fields[19]),
    )


def read_proc_table() -> dict[int, ProcInfo]:
    """Every process of the machine, one pass over /proc."""
    table = {}
    for name in _os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def become_subreaper() -> bool:
    """Make this process the reaper of orphaned descendants (Linux prctl), so a daemon started by
    an activity that double-forks is re-parented here, stays attributable and gets its CPU counted."""
    try:
        libc = _ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# --- loopback addresses -----------------------------------------------------


class LoopbackPool:
    """Gives every activity an address of its own in 127.B.0.0/16.

    All of 127.0.0.0/8 reaches `lo` on Linux without configuration, so a node can bind
    `NODE_IP:port` like a VM binds its VPN address. B is claimed with an flock per localnet
    process so that several local networks on one machine (tests of other engineers, CI) never
    hand out the same address. The third octet is the network's slot, the fourth follows the VPN
    address when free: 192.168.0.3 of the first network -> 127.B.1.3.
    """

    def __init__(self, lock_dir: str | None = None):
        self._lock_dir = _Path(lock_dir or _tempfile.gettempdir()) / "golem-localnet-loopback"
        self._lock_dir.mkdir(mode=0o755, exist_ok=True)
        self._lock_file = None
        self.block = self._claim_block()
        self._net_slots: dict[str, int] = {}
        self._taken: set[str] = set()

    def _claim_block(self) -> int:
        start = _os.getpid() % 200
        for i in range(200):
            block = 20 + (start + i) % 200  # 127.20.-.- .. 127.219.-.-: clear of 127.0.0.x
            f = open(self._lock_dir / f"{block}.lock", "w")
            try:
                _fcntl.flock(f, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock_file = f
            return block
        raise RuntimeError(f"no free loopback block left under {self._lock_dir}")

    def allocate(self, net_id: str | None, vpn_ip: str | None) -> str:
        if net_id is None:
            slot = 0
        else:
            slot = self._net_slots.setdefault(net_id, len(self._net_slots) % 255 + 1)
        preferred = [int(vpn_ip.rsplit(".", 1)[1])] if vpn_ip else []
        for host in preferred + list(range(2, 255)):
            for third in [slot] + [t for t in range(256) if t != slot]:
                ip = f"127.{self.block}.{third}.{host}"
                if 1 <= host <= 254 and ip not in self._taken:
                    self._taken.add(ip)
                    return ip
        raise RuntimeError("loopback block exhausted")

    def release(self, ip: str) -> None:
        self._taken.discard(ip)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


# --- the sandbox ------------------------------------------------------------


class Sandbox:
    """The 'virtual machine' of one activity: a directory as HOME, TMPDIR inside it, an own
    loopback address, and every process it starts.

    Ownership is tracked three ways because none is enough alone (ray-provider.md §3.3): each
    command runs in a session of its own (start_new_session), descendants are followed through
    their parent links on every scan, and an environment marker catches orphans that called
    setsid. The marker alone is not enough: Ray's processes rewrite /proc/<pid>/environ.
    """

    def __init__(self, root: _Path, activity_id: str):
        self.activity_id = activity_id
        self.home = root / activity_id
        self.tmp = self.home / "tmp"
        self.exe_dir = self.home / ".exe"
        for d in (self.home, self.tmp, self.exe_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.loopback_ip: str | None = None
        self.vpn_ip: str | None = None
        self.sessions: set[int] = set()
        self.known: set[tuple[int, int]] = set()  # (pid, start) of processes seen as ours
        self.finished_seconds = _Decimal(0)  # CPU of processes reaped by the localnet itself
        self._captures = 0
        self._cpu_reported = _Decimal(0)
        self._marker = f"{ACTIVITY_MARKER_ENV}={activity_id}".encode()

    def environment(self, extra: dict | None = None) -> dict[str, str]:
        env = {k: v for k, v in _os.environ.items() if not k.startswith("YAGNA_")}  # never leak the app key
        env.update(
            HOME=str(self.home),
            TMPDIR=str(self.tmp),
            NODE_IP=self.loopback_ip or "127.0.0.1",
            GOLEM_VPN_IP=self.vpn_ip or "",
            PWD=str(self.home),
            **{ACTIVITY_MARKER_ENV: self.activity_id},
        )
        if extra:
            env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def owned(self, table: dict[int, ProcInfo]) -> dict[int, ProcInfo]:
        """The sandbox's processes in `table`; remembers them so their orphans stay ours."""
        me = _os.getpid()
        owned = {
            pid: info
            for pid, info in table.items()
            if info.sid in self.sessions or (pid, info.start) in self.known
        }
        # Descendants of owned processes, to a fixed point (setsid'd children of a daemon).
        children: dict[int, list[ProcInfo]] = {}
        for info in table.values():
            children.setdefault(info.ppid, []).append(info)
        stack = list(owned)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child.pid not in owned:
                    owned[child.pid] = child
                    stack.append(child.pid)
        # Orphans re-parented to the localnet (subreaper) that left our sessions.
        for child in children.get(me, ()):
            if child.pid not in owned and child.state != "Z" and _environ_has(child.pid, self._marker):
                owned[child.pid] = child
        self.known = {(pid, info.start) for pid, info in owned.items()}
        return owned

    def cpu_seconds(self, table: dict[int, ProcInfo]) -> _Decimal:
        """CPU seconds of the whole process tree, dead and alive; never decreases."""
        live = sum(info.ticks for info in self.owned(table).values())
        total = self.finished_seconds + _Decimal(live) / _CLK_TCK
        self._cpu_reported = max(self._cpu_reported, total)
        return self._cpu_reported

    def add_rusage(self, rusage) -> None:
        # wait4 gives the reaped process's CPU including its own reaped descendants.
        self.finished_seconds += _Decimal(str(rusage.ru_utime)) + _Decimal(str(rusage.ru_stime))

    def signal_all(self, table: dict[int, ProcInfo], sig: int) -> set[int]:
        pids = {pid for pid, info in self.owned(table).items() if info.state != "Z"}
        for pid in pids:
            try:
                _os.kill(pid, sig)
            except OSError:
                pass
        return pids


# --- ExeScript --------------------------------------------------------------


@_dataclass
class Batch:
    """One ExeScript batch: its commands and the cumulative results golem-core polls."""

    batch_id: str
    commands: list
    results: list = _field(default_factory=list)
    finished: bool = False
    changed: _asyncio.Event = _field(default_factory=_asyncio.Event)

    def add_result(self, result: dict) -> None:
        self.results.append(result)
        if result["isBatchFinished"]:
            self.finished = True
        self.changed.set()
        self.changed = _asyncio.Event()


@_dataclass
class ActivityFaults:
    """Provider-profile faults that touch activities (profile fields `deploy_fails`,
    `dies_after`, `stops_answering_after`); decided once per activity from the seed."""

    deploy_fails: bool = False
    dies_after: float | None = None  # seconds after create: the activity terminates with an error
    stops_answering_after: float | None = None  # seconds after create: exe-unit calls get GSB errors

    @classmethod
    def from_profile(cls, profile: dict | None, seed: int | str, activity_ordinal: int, provider_id: str):
        """`profile` keys: `deploy_fails` (probability 0..1), `dies_after` and `stops_answering_after`
        (seconds, a number or [low, high] drawn uniformly); absent keys mean no fault."""
        profile = profile or {}
        key = f"{seed}:{provider_id}:{activity_ordinal}".encode()
        rng = _random.Random(int.from_bytes(_hashlib.sha256(key).digest()[:8], "big"))

        def seconds(name):
            value = profile.get(name)
            if value is None:
                return None
            if isinstance(value, (list, tuple)):
                return rng.uniform(float(value[0]), float(value[1]))
            return float(value)

        probability = float(profile.get("deploy_fails") or 0)
        return cls(
            deploy_fails=rng.random() < probability,
            dies_after=seconds("dies_after"),
            stops_answering_after=seconds("stops_answering_after"),
        )


class Activity:
    """One activity: the exe-unit state machine over a Sandbox (yagna-api.md §2.8-§2.9)."""

    def __init__(self, engine: "ActivityEngine", activity_id: str, agreement, faults: ActivityFaults):
        self.engine = engine
        self.activity_id = activity_id
        self.agreement = agreement
        self.agreement_id = agreement.agreement_id
        self.provider_id = agreement.provider_id
        self.faults = faults
        self.state = ["Initialized", None]
        self.reason: str | None = None
        self.error_message: str | None = None
        self.created_monotonic = _time.monotonic()
        self.created_at = _iso_now()
        self.sandbox = Sandbox(engine.sandbox_root, activity_id)
        self.deploy_net: list = []
        self.batches: dict[str, Batch] = {}
        self._queue: _asyncio.Queue = _asyncio.Queue()
        self._current: Batch | None = None
        self._worker = _asyncio.ensure_future(self._run_batches())
        self._timers: list[_asyncio.TimerHandle] = []
        loop = _asyncio.get_running_loop()
        if faults.dies_after is not None:
            self._timers.append(loop.call_later(faults.dies_after, self._die))
        self.terminated = _asyncio.Event()

    # -- state --

    @property
    def alive(self) -> bool:
        return self.state[0] != "Terminated"

    def answering(self) -> bool:
        limit = self.faults.stops_answering_after
        return limit is None or _time.monotonic() - self.created_monotonic < limit

    def check_answering(self) -> None:
        if not self.answering():
            # What yagna's router answers when the provider's node is gone (yagna-api.md §2.0).
            raise ActivityApiError(
                500, f"GSB error: GSB failure: Bad request: endpoint address not found: /net/{self.provider_id}/exeunit"
            )

    def state_json(self) -> dict:
        return {"state": list(self.state), "reason": self.reason, "errorMessage": self.error_message}

    def wall_seconds(self) -> _Decimal:
        return _Decimal(str(round(_time.monotonic() - self.created_monotonic, 6)))

    def _die(self) -> None:
        _asyncio.ensure_future(self.engine.terminate(self.activity_id, "activity died", error="Activity process exited"))

    # -- batches --

    def submit(self, commands: list) -> str:
        if not self.alive:
            raise ActivityApiError(400, f"Activity {self.activity_id} is terminated")
        if not isinstance(commands, list) or not commands:
            raise ActivityApiError(400, "exe script `text` must be a non-empty JSON list of commands")
        batch = Batch(_new_id(), commands)
        self.batches[batch.batch_id] = batch
        self._queue.put_nowait(batch)
        return batch.batch_id

    async def results(self, batch_id: str, timeout: float, command_index: int | None = None) -> list:
        """Cumulative results from index 0; blocks until the batch (or `command_index`) is done or
        `timeout` passes (exe-unit semantics, yagna-api.md §2.0)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ActivityApiError(404, f"Batch {batch_id} not found for activity {self.activity_id}")
        deadline = _time.monotonic() + max(0.0, min(timeout, BATCH_POLL_MAX_SECONDS))

        def done():
            if command_index is not None:
                return len(batch.results) > command_index or batch.finished
            return batch.finished

        while not done():
            remaining = deadline - _time.monotonic()
            if remaining <= 0:
                break
            try:
                await _asyncio.wait_for(batch.changed.wait(), remaining)
            except _asyncio.TimeoutError:
                break
        if command_index is not None:
            return batch.results[: command_index + 1]
        return list(batch.results)

    async def _run_batches(self) -> None:
        while True:
            batch = await self._queue.get()
            if batch.finished:  # closed by a termination while queued
                continue
            self._current = batch
            for index, command in enumerate(batch.commands):
                ok, stdout, stderr, message = await self._command(command)
                last = index == len(batch.commands) - 1
                batch.add_result(
                    {
                        "index": index,
                        "eventDate": _iso_now(),
                        "result": "Ok" if ok else "Error",
                        "stdout": stdout,
                        "stderr": stderr,
                        "message": message,
                        # yagna ends a batch at its first error (yagna-api.md §2.9.3).
                        "isBatchFinished": last or not ok,
                    }
                )
                if not ok:
                    break
            self._current = None

    def fail_pending(self, message: str) -> None:
        """Finish every unfinished batch with an error result (the activity is gone)."""
        for batch in self.batches.values():
            if not batch.finished and batch is not self._current:
                batch.add_result(
                    {
                        "index": len(batch.results),
                        "eventDate": _iso_now(),
                        "result": "Error",
                        "stdout": None,
                        "stderr": None,
                        "message": message,
                        "isBatchFinished": True,
                    }
                )

    async def _command(self, command) -> tuple[bool, str | None, str | None, str | None]:
        if not isinstance(command, dict) or len(command) != 1:
            return False, None, None, f"invalid ExeScript command {command!r}: expected one {{name: args}} object"
        name, args = next(iter(command.items()))
        args = args or {}
        if not self.alive:
            return False, None, None, f"Activity {self.activity_id} is terminated"
        handler = getattr(self, f"_exe_{name}", None)
        if handler is None:
            return False, None, None, f"ExeScript command `{name}` is not supported by the local network"
        if not isinstance(args, dict):
            return False, None, None, f"ExeScript command `{name}`: arguments must be an object"
        return await handler(args)

    async def _exe_deploy(self, args: dict):
        if self.state[0] != "Initialized":
            return False, None, None, f"deploy: activity is {self.state[0]}, not Initialized"
        net = args.get("net") or []
        if not isinstance(net, list) or not all(isinstance(n, dict) for n in net):
            return False, None, None, "deploy: `net` must be a list of network objects"
        self.state = ["Initialized", "Deployed"]
        if self.faults.deploy_fails:
            # The provider's profile says the image never comes up.
            await self.engine.terminate(
                self.activity_id, "deploy failed", error="Deployment failed: image unavailable", from_batch=True
            )
            return False, None, None, "Deployment failed: image unavailable"
        self.deploy_net = net
        first = net[0] if net else {}
        self.sandbox.vpn_ip = first.get("nodeIp")
        self.sandbox.loopback_ip = self.engine.loopback.allocate(first.get("id"), first.get("nodeIp"))
        self.state = ["Deployed", None]
        return True, None, None, None

    async def _exe_start(self, args: dict):
        if self.state[0] != "Deployed":
            return False, None, None, f"start: activity is {self.state[0]}, not Deployed"
        self.state = ["Ready", None]
        return True, None, None, None

    async def _exe_run(self, args: dict):
        if self.state[0] != "Ready":
            return False, None, None, f"run: activity is {self.state[0]}, not Ready (deploy and start first)"
        entry_point = args.get("entry_point")
        argv_rest = args.get("args") or []
        if not isinstance(entry_point, str) or not entry_point:
            return False, None, None, "run: `entry_point` must be a non-empty string"
        if not isinstance(argv_rest, list) or not all(isinstance(a, str) for a in argv_rest):
            return False, None, None, "run: `args` must be a list of strings"
        env = args.get("env") if isinstance(args.get("env"), dict) else None
        try:
            code, stdout, stderr = await self.engine.spawn(self, [entry_point, *argv_rest], env)
        except OSError as e:
            return False, None, None, f"run: cannot execute {entry_point}: {e.strerror}"
        if code != 0:
            return False, stdout, stderr, f"ExeScript command exited with code {code}"
        return True, stdout, stderr, None

    async def _exe_terminate(self, args: dict):
        await self.engine.terminate(self.activity_id, "terminated by ExeScript", from_batch=True)
        return True, None, None, None


class ActivityEngine:
    """All activities of the local network: creation from agreements, ExeScript, process
    accounting, and killing every process an activity started when it ends."""

    def __init__(self, datadir: str | _Path, seed: int | str = 0, on_terminated=None):
        self.sandbox_root = _Path(datadir) / "activities"
        self.sandbox_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.seed = seed
        self.activities: dict[str, Activity] = {}
        self.loopback = LoopbackPool()
        self.subreaper = become_subreaper()
        # on_terminated(activity) -> None: the payment section issues the last debit note etc.
        self.on_terminated = on_terminated
        self._children: dict[int, Activity] = {}  # direct children (pid) -> owner
        self._reaper: _asyncio.TimerHandle | None = None
        self._ordinal = 0

    def create(self, agreement, fault_profile: dict | None = None) -> Activity:
        """`agreement` needs: agreement_id, provider_id, state ('Approved' to create)."""
        if getattr(agreement, "state", "Approved") != "Approved":
            # yagna: core/activity/src/provider/service.rs (yagna-api.md §2.7)
            raise ActivityApiError(
                400, f"Bad request: Agreement {agreement.agreement_id} is not Approved. Current state: {agreement.state}"
            )
        self._ordinal += 1
        faults = ActivityFaults.from_profile(fault_profile, self.seed, self._ordinal, agreement.provider_id)
        activity = Activity(self, _new_id(), agreement, faults)
        self.activities[activity.activity_id] = activity
        return activity

    def get(self, activity_id: str) -> Activity:
        activity = self.activities.get(activity_id)
        if activity is None:
            raise ActivityApiError(404, f"Activity {activity_id} not found")
        return activity

    def by_node(self, net_id: str, ip: str) -> Activity | None:
        """The live activity deployed on VPN `net_id` with address `ip`."""
        for activity in self.activities.values():
            if activity.alive and any(n.get("id") == net_id and n.get("nodeIp") == ip for n in activity.deploy_net):
                return activity
        return None

    # -- processes --

    async def spawn(self, activity: Activity, argv: list[str], env: dict | None):
        """Run one command in the sandbox; return (exit code, stdout, stderr) when *it* exits.

        Output goes to files, not pipes: a daemon started in the background keeps the
        inherited descriptors open, and the command must still return when its own process ends.
        """
        sandbox = activity.sandbox
        sandbox._captures += 1
        out_path = sandbox.exe_dir / f"{sandbox._captures}.stdout"
        err_path = sandbox.exe_dir / f"{sandbox._captures}.stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = _subprocess.Popen(
                argv,
                cwd=sandbox.home,
                env=sandbox.environment(env),
                stdin=_subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        sandbox.sessions.add(proc.pid)
        self._children[proc.pid] = activity
        try:
            status, rusage = await self._wait_child(proc.pid)
        finally:
            self._children.pop(proc.pid, None)
        proc.returncode = _os.waitstatus_to_exitcode(status)  # Popen must never waitpid a reused pid
        sandbox.add_rusage(rusage)
        return proc.returncode, _read_capture(out_path), _read_capture(err_path)

    async def _wait_child(self, pid: int):
        loop = _asyncio.get_running_loop()
        done = loop.create_future()
        pidfd = _os.pidfd_open(pid)

        def ready():
            try:
                wpid, status, rusage = _os.wait4(pid, _os.WNOHANG)
            except ChildProcessError:
                wpid, status, rusage = pid, 0, None
            if wpid == 0:
                return
            loop.remove_reader(pidfd)
            _os.close(pidfd)
            if not done.done():
                done.set_result((status, rusage))

        loop.add_reader(pidfd, ready)
        status, rusage = await done
        if rusage is None:
            rusage = _ZeroUsage()
        return status, rusage

    def reap_orphans(self, table: dict[int, ProcInfo] | None = None) -> None:
        """Reap zombie orphans re-parented here (subreaper) that belong to an activity, counting
        their CPU; never touches children the localnet waits for itself."""
        table = read_proc_table() if table is None else table
        me = _os.getpid()
        for info in table.values():
            if info.ppid != me or info.state != "Z" or info.pid in self._children:
                continue
            owner = next(
                (
                    a
                    for a in self.activities.values()
                    if info.sid in a.sandbox.sessions or (info.pid, info.start) in a.sandbox.known
                ),
                None,
            )
            if owner is None:
                continue
            try:
                wpid, _status, rusage = _os.wait4(info.pid, _os.WNOHANG)
            except ChildProcessError:
                continue
            if wpid:
                owner.sandbox.add_rusage(rusage)

    def cpu_seconds(self, activity: Activity) -> _Decimal:
        table = read_proc_table()
        self.reap_orphans(table)
        return activity.sandbox.cpu_seconds(table)

    async def kill_processes(self, activity: Activity) -> None:
        """Kill every process of the sandbox: freeze (SIGSTOP, so none can fork), rescan, SIGKILL,
        until a scan finds none alive; then wait until they are reaped."""
        sandbox = activity.sandbox
        for _ in range(50):
            table = read_proc_table()
            if not sandbox.signal_all(table, _signal.SIGSTOP):
                break
            table = read_proc_table()
            sandbox.cpu_seconds(table)  # last look at their CPU before they go
            sandbox.signal_all(table, _signal.SIGKILL)
            for sid in sandbox.sessions:
                try:
                    _os.killpg(sid, _signal.SIGKILL)
                except OSError:
                    pass
            await _asyncio.sleep(0.005)
            self.reap_orphans()
        # Wait for the zombies of our direct children and orphans to be reaped.
        for _ in range(200):
            table = read_proc_table()
            self.reap_orphans(table)
            me = _os.getpid()
            left = [i for i in sandbox.owned(table).values() if i.state != "Z" or i.ppid == me]
            if not left:
                return
            await _asyncio.sleep(0.01)

    # -- ending --

    async def terminate(
        self, activity_id: str, reason: str, error: str | None = None, from_batch: bool = False
    ) -> Activity:
        """Idempotent end of an activity: state Terminated, every process killed, batches closed.
        `from_batch`: called by a command of the running batch, which then reports its own result."""
        activity = self.get(activity_id)
        if not activity.alive:
            await activity.terminated.wait()
            return activity
        activity.state = ["Terminated", None]
        activity.reason = reason
        activity.error_message = error
        for timer in activity._timers:
            timer.cancel()
        if not from_batch:
            activity._worker.cancel()
            activity._current = None
        await self.kill_processes(activity)
        activity.final_cpu_seconds = activity.sandbox.cpu_seconds(read_proc_table())
        activity.final_wall_seconds = activity.wall_seconds()
        if activity.sandbox.loopback_ip:
            self.loopback.release(activity.sandbox.loopback_ip)
        activity.fail_pending(error or f"Activity terminated: {reason}")
        if self.on_terminated is not None:
            self.on_terminated(activity)
        activity.terminated.set()
        return activity

    async def destroy(self, activity_id: str) -> None:
        """DELETE /activity/{id}: idempotent (golem-core calls it 2-3 times, yagna-api.md §2.1)."""
        await self.terminate(activity_id, "destroyed by requestor")

    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        for activity in list(self.activities.values()):
            if activity.agreement_id == agreement_id and activity.alive:
                await self.terminate(activity.activity_id, reason)

    async def shutdown(self) -> None:
        """Localnet exit: nothing outlives it."""
        await _asyncio.gather(
            *(self.terminate(a.activity_id, "local network shut down") for a in list(self.activities.values()) if a.alive)
        )
        self.loopback.close()


class _ZeroUsage:
    ru_utime = 0.0
    ru_stime = 0.0


def _read_capture(path: _Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, _os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - CAPTURE_LIMIT_BYTES))
        return f.read().decode("utf-8", errors="replace")


###############################################################################
# 7. Net ######################################################################
###############################################################################


import base64 as _base64
import ipaddress as _ipaddress
import struct as _struct

# RFC 6455 §1.3: the GUID every server appends to Sec-WebSocket-Key.
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_MAX_FRAME = 16 << 20
# yagna pings the requestor's socket every 5 s (yagna-api.md §2.10); a ping also keeps proxies honest.
WS_PING_INTERVAL = 5.0


@_dataclass
class VpnNetwork:
    """A requestor's VPN (yagna core/vpn/src/network.rs): a CIDR, the requestor's own addresses
    and the provider nodes with theirs."""

    network_id: str
    network: _ipaddress.IPv4Network
    gateway: str | None
    addresses: list = _field(default_factory=list)  # the requestor's IPs
    nodes: dict = _field(default_factory=dict)  # ip -> node (provider) id

    def json(self) -> dict:
        # `ip` WITH the prefix: without it golem-core sees a /32 and raises NetworkFull (§2.10).
        return {
            "id": self.network_id,
            "ip": f"{self.network.network_address}/{self.network.prefixlen}",
            "mask": str(self.network.netmask),
            "gateway": self.gateway,
        }

    def _host(self, value, field_name: str) -> str:
        if not isinstance(value, str):
            raise ActivityApiError(400, f"`{field_name}` must be an IPv4 address string")
        try:
            ip = _ipaddress.IPv4Address(value)
        except ValueError:
            raise ActivityApiError(400, f"`{field_name}`: {value!r} is not an IPv4 address") from None
        if ip not in self.network:
            raise ActivityApiError(400, f"`{field_name}`: {value} is outside network {self.network}")
        return str(ip)


class NetRegistry:
    """The net API's networks (yagna-api.md §2.10); node addresses resolve to activities."""

    def __init__(self):
        self.networks: dict[str, VpnNetwork] = {}

    def create(self, body) -> dict:
        if not isinstance(body, dict):
            raise ActivityApiError(400, "network body must be a JSON object with `ip`")
        ip, mask, gateway = body.get("ip"), body.get("mask"), body.get("gateway")
        if not isinstance(ip, str) or not ip:
            raise ActivityApiError(400, "`ip` is required: the network address, e.g. 192.168.0.0/16")
        try:
            if mask is not None:
                if "/" in ip:
                    raise ActivityApiError(400, "give either `ip` with a /prefix or `mask`, not both")
                network = _ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)
            elif "/" in ip:
                network = _ipaddress.IPv4Network(ip, strict=False)
            else:
                # yagna's default for a bare address is a /24 (core/vpn/src/network.rs).
                network = _ipaddress.IPv4Network(f"{ip}/24", strict=False)
        except ValueError as e:
            raise ActivityApiError(400, f"`ip`/`mask`: {e}") from None
        if network.num_addresses < 4:
            raise ActivityApiError(400, f"`ip`: network {network} is too small for a requestor and a node")
        vpn = VpnNetwork(_new_id(), network, None)
        vpn.gateway = vpn._host(gateway, "gateway") if gateway else str(next(network.hosts()))
        self.networks[vpn.network_id] = vpn
        return vpn.json()

    def get(self, network_id: str) -> VpnNetwork:
        vpn = self.networks.get(network_id)
        if vpn is None:
            raise ActivityApiError(404, f"Network {network_id} not found")
        return vpn

    def delete(self, network_id: str) -> None:
        self.get(network_id)
        del self.networks[network_id]

    def add_address(self, network_id: str, body) -> None:
        vpn = self.get(network_id)
        ip = vpn._host(body.get("ip") if isinstance(body, dict) else None, "ip")
        if ip in vpn.nodes:
            raise ActivityApiError(409, f"IP address {ip} is taken by node {vpn.nodes[ip]}")
        if ip not in vpn.addresses:
            vpn.addresses.append(ip)

    def add_node(self, network_id: str, body) -> None:
        """Idempotent: golem-core's refresh_nodes() re-posts every node (yagna ignores IpAddrTaken)."""
        vpn = self.get(network_id)
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
            raise ActivityApiError(400, "`id` (the node id) is required")
        ip = vpn._host(body.get("ip"), "ip")
        if ip in vpn.addresses:
            raise ActivityApiError(409, f"IP address {ip} is the requestor's")
        vpn.nodes.setdefault(ip, body["id"])

    def nodes(self, network_id: str) -> list:
        return [{"id": node, "ip": ip} for ip, node in self.get(network_id).nodes.items()]

    def addresses(self, network_id: str) -> list:
        return [{"ip": ip} for ip in self.get(network_id).addresses]


# --- WebSocket (RFC 6455), server side ---------------------------------------


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return _base64.b64encode(_hashlib.sha1((key.strip() + _WEBSOCKET_GUID).encode()).digest()).decode()


def websocket_handshake_error(headers) -> str | None:
    """Why a request is not a valid WebSocket upgrade, or None. `headers`: case-insensitive mapping."""
    if "websocket" not in (headers.get("Upgrade") or "").lower():
        return "expected `Upgrade: websocket`"
    if "upgrade" not in (headers.get("Connection") or "").lower():
        return "expected `Connection: Upgrade`"
    if (headers.get("Sec-WebSocket-Version") or "").strip() != "13":
        return "expected `Sec-WebSocket-Version: 13`"
    key = headers.get("Sec-WebSocket-Key") or ""
    try:
        if len(_base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return "`Sec-WebSocket-Key` must be 16 bytes in base64"
    return None


def websocket_handshake_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n"
    ).encode()


class WebSocket:
    """Frames over an accepted connection. Client frames arrive masked, ours go unmasked."""

    def __init__(self, reader: _asyncio.StreamReader, writer: _asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def send(self, opcode: int, payload: bytes = b"") -> None:
        n = len(payload)
        if n < 126:
            header = _struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            header = _struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            header = _struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.writer.write(header + payload)
        await self.writer.drain()

    async def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise ConnectionError("reserved bits set without an extension")
        if n == 126:
            (n,) = _struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = _struct.unpack("!Q", await self.reader.readexactly(8))
        if n > WS_MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes exceeds {WS_MAX_FRAME}")
        if not masked:
            raise ConnectionError("client frames must be masked (RFC 6455 §5.1)")
        mask = await self.reader.readexactly(4)
        data = await self.reader.readexactly(n)
        if n:
            # XOR with the repeated 4-byte mask, as one big-int operation instead of a byte loop.
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return fin, opcode, data

    async def receive(self) -> tuple[int, bytes]:
        """The next data message (TEXT or BINARY, reassembled); answers pings itself.
        Returns (WS_CLOSE, b"") when the peer closes."""
        message, message_opcode = b"", None
        while True:
            try:
                fin, opcode, data = await self._frame()
            except (_asyncio.IncompleteReadError, ConnectionError, OSError):
                return WS_CLOSE, b""
            if opcode == WS_PING:
                await self.send(WS_PONG, data)
            elif opcode == WS_PONG:
                continue
            elif opcode == WS_CLOSE:
                if not self.closed:
                    self.closed = True
                    await self.send(WS_CLOSE, data[:2])
                return WS_CLOSE, b""
            else:
                if opcode != WS_CONTINUATION:
                    message_opcode = opcode
                message += data
                if fin:
                    return message_opcode or WS_BINARY, message

    async def close(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.send(WS_CLOSE, _struct.pack("!H", code))
            except (ConnectionError, OSError):
                pass


async def bridge_websocket_tcp(ws: WebSocket, host: str, port: int) -> None:
    """Carry bytes both ways between a WebSocket and host:port until either side ends
    (yagna's /net-api/v1/net/{id}/tcp/{ip}/{port}: raw TCP in binary frames)."""
    try:
        tcp_reader, tcp_writer = await _asyncio.open_connection(host, port)
    except OSError as e:
        await ws.close(1011)
        raise ConnectionError(f"cannot connect to {host}:{port}: {e.strerror}") from None

    async def ws_to_tcp():
        while True:
            opcode, data = await ws.receive()
            if opcode == WS_CLOSE:
                break
            tcp_writer.write(data)
            await tcp_writer.drain()
        if tcp_writer.can_write_eof():
            tcp_writer.write_eof()

    async def tcp_to_ws():
        while True:
            data = await tcp_reader.read(65536)
            if not data:
                break
            await ws.send(WS_BINARY, data)
        await ws.close()

    async def keepalive():
        while True:
            await _asyncio.sleep(WS_PING_INTERVAL)
            await ws.send(WS_PING, b"")

    tasks = [_asyncio.ensure_future(c) for c in (ws_to_tcp(), tcp_to_ws(), keepalive())]
    try:
        # Either direction finishing ends the bridge (half-close is not carried by yagna either).
        await _asyncio.wait(tasks[:2], return_when=_asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await _asyncio.gather(*tasks, return_exceptions=True)
        tcp_writer.close()
        await ws.close()


###############################################################################
# 8. Payments #################################################################
###############################################################################


from decimal import ROUND_DOWN as _ROUND_DOWN, InvalidOperation as _InvalidOperation

# --- debit notes and invoices (provider side) -------------------------------

PROP_USAGE_VECTOR = "golem.com.usage.vector"
PROP_LINEAR_COEFFS = "golem.com.pricing.model.linear.coeffs"
PROP_DEBIT_NOTE_INTERVAL = "golem.com.scheme.payu.debit-note.interval-sec?"
PROP_PAYMENT_TIMEOUT = "golem.com.scheme.payu.payment-timeout-sec?"
PROP_ACCEPT_TIMEOUT = "golem.com.payment.debit-notes.accept-timeout?"
# A provider agent's defaults when the demand is silent (yagna agent/provider factory.rs).
DEFAULT_DEBIT_NOTE_INTERVAL = 120
DEFAULT_ACCEPT_TIMEOUT = 240
_WEI = _Decimal("1e-18")
_MICRO = _Decimal("1e-6")
# Why a provider agent breaks an agreement whose debit notes go unaccepted
# (yagna agent/provider BreakReason::DebitNotesDeadline).
DEBIT_NOTE_DEADLINE_REASON = "Requestor isn't accepting DebitNotes in time"


def usage_price(coeffs: list, usage_vector: list, counters: dict) -> tuple[list[_Decimal], _Decimal]:
    """Linear pricing (yagna-api.md §2.11): amount = initial + sum(price_i * usage_i), prices in
    usage-vector order and the initial price last. Exact decimals; usage counters rounded down
    to the microsecond first so the requestor recomputes the same amount from the vector."""
    usage = [counters.get(name, _Decimal(0)).quantize(_MICRO, _ROUND_DOWN) for name in usage_vector]
    prices = [_Decimal(str(c)) for c in coeffs]
    amount = prices[-1] + sum((p * u for p, u in zip(prices, usage)), _Decimal(0))
    return usage, amount.quantize(_WEI, _ROUND_DOWN)


def _amount_str(value: _Decimal) -> str:
    return format(value.quantize(_WEI, _ROUND_DOWN), "f")


def _parse_amount(value, field_name: str) -> _Decimal:
    if not isinstance(value, str):
        raise ActivityApiError(400, f"`{field_name}` must be a decimal string")
    try:
        amount = _Decimal(value)
    except _InvalidOperation:
        raise ActivityApiError(400, f"`{field_name}`: {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise ActivityApiError(400, f"`{field_name}` must be a non-negative amount")
    return amount


class PaymentEventLog:
    """Debit-note or invoice events: persistent, filtered by `eventDate > afterTimestamp` (strict)
    and appSessionId; a poll with nothing new blocks (yagna-api.md §2.0)."""

    def __init__(self):
        self.events: list[tuple[_datetime, str | None, dict]] = []
        self._changed = _asyncio.Event()

    def append(self, event: dict, app_session_id: str | None) -> None:
        date = _datetime.fromisoformat(event["eventDate"].replace("Z", "+00:00"))
        self.events.append((date, app_session_id, event))
        self._changed.set()
        self._changed = _asyncio.Event()

    def _matching(self, after: _datetime | None, app_session_id: str | None, limit: int | None) -> list:
        found = [
            e
            for date, session, e in self.events
            if (after is None or date > after) and (app_session_id is None or session == app_session_id)
        ]
        return found[:limit] if limit else found

    async def poll(self, after: _datetime | None, app_session_id: str | None, timeout: float, limit: int | None = None):
        deadline = _time.monotonic() + max(0.0, timeout)
        while True:
            found = self._matching(after, app_session_id, limit)
            remaining = deadline - _time.monotonic()
            if found or remaining <= 0:
                return found
            try:
                await _asyncio.wait_for(self._changed.wait(), remaining)
            except _asyncio.TimeoutError:
                pass


@_dataclass
class Billing:
    """What one agreement's provider bills: its terms, read once from the agreement."""

    agreement: object
    usage_vector: list
    coeffs: list
    interval: float
    accept_timeout: float
    payment_timeout: float | None
    accepted: _Decimal = _Decimal(0)  # the highest amount the requestor accepted so far
    allocation_id: str | None = None


class PaymentEngine:
    """Provider-side payments: debit notes on the negotiated interval priced from measured usage,
    an invoice when the agreement ends, their accept endpoints, and the provider breaking the
    agreement when a debit note is not accepted within the accept timeout."""

    def __init__(self, activities: ActivityEngine, allocations=None, on_agreement_broken=None):
        self.activities = activities
        # allocations(allocation_id) -> object with total/spent/remaining Decimals, or None.
        self.allocations = allocations
        # on_agreement_broken(agreement, reason): the market section terminates the agreement.
        self.on_agreement_broken = on_agreement_broken
        self.debit_notes: dict[str, dict] = {}
        self.invoices: dict[str, dict] = {}
        self.debit_note_events = PaymentEventLog()
        self.invoice_events = PaymentEventLog()
        self._billing: dict[str, Billing] = {}  # agreement id ->
        self._last_note: dict[str, str] = {}  # activity id -> last debit note id
        self._timers: dict[str, list] = {}  # activity id -> timer handles
        self._invoiced: set[str] = set()

    # -- terms --

    def billing(self, agreement) -> Billing:
        billing = self._billing.get(agreement.agreement_id)
        if billing is None:
            offer, demand = agreement_offer_properties(agreement), agreement_demand_properties(agreement)
            usage_vector = list(offer.get(PROP_USAGE_VECTOR) or ["golem.usage.cpu_sec", "golem.usage.duration_sec"])
            coeffs = list(offer.get(PROP_LINEAR_COEFFS) or [0] * (len(usage_vector) + 1))
            interval = demand.get(PROP_DEBIT_NOTE_INTERVAL) or offer.get(PROP_DEBIT_NOTE_INTERVAL)
            accept = demand.get(PROP_ACCEPT_TIMEOUT) or offer.get(PROP_ACCEPT_TIMEOUT)
            payment_timeout = demand.get(PROP_PAYMENT_TIMEOUT)
            billing = Billing(
                agreement=agreement,
                usage_vector=usage_vector,
                coeffs=coeffs,
                interval=float(interval or DEFAULT_DEBIT_NOTE_INTERVAL),
                accept_timeout=float(min(accept or DEFAULT_ACCEPT_TIMEOUT, DEFAULT_ACCEPT_TIMEOUT)),
                payment_timeout=float(payment_timeout) if payment_timeout else None,
            )
            self._billing[agreement.agreement_id] = billing
        return billing

    def usage(self, activity: Activity) -> dict[str, _Decimal]:
        if activity.alive:
            cpu, wall = self.activities.cpu_seconds(activity), activity.wall_seconds()
        else:
            cpu, wall = activity.final_cpu_seconds, activity.final_wall_seconds
        return {
            "golem.usage.cpu_sec": cpu,
            "golem.usage.cpu-sec": cpu,
            "golem.usage.duration_sec": wall,
            "golem.usage.duration-sec": wall,
        }

    def activity_cost(self, activity: Activity) -> tuple[list[_Decimal], _Decimal]:
        billing = self.billing(activity.agreement)
        return usage_price(billing.coeffs, billing.usage_vector, self.usage(activity))

    # -- debit notes --

    def activity_started(self, activity: Activity) -> None:
        """Schedule the activity's debit notes (real seconds: golem-core checks their pace
        against its own clock, so the time scale must not speed them up)."""
        billing = self.billing(activity.agreement)
        loop = _asyncio.get_running_loop()
        self._timers[activity.activity_id] = [loop.call_later(billing.interval, self._tick, activity)]

    def _tick(self, activity: Activity) -> None:
        if not activity.alive:
            return
        billing = self.billing(activity.agreement)
        if activity.answering():
            self.issue_debit_note(activity)
        loop = _asyncio.get_running_loop()
        self._timers.setdefault(activity.activity_id, []).append(loop.call_later(billing.interval, self._tick, activity))

    def issue_debit_note(self, activity: Activity) -> dict:
        billing = self.billing(activity.agreement)
        usage, amount = self.activity_cost(activity)
        note_id = _new_id()
        now = _datetime.now(_timezone.utc)
        note = {
            "debitNoteId": note_id,
            "previousDebitNoteId": self._last_note.get(activity.activity_id),
            "timestamp": _iso_now(),
            "agreementId": activity.agreement_id,
            "activityId": activity.activity_id,
            "totalAmountDue": _amount_str(amount),
            "usageCounterVector": [float(u) for u in usage],
            "status": "RECEIVED",
            **agreement_parties(activity.agreement),
        }
        if billing.payment_timeout:
            # Payable only under mid-agreement payments (yagna-api.md §2.11).
            due = now.timestamp() + billing.payment_timeout
            note["paymentDueDate"] = _datetime.fromtimestamp(due, _timezone.utc).isoformat(timespec="microseconds")
        self.debit_notes[note_id] = note
        self._last_note[activity.activity_id] = note_id
        self.debit_note_events.append(
            {"eventType": "DebitNoteReceivedEvent", "eventDate": _iso_now(), "debitNoteId": note_id},
            agreement_app_session(activity.agreement),
        )
        loop = _asyncio.get_running_loop()
        self._timers.setdefault(activity.activity_id, []).append(
            loop.call_later(billing.accept_timeout, self._check_accepted, activity, note_id)
        )
        return note

    def _check_accepted(self, activity: Activity, note_id: str) -> None:
        if self.debit_notes[note_id]["status"] != "RECEIVED" or not activity.alive:
            return
        _asyncio.ensure_future(self.break_agreement(activity.agreement, f"{DEBIT_NOTE_DEADLINE_REASON}: {note_id}"))

    async def break_agreement(self, agreement, reason: str) -> None:
        """What a provider agent does to a requestor that does not pay: kill the activities and
        terminate the agreement (visible to golem-core only as the Terminated activity state)."""
        await self.activities.terminate_agreement(agreement.agreement_id, reason)
        if self.on_agreement_broken is not None:
            self.on_agreement_broken(agreement, reason)
        self.agreement_ended(agreement)

    def activity_ended(self, activity: Activity) -> None:
        for timer in self._timers.pop(activity.activity_id, []):
            timer.cancel()

    # -- invoices --

    def agreement_ended(self, agreement) -> dict | None:
        """One invoice per agreement after it terminates: the cost of all its activities."""
        if agreement.agreement_id in self._invoiced:
            return None
        self._invoiced.add(agreement.agreement_id)
        acts = [a for a in self.activities.activities.values() if a.agreement_id == agreement.agreement_id]
        for activity in acts:
            if activity.alive:  # the market terminated the agreement first: end them now
                _asyncio.ensure_future(self.activities.terminate(activity.activity_id, "agreement terminated"))
        total = sum((self._final_cost(a) for a in acts), _Decimal(0))
        billing = self.billing(agreement)
        invoice_id = _new_id()
        due = _datetime.now(_timezone.utc).timestamp() + (billing.payment_timeout or 86400)
        invoice = {
            "invoiceId": invoice_id,
            "timestamp": _iso_now(),
            "agreementId": agreement.agreement_id,
            "activityIds": [a.activity_id for a in acts],
            "amount": _amount_str(total),
            "paymentDueDate": _datetime.fromtimestamp(due, _timezone.utc).isoformat(timespec="microseconds"),
            "status": "RECEIVED",
            **agreement_parties(agreement),
        }
        self.invoices[invoice_id] = invoice
        self.invoice_events.append(
            {"eventType": "InvoiceReceivedEvent", "eventDate": _iso_now(), "invoiceId": invoice_id},
            agreement_app_session(agreement),
        )
        return invoice

    def _final_cost(self, activity: Activity) -> _Decimal:
        return self.activity_cost(activity)[1]

    # -- accepting --

    def get_debit_note(self, note_id: str) -> dict:
        note = self.debit_notes.get(note_id)
        if note is None:
            raise ActivityApiError(404, f"Debit note {note_id} not found")
        return note

    def get_invoice(self, invoice_id: str) -> dict:
        invoice = self.invoices.get(invoice_id)
        if invoice is None:
            raise ActivityApiError(404, f"Invoice {invoice_id} not found")
        return invoice

    def accept_debit_note(self, note_id: str, body) -> None:
        note = self.get_debit_note(note_id)
        self._accept(note, note["totalAmountDue"], body, f"Debit note {note_id}")
        note["status"] = "ACCEPTED"
        self.debit_note_events.append(
            {"eventType": "DebitNoteAcceptedEvent", "eventDate": _iso_now(), "debitNoteId": note_id}, None
        )

    def accept_invoice(self, invoice_id: str, body) -> None:
        invoice = self.get_invoice(invoice_id)
        self._accept(invoice, invoice["amount"], body, f"Invoice {invoice_id}")
        invoice["status"] = "ACCEPTED"
        self.invoice_events.append(
            {"eventType": "InvoiceAcceptedEvent", "eventDate": _iso_now(), "invoiceId": invoice_id}, None
        )

    def _accept(self, document: dict, due: str, body, what: str) -> None:
        """yagna's accept checks: the accepted amount equals the amount due, and the allocation
        exists and covers the increase; the increase is what the allocation spends."""
        if not isinstance(body, dict):
            raise ActivityApiError(400, "acceptance body must be an object with `totalAmountAccepted` and `allocationId`")
        accepted = _parse_amount(body.get("totalAmountAccepted"), "totalAmountAccepted")
        if accepted != _Decimal(due):
            raise ActivityApiError(400, f"{what}: `totalAmountAccepted` {accepted} must equal the amount due {due}")
        allocation_id = body.get("allocationId")
        if not isinstance(allocation_id, str) or not allocation_id:
            raise ActivityApiError(400, "`allocationId` is required")
        if document["status"] == "ACCEPTED":
            return  # golem-core retries accept on 408/504: repeat acceptance is a no-op
        billing = self._billing[document["agreementId"]]
        increase = max(_Decimal(0), accepted - billing.accepted)
        if self.allocations is not None:
            allocation = self.allocations(allocation_id)
            if allocation is None:
                raise ActivityApiError(404, f"Allocation {allocation_id} not found")
            remaining = allocation_remaining(allocation)
            if increase > remaining:
                raise ActivityApiError(
                    400, f"Not enough funds in allocation {allocation_id}: need {increase}, remaining {remaining}"
                )
            allocation_spend(allocation, increase)
        billing.accepted += increase
        billing.allocation_id = allocation_id

    def shutdown(self) -> None:
        for timers in self._timers.values():
            for timer in timers:
                timer.cancel()
        self._timers.clear()


# The agreement and allocation objects belong to sections 5 and 8 (market branch); these
# accessors are the only places that know their shape.


def agreement_offer_properties(agreement) -> dict:
    return agreement.offer_properties


def agreement_demand_properties(agreement) -> dict:
    return agreement.demand_properties


def agreement_app_session(agreement) -> str | None:
    return agreement.app_session_id


def agreement_parties(agreement) -> dict:
    offer, demand = agreement.offer_properties, agreement.demand_properties
    platform = offer.get("golem.com.payment.chosen-platform") or demand.get("golem.com.payment.chosen-platform")
    if not platform:
        platform = next(
            (k.split(".")[4] for k in offer if k.startswith("golem.com.payment.platform.") and k.endswith(".address")),
            "erc20-local-tglm",
        )
    return {
        "issuerId": agreement.provider_id,
        "recipientId": agreement.requestor_id,
        "payeeAddr": offer.get(f"golem.com.payment.platform.{platform}.address", agreement.provider_id),
        "payerAddr": demand.get(f"golem.com.payment.platform.{platform}.address", agreement.requestor_id),
        "paymentPlatform": platform,
    }


def allocation_remaining(allocation) -> _Decimal:
    return allocation.total - allocation.spent


def allocation_spend(allocation, amount: _Decimal) -> None:
    allocation.spent += amount


###############################################################################
# 9. Routes ###################################################################
###############################################################################


###############################################################################
# 10. CLI #####################################################################
###############################################################################


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not built yet")


if __name__ == "__main__":
    sys.exit(main())
