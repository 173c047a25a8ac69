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
import re
import sys
import time

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


def cache_dir() -> str:
    """`$XDG_CACHE_HOME/ray-on-golem` (default `~/.cache/ray-on-golem`): what can be rebuilt at any time."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ray-on-golem")


DB_FILENAME = "ray_on_golem.sqlite3"
# Ray resolves `provider.module` with importlib + getattr (ray-provider.md), so this is the module path.
PROVIDER_MODULE = "ray_on_golem.GolemNodeProvider"
DEFAULT_HEAD_NODE_TYPE = "ray.head.default"  # Ray's own default for `head_node_type`
HEAD_PRIORITY_SUBNET = "ray-on-golem-heads"  # anchor §4.2: head nodes try this subnet first
DEFAULT_PAYMENT_NETWORK = "holesky"  # as the original: real use defaults to the testnet
DEFAULT_NODE_START_TIMEOUT = 600.0  # seconds; `ray up` must never hang forever (anchor §11.7)
ALL_NETWORKS = "all"

# A Golem node id: an Ethereum address (yagna identity), always stored lower-case.
NODE_ID_RE = re.compile(r"0x[0-9a-fA-F]{40}")


def find_yagna() -> str | None:
    """Path of the `yagna` binary: `$YAGNA_PATH`, then `$PATH`, then next to this Python (a venv's bin).

    golem-node installs `yagna` into the venv's bin, which is not on `$PATH` unless it is activated.
    """
    import shutil

    env = os.environ.get("YAGNA_PATH")
    if env:
        return shutil.which(env)
    found = shutil.which("yagna")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "yagna")
    return candidate if os.access(candidate, os.X_OK) else None


# Inside the zipapp the C extensions of aiohttp & co cannot load (a `.so` cannot be imported from a zip):
# their *_NO_EXTENSIONS switches select the pure-Python fallbacks. Set before golem-core is imported.
_ZIPAPP = globals().get("__loader__").archive if type(globals().get("__loader__")).__name__ == "zipimporter" else None
if _ZIPAPP:  # pragma: no cover - zipapp only
    for _name in ("AIOHTTP", "MULTIDICT", "YARL", "FROZENLIST", "PROPCACHE"):
        os.environ.setdefault(f"{_name}_NO_EXTENSIONS", "1")


def prepare_bundled_imports() -> str | None:
    """Call before the first `import yaml`/`import golem`: inside the zipapp, put its bundle on sys.path.

    The zipapp keeps its dependencies in an inner `bundle.zip` (build_zipapp.py says why), and
    golem-core and textX open their grammars (`golem/payload/parser.tx`, `textx/textx.tx`) by path
    next to `__file__`, which cannot work inside a zip anyway. So the bundle is extracted once per
    zip (atomically, to `~/.cache/ray-on-golem/bundle-<version>-<size>-<mtime>`), its precompiled
    pycs into `__pycache__`. Outside the zipapp this does nothing and returns None.
    """
    if not _ZIPAPP:
        return None
    import zipfile
    from importlib.util import MAGIC_NUMBER, cache_from_source

    stat = os.stat(_ZIPAPP)
    target = os.path.join(cache_dir(), f"bundle-{__version__}-{stat.st_size}-{int(stat.st_mtime)}")
    if not os.path.isdir(target):
        tmp = f"{target}.tmp.{os.getpid()}"
        with zipfile.ZipFile(_ZIPAPP) as outer, outer.open("bundle.zip") as inner, zipfile.ZipFile(inner) as zf:
            for info in zf.infolist():
                name = info.filename
                data = zf.read(info)
                if name.endswith(".pyc"):
                    if data[:4] != MAGIC_NUMBER:
                        continue  # another Python: it compiles the .py itself
                    name = os.path.relpath(cache_from_source(os.path.join(tmp, name[:-1])), tmp)
                path = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if target not in sys.path:
        sys.path.insert(0, target)
    return target


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
    """A cluster config that cannot be used; the message names the field path.

    `issues` holds every `(path, message)` found, so one run reports all mistakes, not the first.
    """

    def __init__(self, path: str, message: str, issues: list[tuple[str, str]] | None = None):
        self.path = path
        self.issues = issues or [(path, message)]
        if len(self.issues) == 1:
            text = f"{path}: {message}" if path else message
        else:
            lines = [f"  {p}: {m}" if p else f"  {m}" for p, m in self.issues]
            text = f"{len(self.issues)} problems in the cluster config:\n" + "\n".join(lines)
        super().__init__(text)


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


class _Invalid(Exception):
    """Raised by a field check: the text says what was expected."""


_REQUIRED = object()  # default of a field that must be given


def _describe(value) -> str:
    """How a found value is shown in an error: its YAML-ish repr and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        text = repr(value)
        return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _number(minimum=None, *, exclusive=False, maximum=None, integer=False, nullable=False):
    """A check for an int/float field with bounds (bool is not a number here, although Python says so)."""
    kind = "an integer" if integer else "a number"
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" or null" if nullable else "")

    def check(value):
        if value is None and nullable:
            return None
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or value != value:  # NaN != NaN
            raise _Invalid(expected)
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise _Invalid(expected)
        if maximum is not None and value > maximum:
            raise _Invalid(expected)
        return value

    return check


def _string(*, nullable=False, choices=None, pattern=None, what="a non-empty string"):
    expected = f"one of {', '.join(choices)}" if choices else what
    expected += " or null" if nullable else ""

    def check(value):
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(expected)
        if choices and value not in choices:
            raise _Invalid(expected + _did_you_mean(value, choices))
        if pattern and not re.fullmatch(pattern, value):
            raise _Invalid(expected)
        return value

    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _string_list(item=None, what="a list of strings"):
    def check(value):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _Invalid(what)
        if item:
            for v in value:
                item(v)
        return list(value)

    return check


def _url(value):
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise _Invalid(f"a list of http(s) URLs (`{value}` is not one)")


def _mapping(*, nullable=False):
    def check(value):
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            raise _Invalid("a mapping" + (" or null" if nullable else ""))
        return dict(value)

    return check


def _port(*, nullable=False):
    return _number(1, maximum=65535, integer=True, nullable=nullable)


