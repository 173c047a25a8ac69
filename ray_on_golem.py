#!/usr/bin/env python3
"""Ray on Golem: Ray clusters on machines rented from the Golem Network.

One self-contained module (bottle.py style). Importing it touches the standard
library only; PyYAML, golem-core and Ray are imported lazily inside the
functions that need them, so `--help`, `version`, `status` and `reputation
list` start fast from the zipapp on a bare Python.

Sections, in dependency order (each uses only those above it):

    1.  Constants and paths
    2.  Errors
    3.  Config            cluster YAML: defaults, validation, node-type merge
    4.  Store             sqlite3: reputation, blacklist, clusters, ledger
    5.  Yagna             find/start/stop yagna or the local network, app key
    6.  Market            demand, filter chain, scoring, negotiation, Funnel
    7.  Clusters          node state machine, provisioning, payments
    8.  Webserver         asyncio HTTP/1.1, one handler method per route
    9.  Daemon control    start/stop/status of the detached webserver
    10. Ray integration   GolemNodeProvider, GolemCommandRunner
    11. CLI               argparse; `main()`
"""

from __future__ import annotations

import os
import sys

###############################################################################
# 1. Constants and paths ######################################################
###############################################################################

__version__ = "0.1.0"
PACKAGE_NAME = "ray-on-golem"

DEFAULT_WEBSERVER_PORT = 4578
WEBSERVER_HOST = "127.0.0.1"  # never 0.0.0.0: the webserver spends money
DEFAULT_YAGNA_API_URL = "http://127.0.0.1:7465"
DEFAULT_YAGNA_APPNAME = "ray-on-golem"

# Payment networks we accept; dead testnets get a hint instead of a silent failure.
PAYMENT_NETWORKS = ("local", "holesky", "polygon")
DEAD_PAYMENT_NETWORKS = {
    "goerli": "goerli was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "mumbai": "mumbai was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "rinkeby": "rinkeby was shut down; use `holesky` (testnet) or `polygon` (mainnet)",
    "mainnet": "Ray on Golem pays on Polygon: use `polygon` for mainnet",
}