def parse_duration(value) -> float:
    """Seconds from `90`, `"90s"`, `"10m"`, `"2h"`, `"1d"` or `"1h30m"`; `UsageError` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d+)?\s*[smhdw]?\s*)+", value):
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", value)
        if len(parts) > 1 and not all(unit for _, unit in parts):
            raise UsageError(f"expected a duration like 90s, 10m, 2h or 1d, found {value!r}")
        scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    else:
        raise UsageError(f"expected a duration like 90s, 10m, 2h or 1d, found {value!r}")
    if seconds <= 0:
        raise UsageError(f"expected a positive duration, found {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """`5400` -> `1h30m`: the inverse of `parse_duration` for people."""
    seconds = int(round(seconds))
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out) or "0s"


def _duration(value):
    try:
        return parse_duration(value)
    except UsageError:
        raise _Invalid("a positive duration in seconds or like 90s, 10m, 2h") from None


def check_payment_network(value, *, allow_all=False) -> str:
    """A payment network name, or `UsageError` with a hint for the dead testnets."""
    choices = PAYMENT_NETWORKS + ((ALL_NETWORKS,) if allow_all else ())
    if isinstance(value, str) and value.lower() in DEAD_PAYMENT_NETWORKS:
        raise UsageError(f"expected one of {', '.join(choices)}, found {value!r}: {DEAD_PAYMENT_NETWORKS[value.lower()]}")
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"expected one of {', '.join(choices)}, found {_describe(value)}{_did_you_mean(value, choices)}")
    return value


def resolve_networks(value: str | None) -> tuple[str, ...]:
    """`--network` of the reputation commands: one network, or every one for `all`/None."""
    if value is None or check_payment_network(value, allow_all=True) == ALL_NETWORKS:
        return PAYMENT_NETWORKS
    return (value,)


def _network(value):
    try:
        return check_payment_network(value)
    except UsageError as err:
        raise _Invalid(str(err).removeprefix("expected ")) from None


class _Block:
    """A nested mapping of the schema; `optional` blocks stay null unless given."""

    def __init__(self, fields: dict, *, optional=False):
        self.fields = fields
        self.optional = optional


# Schemas are data: key -> (default, check) for a leaf, or a _Block. Keys and defaults follow the
# original's pydantic models (anchor §4.1-4.2, all `extra="forbid"`), plus our own additions.
NODE_CONFIG_SCHEMA = {
    "subnet_tag": ("public", _string()),
    "priority_subnet_tag": (None, _string(nullable=True)),
    "demand": _Block({
        "image_tag": (None, _string(nullable=True)),
        "image_hash": (None, _string(nullable=True, pattern=r"(sha3:)?([0-9a-fA-F]{56}|[0-9a-fA-F]{64})",
                                     what="a sha3 hash (56 or 64 hex digits)")),
        "capabilities": (["vpn", "inet"], _string_list()),
        "outbound_urls": ([], _string_list(item=_url, what="a list of http(s) URLs")),
        "min_mem_gib": (0.0, _number(0)),
        "min_cpu_threads": (0, _number(0, integer=True)),
        "min_storage_gib": (0.0, _number(0)),
        "max_cpu_threads": (None, _number(1, integer=True, nullable=True)),
        "runtime": ("vm", _string()),
        "node_descriptor": (None, _mapping(nullable=True)),
    }),
    "budget_control": _Block({
        "per_cpu_expected_usage": _Block({
            "cpu_load": (_REQUIRED, _number(0, exclusive=True, maximum=1)),
            "duration_hours": (_REQUIRED, _number(0, exclusive=True)),
            "max_cost": (None, _number(0, nullable=True)),
        }, optional=True),
        "max_start_price": (None, _number(0, nullable=True)),
        "max_cpu_per_hour_price": (None, _number(0, nullable=True)),
        "max_env_per_hour_price": (None, _number(0, nullable=True)),
        "payment_interval_hours": _Block({
            "minimal": (12, _number(0, exclusive=True)),
            "optimal": (None, _number(0, exclusive=True, nullable=True)),
        }),
    }),
}
HEAD_NODE_DEFAULTS = {"priority_subnet_tag": HEAD_PRIORITY_SUBNET}

LOCAL_NETWORK_SCHEMA = {
    "providers": (8, _number(1, integer=True)),
    "seed": (0, _number(integer=True)),
    "profile": (None, _string(nullable=True)),
    "time_scale": (1.0, _number(0, exclusive=True)),
}

PROVIDER_PARAMETERS_SCHEMA = {
    "webserver_port": (DEFAULT_WEBSERVER_PORT, _port()),
    "webserver_datadir": (None, _string(nullable=True)),
    "ray_gcs_expose_port": (6379, _port(nullable=True)),
    "enable_registry_stats": (True, _boolean),
    "payment_network": (DEFAULT_PAYMENT_NETWORK, _network),
    "payment_driver": ("erc20", _string(choices=("erc20",))),
    "total_budget": (5.0, _number(0, exclusive=True)),
    "node_start_timeout": (DEFAULT_NODE_START_TIMEOUT, _duration),
    # node_config is checked separately: it is merged into every node type first.
    "node_config": ({}, _mapping()),
    "local_network": _Block(LOCAL_NETWORK_SCHEMA),
    # Filled from `auth` by the node provider's bootstrap_config; Ray hands them back to us.
    "ssh_private_key": (None, _string(nullable=True)),
    "ssh_user": (None, _string(nullable=True)),
}

_COMMANDS = ([], _string_list(what="a list of shell commands (strings)"))
RAY_CONFIG_SCHEMA = {  # top level keys of Ray's ray/autoscaler/ray-schema.json (additionalProperties: false)
    "cluster_name": ("default", _string()),
    "max_workers": (2, _number(0, integer=True)),
    "upscaling_speed": (1.0, _number(0, exclusive=True)),
    "idle_timeout_minutes": (5, _number(0)),
    "head_node_type": (DEFAULT_HEAD_NODE_TYPE, _string()),
    "initialization_commands": _COMMANDS,
    "setup_commands": _COMMANDS,
    "head_setup_commands": _COMMANDS,
    "worker_setup_commands": _COMMANDS,
    "head_start_ray_commands": _COMMANDS,
    "worker_start_ray_commands": _COMMANDS,
    "file_mounts": ({}, _mapping()),
    "cluster_synced_files": ([], _string_list()),
    "file_mounts_sync_continuously": (False, _boolean),
    "rsync_exclude": ([], _string_list()),
    "rsync_filter": ([], _string_list()),
    "docker": ({}, _mapping()),
    "metadata": ({}, _mapping()),
    "no_restart": (False, _boolean),
    # Legacy keys the original's YAMLs carry "to satisfy checks" (anchor §4).
    "head_node": (None, lambda v: v),
    "worker_nodes": (None, lambda v: v),
}
PROVIDER_BLOCK_KEYS = ("type", "module", "use_internal_ips", "parameters", "cache_stopped_nodes",
                       "disable_launch_config_check", "disable_node_updaters", "foreground_node_launch")
AUTH_SCHEMA = {
    "ssh_user": ("root", _string()),
    "ssh_private_key": (None, _string(nullable=True)),
    "ssh_public_key": (None, _string(nullable=True)),
    "ssh_proxy_command": (None, _string(nullable=True)),
}
NODE_TYPE_SCHEMA = {  # Ray's per node type keys; `node_config` is ours, checked against NODE_CONFIG_SCHEMA
    "node_config": ({}, _mapping()),
    "resources": (_REQUIRED, _mapping()),
    "min_workers": (0, _number(0, integer=True)),
    "max_workers": (None, _number(0, integer=True, nullable=True)),
    "idle_timeout_s": (None, _number(0, nullable=True)),
    "priority": (None, _number(integer=True, nullable=True)),
    "labels": ({}, _mapping()),
    "initialization_commands": _COMMANDS,
    "worker_setup_commands": _COMMANDS,
    "docker": ({}, _mapping()),
}


def _walk(schema: dict, raw, path: str, issues: list, *, defaults: bool) -> dict:
    """Check `raw` against `schema`, appending `(path, message)` to `issues`.

    With `defaults`, missing keys get their defaults and required keys are enforced; without,
    only what is present is checked (a partial `node_config` before the merge).
    """
    import copy

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        issues.append((path, f"expected a mapping, found {_describe(raw)}"))
        raw = {}
    out = {}
    for key in raw:
        if key not in schema:
            hint = _did_you_mean(key, schema) or f" (expected one of: {', '.join(schema)})"
            issues.append((f"{path}.{key}", f"unknown key{hint}"))
    for key, spec in schema.items():
        sub = f"{path}.{key}"
        if isinstance(spec, _Block):
            if raw.get(key) is None and (spec.optional or not defaults):
                if defaults:
                    out[key] = None
                continue
            out[key] = _walk(spec.fields, raw.get(key), sub, issues, defaults=defaults)
            continue
        default, check = spec
        if key not in raw:
            if defaults and default is _REQUIRED:
                issues.append((sub, "required key is missing"))
            elif defaults:
                out[key] = copy.deepcopy(default)
            continue
        try:
            out[key] = check(raw[key])
        except _Invalid as err:
            issues.append((sub, f"expected {err}, found {_describe(raw[key])}"))
    return out


def merge_node_config(base: dict, override: dict) -> dict:
    """Per node type override: dicts merge key by key, lists and scalars replace.

    The original appended lists (dpath ADDITIVE, anchor §4.3/§11.14), so a node type could never
    drop `outbound_urls` given at the provider level; replacing is what users expect.
    """
    out = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_node_config(out[key], value)
        else:
            out[key] = value
    return out


def _has(raw, *keys) -> bool:
    for key in keys:
        if not isinstance(raw, dict) or key not in raw:
            return False
        raw = raw[key]
    return True


def _resolve_node_config(own: dict, common: dict, is_head: bool, own_path: str, common_path: str,
                         issues: list) -> dict:
    """Head defaults <- provider-level `common` <- the node type's `own`, defaulted and cross-checked.

    Both inputs were checked field by field already; what is left are the rules across fields, and
    an error blames the level that set the field (`own_path` or `common_path`).
    """
    merged = merge_node_config(merge_node_config(HEAD_NODE_DEFAULTS if is_head else {}, common), own)

    def origin(*keys):
        return own_path if _has(own, *keys) or not _has(common, *keys) else common_path

    resolved = _walk(NODE_CONFIG_SCHEMA, merged, "", [], defaults=True)
    usage = merged.get("budget_control", {}).get("per_cpu_expected_usage")
    if usage is not None:
        base = origin("budget_control", "per_cpu_expected_usage") + ".budget_control.per_cpu_expected_usage"
        for key in ("cpu_load", "duration_hours"):
            if key not in usage:
                issues.append((f"{base}.{key}", "required key is missing (per_cpu_expected_usage is given)"))
    demand = resolved["demand"]
    if demand["image_tag"] and demand["image_hash"]:
        blame_own = _has(own, "demand", "image_tag") or _has(own, "demand", "image_hash")
        issues.append(((own_path if blame_own else common_path) + ".demand",
                       "Either the `image_tag` or `image_hash` is allowed, not both "
                       f"(found image_tag={demand['image_tag']!r}, image_hash={demand['image_hash']!r})"))
    elif not demand["image_tag"] and not demand["image_hash"]:
        issues.append((origin("demand") + ".demand",
                       "Either the `image_tag` or `image_hash` is required (found neither)"))
    intervals = resolved["budget_control"]["payment_interval_hours"]
    if intervals["optimal"] is None:
        intervals["optimal"] = intervals["minimal"]
    elif intervals["optimal"] < intervals["minimal"]:
        issues.append((origin("budget_control", "payment_interval_hours")
                       + ".budget_control.payment_interval_hours.optimal",
                       f"expected a number >= minimal ({intervals['minimal']}), found {intervals['optimal']}"))
    return resolved


def resolve_node_config(node_config: dict, common: dict | None = None, *, head: bool = False) -> dict:
    """One node's `node_config` (what Ray passes to `create_node`), checked, merged over `common` and
    defaulted; `ConfigError` naming `node_config.<field>` otherwise. For callers that hold no whole
    cluster YAML (the node provider on the head node)."""
    issues: list[tuple[str, str]] = []
    common = common or {}
    _walk(NODE_CONFIG_SCHEMA, common, "provider.parameters.node_config", issues, defaults=False)
    _walk(NODE_CONFIG_SCHEMA, node_config, "node_config", issues, defaults=False)
    if not issues:
        resolved = _resolve_node_config(node_config or {}, common, head, "node_config",
                                        "provider.parameters.node_config", issues)
    if issues:
        raise ConfigError(issues[0][0], issues[0][1], issues)
    return resolved


class NodeType:
    """One entry of `available_node_types` with its fully merged and defaulted `node_config`."""

    def __init__(self, name: str, is_head: bool, node_config: dict, resources: dict,
                 min_workers: int, max_workers: int | None):
        self.name = name
        self.is_head = is_head
        self.node_config = node_config
        self.resources = resources
        self.min_workers = min_workers
        self.max_workers = max_workers

    def to_dict(self) -> dict:
        return {"head": self.is_head, "min_workers": self.min_workers, "max_workers": self.max_workers,
                "resources": self.resources, "node_config": self.node_config}


class ClusterConfig:
    """A validated cluster YAML: Ray's top-level keys, our `provider.parameters` and the node types."""

    def __init__(self, raw: dict, settings: dict, provider: dict, parameters: dict, auth: dict,
                 node_types: dict[str, NodeType], warnings: list[str], source: str | None):
        self.raw = raw
        self.settings = settings
        self.provider = provider
        self.parameters = parameters
        self.auth = auth
        self.node_types = node_types
        self.warnings = warnings
        self.source = source

    cluster_name = property(lambda self: self.settings["cluster_name"])
    head_node_type = property(lambda self: self.settings["head_node_type"])
    payment_network = property(lambda self: self.parameters["payment_network"])
    total_budget = property(lambda self: self.parameters["total_budget"])
    node_start_timeout = property(lambda self: self.parameters["node_start_timeout"])

    def node_config(self, node_type: str) -> dict:
        """The merged `node_config` of one node type (what Ray passes to `create_node`)."""
        try:
            return self.node_types[node_type].node_config
        except KeyError:
            raise UsageError(f"unknown node type {node_type!r}{_did_you_mean(node_type, self.node_types)}") from None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "cluster_name": self.cluster_name,
            "max_workers": self.settings["max_workers"],
            "idle_timeout_minutes": self.settings["idle_timeout_minutes"],
            "head_node_type": self.head_node_type,
            "provider": {"type": self.provider["type"], "module": self.provider["module"],
                         "parameters": {k: v for k, v in self.parameters.items() if k != "node_config"}},
            "auth": self.auth,
            "node_types": {name: nt.to_dict() for name, nt in self.node_types.items()},
            "warnings": self.warnings,
        }


def _read_cluster_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"cluster config {path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise UsageError(f"cluster config {path}: cannot be read ({err.__class__.__name__})") from None
    try:
        prepare_bundled_imports()
        import yaml
    except ImportError:
        raise RayOnGolemError("reading a cluster YAML needs PyYAML: pip install 'PyYAML==6.0.3'") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError("", f"cluster config {path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"cluster config {path}: expected a mapping at the top level, found {_describe(data)}")
    return data


def load_cluster_config(source) -> ClusterConfig:
    """Validate a cluster config (a YAML path or an already parsed dict) and resolve every node type.

    Runs before anything else happens (no prompt, no process, no spend): every problem is reported
    at once as a `ConfigError` naming the field path, what was expected and what was found.
    """
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        raw = _read_cluster_yaml(path)
    elif isinstance(source, dict):
        raw = source
    else:
        raise UsageError(f"expected a cluster config path or mapping, found {_describe(source)}")

    issues: list[tuple[str, str]] = []
    warnings: list[str] = []
    top_schema = dict(RAY_CONFIG_SCHEMA, provider=None, auth=None, available_node_types=None)
    settings = _walk(RAY_CONFIG_SCHEMA, {k: v for k, v in raw.items() if k in RAY_CONFIG_SCHEMA},
                     "", issues, defaults=True)
    issues[:] = [(p.lstrip("."), m) for p, m in issues]
    for key in [k for k in raw if k not in top_schema]:
        issues.append((str(key), f"unknown key{_did_you_mean(key, top_schema)}"))

    # provider: Ray's external provider block pointing at our module.
    provider = raw.get("provider")
    provider_node_config_ok = False  # node types are resolved only on top of a valid provider level
    parameters: dict = {}
    provider_node_config: dict = {}
    if not isinstance(provider, dict):
        issues.append(("provider", f"expected a mapping with type: external and module: {PROVIDER_MODULE}, "
                                   f"found {_describe(provider)}"))
        provider = {}
    else:
        for key in provider:
            if key not in PROVIDER_BLOCK_KEYS:
                issues.append((f"provider.{key}", f"unknown key{_did_you_mean(key, PROVIDER_BLOCK_KEYS)}"))
        if provider.get("type") != "external":
            issues.append(("provider.type", f"expected `external`, found {_describe(provider.get('type'))}"))
        module = provider.get("module")
        if module != PROVIDER_MODULE:
            hint = (" (the original's module path; this tool's provider lives at the module top level)"
                    if module == "ray_on_golem.provider.node_provider.GolemNodeProvider" else "")
            issues.append(("provider.module", f"expected `{PROVIDER_MODULE}`, found {_describe(module)}{hint}"))
        if "use_internal_ips" in provider and not isinstance(provider["use_internal_ips"], bool):
            issues.append(("provider.use_internal_ips", f"expected true or false, "
                                                        f"found {_describe(provider['use_internal_ips'])}"))
        parameters = _walk(PROVIDER_PARAMETERS_SCHEMA, provider.get("parameters"), "provider.parameters",
                           issues, defaults=True)
        provider_node_config = (provider.get("parameters") or {}).get("node_config") or {}
        if isinstance(provider_node_config, dict):
            before = len(issues)
            _walk(NODE_CONFIG_SCHEMA, provider_node_config, "provider.parameters.node_config", issues, defaults=False)
            provider_node_config_ok = len(issues) == before
        else:
            provider_node_config = {}
        if parameters.get("payment_network") != "local" and _has(provider.get("parameters"), "local_network"):
            warnings.append("provider.parameters.local_network is used only with payment_network: local; ignored")
        if parameters.get("payment_network") == "polygon":
            warnings.append("payment_network: polygon spends real GLM (mainnet)")

    auth = _walk(AUTH_SCHEMA, raw.get("auth"), "auth", issues, defaults=True)

    # available_node_types: Ray's node types, each node_config = head defaults <- provider <- own.
    node_types: dict[str, NodeType] = {}
    types_raw = raw.get("available_node_types")
    head_type = settings.get("head_node_type", DEFAULT_HEAD_NODE_TYPE)
    if not isinstance(types_raw, dict) or not types_raw:
        issues.append(("available_node_types", f"expected a mapping of node type names to node types, "
                                               f"found {_describe(types_raw)}"))
        types_raw = {}
    elif head_type not in types_raw:
        issues.append(("head_node_type", f"expected one of the available_node_types ({', '.join(types_raw)}), "
                                         f"found {head_type!r}{_did_you_mean(head_type, types_raw)}"))
    for name, type_raw in types_raw.items():
        type_path = f"available_node_types.{name}"
        before = len(issues)
        fields = _walk(NODE_TYPE_SCHEMA, type_raw, type_path, issues, defaults=True)
        own = fields.get("node_config") or {}
        _walk(NODE_CONFIG_SCHEMA, own, f"{type_path}.node_config", issues, defaults=False)
        for res, amount in (fields.get("resources") or {}).items():
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                issues.append((f"{type_path}.resources.{res}", f"expected an integer >= 0, found {_describe(amount)}"))
        max_w = fields.get("max_workers")
        if max_w is not None and fields.get("min_workers", 0) > max_w:
            issues.append((f"{type_path}.min_workers", f"expected at most max_workers ({max_w}), "
                                                       f"found {fields['min_workers']}"))
        if len(issues) > before or not provider_node_config_ok:
            continue
        is_head = name == head_type
        resolved = _resolve_node_config(own, provider_node_config, is_head, f"{type_path}.node_config",
                                        "provider.parameters.node_config", issues)
        node_types[name] = NodeType(name, is_head, resolved, fields["resources"], fields["min_workers"], max_w)

    if issues:
        raise ConfigError(issues[0][0], issues[0][1], issues)
    parameters["node_config"] = provider_node_config
    return ClusterConfig(raw, settings, dict(provider), parameters, auth, node_types, warnings, path)


###############################################################################
# 4. Store ####################################################################
###############################################################################


def check_node_id(value: str) -> str:
    """A Golem node id (`0x` + 40 hex digits), lower-cased; `UsageError` saying why otherwise."""
    if not isinstance(value, str) or not NODE_ID_RE.fullmatch(value.strip()):
        why = ("missing the 0x prefix" if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{40}", value)
               else "expected 0x followed by 40 hex digits")
        raise UsageError(f"invalid node id {value!r}: {why}")
    return value.strip().lower()


def format_time(ts: float | None) -> str:
    """UTC ISO-8601 to the second, for tables; '' for None."""
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# Outcome of each provider event kind for the local success rate: True counts as a success,
# False as a failure. Later issues add kinds here (no migration needed: the column is free text).
PROVIDER_EVENT_KINDS = {
    "agreement_ok": True,
    "agreement_failed": False,
    "deploy_ok": True,
    "deploy_failed": False,
    "start_failed": False,
    "activity_finished": True,
    "activity_died": False,
    "connection_failed": False,
}

# Weights of the original's ReputationScorer (anchor §7): (uptime*1.0 + success_rate*0.5) / 1.5,
# a missing value counted as 0.
SCORE_WEIGHTS = {"uptime": 1.0, "success_rate": 0.5}

# Migrations by `PRAGMA user_version`: entry i brings the schema from version i to i+1. Never edit a
# published entry; append one. Each is a list of single statements (run inside one transaction:
# sqlite3's executescript would commit on its own).
MIGRATIONS: list[list[str]] = [
    [
        # Providers we have seen (offers, agreements, the registry); names come from offers.
        """CREATE TABLE providers (
            node_id     TEXT PRIMARY KEY,
            name        TEXT,
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL
        )""",
        # Scores per (provider, payment network): the registry's and the ones we compute.
        """CREATE TABLE reputation (
            node_id                TEXT NOT NULL,
            network                TEXT NOT NULL,
            registry_success_rate  REAL,
            registry_uptime        REAL,
            local_ok               INTEGER NOT NULL DEFAULT 0,
            local_failed           INTEGER NOT NULL DEFAULT 0,
            success_rate           REAL,
            uptime                 REAL,
            score                  REAL,
            updated_at             REAL NOT NULL,
            PRIMARY KEY (node_id, network)
        )""",
        """CREATE TABLE provider_events (
            id            INTEGER PRIMARY KEY,
            node_id       TEXT NOT NULL,
            network       TEXT NOT NULL,
            kind          TEXT NOT NULL,
            detail        TEXT,
            cluster_name  TEXT,
            created_at    REAL NOT NULL
        )""",
        "CREATE INDEX provider_events_node ON provider_events (node_id, network, created_at)",
        # expires_at NULL = blocked until unblocked.
        """CREATE TABLE blacklist (
            node_id     TEXT NOT NULL,
            network     TEXT NOT NULL,
            reason      TEXT,
            source      TEXT NOT NULL DEFAULT 'user',
            created_at  REAL NOT NULL,
            expires_at  REAL,
            PRIMARY KEY (node_id, network)
        )""",
        "CREATE INDEX blacklist_expires ON blacklist (expires_at)",
        """CREATE TABLE clusters (
            name          TEXT PRIMARY KEY,
            network       TEXT NOT NULL,
            state         TEXT NOT NULL,
            config        TEXT NOT NULL,
            total_budget  TEXT NOT NULL,
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL
        )""",
        """CREATE TABLE nodes (
            node_id       TEXT PRIMARY KEY,
            cluster_name  TEXT NOT NULL REFERENCES clusters (name) ON DELETE CASCADE,
            node_type     TEXT NOT NULL,
            state         TEXT NOT NULL,
            tags          TEXT NOT NULL DEFAULT '{}',
            provider_id   TEXT,
            internal_ip   TEXT,
            state_log     TEXT NOT NULL DEFAULT '[]',
            attempts      INTEGER NOT NULL DEFAULT 0,
            deadline      REAL,
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL
        )""",
        "CREATE INDEX nodes_cluster ON nodes (cluster_name, state)",
        """CREATE TABLE allocations (
            allocation_id  TEXT PRIMARY KEY,
            cluster_name   TEXT NOT NULL REFERENCES clusters (name),
            platform       TEXT NOT NULL,
            amount         TEXT NOT NULL,
            created_at     REAL NOT NULL,
            released_at    REAL
        )""",
        """CREATE TABLE agreements (
            agreement_id  TEXT PRIMARY KEY,
            cluster_name  TEXT NOT NULL REFERENCES clusters (name),
            node_id       TEXT REFERENCES nodes (node_id),
            provider_id   TEXT NOT NULL,
            network       TEXT NOT NULL,
            state         TEXT NOT NULL,
            terms         TEXT NOT NULL DEFAULT '{}',
            created_at    REAL NOT NULL,
            terminated_at REAL,
            reason        TEXT
        )""",
        "CREATE INDEX agreements_cluster ON agreements (cluster_name, state)",
        """CREATE TABLE activities (
            activity_id   TEXT PRIMARY KEY,
            agreement_id  TEXT NOT NULL REFERENCES agreements (agreement_id),
            state         TEXT NOT NULL,
            created_at    REAL NOT NULL,
            destroyed_at  REAL
        )""",
        # Debit notes and invoices; amounts are exact decimal strings (GLM has 18 decimals).
        """CREATE TABLE ledger (
            document_id   TEXT PRIMARY KEY,
            kind          TEXT NOT NULL CHECK (kind IN ('debit_note', 'invoice')),
            agreement_id  TEXT NOT NULL REFERENCES agreements (agreement_id),
            activity_id   TEXT,
            cluster_name  TEXT NOT NULL,
            amount        TEXT NOT NULL,
            status        TEXT NOT NULL,
            created_at    REAL NOT NULL,
            settled_at    REAL
        )""",
        "CREATE INDEX ledger_cluster ON ledger (cluster_name, kind)",
    ],
]


class Store:
    """The one sqlite3 database in the data dir; owns the connection and every query.

    WAL + a busy timeout let the webserver and any number of CLI processes write at once; writes use
    `BEGIN IMMEDIATE` so two writers queue instead of failing on a lock upgrade. `clock` is injectable
    (tests move time instead of sleeping).
    """

    BUSY_TIMEOUT_S = 30.0

    def __init__(self, datadir: str | None = None, *, path: str | None = None, clock=time.time):
        if path is None:
            path = os.path.join(ensure_datadir(datadir or default_datadir()), DB_FILENAME)
        self.path = path
        self.clock = clock
        import sqlite3

        self._sqlite3 = sqlite3
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            self.conn = sqlite3.connect(path, timeout=self.BUSY_TIMEOUT_S, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.BUSY_TIMEOUT_S * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self.migrate()
        except sqlite3.Error as err:
            raise RayOnGolemError(f"database {path}: {err}") from None
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transaction(self):
        """`with store.transaction():` one IMMEDIATE transaction, rolled back on error."""
        import contextlib

        @contextlib.contextmanager
        def tx():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

        return tx()

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> int:
        """Bring the schema to the latest version; safe when several processes open a new file at once."""
        if self.schema_version == len(MIGRATIONS):
            return len(MIGRATIONS)
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # re-read under the write lock
            if version > len(MIGRATIONS):
                raise RayOnGolemError(f"database {self.path} has schema version {version}, newer than this "
                                      f"ray-on-golem {__version__} knows ({len(MIGRATIONS)}): upgrade ray-on-golem")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        return len(MIGRATIONS)

    # -- providers and events ------------------------------------------------

    def record_provider(self, node_id: str, name: str | None = None, *, seen_at: float | None = None) -> None:
        node_id = check_node_id(node_id)
        seen_at = self.clock() if seen_at is None else seen_at
        with self.transaction() as conn:
            conn.execute(
                """INSERT INTO providers (node_id, name, first_seen, last_seen) VALUES (?, ?, ?, ?)
                   ON CONFLICT (node_id) DO UPDATE SET name = coalesce(excluded.name, name),
                   last_seen = max(last_seen, excluded.last_seen)""",
                (node_id, name, seen_at, seen_at))

    def record_event(self, node_id: str, network: str, kind: str, *, detail: str | None = None,
                     cluster_name: str | None = None) -> int:
        """Remember what a provider did (agreement ok/failed, deploy failed, activity died, ...)."""
        node_id = check_node_id(node_id)
        check_payment_network(network)
        if kind not in PROVIDER_EVENT_KINDS:
            raise UsageError(f"unknown provider event kind {kind!r}{_did_you_mean(kind, PROVIDER_EVENT_KINDS)}")
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO provider_events (node_id, network, kind, detail, cluster_name, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (node_id, network, kind, detail, cluster_name, self.clock()))
            return cur.lastrowid

    def events(self, node_id: str | None = None, network: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM provider_events WHERE 1", []
        if node_id:
            sql, args = sql + " AND node_id = ?", args + [check_node_id(node_id)]
        if network:
            sql, args = sql + " AND network = ?", args + [network]
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    # -- blacklist -------------------------------------------------------------

    def block(self, node_id: str, networks=PAYMENT_NETWORKS, *, reason: str | None = None,
              duration: float | None = None, source: str = "user") -> float | None:
        """Block a provider on `networks` (forever, or for `duration` seconds); returns the expiry."""
        node_id = check_node_id(node_id)
        networks = [check_payment_network(n) for n in networks]
        now = self.clock()
        expires_at = None if duration is None else now + duration
        with self.transaction() as conn:
            conn.executemany(
                """INSERT INTO blacklist (node_id, network, reason, source, created_at, expires_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (node_id, network) DO UPDATE SET reason = excluded.reason,
                   source = excluded.source, created_at = excluded.created_at, expires_at = excluded.expires_at""",
                [(node_id, n, reason, source, now, expires_at) for n in networks])
        return expires_at

    def unblock(self, node_id: str, networks=PAYMENT_NETWORKS) -> list[str]:
        """Lift blocks; returns the networks on which the provider was blocked (expired ones don't count)."""
        node_id = check_node_id(node_id)
        networks = [check_payment_network(n) for n in networks]
        marks = ",".join("?" * len(networks))
        with self.transaction() as conn:
            was = [r[0] for r in conn.execute(
                f"SELECT network FROM blacklist WHERE node_id = ? AND network IN ({marks}) "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY network", (node_id, *networks, self.clock()))]
            conn.execute(f"DELETE FROM blacklist WHERE node_id = ? AND network IN ({marks})", (node_id, *networks))
        return was

    def is_blocked(self, node_id: str, network: str) -> bool:
        return check_node_id(node_id) in self.blocked_node_ids(network)

    def blocked_node_ids(self, network: str) -> set[str]:
        """Providers the market must skip on `network` right now (expired blocks are ignored)."""
        rows = self.conn.execute(
            "SELECT node_id FROM blacklist WHERE network = ? AND (expires_at IS NULL OR expires_at > ?)",
            (network, self.clock()))
        return {r[0] for r in rows}

    def purge_expired_blocks(self) -> int:
        with self.transaction() as conn:
            return conn.execute("DELETE FROM blacklist WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                (self.clock(),)).rowcount

    # -- reputation ------------------------------------------------------------

    def reputation(self, networks=PAYMENT_NETWORKS, *, node_ids=(), blocked_only: bool = False) -> list[dict]:
        """Rows for `reputation list`: every (provider, network) with scores or a block, best first."""
        networks = list(networks)
        marks = ",".join("?" * len(networks))
        now = self.clock()
        sql = f"""
            WITH keys AS (SELECT node_id, network FROM reputation WHERE network IN ({marks})
                          UNION SELECT node_id, network FROM blacklist WHERE network IN ({marks}))
            SELECT k.node_id, k.network, p.name, p.last_seen, r.score, r.success_rate, r.uptime,
                   r.local_ok, r.local_failed,
                   CASE WHEN b.node_id IS NOT NULL AND (b.expires_at IS NULL OR b.expires_at > ?)
                        THEN 1 ELSE 0 END AS blocked,
                   b.reason, b.source AS blocked_by, b.created_at AS blocked_at, b.expires_at AS blocked_until
            FROM keys k
            LEFT JOIN providers p ON p.node_id = k.node_id
            LEFT JOIN reputation r ON r.node_id = k.node_id AND r.network = k.network
            LEFT JOIN blacklist b ON b.node_id = k.node_id AND b.network = k.network"""
        args = networks + networks + [now]
        where = []
        if node_ids:
            ids = [check_node_id(n) for n in node_ids]
            where.append(f"k.node_id IN ({','.join('?' * len(ids))})")
            args += ids
        if blocked_only:
            where.append("blocked = 1")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.score IS NULL, r.score DESC, k.node_id, k.network"
        rows = []
        for r in self.conn.execute(sql, args):
            row = dict(r)
            row["blocked"] = bool(row["blocked"])
            if not row["blocked"]:  # an expired block is history, not state
                row.update(reason=None, blocked_by=None, blocked_at=None, blocked_until=None)
            rows.append(row)
        return rows

    def score(self, node_id: str, network: str) -> float:
        """The market's reputation score: 0 for unknown or blocked providers (as the original)."""
        if self.is_blocked(node_id, network):
            return 0.0
        row = self.conn.execute("SELECT score FROM reputation WHERE node_id = ? AND network = ?",
                                (check_node_id(node_id), network)).fetchone()
        return (row[0] or 0.0) if row else 0.0

    @staticmethod
    def _combine(registry_success, registry_uptime, ok, failed):
        local = ok / (ok + failed) if ok + failed else None
        known = [v for v in (registry_success, local) if v is not None]
        success = sum(known) / len(known) if known else None
        uptime = registry_uptime
        score = ((uptime or 0.0) * SCORE_WEIGHTS["uptime"] + (success or 0.0) * SCORE_WEIGHTS["success_rate"]) \
            / sum(SCORE_WEIGHTS.values())
        return success, uptime, min(1.0, max(0.0, score))

    def recompute_scores(self, networks=PAYMENT_NETWORKS) -> int:
        """Recompute success rates and scores from local provider events; returns rows touched."""
        networks = [check_payment_network(n) for n in networks]
        marks = ",".join("?" * len(networks))
        ok_kinds = [k for k, good in PROVIDER_EVENT_KINDS.items() if good]
        bad_kinds = [k for k, good in PROVIDER_EVENT_KINDS.items() if not good]
        now = self.clock()
        with self.transaction() as conn:
            counts = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(
                f"""SELECT node_id, network,
                       sum(kind IN ({','.join('?' * len(ok_kinds))})),
                       sum(kind IN ({','.join('?' * len(bad_kinds))}))
                    FROM provider_events WHERE network IN ({marks}) GROUP BY node_id, network""",
                (*ok_kinds, *bad_kinds, *networks))}
            existing = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(
                f"SELECT node_id, network, registry_success_rate, registry_uptime FROM reputation "
                f"WHERE network IN ({marks})", networks)}
            for key in set(counts) | set(existing):
                ok, failed = counts.get(key, (0, 0))
                reg_success, reg_uptime = existing.get(key, (None, None))
                success, uptime, score = self._combine(reg_success, reg_uptime, ok, failed)
                conn.execute(
                    """INSERT INTO reputation (node_id, network, local_ok, local_failed, success_rate, uptime,
                                               score, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (node_id, network) DO UPDATE SET local_ok = excluded.local_ok,
                       local_failed = excluded.local_failed, success_rate = excluded.success_rate,
                       uptime = excluded.uptime, score = excluded.score, updated_at = excluded.updated_at""",
                    (*key, ok, failed, success, uptime, score, now))
            return len(set(counts) | set(existing))

    def merge_registry_scores(self, network: str, payload) -> dict:
        """Merge the Golem reputation registry's `{"providers": [{"providerId", "scores": {...}}]}`.

        Entries without a valid id or scores are counted as ignored (as the original's updater);
        scores outside [0, 1] are ignored too. Scores are then recomputed for `network`.
        """
        check_payment_network(network)
        if not isinstance(payload, dict) or not isinstance(payload.get("providers"), list):
            raise UsageError('expected the reputation registry format {"providers": [{"providerId": ..., '
                             '"scores": {"successRate": ..., "uptime": ...}}]}')
        counts = {"total": 0, "added": 0, "updated": 0, "unchanged": 0, "ignored": 0}

        def rate(value):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
            return float(value) if ok else None

        now = self.clock()
        with self.transaction() as conn:
            for entry in payload["providers"]:
                counts["total"] += 1
                scores = entry.get("scores") if isinstance(entry, dict) else None
                node_id = entry.get("providerId") if isinstance(entry, dict) else None
                if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id) or not isinstance(scores, dict):
                    counts["ignored"] += 1
                    continue
                success, uptime = rate(scores.get("successRate")), rate(scores.get("uptime"))
                if success is None and uptime is None:
                    counts["ignored"] += 1
                    continue
                node_id = node_id.lower()
                old = conn.execute("SELECT registry_success_rate, registry_uptime FROM reputation "
                                   "WHERE node_id = ? AND network = ?", (node_id, network)).fetchone()
                if old is None:
                    counts["added"] += 1
                    conn.execute("INSERT INTO reputation (node_id, network, registry_success_rate, registry_uptime, "
                                 "updated_at) VALUES (?, ?, ?, ?, ?)", (node_id, network, success, uptime, now))
                elif (old[0], old[1]) == (success, uptime):
                    counts["unchanged"] += 1
                else:
                    counts["updated"] += 1
                    conn.execute("UPDATE reputation SET registry_success_rate = ?, registry_uptime = ?, "
                                 "updated_at = ? WHERE node_id = ? AND network = ?",
                                 (success, uptime, now, node_id, network))
        self.recompute_scores([network])
        return counts


###############################################################################
# 5. Yagna ####################################################################
###############################################################################


###############################################################################
# 6. Market ###################################################################
###############################################################################


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


def _use_colour(stream) -> bool:
    """Colour only on a terminal, never with NO_COLOR (no-color.org) or TERM=dumb."""
    return (hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def _paint(text: str, colour: str, stream=None) -> str:
    codes = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
    return f"\033[{codes[colour]}m{text}\033[0m" if _use_colour(stream or sys.stdout) else text


def _print_json(data) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain aligned table (no dependency): column widths from the longest cell."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    print(_paint(line, "bold"))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _warn(message: str) -> None:
    print(_paint(f"{PACKAGE_NAME}: warning: {message}", "yellow", sys.stderr), file=sys.stderr)


def _datadir(args) -> str:
    return os.path.abspath(os.path.expanduser(args.datadir)) if getattr(args, "datadir", None) else default_datadir()


# -- version -------------------------------------------------------------------

def installed_versions() -> dict[str, str]:
    """Versions of the installed distributions (normalized name -> version), without importing them.

    Neither the packages nor importlib.metadata are imported: both are slow on a cold start
    (importlib.metadata alone costs ~100 ms here). The version is in the name of each
    `NAME-VERSION.dist-info` directory on sys.path (wheel spec), and the zipapp lists what it bundles
    in `bundled-versions.json` at its root. The first entry on sys.path wins, as for imports.
    """
    found: dict[str, str] = {}
    for entry in sys.path:
        entry = entry or "."
        names: list[tuple[str, str]] = []
        if os.path.isfile(entry):
            import json
            import zipimport

            try:
                bundled = json.loads(zipimport.zipimporter(entry).get_data("bundled-versions.json"))
                names = list(bundled.items())
            except (OSError, ValueError, zipimport.ZipImportError):
                continue
        else:
            try:
                listing = os.listdir(entry)
            except OSError:
                continue
            for name in listing:
                if name.endswith((".dist-info", ".egg-info")) and "-" in name:
                    dist, _, version = name.rsplit(".", 1)[0].partition("-")
                    names.append((dist, version.split("-")[0]))
        for dist, version in names:
            found.setdefault(re.sub(r"[-_.]+", "_", dist).lower(), version)
    return found


def installed_version(dist_name: str, _versions: dict | None = None) -> str | None:
    """Version of one installed distribution (see `installed_versions`), or None."""
    versions = installed_versions() if _versions is None else _versions
    return versions.get(re.sub(r"[-_.]+", "_", dist_name).lower()) or None


def _yagna_info() -> dict:
    """Path and `yagna --version` output, cached per binary (path, size, mtime).

    Starting yagna just to print its version costs ~30 ms and ~30 MB, more than all the rest of
    `ray-on-golem version`; the cache key changes whenever the binary does, so the output stays exact.
    """
    import json

    path = find_yagna()
    if not path:
        return {"path": None, "version": None}
    try:
        st = os.stat(path)
    except OSError as err:
        return {"path": path, "version": f"cannot run: {err.__class__.__name__}"}
    key = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = os.path.join(cache_dir(), "yagna-version.json")
    try:
        with open(cache_file, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return {"path": path, "version": cached["version"]}
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    import subprocess

    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"path": path, "version": f"cannot run: {err.__class__.__name__}"}
    version = out.stdout.strip() or out.stderr.strip() or f"exit code {out.returncode}"
    if out.returncode == 0:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            tmp = f"{cache_file}.tmp.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"key": key, "version": version}, f)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home: no cache, still correct
    return {"path": path, "version": version}


def version_info() -> dict:
    """What a bug report needs: our version, Python, platform, dependencies, yagna, data dir."""
    uname = os.uname()
    versions = installed_versions()
    return {
        "ray-on-golem": __version__,
        "python": {"version": sys.version.split()[0], "implementation": sys.implementation.name,
                   "executable": sys.executable},
        "platform": f"{uname.sysname}-{uname.release}-{uname.machine}",
        "golem-core": installed_version("golem-core", versions),
        "PyYAML": installed_version("PyYAML", versions),
        "ray": installed_version("ray", versions),
        "yagna": _yagna_info(),
        "datadir": default_datadir(),
    }


def cmd_version(args) -> int:
    info = version_info()
    if args.datadir:
        info["datadir"] = _datadir(args)
    if args.json:
        _print_json(info)
        return EXIT_OK
    missing = "not installed"
    yagna = info["yagna"]
    print(f"{PACKAGE_NAME} {__version__}")
    print(f"Python:      {info['python']['version']} ({info['python']['executable']})")
    print(f"Platform:    {info['platform']}")
    print(f"golem-core:  {info['golem-core'] or missing}")
    print(f"PyYAML:      {info['PyYAML'] or missing}")
    print(f"Ray:         {info['ray'] or missing}")
    print(f"yagna:       {yagna['path'] + ' (' + yagna['version'] + ')' if yagna['path'] else 'not found'}")
    print(f"Data dir:    {info['datadir']}")
    return EXIT_OK


# -- validate ------------------------------------------------------------------

def _flatten(prefix: str, value, out: list[tuple[str, object]]) -> list[tuple[str, object]]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out.append((prefix, value))
    return out


def _show(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def cmd_validate(args) -> int:
    config = load_cluster_config(args.cluster_config)
    for warning in config.warnings:
        _warn(warning)
    if args.json:
        _print_json(config.to_dict())
        return EXIT_OK
    params = config.to_dict()["provider"]["parameters"]
    params["node_start_timeout"] = format_duration(params["node_start_timeout"])
    print(_paint(f"{args.cluster_config}: valid", "green") + f" (cluster `{config.cluster_name}`, "
          f"payment network {config.payment_network}, budget {config.total_budget} GLM)")
    print("provider.parameters:")
    for key, value in _flatten("", params, []):
        print(f"  {key}: {_show(value)}")
    for node_type in config.node_types.values():
        role = "head" if node_type.is_head else "worker"
        print(_paint(f"node type `{node_type.name}`", "cyan") + f" ({role}, min_workers {node_type.min_workers}, "
              f"max_workers {'-' if node_type.max_workers is None else node_type.max_workers}):")
        print(f"  resources: {_show(node_type.resources)}")
        for key, value in _flatten("node_config", node_type.node_config, []):
            print(f"  {key}: {_show(value)}")
    return EXIT_OK


# -- reputation ----------------------------------------------------------------

def _networks_arg(value: str | None) -> tuple[str, ...]:
    try:
        return resolve_networks(value)
    except UsageError as err:
        raise UsageError(f"--network: {err}") from None


def cmd_reputation_block(args) -> int:
    node_id = check_node_id(args.node_id)
    networks = _networks_arg(args.network)
    duration = None
    if args.duration is not None:
        try:
            duration = parse_duration(args.duration)
        except UsageError as err:
            raise UsageError(f"--for: {err}") from None
    with Store(_datadir(args)) as store:
        expires_at = store.block(node_id, networks, reason=args.reason, duration=duration)
    until = f"until {format_time(expires_at)} ({format_duration(duration)})" if duration else "until unblocked"
    reason = f": {args.reason}" if args.reason else ""
    print(f"Node {node_id} blocked on {', '.join(networks)} {until}{reason}.")
    return EXIT_OK


def cmd_reputation_unblock(args) -> int:
    node_id = check_node_id(args.node_id)
    networks = _networks_arg(args.network)
    with Store(_datadir(args)) as store:
        was = store.unblock(node_id, networks)
    if was:
        print(f"Node {node_id} unblocked on {', '.join(was)}.")
    else:
        print(f"Node {node_id} was not blocked on {', '.join(networks)}.")
    return EXIT_OK


def cmd_reputation_list(args) -> int:
    networks = _networks_arg(args.network)
    node_ids = [check_node_id(n) for n in args.node_ids]
    with Store(_datadir(args)) as store:
        rows = store.reputation(networks, node_ids=node_ids, blocked_only=args.blocked)
    if args.json:
        _print_json({"networks": list(networks), "providers": rows})
        return EXIT_OK
    title = f"{'Blocked providers' if args.blocked else 'Provider reputation'} on {', '.join(networks)}"
    print(_paint(title, "cyan"))
    if not rows:
        print("No providers found.")
        return EXIT_OK

    def num(v):
        return "" if v is None else f"{v:.3f}"

    def blocked(r):
        if not r["blocked"]:
            return "no"
        until = f"until {format_time(r['blocked_until'])}" if r["blocked_until"] else "forever"
        return _paint(f"yes {until}", "red") + (f": {r['reason']}" if r["reason"] else "")

    _print_table(["NODE ID", "NAME", "NETWORK", "SCORE", "SUCCESS", "UPTIME", "LAST SEEN", "BLOCKED"],
                 [[r["node_id"], r["name"] or "", r["network"], num(r["score"]), num(r["success_rate"]),
                   num(r["uptime"]), format_time(r["last_seen"]), blocked(r)] for r in rows])
    print(f"{len(rows)} record{'s' if len(rows) != 1 else ''} found.")
    return EXIT_OK


def _load_registry_json(source: str):
    """The registry JSON from a file or an http(s) URL (the original read reputation.*.golem.network)."""
    import json

    if re.match(r"https?://", source):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as err:
            raise RayOnGolemError(f"--from {source}: cannot fetch ({err})") from None
    elif re.match(r"[a-z][a-z0-9+.-]*://", source):
        raise UsageError(f"--from {source}: expected a file or an http(s) URL")
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--from {source}: cannot be read ({err.strerror or err.__class__.__name__})") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise UsageError(f"--from {source}: not valid JSON ({err})") from None


def cmd_reputation_update(args) -> int:
    networks = _networks_arg(args.network)
    payload = None
    if args.source:
        if len(networks) != 1:
            raise UsageError("--network: --from needs one payment network (registry scores are per network), "
                             f"one of {', '.join(PAYMENT_NETWORKS)}")
        payload = _load_registry_json(args.source)
    with Store(_datadir(args)) as store:
        if payload is not None:
            try:
                counts = store.merge_registry_scores(networks[0], payload)
            except UsageError as err:
                raise UsageError(f"--from {args.source}: {err}") from None
            print(f"Reputation DB updated. Total scores={counts['total']} (added={counts['added']}, "
                  f"updated={counts['updated']}, unchanged={counts['unchanged']}, ignored={counts['ignored']}).")
        touched = store.recompute_scores(networks)
    print(f"Scores recomputed from local events for {touched} provider record{'s' if touched != 1 else ''} "
          f"on {', '.join(networks)}.")
    return EXIT_OK


# -- parser and main ---------------------------------------------------------

def _add_version(commands, common) -> None:
    p = commands.add_parser("version", parents=[common], help="show versions of everything a bug report needs",
                            description="Show the versions of ray-on-golem, Python, golem-core, PyYAML, Ray "
                                        "and yagna, and the data directory.")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_version)


def _add_validate(commands, common) -> None:
    p = commands.add_parser("validate", parents=[common], help="check a cluster YAML; print the resolved config",
                            description="Check a cluster YAML before anything else happens and print the "
                                        "resolved configuration of every node type (exit 2 on any mistake).")
    p.add_argument("cluster_config", metavar="CLUSTER.yaml")
    p.add_argument("--json", action="store_true", help="print the resolved configuration as JSON")
    p.set_defaults(func=cmd_validate)


def _add_reputation(commands, common) -> None:
    p = commands.add_parser("reputation", help="block providers and inspect their scores",
                            description="Provider reputation: blocks (with reason and expiry) and scores, per "
                                        "payment network, in the data dir's database.")
    sub = p.add_subparsers(dest="reputation_command", metavar="COMMAND", required=True)
    network_help = (f"payment network: {', '.join(PAYMENT_NETWORKS)} or {ALL_NETWORKS} "
                    f"(default: {ALL_NETWORKS})")

    block = sub.add_parser("block", parents=[common], help="never rent from a provider (again)")
    block.add_argument("node_id", metavar="NODE_ID", help="provider node id (0x + 40 hex digits)")
    block.add_argument("--reason", help="why, shown by `reputation list`")
    block.add_argument("--for", dest="duration", metavar="DURATION", help="block for e.g. 30m, 2h, 7d "
                                                                           "(default: until unblocked)")
    block.add_argument("--network", help=network_help)
    block.set_defaults(func=cmd_reputation_block)

    unblock = sub.add_parser("unblock", parents=[common], help="lift a block")
    unblock.add_argument("node_id", metavar="NODE_ID")
    unblock.add_argument("--network", help=network_help)
    unblock.set_defaults(func=cmd_reputation_unblock)

    listing = sub.add_parser("list", parents=[common], help="table of providers: scores and blocks",
                             description="Score = (uptime + 0.5 * success rate) / 1.5; success rate blends the "
                                         "registry's with our own agreement/deploy/activity outcomes.")
    listing.add_argument("node_ids", metavar="NODE_ID", nargs="*", help="only these providers")
    listing.add_argument("--network", help=network_help)
    listing.add_argument("--blocked", action="store_true", help="only providers blocked now")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_reputation_list)

    update = sub.add_parser("update", parents=[common], help="recompute scores; merge registry scores",
                            description="Recompute scores from local provider events; with --from, first merge "
                                        "scores in the Golem reputation registry's JSON format.")
    update.add_argument("--from", dest="source", metavar="FILE_OR_URL",
                        help='registry JSON: {"providers": [{"providerId", "scores": {"successRate", "uptime"}}]}')
    update.add_argument("--network", help=network_help + "; one network with --from")
    update.set_defaults(func=cmd_reputation_update)


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI. Each command registers itself here with one `_add_<name>(commands, common)` line."""
    import argparse  # here, not at the top: `import ray_on_golem` (Ray's provider lookup) does not need it

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--datadir", metavar="PATH",
                        help="data directory (default: $RAY_ON_GOLEM_DATADIR or ~/.local/share/ray_on_golem)")
    parser = argparse.ArgumentParser(prog=PACKAGE_NAME, description="Ray clusters on machines rented from the Golem Network.")
    parser.add_argument("-V", "--version", action="version", version=f"{PACKAGE_NAME} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_version(commands, common)
    _add_validate(commands, common)
    _add_reputation(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ray-on-golem` console script and `python -m ray_on_golem`.

    Expected failures (`RayOnGolemError`) print one line and exit with their code; anything else is a
    bug: one line too, the traceback only with RAY_ON_GOLEM_DEBUG=1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except RayOnGolemError as err:
        print(f"{PACKAGE_NAME}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ray-on-golem reputation list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - the user never sees a traceback
        if os.environ.get("RAY_ON_GOLEM_DEBUG"):
            raise
        print(f"{PACKAGE_NAME}: internal error: {err.__class__.__name__}: {err} "
              "(run with RAY_ON_GOLEM_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