# Exit codes of the CLI.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def default_datadir() -> str:
    """`$RAY_ON_GOLEM_DATADIR`, else the XDG data dir (`~/.local/share/ray_on_golem`)."""
    env = os.environ.get("RAY_ON_GOLEM_DATADIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "ray_on_golem")


def ensure_datadir(path: str) -> str:
    """Create the data dir (mode 0700: it holds tokens and app keys) and return it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def write_secret_file(path: str, content: str) -> None:
    """Write `content` to `path` with mode 0600 from the first byte (no window of 0644)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


###############################################################################
# 2. Errors ###################################################################
###############################################################################


class RayOnGolemError(Exception):
    """Base of every error we expect: the CLI prints the message, the webserver sends it as JSON."""

    exit_code = EXIT_FAILED
    http_status = 500


class UsageError(RayOnGolemError):
    """Bad argument or bad input: exit 2, HTTP 400."""

    exit_code = EXIT_USAGE
    http_status = 400


class ConfigError(UsageError):
    """A cluster config that cannot be used; the message names the field path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class NotFound(RayOnGolemError):
    exit_code = EXIT_FAILED
    http_status = 404


class Unauthorized(RayOnGolemError):
    http_status = 401


class Conflict(RayOnGolemError):
    http_status = 409


class ServiceUnavailable(RayOnGolemError):
    """yagna, the local network or the webserver cannot be reached (exit 1, HTTP 503)."""

    http_status = 503


###############################################################################
# 3. Config ###################################################################
###############################################################################


###############################################################################
# 4. Store ####################################################################
###############################################################################


###############################################################################
# 5. Yagna ####################################################################
###############################################################################


# --- golem-core connection ----------------------------------------------------
# The client side of yagna: where it listens, the app key, a reachability and
# auth check with a message that says what to do, and a GolemNode bound to them.
# golem-core itself makes no HTTP call on start (reference/yagna-api.md §1.3), so
# without `check_yagna` a wrong URL or key shows up only as silently dead loops.

def check_yagna(api_url: str, app_key: str, timeout: float = 5.0) -> dict:
    """GET `/me` with the app key; return the identity or raise what the user must fix.

    yagna serves `/me` at the root and answers 401 with a plain-text body on a bad key
    (reference/yagna-api.md §1.2, §2.2).
    """
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/me", headers={"Authorization": f"Bearer {app_key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise Unauthorized(
                f"yagna at {api_url} rejected the app key: set YAGNA_APPKEY to a key from "
                "`yagna app-key list` (or unset it to use the local network's key)"
            ) from None
        raise ServiceUnavailable(f"yagna at {api_url} answered /me with HTTP {e.code}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ServiceUnavailable(
            f"yagna is not reachable at {api_url} ({reason}): start it with `ray-on-golem start` "
            "or `yagna service run`, or point YAGNA_API_URL at a running one"
        ) from None


class LocalNetworkProcess:
    """A `golem_localnet.py serve` this command started, stopped by PID when done.

    Contract: docs/internals.md (ready line on stdout, `DIR/appkey` mode 0600).
    """

    READY_PREFIX = "golem-localnet listening on "

    def __init__(self, datadir: str, options: dict | None = None):
        self.datadir = datadir
        self.options = options or {}
        self.process = None
        self.url = ""
        self.app_key = ""

    def start(self, ready_timeout: float = 30.0) -> "LocalNetworkProcess":
        import subprocess
        import threading

        ensure_datadir(self.datadir)
        here = os.path.dirname(os.path.abspath(__file__))  # the zipapp path when zipped
        argv = [sys.executable, "-m", "golem_localnet", "serve", "--port", "0",
                "--datadir", self.datadir, "--host", "127.0.0.1"]
        for key, flag in (("providers", "--providers"), ("seed", "--seed"),
                          ("profile", "--profile"), ("time_scale", "--time-scale")):
            if self.options.get(key) is not None:
                argv += [flag, str(self.options[key])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p))
        env.pop("YAGNA_APPKEY", None)  # the local network keeps its own key in DIR/appkey
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env=env, text=True, start_new_session=True,
        )
        line_box: list[str] = []
        reader = threading.Thread(
            target=lambda: line_box.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(ready_timeout)
        line = line_box[0].strip() if line_box else ""
        if not line.startswith(self.READY_PREFIX):
            self.stop()
            raise ServiceUnavailable(
                f"the local network did not start (no ready line within {ready_timeout:g} s); "
                f"see `python -m golem_localnet serve --datadir {self.datadir}`"
            )
        self.url = line[len(self.READY_PREFIX):]
        with open(os.path.join(self.datadir, "appkey")) as f:
            self.app_key = f.read().strip()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the local network kills its activities and exits 0), then SIGKILL."""
        import signal
        import subprocess

        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()

    def remove_datadir(self) -> None:
        import shutil

        shutil.rmtree(self.datadir, ignore_errors=True)


def connect_local_network(datadir: str, options: dict | None = None):
    """(url, app_key, started) for `payment_network: local`: reuse a reachable one, else start one.

    Reachable means `YAGNA_API_URL` + `YAGNA_APPKEY` answer `/me`, or the local network
    recorded in `<datadir>/localnet/localnet.json` does with its appkey file.
    """
    import json

    candidates = []
    if os.environ.get("YAGNA_API_URL") and os.environ.get("YAGNA_APPKEY"):
        candidates.append((os.environ["YAGNA_API_URL"], os.environ["YAGNA_APPKEY"]))
    localnet_dir = os.path.join(datadir, "localnet")
    try:
        with open(os.path.join(localnet_dir, "localnet.json")) as f:
            url = json.load(f)["url"]
        with open(os.path.join(localnet_dir, "appkey")) as f:
            candidates.append((url, f.read().strip()))
    except (OSError, ValueError, KeyError):
        pass
    for url, key in candidates:
        try:
            check_yagna(url, key, timeout=2.0)
            return url, key, None
        except Unauthorized:
            raise
        except ServiceUnavailable:
            continue
    import tempfile

    # Ours lives in a fresh directory so a webserver's local network record is never clobbered.
    process = LocalNetworkProcess(tempfile.mkdtemp(prefix="rog-localnet-"), options)
    try:
        process.start()
    except BaseException:
        process.remove_datadir()
        raise
    return process.url, process.app_key, process


###############################################################################
# 6. Market ###################################################################
###############################################################################

# The market pipeline: one object serves `network-stats` (scan, sign nothing) and
# node starts (take drafts best score first, sign agreements), so the scan tells
# the truth about what `ray up` will do.
#
#   initial proposals ─> filter chain ─> scoring ─> negotiation queue (best first)
#        (demand events)   (blacklist,     (cost,      │ `concurrency` negotiators,
#                           budget)         reputation, │ response timeout
#                                           random)     ▼
#                                               drafts (best first) ─> agreement | reject
#
# Every stage counts what passes it in the Funnel; every failure reason is grouped.

import dataclasses
import re

# A fixed image for the local network: its providers run Ray from this host, so no
# image is fetched; the hash only has to be well-formed.
LOCAL_IMAGE_HASH = "0" * 56
LOCAL_IMAGE_URL = "http://127.0.0.1/ray-on-golem-local.gvmi"
DEFAULT_REGISTRY_URL = "https://registry.golem.network"

DEFAULT_NEGOTIATION_CONCURRENCY = 16
DEFAULT_PROPOSAL_RESPONSE_TIMEOUT = 30.0  # seconds; the original's value (golem-core's default is 5)
DEBIT_NOTE_INTERVAL_S = 180  # what the original asks for; providers accept [1 s, 24 h]
DEBIT_NOTE_ACCEPT_TIMEOUT_S = 240  # a real provider rejects a larger one (reference/yagna-api.md §2.6)
DEMAND_LIFETIME_DAYS = 365
# Scoring without a `per_cpu_expected_usage` block still prefers cheap providers: price
# them for one fully used CPU-hour.
DEFAULT_EXPECTED_USAGE = (1.0, 1.0)  # (cpu_load, duration_hours)
SCORE_WEIGHTS = {"cost": 1.0, "reputation": 1.0, "random": 0.1}  # as the original's scorers

STAGE_INITIAL = "Initial"
STAGE_NOT_BLACKLISTED = "Not blacklisted"
STAGE_NEGOTIATION_INITIALIZED = "Negotiation initialized"
STAGE_NEGOTIATED = "Negotiated successfully"

REASON_NO_MORE_NEEDED = "No more needed"
REASON_UNPRICEABLE = "Can't estimate costs!"
REASON_NO_RESPONSE = "Failed to receive proposal response!"

_BRACKETED = re.compile(r"\[.*?\]")


def mask_ids(text: str) -> str:
    """Mask bracketed ids (`Proposal [abc…]`) so the same failure groups under one key."""
    return _BRACKETED.sub("[***]", text)


# --- Funnel ---------------------------------------------------------------------


class Funnel:
    """Counts of proposals per pipeline stage plus grouped failure reasons.

    Stages are declared up front, in pipeline order, so a stage nothing passed
    still prints `0`. Counts are proposals, not unique providers (as the original).
    """

    def __init__(self, stages: list[str]):
        self.stages = list(stages)
        self.counts = dict.fromkeys(self.stages, 0)
        self.errors: dict[str, int] = {}
        self.providers: dict[str, dict] = {}  # provider id -> row of the --providers table

    def passed(self, stage: str) -> None:
        self.counts[stage] += 1

    def failed(self, reason: str) -> str:
        key = mask_ids(reason.strip()) or "Rejected without a reason"
        self.errors[key] = self.errors.get(key, 0) + 1
        return key

    def sorted_errors(self) -> list[tuple[str, int]]:
        """Most frequent first; ties in the order they were first seen."""
        return sorted(self.errors.items(), key=lambda kv: -kv[1])

    def report_lines(self) -> list[str]:
        lines = ["Proposals count:"]
        lines += [f"{stage}: {self.counts[stage]}" for stage in self.stages]
        lines += ["", "Negotiation errors:"]
        lines += [f"{reason}: {count}" for reason, count in self.sorted_errors()] or ["(none)"]
        return lines

    def as_dict(self) -> dict:
        return {
            "funnel": [{"stage": s, "count": self.counts[s]} for s in self.stages],
            "errors": [{"reason": r, "count": c} for r, c in self.sorted_errors()],
            "providers": sorted(self.providers.values(), key=lambda p: -(p.get("score") or 0)),
        }


# --- Budget filters -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BudgetControl:
    """`node_config.budget_control`: the four price limits and the expected usage."""

    cpu_load: float | None = None
    duration_hours: float | None = None
    max_cost: float | None = None
    max_start_price: float | None = None
    max_cpu_per_hour_price: float | None = None
    max_env_per_hour_price: float | None = None
    payment_interval_minimal_hours: float = 12.0
    payment_interval_optimal_hours: float | None = None

    @classmethod
    def from_node_config(cls, node_config: dict) -> "BudgetControl":
        budget = node_config.get("budget_control") or {}
        usage = budget.get("per_cpu_expected_usage") or {}
        interval = budget.get("payment_interval_hours") or {}
        minimal = interval.get("minimal", 12.0)
        return cls(
            cpu_load=usage.get("cpu_load"),
            duration_hours=usage.get("duration_hours"),
            max_cost=usage.get("max_cost"),
            max_start_price=budget.get("max_start_price"),
            max_cpu_per_hour_price=budget.get("max_cpu_per_hour_price"),
            max_env_per_hour_price=budget.get("max_env_per_hour_price"),
            payment_interval_minimal_hours=minimal,
            payment_interval_optimal_hours=interval.get("optimal", minimal),
        )

    @property
    def expected_usage(self) -> tuple[float, float]:
        if self.cpu_load is not None and self.duration_hours is not None:
            return self.cpu_load, self.duration_hours
        return DEFAULT_EXPECTED_USAGE


class Pricing:
    """Prices read from an offer's properties with golem-core's own pricing callables.

    `LinearCoeffs` gives None when the model is not linear or the coefficients do not
    match the usage vector; per-CPU pricing also needs `golem.inf.cpu.threads`.
    """

    def __init__(self, budget: BudgetControl):
        from datetime import timedelta

        from golem.managers.proposal.plugins.linear_coeffs import LinearCoeffsCost
        from golem.managers.proposal.plugins.scoring.pricings import LinearPerCpuAverageCostPricing

        cpu_load, hours = budget.expected_usage
        self.expected_cost = LinearPerCpuAverageCostPricing(cpu_load, timedelta(hours=hours))
        self.start_price = LinearCoeffsCost("price_initial")
        self.cpu_per_sec = LinearCoeffsCost("price_cpu_sec")
        self.env_per_sec = LinearCoeffsCost("price_duration_sec")


@dataclasses.dataclass(frozen=True)
class PriceFilter:
    """One budget limit: rejects offers priced above `limit`, or unpriceable ones."""

    label: str
    limit: float  # in the unit `price` returns (GLM, or GLM per second)
    price: object  # callable(ProposalData) -> float | None
    per: float = 1.0  # 3600 for the per-hour limits: the unit of the label

    def rejection(self, proposal_data) -> str | None:
        value = self.price(proposal_data)
        if value is None:
            return REASON_UNPRICEABLE
        if value > self.limit:
            return f"{self.label} (offered {value * self.per:.6g})"
        return None


def budget_filters(budget: BudgetControl, pricing: Pricing) -> list[PriceFilter]:
    """The four limits that are set, in the order of the original (the labels are exact)."""
    filters = []
    if budget.max_cost is not None:
        filters.append(PriceFilter(
            f"Reject if per cpu expected cost exceeds `max_cost` = {budget.max_cost}",
            budget.max_cost, pricing.expected_cost))
    if budget.max_start_price is not None:
        filters.append(PriceFilter(
            f"Reject if start price exceeds `max_start_price` = {budget.max_start_price}",
            budget.max_start_price, pricing.start_price))
    if budget.max_cpu_per_hour_price is not None:
        filters.append(PriceFilter(
            "Reject if cpu per hour price exceeds `max_cpu_per_hour_price` = "
            f"{budget.max_cpu_per_hour_price}",
            budget.max_cpu_per_hour_price / 3600, pricing.cpu_per_sec, 3600))
    if budget.max_env_per_hour_price is not None:
        filters.append(PriceFilter(
            "Reject if env per hour price exceeds `max_env_per_hour_price` = "
            f"{budget.max_env_per_hour_price}",
            budget.max_env_per_hour_price / 3600, pricing.env_per_sec, 3600))
    return filters


# --- Scoring --------------------------------------------------------------------


class Scorer:
    """Score in [0, 1]: cheap, reputable, plus a little seeded randomness to spread load.

    Final score = Σ(w·s)/Σw over the scores that exist (golem-core's `ProposalScoringMixin`
    rule), so an unpriceable offer or an unknown provider is judged on what is known.
    The cost score 1/(1 + cost/reference) is monotone and needs no batch normalisation,
    so a proposal is scored the moment it arrives.
    """

    def __init__(self, reputation, cost_reference: float, seed: int | None = None):
        import random

        self.reputation = reputation  # callable(provider_id) -> float in [0, 1] | None
        self.cost_reference = cost_reference if cost_reference and cost_reference > 0 else 1.0
        self.rng = random.Random(seed)

    def score(self, provider_id: str, expected_cost: float | None) -> float:
        parts = [(SCORE_WEIGHTS["random"], self.rng.random())]
        if expected_cost is not None:
            parts.append((SCORE_WEIGHTS["cost"], 1.0 / (1.0 + max(expected_cost, 0.0) / self.cost_reference)))
        reputation = self.reputation(provider_id)
        if reputation is not None:
            parts.append((SCORE_WEIGHTS["reputation"], min(max(float(reputation), 0.0), 1.0)))
        return sum(w * s for w, s in parts) / sum(w for w, _ in parts)


# --- Demand ---------------------------------------------------------------------


@dataclasses.dataclass
class DemandSpec:
    """What a node needs from a provider, from the resolved `node_config`."""

    payment_network: str
    subnet_tag: str = "public"
    image_tag: str | None = None
    image_hash: str | None = None
    capabilities: tuple = ("vpn", "inet")
    outbound_urls: tuple = ()
    min_mem_gib: float = 0.0
    min_cpu_threads: int = 0
    min_storage_gib: float = 0.0
    max_cpu_threads: int | None = None
    runtime: str = "vm"
    node_descriptor: dict | None = None
    payment_timeout_s: int = 12 * 3600
    registry_url: str = DEFAULT_REGISTRY_URL

    @classmethod
    def from_node_config(cls, node_config: dict, payment_network: str,
                         registry_url: str | None = None) -> "DemandSpec":
        demand = node_config.get("demand") or {}
        budget = BudgetControl.from_node_config(node_config)
        return cls(
            payment_network=payment_network,
            subnet_tag=node_config.get("subnet_tag") or "public",
            image_tag=demand.get("image_tag"),
            image_hash=demand.get("image_hash"),
            capabilities=tuple(demand.get("capabilities", ("vpn", "inet"))),
            outbound_urls=tuple(demand.get("outbound_urls") or ()),
            min_mem_gib=demand.get("min_mem_gib") or 0.0,
            min_cpu_threads=demand.get("min_cpu_threads") or 0,
            min_storage_gib=demand.get("min_storage_gib") or 0.0,
            max_cpu_threads=demand.get("max_cpu_threads"),
            runtime=demand.get("runtime") or "vm",
            node_descriptor=demand.get("node_descriptor"),
            payment_timeout_s=int(budget.payment_interval_minimal_hours * 3600),
            registry_url=(registry_url or os.environ.get("RAY_ON_GOLEM_REGISTRY_URL")
                          or DEFAULT_REGISTRY_URL),
        )

    def resolve_image(self, timeout: float = 10.0) -> tuple[str, str]:
        """(sha3 hash, download URL): fixed on the local network, else the Golem registry.

        Registry contract (anchor §5.1): GET /v1/image/info?tag=|hash= → {"sha3", "http"}; 404 = unknown.
        """
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        if self.payment_network == "local":
            return self.image_hash or LOCAL_IMAGE_HASH, LOCAL_IMAGE_URL
        if self.image_tag:
            what, query = "tag", {"tag": self.image_tag, "count": "false"}
        else:
            what, query = "hash", {"hash": self.image_hash, "count": "false"}
        url = f"{self.registry_url.rstrip('/')}/v1/image/info?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                info = json.loads(response.read())
            return info["sha3"], info["http"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise ConfigError(f"node_config.demand.image_{what}",
                                  f"image {what} `{query[what]}` does not exist") from None
            raise ServiceUnavailable(f"can't access the Golem registry at {self.registry_url} "
                                     f"for image lookup (HTTP {e.code})") from None
        except (OSError, ValueError, KeyError) as e:
            raise ServiceUnavailable(f"can't access the Golem registry at {self.registry_url} "
                                     f"for image lookup ({getattr(e, 'reason', e)})") from None

    def manifest(self, image_hash: str, image_url: str) -> str:
        """Base64 computation manifest allowing `outbound_urls` (the original's, unsigned)."""
        import base64
        import json
        import urllib.parse

        manifest = {
            "version": "0.1.0",
            "createdAt": "2023-06-26T00:00:00.000000Z",
            "expiresAt": "2100-01-01T00:00:00.000000Z",
            "metadata": {"name": "Golem Ray", "description": "Golem ray webserver", "version": "0.0.1"},
            "payload": [{"urls": [image_url], "hash": f"sha3:{image_hash}"}],
            "compManifest": {
                "version": "0.1.0",
                "script": {"commands": ["run /bin/sh -c *"], "match": "regex"},
                "net": {"inet": {"out": {
                    "protocols": sorted({urllib.parse.urlparse(u).scheme for u in self.outbound_urls}),
                    "urls": list(self.outbound_urls)}}},
            },
        }
        return base64.b64encode(json.dumps(manifest).encode()).decode()

    async def build(self, allocation):
        """A golem-core `DemandBuilder` with the payload, payment terms and allocation decorations."""
        import asyncio
        from datetime import datetime, timedelta, timezone

        from golem.payload import ManifestVmPayload, VmPayload, defaults
        from golem.payload.constraints import Constraint
        from golem.resources import DemandBuilder

        image_hash, image_url = await asyncio.get_running_loop().run_in_executor(None, self.resolve_image)
        common = dict(runtime=self.runtime, min_mem_gib=self.min_mem_gib,
                      min_storage_gib=self.min_storage_gib, min_cpu_threads=self.min_cpu_threads)
        if self.outbound_urls:
            caps = list(dict.fromkeys([*self.capabilities, "manifest-support"]))
            payload = ManifestVmPayload(manifest=self.manifest(image_hash, image_url),
                                        capabilities=caps, **common)
        else:
            payload = VmPayload(package_url=f"hash:sha3:{image_hash}:{image_url}",
                                capabilities=list(self.capabilities), **common)
        builder = DemandBuilder()
        await builder.add(defaults.ActivityInfo(
            expiration=datetime.now(timezone.utc) + timedelta(days=DEMAND_LIFETIME_DAYS),
            multi_activity=True))
        await builder.add(defaults.NodeInfo(subnet_tag=self.subnet_tag))
        await builder.add(payload)
        # Mid-agreement payments: without them a real provider caps the agreement at 30 min.
        await builder.add(defaults.PaymentInfo(
            debit_notes_accept_timeout=DEBIT_NOTE_ACCEPT_TIMEOUT_S,
            debit_notes_interval=DEBIT_NOTE_INTERVAL_S,
            payment_timeout=self.payment_timeout_s))
        if self.max_cpu_threads:
            builder.add_constraints(Constraint(defaults.PROP_INF_CPU_THREADS, "<=", self.max_cpu_threads))
        if self.node_descriptor:
            builder.add_properties({"golem.!exp.gap-31.v0.node.descriptor": self.node_descriptor})
        if allocation is not None:  # its platform address and protocol version (yagna-api.md §2.3)
            await builder.add(await allocation.get_demand_spec())
        return builder


# --- Pipeline -------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    """One initial proposal on its way through the pipeline."""

    proposal: object  # golem.resources.Proposal
    provider_id: str
    row: dict  # the provider's row in the Funnel
    expected_cost: float | None = None
    score: float = 0.0
    draft: object = None  # the provider's Draft once negotiated


class MarketPipeline:
    """Demand → filters → scoring → bounded negotiation → drafts, counted in a Funnel.

    `scan(duration)` (network-stats) negotiates everything that passes and signs
    nothing; `agreement()` / `agreements()` (node starts) sign the best draft first.
    `is_blacklisted(provider_id)` and `reputation(provider_id)` come from the Store.
    """

    def __init__(self, node, spec: DemandSpec, budget: BudgetControl, *,
                 is_blacklisted=lambda provider_id: False, reputation=lambda provider_id: None,
                 total_budget: float = 5.0, payment_driver: str = "erc20",
                 concurrency: int = DEFAULT_NEGOTIATION_CONCURRENCY,
                 response_timeout: float = DEFAULT_PROPOSAL_RESPONSE_TIMEOUT, seed: int | None = None,
                 max_drafts: int | None = None):
        import asyncio
        from datetime import timedelta

        from golem.managers.proposal.plugins.negotiating import (
            MidAgreementPaymentsNegotiator,
            PaymentPlatformNegotiator,
        )

        if concurrency < 1:
            raise UsageError("concurrency: must be at least 1")
        self.node = node
        self.spec = spec
        self.budget = budget
        self.is_blacklisted = is_blacklisted
        self.total_budget = total_budget
        self.payment_driver = payment_driver
        self.concurrency = concurrency
        self.max_drafts = max_drafts  # node starts hold a few drafts; a scan negotiates everything
        self.response_timeout = response_timeout
        self.pricing = Pricing(budget)
        self.filters = budget_filters(budget, self.pricing)
        cost_reference = budget.max_cost if budget.max_cost else None
        self.scorer = Scorer(reputation, cost_reference, seed)
        minimal = timedelta(hours=budget.payment_interval_minimal_hours)
        optimal = timedelta(hours=budget.payment_interval_optimal_hours or budget.payment_interval_minimal_hours)
        self.negotiators = [
            PaymentPlatformNegotiator(),
            MidAgreementPaymentsNegotiator(
                min_debit_note_interval=timedelta(seconds=DEBIT_NOTE_INTERVAL_S),
                optimal_debit_note_interval=timedelta(seconds=DEBIT_NOTE_INTERVAL_S),
                min_payment_timeout=minimal, optimal_payment_timeout=optimal),
        ]
        self.funnel = Funnel(
            [STAGE_INITIAL, STAGE_NOT_BLACKLISTED]
            + [f"Passed {f.label}" for f in self.filters]
            + [STAGE_NEGOTIATION_INITIALIZED, STAGE_NEGOTIATED])
        self.negotiating = 0
        self.allocation = None
        self.demand = None
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()  # (-score, seq, Candidate)
        self._drafts: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._room = asyncio.Condition()  # signalled when a draft slot frees (max_drafts)
        self._reserved = 0  # negotiator slots holding or about to hold a draft
        self._seq = 0
        self._tasks: list = []
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Allocate, subscribe the demand and start the collector and the negotiators."""
        import asyncio

        from golem.resources import Allocation, Demand

        try:
            self.allocation = await Allocation.create_any_account(
                self.node, _decimal(self.total_budget), self.spec.payment_network, self.payment_driver)
        except Exception as e:
            raise ServiceUnavailable(
                f"could not allocate {self.total_budget} GLM on {self.spec.payment_network}: "
                f"{_describe_error(e)}") from None
        builder = await self.spec.build(self.allocation)
        self.demand = await Demand.create_from_properties_constraints(
            self.node, builder.properties, builder.constraints)
        self.demand.start_collecting_events()
        self._tasks.append(asyncio.create_task(self._collect()))
        self._tasks += [asyncio.create_task(self._negotiate_forever())
                        for _ in range(self.concurrency)]

    async def stop(self, reject_drafts: bool = True) -> None:
        """Stop negotiating, reject unsigned drafts politely, unsubscribe, release the allocation."""
        import asyncio

        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if reject_drafts:
            drafts = []
            while not self._drafts.empty():
                drafts.append(self._drafts.get_nowait()[2])
            await asyncio.gather(*(self._reject(c.draft, REASON_NO_MORE_NEEDED) for c in drafts),
                                 return_exceptions=True)
        if self.demand is not None:
            await _quietly(self.demand.unsubscribe())
        if self.allocation is not None:
            await _quietly(self.allocation.release())

    async def settle(self) -> None:
        """Stop taking new proposals; let running negotiations end (bounded by the timeout)."""
        import asyncio

        if self._tasks:
            self._tasks[0].cancel()  # the collector
            await asyncio.gather(self._tasks[0], return_exceptions=True)
        self._stopping = True
        while self.negotiating:
            await asyncio.sleep(0.05)

    # -- what callers use ---------------------------------------------------------------

    async def scan(self, duration_s: float, stop_event=None, on_progress=None,
                   progress_interval: float = 0.5) -> bool:
        """network-stats: run for `duration_s` (or until `stop_event`), sign nothing.

        Returns True when the scan ran its full duration, False when stopped early.
        """
        import asyncio
        import time

        started = time.monotonic()
        full = True
        await self.start()
        try:
            while True:
                remaining = duration_s - (time.monotonic() - started)
                if remaining <= 0:
                    break
                if stop_event is not None and stop_event.is_set():
                    full = False
                    break
                if on_progress:
                    on_progress(time.monotonic() - started, remaining)
                await asyncio.sleep(min(progress_interval, remaining))
            if full:
                await self.settle()
        finally:
            await self.stop(reject_drafts=True)
        return full

    async def next_draft(self, exclude=frozenset()):
        """The best-scored negotiated draft whose provider is not in `exclude`."""
        skipped = []
        try:
            while True:
                item = await self._drafts.get()
                if item[2].provider_id in exclude:
                    skipped.append(item)
                    continue
                async with self._room:
                    self._room.notify_all()
                return item[2]
        finally:
            for item in skipped:
                self._drafts.put_nowait(item)

    async def agreement(self, exclude=frozenset()):
        """Sign the best draft: (Agreement, Candidate). Failures are counted and the next one tried."""
        while True:
            candidate = await self.next_draft(exclude)
            agreement = None
            try:
                agreement = await candidate.draft.create_agreement(autoclose=True)
                await agreement.confirm()
                # `wait` answers 410 on a rejection: golem-core returns False (yagna-api.md §2.7)
                if await agreement.wait_for_approval():
                    candidate.row["outcome"] = "agreement"
                    return agreement, candidate
                reason = "Agreement rejected by the provider"
            except Exception as e:  # any failure: record it and take the next draft
                reason = f"Agreement failed: {_describe_error(e)}"
                if agreement is not None:
                    await _quietly(agreement.terminate("Agreement failed"))
            candidate.row["outcome"] = self.funnel.failed(reason)

    async def agreements(self, exclude=frozenset()):
        """Agreements best score first, for as long as the caller keeps asking."""
        while True:
            yield await self.agreement(exclude)

    # -- stages ----------------------------------------------------------------

    async def _collect(self) -> None:
        async for proposal in self.demand.initial_proposals():
            self.classify(proposal)

    def classify(self, proposal) -> Candidate | None:
        """Filter chain and scoring for one initial proposal; queue it when it passes."""
        data = _proposal_data(proposal)
        provider_id = data.issuer_id or ""
        props = data.properties
        row = self.funnel.providers.setdefault(provider_id, {"id": provider_id})
        row.update(
            name=props.get("golem.node.id.name"), cpu_threads=props.get("golem.inf.cpu.threads"),
            mem_gib=props.get("golem.inf.mem.gib"),
            start_price=self.pricing.start_price(data),
            cpu_per_hour=_per_hour(self.pricing.cpu_per_sec(data)),
            env_per_hour=_per_hour(self.pricing.env_per_sec(data)),
            expected_cost=self.pricing.expected_cost(data), score=None)
        self.funnel.passed(STAGE_INITIAL)
        if self.is_blacklisted(provider_id):
            row["outcome"] = "blacklisted"
            return None  # initial proposals are dropped, never rejected over REST
        self.funnel.passed(STAGE_NOT_BLACKLISTED)
        for price_filter in self.filters:
            reason = price_filter.rejection(data)
            if reason is not None:
                row["outcome"] = f"rejected: {reason}"
                return None
            self.funnel.passed(f"Passed {price_filter.label}")
        candidate = Candidate(proposal, provider_id, row, expected_cost=row["expected_cost"])
        candidate.score = row["score"] = round(self.scorer.score(provider_id, candidate.expected_cost), 6)
        row["outcome"] = "queued"
        self._seq += 1
        self._queue.put_nowait((-candidate.score, self._seq, candidate))
        return candidate

    async def _negotiate_forever(self) -> None:
        while True:
            if self.max_drafts:
                async with self._room:  # reserve a draft slot before taking a proposal
                    await self._room.wait_for(
                        lambda: self._drafts.qsize() + self._reserved < self.max_drafts)
                    self._reserved += 1
            try:
                _, _, candidate = await self._queue.get()
                if not self._stopping:
                    await self._negotiate_candidate(candidate)
            finally:
                if self.max_drafts:
                    async with self._room:
                        self._reserved -= 1
                        self._room.notify_all()

    async def _negotiate_candidate(self, candidate: Candidate) -> None:
        self.negotiating += 1
        self.funnel.passed(STAGE_NEGOTIATION_INITIALIZED)
        candidate.row["outcome"] = "negotiating"
        try:
            candidate.draft = await self.negotiate(candidate.proposal)
        except Exception as e:
            candidate.row["outcome"] = self.funnel.failed(_negotiation_failure(e))
        else:
            self.funnel.passed(STAGE_NEGOTIATED)
            candidate.row["outcome"] = "negotiated"
            self._seq += 1
            self._drafts.put_nowait((-candidate.score, self._seq, candidate))
        finally:
            self.negotiating -= 1

    async def negotiate(self, offer):
        """Counter-propose until the provider's Draft needs no change; return that Draft.

        The loop of golem-core's `NegotiatingPlugin._negotiate_proposal` with our own
        timeouts and error reasons (reference/yagna-api.md §2.6): one round trip is
        enough with a real provider, who echoes our payment terms.
        """
        import asyncio
        from copy import deepcopy

        from golem.managers import RejectProposal
        from golem.managers.base import ManagerPluginException

        demand_data = await offer.demand.get_demand_data()
        while True:
            negotiated = deepcopy(demand_data)
            try:
                for negotiator in self.negotiators:
                    if await negotiator(negotiated, _proposal_data(offer)) is False:
                        raise RejectProposal()
            except RejectProposal:
                if not offer.initial:
                    await self._reject(offer, "")
                raise
            if not offer.initial and negotiated == demand_data:
                return offer
            demand_data = negotiated
            try:
                ours = await offer.respond(demand_data.properties, demand_data.constraints)
            except Exception as e:  # HTTP error or the 5 s client timeout of `respond`
                raise ManagerPluginException(
                    f"Failed to send proposal response! {_describe_error(e)}") from None
            try:
                offer = await asyncio.wait_for(ours.responses().__anext__(), self.response_timeout)
            except (StopAsyncIteration, asyncio.TimeoutError):
                raise ManagerPluginException(REASON_NO_RESPONSE) from None

    async def _reject(self, proposal, reason: str) -> None:
        await _quietly(proposal.reject(reason))

    def progress(self) -> dict:
        counts = self.funnel.counts
        return {
            "initial": counts[STAGE_INITIAL],
            "passed": counts[self.funnel.stages[-3]],
            "negotiating": self.negotiating,
            "negotiated": counts[STAGE_NEGOTIATED],
            "errors": sum(self.funnel.errors.values()),
        }


def _proposal_data(proposal):
    """ProposalData from the event's embedded data, without parsing the offer's constraints.

    `Proposal.get_proposal_data()` parses them with textX (milliseconds each); nothing
    downstream reads them, and the market already matched them both ways.
    """
    from golem.payload import Constraints, Properties
    from golem.resources import ProposalData

    data = proposal.data
    return ProposalData(properties=Properties(data.properties), constraints=Constraints(),
                        proposal_id=data.proposal_id, issuer_id=data.issuer_id, state=data.state,
                        timestamp=data.timestamp, prev_proposal_id=data.prev_proposal_id)


def _negotiation_failure(e: Exception) -> str:
    """The reason a negotiation failed, as grouped in the Funnel."""
    from golem.resources.proposal.exceptions import ProposalRejected

    if isinstance(e, ProposalRejected):
        return e.reason  # the provider's own text (reference/yagna-api.md §5.1)
    return _describe_error(e)


def _describe_error(e: BaseException) -> str:
    """One line for any failure: HTTP errors as `500: {body}` (ya-aioclient's `ApiException`)."""
    import asyncio

    status = getattr(e, "status", None)
    if status is not None and hasattr(e, "body"):
        body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else (e.body or "")
        return f"{status}: {body.strip()}"
    if isinstance(e, asyncio.TimeoutError):
        return "Request timed out"
    return str(e) or type(e).__name__


def _per_hour(per_second: float | None) -> float | None:
    return None if per_second is None else per_second * 3600


def _decimal(value: float):
    from decimal import Decimal

    return Decimal(str(value))


async def _quietly(awaitable) -> None:
    """Best-effort cleanup: a provider or yagna error must not hide the result."""
    try:
        await awaitable
    except Exception:
        pass


###############################################################################
# 7. Clusters #################################################################
###############################################################################


###############################################################################
# 8. Webserver ################################################################
###############################################################################


###############################################################################
# 9. Daemon control ###########################################################
###############################################################################


###############################################################################
# 10. Ray integration #########################################################
###############################################################################


###############################################################################
# 11. CLI #####################################################################
###############################################################################


# --- network-stats --------------------------------------------------------------


def add_network_stats_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "network-stats", help="scan the market: what your budget buys, before spending anything",
        description="Scan the Golem market with the demand and budget of one node type: count "
                    "proposals per filter, negotiate every one that passes (no agreement is signed) "
                    "and group the reasons negotiations failed.")
    parser.add_argument("cluster_config", metavar="CLUSTER.yaml", help="cluster config file")
    parser.add_argument("--duration", "-d", type=float, default=5.0, metavar="MIN",
                        help="minutes to scan, fractions allowed (default 5)")
    parser.add_argument("--node-type", metavar="NAME",
                        help="node type of `available_node_types` (default: the head node type)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--providers", action="store_true", help="add a table per provider")
    parser.set_defaults(func=cmd_network_stats)


def cmd_network_stats(args) -> int:
    """Scan the market for `--duration` minutes with one node type's demand and budget."""
    import math

    if not (args.duration > 0 and math.isfinite(args.duration)):
        raise UsageError(f"--duration: must be a positive number of minutes, got {args.duration:g}")
    scan = NetworkStatsScan.from_config_file(args.cluster_config, args.node_type)
    return scan.run(args.duration, as_json=args.json, show_providers=args.providers)


class NetworkStatsScan:
    """One `network-stats` run: connect, scan with the MarketPipeline, print, clean up."""

    def __init__(self, node_type: str, node_config: dict, payment_network: str,
                 payment_driver: str = "erc20", total_budget: float = 5.0,
                 local_network: dict | None = None, datadir: str | None = None):
        self.node_type = node_type
        self.node_config = node_config
        self.payment_network = payment_network
        self.payment_driver = payment_driver
        self.total_budget = total_budget
        self.local_network = local_network or {}
        self.datadir = datadir or default_datadir()
        self.interrupted = False

    # -- running ------------------------------------------------------------------

    def run(self, duration_min: float, as_json: bool = False, show_providers: bool = False,
            out=None, err=None) -> int:
        import asyncio
        import json

        out = out or sys.stdout
        err = err or sys.stderr
        spec = DemandSpec.from_node_config(self.node_config, self.payment_network)
        budget = BudgetControl.from_node_config(self.node_config)
        if not as_json:
            print(f"Gathering stats data for {duration_min:g} minute{'s' * (duration_min != 1)}...",
                  file=out, flush=True)
        pipeline = asyncio.run(self._scan(spec, budget, duration_min * 60, err))
        if as_json:
            report = {"node_type": self.node_type, "duration_minutes": duration_min,
                      "interrupted": self.interrupted, **pipeline.funnel.as_dict()}
            print(json.dumps(report, indent=2), file=out)
        else:
            print("Gathering stats data done", file=out)
            print("", file=out)
            print("\n".join(pipeline.funnel.report_lines()), file=out)
            if show_providers:
                print("", file=out)
                print("\n".join(providers_table(pipeline.funnel)), file=out)
        out.flush()
        return 130 if self.interrupted else EXIT_OK

    async def _scan(self, spec: DemandSpec, budget: BudgetControl, duration_s: float, err):
        import asyncio
        import signal

        from golem.node import GolemNode

        _quiet_golem_logging(self.datadir)
        loop = asyncio.get_running_loop()
        stop_event = asyncio.Event()

        def on_signal():
            if not stop_event.is_set():
                self.interrupted = True
                print("\nReceived CTRL-C, exiting...", file=err, flush=True)
                stop_event.set()

        localnet = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            url, app_key, localnet = await loop.run_in_executor(None, self._connect)
            store = open_store_for_market(self.datadir)
            progress = _ProgressLine(err, duration_s) if err.isatty() else None
            node = GolemNode(app_key=app_key, api_url=url, collect_payment_events=False)
            await node.start()
            try:
                pipeline = MarketPipeline(
                    node, spec, budget, total_budget=self.total_budget,
                    payment_driver=self.payment_driver,
                    is_blacklisted=store.blacklist_check(self.payment_network),
                    reputation=store.reputation_lookup(self.payment_network))
                await pipeline.scan(duration_s, stop_event,
                                    on_progress=progress and (lambda e, r: progress.show(e, r, pipeline)))
            finally:
                if progress:
                    progress.clear()
                await node.aclose()
            return pipeline
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if localnet is not None:
                await loop.run_in_executor(None, localnet.stop)
                localnet.remove_datadir()

    def _connect(self):
        """(url, app key, LocalNetworkProcess we started or None); raises what to do otherwise."""
        if self.payment_network == "local":
            return connect_local_network(self.datadir, self.local_network)
        url = os.environ.get("YAGNA_API_URL") or DEFAULT_YAGNA_API_URL
        app_key = os.environ.get("YAGNA_APPKEY")
        if not app_key:
            raise ServiceUnavailable(
                "no yagna app key: set YAGNA_APPKEY to a key from `yagna app-key list` "
                "(or start the services with `ray-on-golem start`)")
        check_yagna(url, app_key)
        return url, app_key, None


def providers_table(funnel: Funnel) -> list[str]:
    """One row per provider, best score first: what it offers and what happened to it."""
    def fmt(value, spec=".4g"):
        return "-" if value is None else format(value, spec)

    header = ["PROVIDER", "NAME", "CPU", "MEM GiB", "START", "CPU/H", "ENV/H", "EXP. COST",
              "SCORE", "OUTCOME"]
    rows = [[p["id"], str(p.get("name") or "-"), fmt(p.get("cpu_threads"), "d"),
             fmt(p.get("mem_gib"), ".3g"), fmt(p.get("start_price")), fmt(p.get("cpu_per_hour")),
             fmt(p.get("env_per_hour")), fmt(p.get("expected_cost")), fmt(p.get("score"), ".3f"),
             p.get("outcome", "")]
            for p in funnel.as_dict()["providers"]]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip()
            for r in [header] + rows]


class _ProgressLine:
    """`elapsed / remaining / running counts`, rewritten in place on a terminal."""

    def __init__(self, stream, duration_s: float):
        self.stream = stream
        self.duration_s = duration_s

    def show(self, elapsed: float, remaining: float, pipeline: MarketPipeline) -> None:
        p = pipeline.progress()
        line = (f"{_clock(elapsed)} elapsed, {_clock(remaining)} left: {p['initial']} proposals, "
                f"{p['passed']} passed filters, {p['negotiating']} negotiating, "
                f"{p['negotiated']} negotiated, {p['errors']} failed")
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[2K")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _quiet_golem_logging(datadir: str) -> None:
    """golem-core and asyncio log to `<datadir>/network-stats.log`, never over the report."""
    import logging

    handler = logging.FileHandler(os.path.join(ensure_datadir(datadir), "network-stats.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("golem", "asyncio"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ray-on-golem` console script and `python -m ray_on_golem`."""
    raise SystemExit("not built yet")


if __name__ == "__main__":
    sys.exit(main())
