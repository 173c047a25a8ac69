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
# Ray resolves `provider.module` with importlib + getattr (ray/autoscaler/_private/loader.py), so this is the module path.
PROVIDER_MODULE = "ray_on_golem.GolemNodeProvider"
# The original project's module path (its YAMLs carry it): served by the alias modules of section 10.
PROVIDER_MODULE_ALIAS = "ray_on_golem.provider.node_provider.GolemNodeProvider"
DEFAULT_HEAD_NODE_TYPE = "ray.head.default"  # Ray's own default for `head_node_type`
HEAD_PRIORITY_SUBNET = "ray-on-golem-heads"  # head nodes try this subnet first (docs/yagna-behaviour.md §7)
DEFAULT_PAYMENT_NETWORK = "holesky"  # as the original: real use defaults to the testnet
DEFAULT_NODE_START_TIMEOUT = 600.0  # seconds; `ray up` must never hang forever (docs/yagna-behaviour.md §7)
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


# The zipapp this module was imported from (absolute: children start in other directories), else None.
_ZIPAPP = (os.path.abspath(globals().get("__loader__").archive)
           if type(globals().get("__loader__")).__name__ == "zipimporter" else None)
BUNDLE_MANIFEST = "bundle.json"  # at the zipapp's root, written by build_zipapp.py


class ZipappBundle:
    """The zipapp's dependencies (its inner `bundle.zip`), extracted once per content hash into the cache.

    golem-core and textX open their grammars (`golem/payload/parser.tx`, `textx/textx.tx`) by path next
    to `__file__`, so the bundle must be on disk. It goes to `<cache>/bundle-<version>-<sha256[:16]>`:
    into a temporary directory first, under a lock file (concurrent first users wait for one
    extraction), then renamed into place. The last file written is `.complete`, listing every file
    and its size: a directory without it, or with a file missing or of another size (a copy cut
    short, a full disk), is broken and extracted again. The precompiled pycs go into `__pycache__`.

    It is also a meta path finder, installed last on `sys.meta_path` when this module is imported
    from the zipapp: an import of a bundled top-level package (`yaml`, `golem`, ...) that nothing
    else on the host provides extracts the bundle and puts it on `sys.path`. So every way in finds
    the dependencies: the pyz run as a program, `import ray_on_golem` with the pyz on the import
    path (Ray's provider loading), and every process those start (`python_module_command` runs
    them through the pyz). Where the pyz runs as the program, the bundle goes first (golem-core
    gets the aiohttp & co it was built with); where it is a library in someone else's process
    (Ray's), last: the host's own packages win, the bundle only fills what is missing.
    """

    MARKER = ".complete"

    def __init__(self, archive: str):
        self.archive = archive
        self._manifest: dict | None = None
        self._directory: str | None = None  # once checked complete in this process

    def manifest(self) -> dict:
        """`bundle.json` of the zipapp: sha256 of the bundle and its top-level import names."""
        if self._manifest is None:
            import json
            import zipimport

            self._manifest = json.loads(zipimport.zipimporter(self.archive).get_data(BUNDLE_MANIFEST))
        return self._manifest

    def target(self) -> str:
        return os.path.join(cache_dir(), f"bundle-{__version__}-{self.manifest()['sha256'][:16]}")

    def is_complete(self, directory: str) -> bool:
        """The marker names this bundle, and every file it lists is there with its size."""
        import json

        try:
            with open(os.path.join(directory, self.MARKER), encoding="utf-8") as f:
                marker = json.load(f)
            if marker.get("sha256") != self.manifest()["sha256"]:
                return False
            return all(os.stat(os.path.join(directory, name)).st_size == size
                       for name, size in marker["files"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def directory(self) -> str:
        """The extracted bundle, extracting (or repairing) it first if needed."""
        if self._directory:
            return self._directory
        target = self.target()
        if not self.is_complete(target):
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            with _exclusive_lock(f"{target}.lock"):
                if not self.is_complete(target):  # the first of concurrent processes did it
                    self._extract(target)
        self._directory = target
        return target

    def _extract(self, target: str) -> None:
        import json
        import shutil
        import zipfile
        from importlib.util import MAGIC_NUMBER, cache_from_source

        tmp = f"{target}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        files = {}
        try:
            with zipfile.ZipFile(self.archive) as outer, outer.open("bundle.zip") as inner, \
                    zipfile.ZipFile(inner) as zf:
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
                    files[name] = len(data)
            with open(os.path.join(tmp, self.MARKER), "w", encoding="utf-8") as f:
                json.dump({"sha256": self.manifest()["sha256"], "files": files}, f)
        except BaseException:  # a full disk, an interrupt: leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.lexists(target):  # broken: move it aside, then swap (rename is atomic)
            broken = f"{target}.broken.{os.getpid()}"
            os.rename(target, broken)
            shutil.rmtree(broken, ignore_errors=True)
        os.rename(tmp, target)

    # -- meta path finder (importlib.abc.MetaPathFinder protocol) --
    def find_spec(self, name, path=None, target=None):
        if path is not None:
            return None  # a submodule: its package's own path finds it
        try:
            if name not in self.manifest()["top_level"]:
                return None
        except (OSError, ValueError, KeyError):  # a pyz built without a manifest: nothing to offer
            return None
        from importlib.machinery import PathFinder

        return PathFinder.find_spec(name, [prepare_bundled_imports()])

    def invalidate_caches(self) -> None:
        pass


class _exclusive_lock:
    """`with _exclusive_lock(path):` an flock on `path` (created 0600), held for the block."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def __enter__(self):
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)  # closing releases the flock
        self._fd = None


_BUNDLE = ZipappBundle(_ZIPAPP) if _ZIPAPP else None
# `python3 ray-on-golem.pyz ...` (what python_module_command runs), not a library of another program.
_ZIPAPP_IS_PROGRAM = bool(_ZIPAPP) and os.path.abspath(getattr(sys, "argv", None) and sys.argv[0] or ".") == _ZIPAPP
# `python -m ray_on_golem` from the zip loads this module twice (`__main__`, then `ray_on_golem`): one hook.
if _BUNDLE and not any(type(f).__name__ == "ZipappBundle" for f in sys.meta_path):
    sys.meta_path.append(_BUNDLE)  # last: the host's own packages are found first


def prepare_bundled_imports() -> str | None:
    """Inside the zipapp, extract its bundle if needed and put it on sys.path; return its directory.

    Called before our own `import yaml`/`import golem` (and by the bundle's import hook for anyone
    else's). The pure-Python fallbacks of aiohttp & co are selected here, before they are imported:
    a `.so` is never bundled. Outside the zipapp this does nothing and returns None.
    """
    if not _BUNDLE:
        return None
    for name in ("AIOHTTP", "MULTIDICT", "YARL", "FROZENLIST", "PROPCACHE"):
        os.environ.setdefault(f"{name}_NO_EXTENSIONS", "1")
    directory = _BUNDLE.directory()
    if directory not in sys.path:
        if _ZIPAPP_IS_PROGRAM:
            sys.path.insert(0, directory)
        else:
            sys.path.append(directory)
        import importlib

        importlib.invalidate_caches()
    return directory


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
        # One line per problem: a provider-level mistake is found again for every node type.
        self.issues = list(dict.fromkeys(issues or [(path, message)]))
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


class MethodNotAllowed(RayOnGolemError):
    """A route exists for the path, not for the method (HTTP 405 with `Allow`)."""

    http_status = 405

    def __init__(self, message: str, allowed=()):
        super().__init__(message)
        self.allowed = tuple(allowed)  # the methods the path takes: the `Allow` header


class BadRequestHead(RayOnGolemError):
    """A request the HTTP parser cannot take: 400, or 414/431/505 for what the status names."""

    def __init__(self, message: str, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status


class PayloadTooLarge(RayOnGolemError):
    """A request body over the webserver's limit (HTTP 413)."""

    http_status = 413


class NodeStartFailed(RayOnGolemError):
    """One provider could not start the node; the node tries the next one."""

    def __init__(self, kind: str, message: str):
        self.kind = kind  # a provider event kind of the Store
        super().__init__(message)


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


def _key_name(key) -> str:
    """A mapping key as it appears in a field path: plain names as they are, anything else
    (an empty or blank string, a number, null) quoted so the user sees which key is meant."""
    if isinstance(key, str) and key and key == key.strip() and key.isprintable():
        return key
    return repr(key)


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


_LARGEST_NUMBER = 2 ** 63 - 1  # sqlite's INTEGER; every count, price and port fits far below it


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
        if abs(value) > _LARGEST_NUMBER:  # inf, or more than sqlite and JSON peers hold
            raise _Invalid(f"{expected} (at most {_LARGEST_NUMBER:.0e} in size)")
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
    if not 0 < seconds <= _LARGEST_NUMBER:  # also NaN and inf
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
# original's pydantic models (docs/yagna-behaviour.md §7, all `extra="forbid"`), plus our own additions.
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

AUTOSTOP_SCHEMA = {
    "idle_minutes": (_REQUIRED, _number(0, exclusive=True)),
    "down": (True, _boolean),
}

PROVIDER_PARAMETERS_SCHEMA = {
    "webserver_port": (DEFAULT_WEBSERVER_PORT, _port()),
    "webserver_datadir": (None, _string(nullable=True)),
    # A webserver that `ray up` starts stops after this long without a live node (section 8, IdleShutdown).
    "webserver_idle_timeout": (None, lambda value: None if value is None else _duration(value)),
    "ray_gcs_expose_port": (6379, _port(nullable=True)),
    "enable_registry_stats": (True, _boolean),
    "payment_network": (DEFAULT_PAYMENT_NETWORK, _network),
    "payment_driver": ("erc20", _string(choices=("erc20",))),
    "total_budget": (5.0, _number(0, exclusive=True)),
    "node_start_timeout": (DEFAULT_NODE_START_TIMEOUT, _duration),
    # node_config is checked separately: it is merged into every node type first.
    "node_config": ({}, _mapping()),
    "local_network": _Block(LOCAL_NETWORK_SCHEMA),
    # Autostop (section 7, Autostop): tear the whole cluster down after this many idle minutes.
    "autostop": _Block(AUTOSTOP_SCHEMA, optional=True),
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
    # Legacy keys the original's YAMLs carry "to satisfy checks" (docs/yagna-behaviour.md §7);
    # dropped by GolemNodeProvider.fillout_available_node_types_resources (LEGACY_RAY_KEYS).
    "head_node": (None, lambda v: v),
    "worker_nodes": (None, lambda v: v),
}
LEGACY_RAY_KEYS = ("head_node", "worker_nodes")
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
            issues.append((f"{path}.{_key_name(key)}", f"unknown key{hint}"))
    for key, spec in schema.items():
        sub = f"{path}.{key}"
        if isinstance(spec, _Block):
            if key in raw and raw[key] is None and not spec.optional:
                # `budget_control:` with every line under it commented out: in a node type it would
                # silently drop the provider level's limits, so it is said, not guessed.
                issues.append((sub, "expected a mapping, found an empty block (give its keys or remove it)"))
                continue
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

    The original appended lists (dpath ADDITIVE, docs/yagna-behaviour.md §7), so a node type could never
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


YAML_MAX_DEPTH = 50  # a cluster config nests 7 levels; Python's recursion limit is reached near 300
YAML_MAX_NODES = 200_000  # values after aliases are expanded: no "billion laughs"


def _cluster_yaml_loader():
    """PyYAML's SafeLoader with limits that turn hostile or broken YAML into a `ConfigError` naming
    the field: nesting depth, size after alias expansion, recursive aliases and scalars that PyYAML
    matches but cannot build (a 5,000-digit integer, the date 2024-13-45). Built on first use: PyYAML
    is imported lazily."""
    import yaml

    class ClusterYamlLoader(yaml.SafeLoader):
        def compose_document(self):
            self._field_path = []
            return super().compose_document()

        def compose_node(self, parent, index):
            if index is not None:  # a value: its key's text, or its position in a list
                self._field_path.append(f"[{index}]" if isinstance(index, int) else
                                        _key_name(getattr(index, "value", index)))
            try:
                path = ".".join(self._field_path).replace(".[", "[")
                mark = self.peek_event().start_mark
                if len(self._field_path) > YAML_MAX_DEPTH:
                    raise _YamlLimit(".".join(self._field_path[:3]).replace(".[", "[") + "...",
                                     f"nested deeper than {YAML_MAX_DEPTH} levels", mark)
                if self.check_event(yaml.AliasEvent):
                    target = self.anchors.get(self.peek_event().anchor)
                    if target is not None and not hasattr(target, "rog_size"):  # still being composed
                        raise _YamlLimit(path, "an alias refers to the value that contains it", mark)
                node = super().compose_node(parent, index)
                if not hasattr(node, "rog_size"):
                    if isinstance(node, yaml.SequenceNode):
                        children = node.value
                    elif isinstance(node, yaml.MappingNode):
                        children = [n for pair in node.value for n in pair]
                    else:
                        children = []
                    node.rog_size = 1 + sum(child.rog_size for child in children)
                    node.rog_path = path
                if node.rog_size > YAML_MAX_NODES:
                    raise _YamlLimit(path, f"more than {YAML_MAX_NODES} values once aliases are expanded", mark)
                return node
            finally:
                if index is not None:
                    self._field_path.pop()

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            # Not YAMLError: int('9' * 5000), date(2024, 13, 45), `!!timestamp x` (AttributeError)
            except (ValueError, OverflowError, TypeError, AttributeError) as err:
                text = node.value if isinstance(node.value, str) else ""
                digits = len(text.lstrip("+-").replace("_", ""))
                problem = (f"expected a number of at most 4300 digits, found a {digits}-digit number"
                           if "digits" in str(err) else f"cannot read {_describe(text)} as {node.tag.rsplit(':', 1)[-1]}: {err}")
                raise _YamlLimit(getattr(node, "rog_path", ""), problem, node.start_mark) from None

    return ClusterYamlLoader


class _YamlLimit(Exception):
    """A YAML text within PyYAML's grammar but beyond what a cluster config may be; names the field."""

    def __init__(self, path: str, problem: str, mark):
        super().__init__(problem)
        self.path, self.problem, self.mark = path, problem, mark


def _plain_data_issues(raw: dict) -> list[tuple[str, str]]:
    """Values JSON and Ray cannot carry (dates, binary, sets) and keys that are not strings.

    PyYAML builds `2024-01-01` as a date and `!!set` as a set; Ray's launcher then fails to hash the
    config. Iterative: a config given as a dict (Ray's bootstrap) has no depth limit of its own.
    """
    issues = []
    seen: set[int] = set()  # a value shared by aliases is checked once
    stack: list[tuple[str, object, frozenset]] = [("", raw, frozenset())]
    while stack:
        path, value, ancestors = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in ancestors:  # `&a [*a]` read by yaml.safe_load (Ray's loader)
                issues.append((path, "an alias refers to the value that contains it"))
                continue
            if id(value) in seen:
                continue
            seen.add(id(value))
            ancestors = ancestors | {id(value)}
        if isinstance(value, dict):
            for key, sub in value.items():
                sub_path = f"{path}.{_key_name(key)}" if path else _key_name(key)
                if not isinstance(key, str):
                    issues.append((sub_path, f"expected a text key, found {_describe(key)}; quote it"))
                stack.append((sub_path, sub, ancestors))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", sub, ancestors) for i, sub in enumerate(value))
        elif not (value is None or isinstance(value, (str, int, float))):
            issues.append((path, f"expected a string, number, list or mapping, found {_describe(value)}"
                                 + ("; quote it" if hasattr(value, "isoformat") else "")))
    return sorted(issues)


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
        data = yaml.load(text, Loader=_cluster_yaml_loader())  # noqa: S506 - a SafeLoader with limits
    except _YamlLimit as err:
        where = f"line {err.mark.line + 1}, column {err.mark.column + 1}" if err.mark else "?"
        raise ConfigError(err.path, f"{err.problem} (cluster config {path}, {where})") from None
    except RecursionError:  # not expected under YAML_MAX_DEPTH; still an answer, not a traceback
        raise ConfigError("", f"cluster config {path}: nested too deeply") from None
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

    issues: list[tuple[str, str]] = _plain_data_issues(raw)
    if issues:
        raise ConfigError(issues[0][0], issues[0][1], issues)
    warnings: list[str] = []
    top_schema = dict(RAY_CONFIG_SCHEMA, provider=None, auth=None, available_node_types=None)
    settings = _walk(RAY_CONFIG_SCHEMA, {k: v for k, v in raw.items() if k in RAY_CONFIG_SCHEMA},
                     "", issues, defaults=True)
    issues[:] = [(p.lstrip("."), m) for p, m in issues]
    for key in [k for k in raw if k not in top_schema]:
        issues.append((_key_name(key), f"unknown key{_did_you_mean(key, top_schema)}"))

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
                issues.append((f"provider.{_key_name(key)}", f"unknown key{_did_you_mean(key, PROVIDER_BLOCK_KEYS)}"))
        if provider.get("type") != "external":
            issues.append(("provider.type", f"expected `external`, found {_describe(provider.get('type'))}"))
        module = provider.get("module")
        if module not in (PROVIDER_MODULE, PROVIDER_MODULE_ALIAS):
            issues.append(("provider.module", f"expected `{PROVIDER_MODULE}` (or the original's "
                                              f"`{PROVIDER_MODULE_ALIAS}`), found {_describe(module)}"))
        if "use_internal_ips" in provider and not isinstance(provider["use_internal_ips"], bool):
            issues.append(("provider.use_internal_ips", f"expected true or false, "
                                                        f"found {_describe(provider['use_internal_ips'])}"))
        parameters = _walk(PROVIDER_PARAMETERS_SCHEMA, provider.get("parameters"), "provider.parameters",
                           issues, defaults=True)
        raw_parameters = provider.get("parameters")
        provider_node_config = (raw_parameters if isinstance(raw_parameters, dict) else {}).get("node_config") or {}
        if isinstance(provider_node_config, dict) and isinstance(raw_parameters, (dict, type(None))):
            before = len(issues)
            _walk(NODE_CONFIG_SCHEMA, provider_node_config, "provider.parameters.node_config", issues, defaults=False)
            provider_node_config_ok = len(issues) == before
        else:
            provider_node_config = {}
        if parameters.get("payment_network") != "local" and _has(provider.get("parameters"), "local_network"):
            warnings.append("provider.parameters.local_network is used only with payment_network: local; ignored")
        if _has(provider.get("parameters"), "ray_gcs_expose_port"):
            warnings.append("provider.parameters.ray_gcs_expose_port is not used: no local port is bound for "
                            "Ray's GCS (`ray up` forwards the head's Ray client and dashboard to free local ports)")
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
        type_path = f"available_node_types.{_key_name(name)}"
        before = len(issues)
        fields = _walk(NODE_TYPE_SCHEMA, type_raw, type_path, issues, defaults=True)
        own = fields.get("node_config") or {}
        _walk(NODE_CONFIG_SCHEMA, own, f"{type_path}.node_config", issues, defaults=False)
        for res, amount in (fields.get("resources") or {}).items():
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
                issues.append((f"{type_path}.resources.{_key_name(res)}", f"expected an integer >= 0, found {_describe(amount)}"))
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

# Weights of the original's ReputationScorer (docs/yagna-behaviour.md §7): (uptime*1.0 + success_rate*0.5) / 1.5,
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
    """The one sqlite3 database in the data dir: its connection, and the queries of reputation and blacklist.

    The other tables' queries live in this section too, in ClusterRecords and Ledger over the same
    Store: no SQL outside section 4.

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
        # 0600 before sqlite opens it: its -wal and -shm files take the database's mode when created.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        except OSError:
            pass
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
        for side in (f"{path}-wal", f"{path}-shm"):  # made by an older version with the default mode
            try:
                if os.stat(side).st_mode & 0o077:
                    os.chmod(side, 0o600)
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

    def unsettled_rentals(self) -> dict[str, list[dict]]:
        """What is rented and not yet given back: nodes not terminated, agreements not terminated,
        activities not destroyed, allocations not released. `status` shows them after a webserver
        was killed (it could not end them)."""
        queries = {
            "nodes": "SELECT node_id, cluster_name, node_type, state, provider_id FROM nodes "
                     "WHERE state != 'terminated' ORDER BY node_id",
            "agreements": "SELECT agreement_id, cluster_name, node_id, provider_id FROM agreements "
                          "WHERE terminated_at IS NULL ORDER BY created_at",
            "activities": "SELECT activity_id, agreement_id FROM activities WHERE destroyed_at IS NULL "
                          "ORDER BY created_at",
            "allocations": "SELECT allocation_id, cluster_name, amount FROM allocations WHERE released_at IS NULL "
                           "ORDER BY created_at",
        }
        return {kind: [dict(row) for row in self.conn.execute(sql)] for kind, sql in queries.items()}


# Payments (section 7): a ledger row also names its node and allocation, the amount accepting
# it added to the cluster's spending (`spent`, an exact decimal string) and why it was
# rejected; an agreement keeps the exact linear prices its bills are checked against.
MIGRATIONS.append([
    "ALTER TABLE ledger ADD COLUMN node_id TEXT",
    "ALTER TABLE ledger ADD COLUMN allocation_id TEXT",
    "ALTER TABLE ledger ADD COLUMN spent TEXT NOT NULL DEFAULT '0'",
    "ALTER TABLE ledger ADD COLUMN reason TEXT",
    "ALTER TABLE agreements ADD COLUMN pricing TEXT",
    "CREATE INDEX ledger_agreement ON ledger (agreement_id)",
])
# A provider that bills more than its agreed prices allow (section 7, Payments).
PROVIDER_EVENT_KINDS["billing_breach"] = False
# `ray-on-golem cleanup` (section 7, LeftoverRentals): the agreements of our app session it ended,
# most of them unknown to the other tables (a crash before they were recorded, another data dir's
# store lost), hence no foreign keys.
MIGRATIONS.append([
    """CREATE TABLE cleanups (
        agreement_id   TEXT PRIMARY KEY,
        provider_id    TEXT,
        provider_name  TEXT,
        activities     TEXT NOT NULL DEFAULT '[]',
        created_at     REAL,
        ended_at       REAL NOT NULL,
        outcome        TEXT NOT NULL
    )""",
])
# A restart keeps the cluster (section 7, ClusterService.recover): what re-adoption needs, as
# JSON. Per cluster its VPN (net API id, address range) and Ray ports; per node its rental
# (agreement, activity, VPN address) and what its ClusterNode is rebuilt from.
MIGRATIONS.append([
    "ALTER TABLE clusters ADD COLUMN runtime TEXT",
    "ALTER TABLE nodes ADD COLUMN runtime TEXT",
])


# The rows of clusters and payments (written by section 7): their queries live here, with the Store's.
import json  # noqa: E402


class ClusterRecords:
    """The clusters, nodes, agreements, activities and allocations rows (section 7 writes them through this).

    Everything rented is written here before it is used, so a crash leaves a record
    of what must be released.
    """

    def __init__(self, store):
        self.store = store
        self._counts_cache: tuple[tuple[int, int], dict] | None = None

    def cluster(self, name: str, network: str, parameters: dict) -> None:
        now = self.store.clock()
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO clusters (name, network, state, config, total_budget, created_at, updated_at) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET state = 'running', "
                "network = excluded.network, config = excluded.config, total_budget = excluded.total_budget, "
                "updated_at = excluded.updated_at",
                (name, network, json.dumps(parameters), str(parameters.get("total_budget", "")), now, now))

    def cluster_state(self, name: str, state: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE clusters SET state = ?, updated_at = ? WHERE name = ?",
                         (state, self.store.clock(), name))

    def next_node_number(self) -> int:
        row = self.store.conn.execute(
            "SELECT MAX(CAST(SUBSTR(node_id, 5) AS INTEGER)) FROM nodes WHERE node_id LIKE 'node%'").fetchone()
        return (row[0] or 0) + 1

    def node(self, node: "ClusterNode") -> None:
        now = self.store.clock()
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO nodes (node_id, cluster_name, node_type, state, tags, provider_id, internal_ip, "
                "state_log, attempts, deadline, created_at, updated_at, runtime) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (node_id) DO UPDATE SET state = excluded.state, tags = excluded.tags, "
                "provider_id = excluded.provider_id, internal_ip = excluded.internal_ip, "
                "state_log = excluded.state_log, attempts = excluded.attempts, updated_at = excluded.updated_at, "
                "runtime = excluded.runtime",
                (node.node_id, node.cluster.name, node.node_type, node.state.value, json.dumps(node.tags),
                 node.provider_id, node.internal_ip, json.dumps(node.state_log), node.attempts,
                 node.deadline_at, node.created_at, now, json.dumps(node.runtime_record())))

    def cluster_runtime(self, name: str, runtime: dict) -> None:
        """The cluster's VPN and Ray ports, for a restarted webserver to re-adopt it."""
        with self.store.transaction() as conn:
            conn.execute("UPDATE clusters SET runtime = ? WHERE name = ?", (json.dumps(runtime), name))

    def adoptable(self) -> list[dict]:
        """Clusters with nodes not terminated, as a previous webserver left them: `{name, network,
        parameters, runtime, nodes: [row + runtime + agreement created_at/pricing], allocation_id}`."""
        clusters = []
        for row in self.store.conn.execute(
                "SELECT name, network, config, runtime FROM clusters WHERE name IN "
                "(SELECT cluster_name FROM nodes WHERE state != 'terminated') ORDER BY created_at").fetchall():
            nodes = []
            for node in self.store.conn.execute(
                    "SELECT n.*, a.created_at AS agreement_created_at, a.pricing, a.terminated_at "
                    "FROM nodes n LEFT JOIN agreements a ON a.agreement_id = json_extract(n.runtime, '$.agreement_id') "
                    "WHERE n.cluster_name = ? AND n.state != 'terminated' ORDER BY n.created_at", (row["name"],)):
                node = dict(node)
                for key in ("tags", "state_log", "runtime"):
                    node[key] = json.loads(node[key] or ("[]" if key == "state_log" else "{}"))
                nodes.append(node)
            allocation = self.store.conn.execute(
                "SELECT allocation_id FROM allocations WHERE cluster_name = ? AND released_at IS NULL "
                "ORDER BY created_at DESC", (row["name"],)).fetchone()
            clusters.append({"name": row["name"], "network": row["network"], "parameters": json.loads(row["config"]),
                             "runtime": json.loads(row["runtime"] or "{}"), "nodes": nodes,
                             "allocation_id": allocation[0] if allocation else None})
        return clusters

    def agreement(self, agreement_id: str, node: "ClusterNode", provider_id: str, terms: dict) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO agreements (agreement_id, cluster_name, node_id, provider_id, network, state, terms, "
                "created_at) VALUES (?, ?, ?, ?, ?, 'approved', ?, ?)",
                (agreement_id, node.cluster.name, node.node_id, provider_id, node.cluster.network,
                 json.dumps(terms), self.store.clock()))

    def agreement_ended(self, agreement_id: str, reason: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE agreements SET state = 'terminated', terminated_at = ?, reason = ? "
                         "WHERE agreement_id = ? AND terminated_at IS NULL",
                         (self.store.clock(), reason, agreement_id))
            # No activity outlives its agreement (the provider destroys it): an orphan's
            # activity row, which no one destroyed, must not stay open forever.
            conn.execute("UPDATE activities SET state = 'destroyed', destroyed_at = ? "
                         "WHERE agreement_id = ? AND destroyed_at IS NULL", (self.store.clock(), agreement_id))

    def activity(self, activity_id: str, agreement_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO activities (activity_id, agreement_id, state, created_at) "
                         "VALUES (?, ?, 'created', ?)", (activity_id, agreement_id, self.store.clock()))

    def activity_ended(self, activity_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE activities SET state = 'destroyed', destroyed_at = ? "
                         "WHERE activity_id = ? AND destroyed_at IS NULL", (self.store.clock(), activity_id))

    def allocation(self, allocation_id: str, cluster_name: str, platform: str, amount: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO allocations (allocation_id, cluster_name, platform, amount, "
                         "created_at) VALUES (?, ?, ?, ?, ?)",
                         (allocation_id, cluster_name, platform, amount, self.store.clock()))

    def allocation_released(self, allocation_id: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE allocations SET released_at = ? WHERE allocation_id = ? AND released_at IS NULL",
                         (self.store.clock(), allocation_id))

    def open_allocations(self) -> list[str]:
        return [r[0] for r in self.store.conn.execute(
            "SELECT allocation_id FROM allocations WHERE released_at IS NULL")]

    def end_stale_nodes(self, live: set[str], reason: str) -> int:
        """Rows of nodes a previous webserver left pending/running/terminating: they ended with it."""
        with self.store.transaction() as conn:
            rows = conn.execute("SELECT node_id, state_log FROM nodes WHERE state != 'terminated'").fetchall()
            stale = [(node_id, log) for node_id, log in rows if node_id not in live]
            for node_id, log in stale:
                conn.execute("UPDATE nodes SET state = 'terminated', state_log = ?, updated_at = ? WHERE node_id = ?",
                             (json.dumps([*json.loads(log or "[]"), reason]), self.store.clock(), node_id))
        return len(stale)

    def agreement_owner(self, agreement_id: str) -> dict | None:
        """The cluster and node an agreement of ours was signed for; None if it is not ours."""
        row = self.store.conn.execute("SELECT cluster_name, node_id FROM agreements WHERE agreement_id = ?",
                                      (agreement_id,)).fetchone()
        return dict(row) if row else None

    def owned_agreements(self) -> dict[str, dict]:
        """`{agreement_id: {cluster_name, node_id}}`: agreements not recorded ended whose node is not
        terminated. They belong to a cluster (a restarted webserver adopts them); `cleanup` keeps them."""
        return {r["agreement_id"]: {"cluster_name": r["cluster_name"], "node_id": r["node_id"]}
                for r in self.store.conn.execute(
                    "SELECT a.agreement_id, a.cluster_name, a.node_id FROM agreements a JOIN nodes n "
                    "ON n.node_id = a.node_id WHERE a.terminated_at IS NULL AND n.state != 'terminated'")}

    def leftover_ended(self, leftover: dict, outcome: str) -> None:
        """`cleanup` ended (or failed to end) an agreement no cluster owned: one `cleanups` row each."""
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO cleanups (agreement_id, provider_id, provider_name, activities, "
                "created_at, ended_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (leftover["agreement_id"], leftover.get("provider_id"), leftover.get("provider_name"),
                 json.dumps([a["activity_id"] for a in leftover.get("activities", [])]),
                 leftover.get("created_at"), self.store.clock(), outcome))
        if outcome == "ended":
            self.agreement_ended(leftover["agreement_id"], "ended by `ray-on-golem cleanup`: no cluster owned it")

    def cleanups(self) -> list[dict]:
        return [dict(r) for r in self.store.conn.execute("SELECT * FROM cleanups ORDER BY ended_at")]

    def open_agreements(self) -> list[dict]:
        return [dict(r) for r in self.store.conn.execute(
            "SELECT agreement_id, cluster_name, node_id, provider_id FROM agreements WHERE terminated_at IS NULL")]

    def recent_failures(self, provider_id: str, network: str, window_s: float) -> int:
        failing = [k for k, good in PROVIDER_EVENT_KINDS.items() if not good]
        marks = ",".join("?" * len(failing))
        row = self.store.conn.execute(
            f"SELECT COUNT(*) FROM provider_events WHERE node_id = ? AND network = ? AND kind IN ({marks}) "
            "AND created_at > ?", (provider_id, network, *failing, self.store.clock() - window_s)).fetchone()
        return row[0]

    def state_logs(self, cluster_name: str) -> dict[str, list[str]]:
        """Each recorded node's bring-up steps (the status page shows nodes no longer held in memory)."""
        import json

        return {row["node_id"]: json.loads(row["state_log"] or "[]") for row in self.store.conn.execute(
            "SELECT node_id, state_log FROM nodes WHERE cluster_name = ?", (cluster_name,))}

    def first_allocation_at(self, cluster_name: str) -> float | None:
        """When the cluster's first allocation was made: where its spending chart starts."""
        return self.store.conn.execute("SELECT MIN(created_at) FROM allocations WHERE cluster_name = ?",
                                       (cluster_name,)).fetchone()[0]

    def has_cluster(self, name: str) -> bool:
        return self.store.conn.execute("SELECT 1 FROM clusters WHERE name = ?", (name,)).fetchone() is not None

    def node_counts(self) -> dict[str, dict[str, int]]:
        """`{cluster: {node_state: count}}` from the clusters and nodes tables.

        Recomputed only after a commit (`PRAGMA data_version` moves on other connections' commits,
        `total_changes` on ours): status polls stay cheap.
        """
        conn = self.store.conn
        version = (conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
        if self._counts_cache is None or self._counts_cache[0] != version:
            self._counts_cache = (version, self._node_counts())
        return self._counts_cache[1]

    def _node_counts(self) -> dict[str, dict[str, int]]:
        rows = self.store.conn.execute(
            "SELECT c.name, n.state, COUNT(n.node_id) FROM clusters c LEFT JOIN nodes n ON n.cluster_name = c.name "
            "GROUP BY c.name, n.state"
        ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for name, state, n in rows:
            counts.setdefault(name, {})
            if state is not None:
                counts[name][state] = n
        return counts


class Ledger:
    """The ledger rows: every debit note and invoice, and the prices of our agreements."""

    def __init__(self, store):
        self.store = store

    def known(self, document_id: str) -> str | None:
        row = self.store.conn.execute("SELECT status FROM ledger WHERE document_id = ?", (document_id,)).fetchone()
        return row[0] if row else None

    def received(self, document_id: str, kind: str, agreement_id: str, activity_id: str | None, node_id: str,
                 cluster_name: str, allocation_id: str | None, amount: str) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO ledger (document_id, kind, agreement_id, activity_id, node_id, cluster_name, "
                "allocation_id, amount, status, created_at) VALUES (?,?,?,?,?,?,?,?, 'received', ?)",
                (document_id, kind, agreement_id, activity_id, node_id, cluster_name, allocation_id, amount,
                 self.store.clock()))

    def update(self, document_id: str, status: str, *, spent=0, reason: str | None = None) -> None:
        settled = self.store.clock() if status in ("accepted", "rejected", "failed") else None
        with self.store.transaction() as conn:
            conn.execute("UPDATE ledger SET status = ?, spent = ?, reason = ?, settled_at = ? WHERE document_id = ?",
                         (status, str(spent), reason, settled, document_id))

    def spent(self, allocation_id: str):
        """What an allocation has spent: the sum of its accepted rows (exact: summed here, not in SQL)."""
        from decimal import Decimal

        rows = self.store.conn.execute(
            "SELECT spent FROM ledger WHERE allocation_id = ? AND status IN ('accepting', 'accepted')", (allocation_id,))
        return sum((Decimal(r[0]) for r in rows), Decimal(0))

    def accepted_documents(self, allocation_id: str) -> list[dict]:
        """The documents an allocation accepted (or was accepting when its webserver died), oldest
        first: a restarted webserver rebuilds what each agreement and activity has accepted."""
        return [dict(r) for r in self.store.conn.execute(
            "SELECT document_id, kind, agreement_id, activity_id, amount, spent, status FROM ledger "
            "WHERE allocation_id = ? AND status IN ('accepting', 'accepted') ORDER BY created_at", (allocation_id,))]

    def accepted_for_node(self, node_id: str):
        """What one node's debit notes and invoices were accepted for (each row spends its increase)."""
        from decimal import Decimal

        rows = self.store.conn.execute("SELECT spent FROM ledger WHERE node_id = ? AND status = 'accepted'", (node_id,))
        return sum((Decimal(r[0]) for r in rows), Decimal(0))

    def pricing(self, agreement_id: str, terms: dict) -> None:
        """The agreed linear prices (`PriceTerms.to_json()`) its bills are checked against."""
        with self.store.transaction() as conn:
            conn.execute("UPDATE agreements SET pricing = ? WHERE agreement_id = ?", (json.dumps(terms), agreement_id))

    def rows(self, cluster_name: str | None = None) -> list[dict]:
        sql = "SELECT * FROM ledger" + (" WHERE cluster_name = ?" if cluster_name else "") + " ORDER BY created_at"
        return [dict(r) for r in self.store.conn.execute(sql, (cluster_name,) if cluster_name else ())]

    def cost_rows(self, cluster_name: str | None = None) -> tuple[list[dict], list[tuple[str, str]], dict[str, list]]:
        """What `costs` reports, as rows: the clusters, `(agreement_id, spent)` of every accepting or
        accepted document, and per cluster its nodes joined with their agreements and providers."""
        where, args = (" WHERE c.name = ?", (cluster_name,)) if cluster_name else ("", ())
        clusters = [dict(r) for r in self.store.conn.execute(
            "SELECT name, network, state, total_budget FROM clusters c" + where + " ORDER BY created_at", args)]
        spent = [(r[0], r[1]) for r in self.store.conn.execute(
            "SELECT agreement_id, spent FROM ledger WHERE status IN ('accepting', 'accepted')"
            + (" AND cluster_name = ?" if cluster_name else ""), args)]
        nodes = {cluster["name"]: self.store.conn.execute(
            "SELECT n.node_id, n.node_type, n.state, n.created_at AS node_created_at, a.agreement_id, "
            "a.provider_id, a.pricing, a.created_at, a.terminated_at, p.name AS provider_name "
            "FROM nodes n LEFT JOIN agreements a ON a.node_id = n.node_id "
            "LEFT JOIN providers p ON p.node_id = a.provider_id "
            "WHERE n.cluster_name = ? ORDER BY n.created_at, a.created_at", (cluster["name"],)).fetchall()
            for cluster in clusters}
        return clusters, spent, nodes


###############################################################################
# 5. Yagna ####################################################################
###############################################################################

# Payment tokens: mainnets pay in GLM, every test network (and the local one) in tGLM.
MAINNET_PAYMENT_NETWORKS = ("polygon", "mainnet")
DEFAULT_SERVICE_NETWORK = "local"  # what `start` runs when no cluster asks: works with no wallet and no internet
YAGNA_READY_TIMEOUT = 120.0  # real yagna offline answers after ~3.7 s (relay timeout): docs/yagna-behaviour.md §5
YAGNA_STOP_TIMEOUT = 10.0
# The app key the webserver uses, for `ssh-proxy` (Ray's ProxyCommand runs in the user's shell,
# which need not hold $YAGNA_APPKEY): mode 0600 in the data dir, rewritten at every start.
YAGNA_APPKEY_FILE = "yagna.appkey"
YAGNA_LOG_MAX_BYTES = 10 * 1024 * 1024
# Chains whose RPC endpoint yagna resolves at run time as `{CHAIN}_GETH_ADDR` (docs/yagna-behaviour.md §5).
YAGNA_CHAINS = ("MAINNET", "GOERLI", "HOLESKY", "MUMBAI", "POLYGON", "AMOY", "SEPOLIA", "HOODI", "RINKEBY")


def payment_platform(network: str, driver: str = "erc20", token: str | None = None) -> str:
    """yagna's payment platform name, `erc20-<network>-<token>` (e.g. `erc20-holesky-tglm`)."""
    if token is None:
        token = "glm" if network in MAINNET_PAYMENT_NETWORKS else "tglm"
    return f"{driver}-{network}-{token}"


def require_yagna() -> str:
    """The yagna binary (`find_yagna`), or a ServiceUnavailable that says how to get one."""
    path = find_yagna()
    if path:
        return path
    if os.environ.get("YAGNA_PATH"):
        raise ServiceUnavailable(f"YAGNA_PATH={os.environ['YAGNA_PATH']!r} is not an executable file")
    raise ServiceUnavailable(
        "the yagna binary was not found: install it with `pip install golem-node==0.17.6` or set YAGNA_PATH"
    )


def yagna_loopback_env(yagna_datadir: str, port_base: int) -> dict[str, str]:
    """Environment that keeps a real yagna on 127.0.0.1: the recipe of docs/yagna-behaviour.md §5.

    Without `YA_NET_RELAY_HOST` yagna asks 8.8.8.8 for relay SRV records and never
    serves REST (§8); the proxies make the GitHub release check fail at once.
    Ports: GSB `port_base`, REST `+1`, net bind (UDP) `+2`, dead relay `+3`, central `+4`.
    """
    dead = "http://127.0.0.1:1"
    env = {
        "YAGNA_DATADIR": yagna_datadir,
        "GSB_URL": f"tcp://127.0.0.1:{port_base}",
        "YAGNA_API_URL": f"http://127.0.0.1:{port_base + 1}",
        "YA_NET_TYPE": "hybrid",
        "YA_NET_BIND_URL": f"udp://127.0.0.1:{port_base + 2}",
        "YA_NET_RELAY_HOST": f"127.0.0.1:{port_base + 3}",
        "CENTRAL_NET_HOST": f"127.0.0.1:{port_base + 4}",
        "YAGNA_METRICS_URL": f"{dead}/",
        "RUST_LOG": "info",
        "RUST_BACKTRACE": "0",  # else every CLI error prints a 45-frame backtrace (§3)
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for chain in YAGNA_CHAINS:
        env[f"{chain}_GETH_ADDR"] = dead
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[proxy] = env[proxy.lower()] = dead
    return env


def proc_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if it is gone.

    A pid plus its start time names one process for good: the kernel reuses pids,
    never (pid, start time) pairs.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs and, if `start_time` is given, is still the same process."""
    now = proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def stop_process(pid: int, start_time: int | None, first_signal: int, timeout: float) -> str:
    """Send `first_signal`, wait up to `timeout`, then SIGKILL. Returns what it took: gone|signal|killed."""
    import signal

    if not process_alive(pid, start_time):
        return "gone"
    try:
        os.kill(pid, first_signal)
    except ProcessLookupError:
        return "gone"
    if wait_process_exit(pid, start_time, timeout):
        return "signal"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "signal"
    wait_process_exit(pid, start_time, 5.0)
    return "killed"


def wait_process_exit(pid: int, start_time: int | None, timeout: float) -> bool:
    """Poll until the process is gone (reaping it if it is our child); True if it went in time."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:  # our own child stays a zombie until reaped
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not process_alive(pid, start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def tail_lines(path: str, count: int = 20) -> list[str]:
    """The last `count` lines of a log file (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return data.splitlines()[-count:]


def open_rotated_log(path: str, max_bytes: int, backups: int = 3):
    """Open a child process's log for appending, first rolling it over if it grew past `max_bytes`.

    A child writes through an inherited fd, so it can only be rotated between runs.
    """
    try:
        if os.path.getsize(path) > max_bytes:
            for i in range(backups - 1, 0, -1):
                if os.path.exists(f"{path}.{i}"):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def python_module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `module` (ours or golem_localnet) with `sys.executable`.

    From a checkout or a venv: `-m module` with this module's directory first on PYTHONPATH. From
    the zipapp: `python ray-on-golem.pyz ...` (`... localnet ...` for golem_localnet: the pyz's
    `__main__` runs it), so the child imports this module first and its bundle hook with it
    (`ZipappBundle`); the pyz stays on PYTHONPATH for what the child starts in turn (Ray on a node).
    """
    env = dict(os.environ)
    here = _ZIPAPP or os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    if _ZIPAPP:
        return [sys.executable, _ZIPAPP, *(["localnet"] if module == "golem_localnet" else []), *args], env
    return [sys.executable, "-m", module, *args], env


class HTTPConnection:
    """A keep-alive HTTP/1.1 client connection to a loopback `http://` service (yagna, the webserver).

    Not `http.client` (it imports `email` and `ssl`: ~50 ms) nor even `socket` (its enum
    conversions: ~10 ms), out of a `status` whose whole budget is 60 ms: the C `_socket`
    and a small buffer. Plain http only; every service here is on 127.0.0.1.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._sock = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock, self._buffer = None, b""

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> tuple[int, bytes]:
        """Send one request, return (status, body). OSError/ValueError when the exchange fails."""
        import _socket

        # A reused keep-alive connection the server closed meanwhile fails on first use: retry once, fresh.
        for attempt in (0, 1):
            fresh = self._sock is None
            if fresh:
                self._sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                self._sock.settimeout(self.timeout)
                try:
                    self._sock.connect((self.host, self.port))
                except OSError:
                    self.close()
                    raise
                self._sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self._sock.settimeout(self.timeout)
            head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body or b'')}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            try:
                self._sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
                return self._read_response()
            except (OSError, ValueError):
                self.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("connection closed by the server")
        self._buffer += chunk

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > 65536:
                raise ValueError("response line too long")
            self._fill()
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _read_response(self) -> tuple[int, bytes]:
        status = int(self._line().split()[1])
        headers = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while (size := int(self._line().split(b";")[0], 16)) > 0:
                body += self._exactly(size)
                self._line()
            while self._line():
                pass  # trailers
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        else:  # until the server closes
            try:
                while True:
                    self._fill()
            except ConnectionResetError:
                pass
            body, headers["connection"] = self._buffer, "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body


def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: object = None,
    timeout: float = 10.0,
    connection: HTTPConnection | None = None,
) -> tuple[int, object]:
    """One JSON request to `http://host:port/path`; returns (status, decoded JSON or text).

    Raises ServiceUnavailable when nothing answers. `connection` reuses a keep-alive
    HTTPConnection to the same host.
    """
    import json

    if not url.startswith("http://"):
        raise UsageError(f"only http:// URLs are supported here, not {url!r}")
    netloc, slash, path = url[len("http://") :].partition("/")
    host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "80")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = connection or HTTPConnection(host, int(port), timeout=timeout)
    try:
        status, raw = conn.request(method, slash + path, headers, payload)
    except (OSError, ValueError, IndexError) as e:
        raise ServiceUnavailable(f"no answer from http://{netloc}: {e}") from None
    finally:
        if connection is None:
            conn.close()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


class YagnaService:
    """The yagna REST endpoint the webserver talks to, and the process behind it if we started it.

    `payment_network: local` means the local Golem network (`golem_localnet.py serve`);
    anything else means the real `yagna service run`. A daemon that already answers
    is used as it is and left running on stop: only what we started is ours to stop.
    """

    # The `local_network` block of a cluster YAML as flags of `golem_localnet.py serve`.
    LOCALNET_FLAGS = {"providers": "--providers", "seed": "--seed", "profile": "--profile",
                      "time_scale": "--time-scale"}

    def __init__(self, network: str, datadir: str, appname: str = DEFAULT_YAGNA_APPNAME,
                 local_network: dict | None = None):
        import logging
        import threading

        self.network = network
        self.datadir = datadir
        self.appname = appname
        self.local_network = dict(local_network or {})  # used when it starts the local network
        self.kind = "localnet" if network == "local" else "yagna"
        self.api_url = ""
        self.app_key = ""  # secret: never logged, never in argv, never in an HTTP response
        self.version: str | None = None
        self.identity: str | None = None
        self.pid: int | None = None
        self.pid_start_time: int | None = None
        self.started_by_us = False
        self.warnings: list[str] = []
        # The daemon a killed webserver had started in this data dir ({"url", "pid",
        # "pid_start_time"}): found still running, it is adopted, so that it is stopped with us.
        self.orphan: dict | None = None
        self.cancelled = threading.Event()  # set by a shutdown that comes while we start
        self.stopped = False
        # What the network is, as the local network says in its localnet.json (the real one: 1.0, None):
        self.time_scale = 1.0  # simulated seconds per real second (autostop's idle clock)
        self.no_nodes_reason: str | None = None  # why no Ray node can run on it (sandbox mode)
        self._process = None
        self._log = logging.getLogger("ray_on_golem.yagna")

    @property
    def payment_platform(self) -> str:
        return payment_platform(self.network)

    @property
    def log_path(self) -> str:
        return os.path.join(self.datadir, "localnet.log" if self.kind == "localnet" else "yagna.log")

    @property
    def registry_url(self) -> str:
        """Where images are looked up: the local network serves the Golem registry's API itself;
        `$RAY_ON_GOLEM_REGISTRY_URL` points elsewhere (a mirror)."""
        return (os.environ.get("RAY_ON_GOLEM_REGISTRY_URL")
                or (self.api_url if self.kind == "localnet" else DEFAULT_REGISTRY_URL))

    def info(self) -> dict:
        """What status shows about the daemon (no secrets)."""
        return {
            "kind": self.kind,
            "url": self.api_url or None,
            "version": self.version,
            "pid": self.pid,
            "started_by_us": self.started_by_us,
            "identity": self.identity,
            "payment_network": self.network,
            "payment_platform": self.payment_platform,
            "time_scale": self.time_scale,
        }

    # -- start ---------------------------------------------------------------

    def start(self, timeout: float = YAGNA_READY_TIMEOUT) -> None:
        """Connect to a reachable daemon or start one; then get the app key and version. Blocking."""
        if self.kind == "localnet":
            self._connect_or_start_localnet(timeout)
        else:
            self._connect_or_start_yagna(timeout)
        me = self.get("/me")
        self.identity = me.get("identity") if isinstance(me, dict) else None
        write_secret_file(os.path.join(self.datadir, YAGNA_APPKEY_FILE), self.app_key + "\n")
        self.version = self._fetch_version()
        self._log.info(
            "using %s at %s (version %s, %s)",
            self.kind,
            self.api_url,
            self.version,
            "started by us" if self.started_by_us else "started externally",
        )

    def _reachable(self, url: str) -> bool:
        """Any HTTP answer (even 401) means a daemon listens, as the original checked (docs/yagna-behaviour.md §1)."""
        try:
            http_request("GET", f"{url}/me", timeout=2.0)
        except ServiceUnavailable:
            return False
        return True

    def _connect_or_start_localnet(self, timeout: float) -> None:
        import json

        netdir = ensure_datadir(os.path.join(self.datadir, "localnet"))
        state_path = os.path.join(netdir, "localnet.json")
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("url") and process_alive(int(state.get("pid") or 0)) and self._reachable(state["url"]):
            self.api_url = state["url"]
            self.pid = int(state["pid"])
            self._adopt_or_leave("the local network")
        else:
            try:
                os.unlink(state_path)  # stale: the new process writes its own
            except FileNotFoundError:
                pass
            # Default isolation (auto: namespaced, VM-like nodes when root): Ray reaches them by SSH.
            cmd, env = python_module_command("golem_localnet", "serve", "--port", "0", "--datadir", netdir,
                                             "--hide", self.datadir)
            for key, flag in self.LOCALNET_FLAGS.items():
                if self.local_network.get(key) is not None:
                    cmd = [*cmd, flag, str(self.local_network[key])]
            self._spawn(cmd, env)
            self._wait_ready(timeout, lambda: self._localnet_url(state_path))
        self.app_key = os.environ.get("YAGNA_APPKEY") or self._read_localnet_appkey(netdir)
        self._read_localnet_traits(state_path)

    def _read_localnet_traits(self, state_path: str) -> None:
        """Its clock and how it makes nodes, from the `localnet.json` of the process we use: a node
        in the shared-loopback sandbox cannot run sshd, so Ray cannot reach it (docs/internals.md)."""
        import json

        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = {}
        self.time_scale = float(state.get("time_scale") or 1.0)
        if (state.get("isolation") or "sandbox") == "sandbox":
            why = f" ({state['isolation_reason']})" if state.get("isolation_reason") else ""
            self.no_nodes_reason = (f"the local network runs in sandbox mode{why}: its nodes share this machine's "
                                    "loopback and cannot run sshd; run it as root for VM-like nodes")

    def _adopt_or_leave(self, what: str) -> None:
        """A reachable daemon is ours only if a killed webserver of this data dir had started it."""
        orphan = self.orphan or {}
        if orphan.get("url") == self.api_url and process_alive(orphan.get("pid") or 0, orphan.get("pid_start_time")):
            self.pid, self.pid_start_time = orphan["pid"], orphan.get("pid_start_time")
            self.started_by_us = True
            self._log.info("adopting %s (pid %s), left running by a webserver that was killed", what, self.pid)
        else:
            self._log.info("not starting %s: it was started externally (%s)", what, self.api_url)

    def _localnet_url(self, state_path: str) -> str | None:
        """The URL from `localnet.json` once our child wrote it (internals.md: the local network process)."""
        import json

        try:
            with open(state_path) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        if state.get("pid") != self.pid or not state.get("url"):
            return None
        return state["url"] if self._reachable(state["url"]) else None

    @staticmethod
    def _read_localnet_appkey(netdir: str) -> str:
        try:
            with open(os.path.join(netdir, "appkey")) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise ServiceUnavailable(f"the local network wrote no app key in {netdir}") from None

    def _connect_or_start_yagna(self, timeout: float) -> None:
        url = os.environ.get("YAGNA_API_URL", DEFAULT_YAGNA_API_URL).rstrip("/")
        if self._reachable(url):
            self.api_url = url
            self._adopt_or_leave("yagna")
        else:
            binary = require_yagna()
            env = dict(os.environ, RUST_BACKTRACE="0")
            # --disable-metrics-push: no reports to metrics.golem.network from a user's machine.
            self._spawn([binary, "service", "run", "--disable-metrics-push"], env)
            self._wait_ready(timeout, lambda: url if self._reachable(url) else None)
        self.app_key = os.environ.get("YAGNA_APPKEY") or self._yagna_app_key()
        try:
            # Registers the requestor account for this platform; works offline and is
            # idempotent (docs/yagna-behaviour.md §5). Funding needs the chain, so it is not done here.
            self.yagna_cli("payment", "init", "--sender", "--network", self.network)
        except ServiceUnavailable as e:
            self._warn(f"payment account not initialised: {e}")

    def adopt_orphan(self, runtime: dict) -> None:
        """`runtime`: the webserver.json a killed webserver left; the daemon it had started is ours now."""
        yagna = runtime.get("yagna") or {}
        if yagna.get("started_by_us"):
            self.orphan = {"url": yagna.get("url"), "pid": yagna.get("pid"),
                           "pid_start_time": runtime.get("yagna_pid_start_time")}  # fmt: skip

    def cancel_start(self) -> None:
        """A shutdown came: a daemon still starting is stopped, not left behind."""
        self.cancelled.set()

    def check_exited(self) -> bool:
        """Whether the daemon we started has exited on its own (said once, as a status warning)."""
        if self.started_by_us and not self.stopped and not process_alive(self.pid, self.pid_start_time):
            self.stopped = True
            self._warn(f"{self.kind} (pid {self.pid}) exited unexpectedly; "
                       "restart the webserver (`ray-on-golem stop`, then `start`)")  # fmt: skip
            return True
        return False

    def _warn(self, message: str) -> None:
        import datetime

        self._log.warning("%s", message)
        self.warnings.append(f"{datetime.datetime.now(datetime.timezone.utc).isoformat()} {message}")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        import subprocess

        log = open_rotated_log(self.log_path, YAGNA_LOG_MAX_BYTES)
        try:
            # Own session: a Ctrl-C on a foreground webserver must not reach the daemon
            # before the webserver has closed its agreements.
            # cwd: `-m golem_localnet` looks in the cwd first; never a stray copy where the user stands.
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True, cwd=self.datadir,
            )  # fmt: skip
        finally:
            log.close()
        self.pid = self._process.pid
        self.pid_start_time = proc_start_time(self.pid)
        self.started_by_us = True
        self._log.info("started %s (pid %s), log in %s", self.kind, self.pid, self.log_path)

    def _wait_ready(self, timeout: float, ready) -> None:
        import time

        deadline = time.monotonic() + timeout
        while True:
            if self.cancelled.is_set():
                self.stop()
                raise ServiceUnavailable(f"{self.kind} start cancelled: the webserver is shutting down")
            if self._process.poll() is not None:
                lines = "\n".join(tail_lines(self.log_path, 20))
                raise ServiceUnavailable(
                    f"{self.kind} exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{lines}"
                )
            url = ready()
            if url:
                self.api_url = url.rstrip("/")
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise ServiceUnavailable(f"{self.kind} did not answer within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def yagna_cli(self, *args: str, timeout: float = 30.0) -> str:
        """Run `yagna ARGS` (same environment as the daemon: the CLI needs its GSB_URL) and return stdout."""
        import subprocess

        try:
            done = subprocess.run(
                [require_yagna(), *args], capture_output=True, text=True, timeout=timeout,
                env=dict(os.environ, RUST_BACKTRACE="0"), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"`yagna {' '.join(args)}` did not finish within {timeout:.0f} s") from None
        if done.returncode != 0:
            # stderr of the yagna CLI names the problem ("Server is unreachable"); it never holds the key.
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ServiceUnavailable(f"`yagna {' '.join(args)}` failed: {err}")
        return done.stdout

    def _yagna_app_key(self) -> str:
        """Reuse the app key named `appname`, else create it (`yagna app-key create` is idempotent by name)."""
        import json

        for entry in json.loads(self.yagna_cli("app-key", "list", "--json") or "[]"):
            if entry.get("name") == self.appname:
                return entry["key"]
        out = self.yagna_cli("app-key", "create", self.appname).strip()
        try:  # some yagna versions print the key as a JSON string
            out = json.loads(out)
        except ValueError:
            pass
        if not out:
            raise ServiceUnavailable("`yagna app-key create` printed no key")
        return out

    def _fetch_version(self) -> str | None:
        """yagna answers `/version/get` with `{"current": {"version": ...}}` (docs/yagna-behaviour.md §1)."""
        try:
            data = self.get("/version/get")
            return data["current"]["version"]
        except (RayOnGolemError, KeyError, TypeError):
            pass
        if self.kind == "yagna":
            try:  # `yagna 0.17.6 (a98d28015 2026-03-13)`
                return self.yagna_cli("--version", timeout=10).split()[1]
            except (RayOnGolemError, IndexError):
                return None
        return None

    def get(self, path: str, timeout: float = 10.0) -> object:
        """GET a yagna REST path with the app key; raises ServiceUnavailable on an HTTP error."""
        status, data = http_request("GET", self.api_url + path, token=self.app_key, timeout=timeout)
        if status >= 400:
            msg = data.get("message") if isinstance(data, dict) else data
            raise ServiceUnavailable(f"{self.kind} answered {status} to GET {path}: {msg}")
        return data

    # -- stop ----------------------------------------------------------------

    def stop(self) -> str:
        """Stop the daemon if we started it; say what happened."""
        import signal

        if self.stopped:
            return "stopped"
        if not self.started_by_us or self.pid is None:
            if self.api_url:
                self._log.info("not stopping %s: it was started externally", self.kind)
            return "left running (started externally)"
        # yagna: SIGINT, never SIGTERM alone: a daemon stuck in net init ignores
        # SIGTERM for minutes (docs/yagna-behaviour.md §5). The local network exits on either.
        how = stop_process(self.pid, self.pid_start_time, signal.SIGINT, YAGNA_STOP_TIMEOUT)
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except Exception:  # noqa: BLE001 - already killed above; reaping is best effort
                pass
        self._log.info("stopped %s (pid %s): %s", self.kind, self.pid, how)
        self.stopped = True
        return {"gone": "already gone", "signal": "stopped", "killed": "killed after a timeout"}[how]


# --- golem-core connection ----------------------------------------------------
# golem-core makes no HTTP call when a GolemNode starts (golem/node/node.py, docs/yagna-behaviour.md §1):
# a wrong URL or app key would only show up as silently dead event loops, so the
# daemon is checked first (YagnaService.start GETs `/me`) and failures say what to do.


def start_yagna_for(network: str, datadir: str, local_network: dict | None = None) -> "YagnaService":
    """A started YagnaService (reused or spawned), or ServiceUnavailable naming the fix."""
    service = YagnaService(network, datadir, local_network=local_network)
    try:
        service.start()
    except ServiceUnavailable as e:
        if " 401 " in str(e):
            raise ServiceUnavailable(
                f"{service.kind} at {service.api_url} rejected the app key: set YAGNA_APPKEY to a key "
                "from `yagna app-key list`, or unset it to let Ray on Golem find one") from None
        raise ServiceUnavailable(
            f"{e} (start the services with `ray-on-golem start`, or point YAGNA_API_URL at a "
            "running yagna)") from None
    return service


# Networks whose faucet `yagna payment fund` may call; never a mainnet (polygon): that is real money.
AUTO_FUNDED_TESTNETS = ("holesky",)


def top_up_testnet_wallet(service: "YagnaService", network: str, driver: str = "erc20") -> str | None:
    """Ask the testnet faucet for tGLM (the original's `prepare_funds`); a warning if it fails.

    One attempt, no 5-minute retry loop: offline the CLI fails in well under a second
    ("Server is unreachable", docs/yagna-behaviour.md §5) and the allocation then says what is missing.
    """
    if network not in AUTO_FUNDED_TESTNETS or service.kind != "yagna":
        return None
    try:
        # `--network` always: the 0.17.6 CLI defaults to hoodi (docs/yagna-behaviour.md §5)
        service.yagna_cli("payment", "fund", "--network", network, "--driver", driver, timeout=120)
    except ServiceUnavailable as e:
        return f"could not top up the {network} wallet: {e}"
    return None


class VpnTcpProxy:
    """stdio <-> one TCP connection to a node's VPN address, through the net API's WebSocket
    (`GET {net-api}/net/{id}/tcp/{ip}/{port}`, raw TCP in binary frames; docs/internals.md).
    What `ssh -o ProxyCommand="ray-on-golem ssh-proxy ..."` needs, with no websocat: a client
    side of RFC 6455 (masked frames, pings answered) over a plain socket."""

    def __init__(self, net_api_url: str, app_key: str, network_id: str, ip: str, port: int):
        import urllib.parse

        url = urllib.parse.urlsplit(f"{net_api_url.rstrip('/')}/net/{network_id}/tcp/{ip}/{port}")
        if url.scheme not in ("http", "ws"):
            raise UsageError(f"--api-url: only http:// (loopback) is supported, got {url.scheme}://")
        self.host, self.port, self.path = url.hostname or "127.0.0.1", url.port or 80, url.path
        self._app_key = app_key
        self._sock = None
        self._send_lock = None

    def connect(self, timeout: float = 30.0) -> None:
        import base64
        import hashlib
        import socket
        import threading

        key = base64.b64encode(os.urandom(16)).decode()
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.sendall((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {self._app_key}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self._pending = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            sock.close()
            raise ServiceUnavailable(f"the net API refused the connection: {lines[0] or 'no answer'} "
                                     f"{self._pending[:300].decode(errors='replace')}".strip())
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if not any(line.lower().startswith("sec-websocket-accept:") and line.split(":", 1)[1].strip().encode() == accept
                   for line in lines[1:]):
            sock.close()
            raise ServiceUnavailable("the net API answered a bad WebSocket handshake (Sec-WebSocket-Accept)")
        sock.settimeout(None)
        self._sock = sock
        self._send_lock = threading.Lock()

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        import struct

        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
        with self._send_lock:
            self._sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            self._pending += chunk
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def _frames(self):
        """(opcode, payload) of each frame the server sends (its frames are unmasked)."""
        import struct

        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if b1 & 0x80 else b""
            data = self._read(n)
            if mask:
                key = (mask * (n // 4 + 1))[:n]
                data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
            yield b0 & 0x0F, data

    def run(self, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
        """Carry bytes until either side ends; 0 when the node side closed cleanly."""
        import threading

        def upstream():
            try:
                while True:
                    data = os.read(stdin_fd, 65536)
                    if not data:
                        break
                    self._send(0x2, data)
                self._send(0x8, (1000).to_bytes(2, "big"))
            except OSError:
                pass

        threading.Thread(target=upstream, daemon=True).start()
        try:
            for opcode, data in self._frames():
                if opcode in (0x0, 0x1, 0x2):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout_fd, view):]
                elif opcode == 0x9:
                    self._send(0xA, data)
                elif opcode == 0x8:
                    break
        except (EOFError, OSError):
            pass
        finally:
            self._sock.close()
        return 0


def vpn_net_api_url(datadir: str, recorded_api_url: str | None = None) -> str:
    """Where the net API is: $YAGNA_NET_URL (golem-core reads it too), else under yagna's REST root."""
    if os.environ.get("YAGNA_NET_URL"):
        return os.environ["YAGNA_NET_URL"]
    return f"{yagna_api_url(datadir, recorded_api_url)}/net-api/v1"


def vpn_app_key(datadir: str) -> str:
    """The app key from $YAGNA_APPKEY, the one the webserver uses (its data dir's key file, for
    the real yagna and the local network alike), or the local network's own key file; never argv."""
    if os.environ.get("YAGNA_APPKEY"):
        return os.environ["YAGNA_APPKEY"]
    for path in (os.path.join(datadir, YAGNA_APPKEY_FILE), os.path.join(datadir, "localnet", "appkey")):
        try:
            with open(path) as f:
                key = f.read().strip()
        except OSError:
            continue
        if key:
            return key
    raise UsageError("no app key: set YAGNA_APPKEY, or start the services (`ray-on-golem start`) "
                     f"so that the app key is in the data dir ({os.path.join(datadir, YAGNA_APPKEY_FILE)})")


def app_session_id(datadir: str) -> str:
    """The app session of this data dir, the same across webserver restarts: yagna tags each agreement
    we confirm with it (golem-core `Agreement.confirm`), so `GET /market-api/v1/agreements?appSessionId=`
    lists ours and never another application's, and payment events are filtered by it
    (docs/yagna-behaviour.md §3). Derived from the data dir's real path, so nothing to store or lose."""
    import hashlib

    return "ray-on-golem-" + hashlib.sha256(os.path.realpath(datadir).encode()).hexdigest()[:24]


def yagna_api_url(datadir: str, recorded_api_url: str | None = None) -> str:
    """yagna's REST root for a process that is not the webserver: $YAGNA_API_URL (golem-core reads
    the same variable), the yagna URL the webserver recorded (`recorded_api_url`), the local network
    of this data dir, else yagna's default."""
    import json

    url = os.environ.get("YAGNA_API_URL") or recorded_api_url
    if not url:
        try:
            with open(os.path.join(datadir, "localnet", "localnet.json")) as f:
                url = json.load(f).get("url")
        except (OSError, ValueError):
            url = None
    return (url or DEFAULT_YAGNA_API_URL).rstrip("/")


def golem_node_for(service: "YagnaService", collect_payment_events: bool = True):
    """An unstarted golem-core GolemNode bound to the service's URL and app key."""
    from golem.node import GolemNode

    return GolemNode(app_key=service.app_key, api_url=service.api_url,
                     collect_payment_events=collect_payment_events)


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

DEFAULT_REGISTRY_URL = "https://registry.golem.network"

DEFAULT_NEGOTIATION_CONCURRENCY = 16
DEFAULT_PROPOSAL_RESPONSE_TIMEOUT = 30.0  # seconds; the original's value (golem-core's default is 5)
DEBIT_NOTE_INTERVAL_S = 180  # what the original asks for; providers accept [1 s, 24 h]
DEBIT_NOTE_ACCEPT_TIMEOUT_S = 240  # a real provider rejects a larger one (docs/yagna-behaviour.md §3)
DEMAND_LIFETIME_DAYS = 365
# yagna drops a demand subscription after an hour (golem-core's Demand DEFAULT_TTL, which its
# RefreshingDemandManager follows): a long-lived pipeline subscribes a fresh one before that.
DEMAND_REFRESH_S = 50 * 60
# Scoring without a `per_cpu_expected_usage` block still prefers cheap providers: price
# them for one fully used CPU-hour.
DEFAULT_EXPECTED_USAGE = (1.0, 1.0)  # (cpu_load, duration_hours)
MARKET_SCORE_WEIGHTS = {"cost": 1.0, "reputation": 1.0, "random": 0.1}  # as the original's scorers

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
        # kept verbatim (trailing " ; " of the outbound message included): users grep for it
        key = mask_ids(reason) if reason.strip() else "Rejected without a reason"
        self.errors[key] = self.errors.get(key, 0) + 1
        return key

    def sorted_errors(self) -> list[tuple[str, int]]:
        """Most frequent first; ties alphabetically, so the report is reproducible."""
        return sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))

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


class BudgetControl:
    """`node_config.budget_control`: the four price limits and the expected usage.

    (Plain classes, not dataclasses, in this module: `import dataclasses` would cost
    every cold start of the CLI its `inspect` import.)
    """

    def __init__(self, *, cpu_load: float | None = None, duration_hours: float | None = None,
                 max_cost: float | None = None, max_start_price: float | None = None,
                 max_cpu_per_hour_price: float | None = None, max_env_per_hour_price: float | None = None,
                 payment_interval_minimal_hours: float = 12.0,
                 payment_interval_optimal_hours: float | None = None):
        self.cpu_load = cpu_load
        self.duration_hours = duration_hours
        self.max_cost = max_cost
        self.max_start_price = max_start_price
        self.max_cpu_per_hour_price = max_cpu_per_hour_price
        self.max_env_per_hour_price = max_env_per_hour_price
        self.payment_interval_minimal_hours = payment_interval_minimal_hours
        self.payment_interval_optimal_hours = payment_interval_optimal_hours

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


class PriceFilter:
    """One budget limit: rejects offers priced above `limit`, or unpriceable ones."""

    def __init__(self, label: str, limit: float, price, per: float = 1.0):
        self.label = label
        self.limit = limit  # in the unit `price` returns (GLM, or GLM per second)
        self.price = price  # callable(ProposalData) -> float | None
        self.per = per  # 3600 for the per-hour limits: the unit of the label

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
        parts = [(MARKET_SCORE_WEIGHTS["random"], self.rng.random())]
        if expected_cost is not None:
            parts.append((MARKET_SCORE_WEIGHTS["cost"], 1.0 / (1.0 + max(expected_cost, 0.0) / self.cost_reference)))
        reputation = self.reputation(provider_id)
        if reputation is not None:
            parts.append((MARKET_SCORE_WEIGHTS["reputation"], min(max(float(reputation), 0.0), 1.0)))
        return sum(w * s for w, s in parts) / sum(w for w, _ in parts)


# --- Demand ---------------------------------------------------------------------


class DemandSpec:
    """What a node needs from a provider, from the resolved `node_config`."""

    def __init__(self, payment_network: str, *, subnet_tag: str = "public", image_tag: str | None = None,
                 image_hash: str | None = None, capabilities: tuple = ("vpn", "inet"),
                 outbound_urls: tuple = (), min_mem_gib: float = 0.0, min_cpu_threads: int = 0,
                 min_storage_gib: float = 0.0, max_cpu_threads: int | None = None, runtime: str = "vm",
                 node_descriptor: dict | None = None, payment_timeout_s: int = 12 * 3600,
                 registry_url: str):
        self.payment_network = payment_network
        self.subnet_tag = subnet_tag
        self.image_tag = image_tag
        self.image_hash = image_hash
        self.capabilities = tuple(capabilities)
        self.outbound_urls = tuple(outbound_urls)
        self.min_mem_gib = min_mem_gib
        self.min_cpu_threads = min_cpu_threads
        self.min_storage_gib = min_storage_gib
        self.max_cpu_threads = max_cpu_threads
        self.runtime = runtime
        self.node_descriptor = node_descriptor
        self.payment_timeout_s = payment_timeout_s
        self.registry_url = registry_url

    @classmethod
    def from_node_config(cls, node_config: dict, payment_network: str, registry_url: str) -> "DemandSpec":
        demand = node_config.get("demand") or {}
        budget = BudgetControl.from_node_config(node_config)
        return cls(
            payment_network=payment_network,
            subnet_tag=node_config.get("subnet_tag") or "public",
            image_tag=demand.get("image_tag"),
            image_hash=(demand.get("image_hash") or "").removeprefix("sha3:") or None,
            capabilities=tuple(demand.get("capabilities", ("vpn", "inet"))),
            outbound_urls=tuple(demand.get("outbound_urls") or ()),
            min_mem_gib=demand.get("min_mem_gib") or 0.0,
            min_cpu_threads=demand.get("min_cpu_threads") or 0,
            min_storage_gib=demand.get("min_storage_gib") or 0.0,
            max_cpu_threads=demand.get("max_cpu_threads"),
            runtime=demand.get("runtime") or "vm",
            node_descriptor=demand.get("node_descriptor"),
            payment_timeout_s=int(budget.payment_interval_minimal_hours * 3600),
            registry_url=registry_url,
        )

    def resolve_image(self, timeout: float = 10.0) -> tuple[str, str]:
        """(sha3 hash, download URL) from the Golem registry (the local network serves the same API).

        Registry contract (docs/yagna-behaviour.md §7): GET /v1/image/info?tag=|hash= → {"sha3", "http"}; 404 = unknown.
        """
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

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
        if allocation is not None:  # its platform address and protocol version (docs/yagna-behaviour.md §3)
            await builder.add(await allocation.get_demand_spec())
        return builder


# --- Pipeline -------------------------------------------------------------------


class Candidate:
    """One initial proposal on its way through the pipeline."""

    __slots__ = ("proposal", "provider_id", "row", "expected_cost", "score", "draft")

    def __init__(self, proposal, provider_id: str, row: dict, expected_cost: float | None = None):
        self.proposal = proposal  # golem.resources.Proposal
        self.provider_id = provider_id
        self.row = row  # the provider's row in the Funnel
        self.expected_cost = expected_cost
        self.score = 0.0
        self.draft = None  # the provider's Draft once negotiated


AGREEMENT_ABANDON_WAIT_S = 30.0  # how long an abandoned Pending agreement is watched for an approval to end


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
                 max_drafts: int | None = None, demand_refresh_s: float = DEMAND_REFRESH_S,
                 allocation=None):
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
        self.demand_refresh_s = demand_refresh_s
        self.pricing = Pricing(budget)
        self.filters = budget_filters(budget, self.pricing)
        # cost scores are relative to the user's own limit, else to 1 GLM per expected usage
        self.scorer = Scorer(reputation, budget.max_cost or 1.0, seed)
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
        # A given allocation (a cluster's, shared by its pipelines) is the giver's to release.
        self.allocation = allocation
        self._owns_allocation = allocation is None
        self.demand = None  # the newest subscription; older ones stay until stop (their drafts)
        self.demands: list = []
        self._queue: asyncio.PriorityQueue = asyncio.PriorityQueue()  # (-score, seq, Candidate)
        self._drafts: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._room = asyncio.Condition()  # signalled when a draft slot frees (max_drafts)
        self._reserved = 0  # negotiator slots holding or about to hold a draft
        self._seq = 0
        self._demand_data: dict = {}  # demand id -> DemandData, parsed once
        self._answers: dict = {}  # our counter-proposal id -> future of the provider's answer
        self._answer_handler = None
        self._tasks: list = []
        self._abandoning: set = set()  # tasks ending agreements the caller gave up on (_abandon)
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Allocate, subscribe the demand and start the collector and the negotiators."""
        import asyncio

        from golem.resources import Allocation
        from golem.resources.proposal.events import NewProposal

        try:
            if self.allocation is None:
                self.allocation = await Allocation.create_any_account(
                    self.node, _decimal(self.total_budget), self.spec.payment_network, self.payment_driver)
        except Exception as e:
            network = self.spec.payment_network
            hint = f"; check the wallet with `yagna payment status --network {network}`"
            if network in AUTO_FUNDED_TESTNETS:
                hint += f" and top it up with `yagna payment fund --network {network}`"
            raise ServiceUnavailable(
                f"could not allocate {self.total_budget} GLM on {network}: {_api_error_text(e)}{hint}") from None
        await self._subscribe()
        self._answer_handler = await self.node.event_bus.on(NewProposal, self._on_new_proposal)
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
        await asyncio.gather(*self._abandoning, return_exceptions=True)
        if self._answer_handler is not None:
            await _quietly(self.node.event_bus.off(self._answer_handler))
            self._answer_handler = None
        if reject_drafts:
            drafts = []
            while not self._drafts.empty():
                drafts.append(self._drafts.get_nowait()[2])
            await asyncio.gather(*(self._reject(c.draft, REASON_NO_MORE_NEEDED) for c in drafts),
                                 return_exceptions=True)
        for demand in self.demands:
            await _quietly(demand.unsubscribe())
        if self.allocation is not None and self._owns_allocation:
            await _quietly(self.allocation.release())

    async def settle(self, stop_event=None) -> None:
        """Stop taking new proposals; negotiate every one already accepted, then return.

        Bounded: each negotiation ends within the response timeout, `concurrency` at a time.
        """
        import asyncio

        if self._tasks:
            self._tasks[0].cancel()  # the collector
            await asyncio.gather(self._tasks[0], return_exceptions=True)
        # asyncio.Queue removes an item only when its getter resumes, so an item being
        # handed over still counts as queued here: no gap between the two conditions.
        while not self._queue.empty() or self.negotiating:
            if stop_event is not None and stop_event.is_set():
                break
            await asyncio.sleep(0.02)
        self._stopping = True

    # -- what callers use ---------------------------------------------------------------

    async def scan(self, duration_s: float, stop_event=None, on_progress=None,
                   progress_interval: float = 0.5) -> bool:
        """network-stats: run for `duration_s` (or until `stop_event`), sign nothing.

        Returns True when the scan ran its full duration, False when stopped early. After the
        full duration the proposals already accepted are still negotiated (`settle`); an early
        stop cancels negotiations at once.
        """
        import asyncio
        import time

        if stop_event is not None and stop_event.is_set():
            return False  # interrupted while connecting: allocate and subscribe nothing
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
                await self.settle(stop_event)
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
                # `wait` answers 410 on a rejection: golem-core returns False (docs/yagna-behaviour.md §3)
                if await agreement.wait_for_approval():
                    candidate.row["outcome"] = "agreement"
                    return agreement, candidate
                reason = "Agreement rejected by the provider"
            except Exception as e:  # any failure: record it and take the next draft
                reason = f"Agreement failed: {_describe_error(e)}"
                if agreement is not None:
                    await _quietly(agreement.terminate("Agreement failed"))
            except BaseException:  # the caller's deadline or cancellation: never leave it signed
                if agreement is not None:
                    self._abandon(agreement)
                raise
            candidate.row["outcome"] = self.funnel.failed(reason)

    def _abandon(self, agreement) -> None:
        """End, in the background, an agreement whose signing the caller gave up on.

        yagna terminates only an Approved agreement, and golem-core 0.7.8 has no `cancel`: one
        still Pending is terminated once its provider approves it (or not at all if it rejects).
        """
        import asyncio

        async def abandon() -> None:
            try:
                await agreement.terminate("No longer needed")
                return
            except Exception:  # noqa: BLE001 - still Pending: wait for the provider's decision
                pass
            try:
                if await asyncio.wait_for(agreement.wait_for_approval(), AGREEMENT_ABANDON_WAIT_S):
                    await agreement.terminate("No longer needed")
            except Exception:  # noqa: BLE001 - expired, rejected or gone: nothing is signed
                pass

        task = asyncio.create_task(abandon())
        self._abandoning.add(task)
        task.add_done_callback(self._abandoning.discard)

    async def agreements(self, exclude=frozenset()):
        """Agreements best score first, for as long as the caller keeps asking."""
        while True:
            yield await self.agreement(exclude)

    # -- stages ----------------------------------------------------------------

    async def _collect(self) -> None:
        import asyncio

        while True:
            try:
                await asyncio.wait_for(self._collect_from(self.demand), self.demand_refresh_s)
            except asyncio.TimeoutError:
                pass
            await self._subscribe()

    async def _collect_from(self, demand) -> None:
        async for proposal in demand.initial_proposals():
            self.classify(proposal)

    async def _subscribe(self) -> None:
        """Subscribe a demand (the allocation's platform in it) and start collecting its events."""
        from golem.resources import Demand

        builder = await self.spec.build(self.allocation)
        demand = await Demand.create_from_properties_constraints(
            self.node, builder.properties, builder.constraints)
        demand.start_collecting_events()
        self.demand = demand
        self.demands.append(demand)
        # golem-core's Demand.get_demand_data() re-parses the constraints with textX on
        # every call (its cache is never filled): read it once for all negotiations.
        self._demand_data[demand.id] = await demand.get_demand_data()

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
        timeouts and error reasons (docs/yagna-behaviour.md §3): one round trip is
        enough with a real provider, who echoes our payment terms.
        """
        import asyncio
        import dataclasses

        from golem.managers import RejectProposal
        from golem.managers.base import ManagerPluginException
        from golem.payload import Properties

        demand_data = self._demand_data.get(offer.demand.id) or await offer.demand.get_demand_data()
        while True:
            # negotiators change properties only: copy those, share the parsed constraints
            negotiated = dataclasses.replace(demand_data, properties=Properties(demand_data.properties))
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
            offer = await self._answer(ours)

    async def _answer(self, ours):
        """The provider's Draft answering our counter-proposal, as soon as it arrives.

        golem-core's `responses()` notices a new child only on a 100 ms poll
        (`Resource.child_aiter`), which would cap negotiation at ~10 rounds/s per
        negotiator; the NewProposal event of the Draft wakes us at once. `responses()`
        still delivers the provider's rejection (ProposalRejected) and ends the wait.
        """
        import asyncio

        from golem.managers.base import ManagerPluginException

        answered = asyncio.get_running_loop().create_future()
        self._answers[ours.id] = answered
        for child in ours.children:  # answered before we started listening
            if not answered.done():
                answered.set_result(child)
        fallback = asyncio.ensure_future(ours.responses().__anext__())
        try:
            done, _ = await asyncio.wait({answered, fallback}, timeout=self.response_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._answers.pop(ours.id, None)
            for waiter in (answered, fallback):
                if not waiter.done():
                    waiter.cancel()
        if answered in done:
            return answered.result()
        if fallback in done:
            try:
                return fallback.result()  # raises ProposalRejected on the provider's rejection
            except StopAsyncIteration:
                pass
        raise ManagerPluginException(REASON_NO_RESPONSE)

    async def _on_new_proposal(self, event) -> None:
        try:
            data = event.resource.data
        except RuntimeError:  # our own counter-proposals carry no data until fetched
            return
        answered = self._answers.get(data.prev_proposal_id)
        if answered is not None and not answered.done():
            answered.set_result(event.resource)

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
    properties = Properties()  # Properties(mapping) deep-copies; nothing here mutates them
    properties.update(data.properties)
    return ProposalData(properties=properties, constraints=Constraints(),
                        proposal_id=data.proposal_id, issuer_id=data.issuer_id, state=data.state,
                        timestamp=data.timestamp, prev_proposal_id=data.prev_proposal_id)


def _negotiation_failure(e: Exception) -> str:
    """The reason a negotiation failed, as grouped in the Funnel."""
    from golem.resources.proposal.exceptions import ProposalRejected

    if isinstance(e, ProposalRejected):
        return e.reason  # the provider's own text (docs/yagna-behaviour.md §3)
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


def _api_error_text(e: BaseException) -> str:
    """The reason inside a yagna error body (`message`, or `internalError` of a 500), else one line."""
    import json

    body = getattr(e, "body", None)
    try:
        data = json.loads(body) if body else None
    except (TypeError, ValueError):
        data = None
    if isinstance(data, dict):
        for key in ("message", "internalError", "detail"):
            if isinstance(data.get(key), str):
                return f"{getattr(e, 'status', '')} {data[key]}".strip()
    return _describe_error(e)


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


def market_store_callbacks(store: "Store", network: str) -> dict:
    """`is_blacklisted` and `reputation` for a MarketPipeline, read from the Store.

    The blacklist is read once, which suits a scan; a pipeline that lives as long as a
    cluster should ask `store.is_blocked` per proposal, so a block applies at once.
    """
    blocked = store.blocked_node_ids(network)

    def reputation(provider_id: str) -> float | None:
        try:
            return store.score(provider_id, network)
        except UsageError:  # not a Golem node id: no reputation to speak of
            return None

    return {"is_blacklisted": lambda provider_id: provider_id.lower() in blocked,
            "reputation": reputation}


###############################################################################
# 7. Clusters #################################################################
###############################################################################
# The webserver's model of Ray clusters: nodes rented through the market
# pipeline (section 6), each node one activity on one provider. A node moves
#
#     pending ──> running ──> terminating ──> terminated
#        └─────────────────────────┘ (deadline, failure or terminate while pending)
#
# and every provisioning step is appended to its numbered state log. Whatever a
# node rents (agreement, activity) is written to sqlite before it is used and
# released on every path out; a provider that fails a node is excluded for that
# node, recorded as a provider event, and blacklisted for a while after repeated
# failures. The bring-up runs ExeScript `run`s of `/bin/sh -c` until sshd answers; from
# then on Ray reaches the node by SSH through the VPN (Node SSH below).

import enum
import json
import re
import shlex
import time


class BackgroundTask:
    """A coroutine that runs in the background from `start()` until `stop()` cancels it and waits
    for it to end: the watchers of autostop and payments, a tunnel's supervisor."""

    def __init__(self, run):
        self._run = run  # async callable, run once per start
        self._task = None

    def start(self) -> None:
        import asyncio

        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        import asyncio

        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class NodeState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


# The numbered provisioning steps of a node's state log (the original had nine,
# two of them for ssh; here the node is reached through its activity).
PROVISIONING_STEPS = (
    "Getting an agreement",
    "Creating an activity on {provider}",
    "Joining the VPN",
    "Deploying the image",
    "Starting the VM",
    "Running bootstrap commands",
    "Ready on {provider}",
)

# Ray's tag names (ray/autoscaler/tags.py), repeated so the webserver never imports Ray.
RAY_TAG_NODE_KIND = "ray-node-type"
RAY_TAG_USER_NODE_TYPE = "ray-user-node-type"
RAY_NODE_KIND_HEAD = "head"
CLUSTER_VPN_PREFIX = 16  # one VPN per cluster (the original shared one /16 between all)
PROVIDER_FAILURES_BEFORE_BLACKLIST = 2  # failed node starts within the window...
PROVIDER_FAILURE_WINDOW_S = 3600.0
PROVIDER_BLACKLIST_S = 3600.0  # ...block the provider for an hour (reason recorded)
ACTIVITY_MONITOR_INTERVAL_S = 5.0  # GET /activity/{id}/state of running nodes
DEPLOY_TIMEOUT_S = 300.0  # golem-core's default_prepare_activity waits as long
INVOICE_WAIT_S = 20.0  # how long a stopping cluster waits for its invoices
NODE_STATE_DIR = ".ray_on_golem"  # in the node's HOME: its environment, token, this module


def tags_match(tags: dict, tag_filter: dict) -> bool:
    """A node matches only if it has every filter key with that value (the original
    compared only keys present on both sides, docs/yagna-behaviour.md §7)."""
    return all(key in tags and tags[key] == value for key, value in tag_filter.items())


def diagnose_funnel(funnel) -> str:
    """Why no agreement came: the first stage nothing passed, then the grouped errors.

    E.g. "0 of 48 offers passed `Reject if start price exceeds `max_start_price` = 0.0001`".
    """
    if funnel is None:
        return "the market was never reached"
    counts, stages = funnel.counts, funnel.stages
    before = counts[stages[0]]
    if before == 0:
        text = "no offer matched the demand (no provider with the image, subnet and minimums asked for)"
    else:
        text = f"{before} offers seen, {counts[stages[-1]]} negotiated, none started the node"
        for stage in stages[1:]:
            if counts[stage] == 0:
                label = stage[len("Passed "):] if stage.startswith("Passed ") else stage
                text = f"0 of {before} offers passed `{label}`"
                break
            before = counts[stage]
    errors = funnel.sorted_errors()
    if errors:
        text += "; negotiation errors: " + ", ".join(f"{reason} ({n})" for reason, n in errors[:5])
    return text


def node_environment_script(node_id: str, vpn_ip: str) -> str:
    """Bootstrap: write the node's environment file; print `NODE_IP`.

    The same on every network: the image's `python3` and `ray` are on the node's PATH, every node
    is a machine of its own (Ray's default temp dir and fixed ports); only this module is added.
    """
    lines = [
        f'export NODE_IP="${{NODE_IP:-{vpn_ip}}}"',
        "export ON_GOLEM_NETWORK=1",
        "export RAY_USAGE_STATS_ENABLED=0",
        f"export RAY_ON_GOLEM_NODE_ID={shlex.quote(node_id)}",
    ]
    # This version of ray_on_golem first, whatever the image holds (`ray up` copies it there: file_mounts).
    lib = f"$HOME/{NODE_STATE_DIR}/lib"
    lines.append(f'export PYTHONPATH="\\{lib}/ray-on-golem.pyz:\\{lib}\\${{PYTHONPATH:+:\\$PYTHONPATH}}"')
    body = "\n".join(lines)
    return (
        f'mkdir -p "$HOME/{NODE_STATE_DIR}" && '
        f'NODE_IP="${{NODE_IP:-{vpn_ip}}}" && '
        f"cat > \"$HOME/{NODE_STATE_DIR}/env\" <<EOF\n{body}\nEOF\n"
        # Ray's SSH runner sources ~/.bashrc before each command: the node's environment with it.
        f'grep -qs "{NODE_STATE_DIR}/env" "$HOME/.bashrc" || '
        f'echo \'[ -f "$HOME/{NODE_STATE_DIR}/env" ] && . "$HOME/{NODE_STATE_DIR}/env"\' >> "$HOME/.bashrc"\n'
        'printf "%s" "$NODE_IP"'
    )


# Prints `<python version> <ray version>` of the node's `python3` (after its environment file), `-` for
# what is missing; never fails, so a node without Python or Ray gets the mismatch message.
NODE_VERSIONS_SCRIPT = (
    f'if [ -f "$HOME/{NODE_STATE_DIR}/env" ]; then . "$HOME/{NODE_STATE_DIR}/env"; fi; '
    "python3 -c 'import platform, importlib.metadata as m\n"
    "try: ray = m.version(\"ray\")\n"
    "except Exception: ray = \"-\"\n"
    "print(platform.python_version(), ray)' 2>/dev/null || echo - -"
)


def version_mismatch(requestor: dict, node: list, image_tag: str | None) -> str | None:
    """Why a node of `node` = [python, ray] versions cannot serve a requestor of `requestor`
    ({"python", "ray"}), with what to use instead; None when they agree (Ray exactly, Python
    major.minor: Ray's own check, ray/_private/utils.py::check_version_info, warns on the patch)."""
    node_python, node_ray = (list(node) + ["-", "-"])[:2]
    want_python, want_ray = str(requestor.get("python") or "-"), str(requestor.get("ray") or "-")
    minor = lambda version: ".".join(version.split(".")[:2])  # noqa: E731
    if node_ray == want_ray and minor(node_python) == minor(want_python):
        return None
    image = f"image {image_tag}" if image_tag else "the image"
    return (f"version mismatch: the node ({image}) runs Python {node_python} with Ray {node_ray}, this "
            f"machine Python {want_python} with Ray {want_ray}; use an image_tag carrying Python "
            f"{minor(want_python)} and Ray {want_ray} (golem/ray-on-golem:*-py{minor(want_python)}.*-ray{want_ray}), "
            f"or run `ray up` from Python {minor(node_python)} with `pip install 'ray[default]=={node_ray}'`")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((WEBSERVER_HOST, 0))
        return s.getsockname()[1]


# --- Node SSH -------------------------------------------------------------------
# Nodes are reached by OpenSSH through the VPN on every network, as the original did:
# `ray-on-golem ssh-proxy` is the ProxyCommand (stdio <-> the net API's WebSocket). One key
# pair per cluster, made here in the data dir (0600, never sent over HTTP); each node's
# host key is pinned at first contact (the bring-up's check) in the cluster's known_hosts,
# then checked strictly by Ray's SSHCommandRunner (ray/autoscaler/_private/command_runner.py).

SSH_USER = "root"  # the Golem image's only user (auth.ssh_user)
SSH_READY_TIMEOUT_S = 60.0  # sshd started: it must answer within this
TUNNEL_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # restart delays of a dead tunnel
# The head's ports `ray up` forwards to this machine: Ray's defaults (`ray start --ray-client-server-port`,
# `--dashboard-port`), which the head, a machine of its own, keeps.
HEAD_RAY_CLIENT_PORT = 10001
HEAD_DASHBOARD_PORT = 8265


def cluster_dir(datadir: str, cluster_name: str) -> str:
    """`<datadir>/clusters/<name>`: the cluster's key pair and known_hosts (mode 0700)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", cluster_name) or "_"
    path = os.path.join(datadir, "clusters", safe)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class ClusterKeys:
    """The cluster's SSH key pair and pinned host keys, files in its cluster dir."""

    def __init__(self, datadir: str, cluster_name: str):
        directory = cluster_dir(datadir, cluster_name)
        self.private_key = os.path.join(directory, "id_ed25519")
        self.public_key_file = self.private_key + ".pub"
        self.known_hosts = os.path.join(directory, "known_hosts")

    def ensure(self) -> "ClusterKeys":
        """Make the key pair once (ssh-keygen writes the private key 0600)."""
        import subprocess

        if not (os.path.exists(self.private_key) and os.path.exists(self.public_key_file)):
            for path in (self.private_key, self.public_key_file):
                if os.path.exists(path):
                    os.unlink(path)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ray-on-golem",
                            "-f", self.private_key], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, timeout=30)
        os.chmod(self.private_key, 0o600)
        return self

    def public_key(self) -> str:
        with open(self.public_key_file) as f:
            return f.read().strip()

    def forget_host(self, ip: str) -> None:
        """A released node's pinned key goes: its VPN address may serve another node later."""
        import subprocess

        if os.path.exists(self.known_hosts):
            subprocess.run(["ssh-keygen", "-R", ip, "-f", self.known_hosts], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            try:
                os.unlink(self.known_hosts + ".old")
            except FileNotFoundError:
                pass


def ssh_proxy_command(datadir: str, network: str) -> str:
    """ssh's ProxyCommand: `ray-on-golem ssh-proxy NETWORK %h %p` with this module first on
    its PYTHONPATH (`network`: a net API id, or `@CLUSTER` resolved through the webserver)."""
    argv, env = python_module_command("ray_on_golem", "ssh-proxy", "--datadir", datadir, network)
    words = [shlex.quote(a).replace("%", "%%") for a in ["env", f"PYTHONPATH={env['PYTHONPATH']}", *argv]]
    return " ".join(words + ["%h", "%p"])


def ssh_options(private_key: str, known_hosts: str, proxy: str | None, *, first_contact: bool) -> list[str]:
    """OpenSSH options of every connection to a node: the cluster key only, pinned host keys
    (`accept-new` only at the bring-up's first contact), no password prompt."""
    options = {"IdentitiesOnly": "yes", "BatchMode": "yes", "UserKnownHostsFile": known_hosts,
               "StrictHostKeyChecking": "accept-new" if first_contact else "yes",
               "ServerAliveInterval": "5", "ServerAliveCountMax": "3", "LogLevel": "ERROR"}
    if proxy:
        options["ProxyCommand"] = proxy
    return ["-i", private_key] + [x for k, v in options.items() for x in ("-o", f"{k}={v}")]


class SSHTunnel:
    """One head's forwards over one supervised `ssh -N`, restarted with backoff while the head runs:
    `remote` forwards (`-R`) the head's 127.0.0.1:<webserver port> back to the webserver (the
    autoscaler's way back), `local` ones (`-L`) a free port of this machine's 127.0.0.1 to the head's
    Ray client server and dashboard (what `ray up` prints). Its state and ports are in `status`.

    `forwards` is `{name: (direction, listen_port, target_port)}`; a local listen port of 0 (or one
    another process took meanwhile) is replaced by a free port before each start, else it is kept,
    so a node's recorded `as_dict()["forwards"]` rebuilds the same tunnel (same addresses for users).

    Up means ssh itself confirmed every forward, read from `ssh -v`: "remote forward success for:
    listen H:P" (sshd has bound the head's port: it binds before it replies) and "Local forwarding
    listening on H port P" (ssh has bound ours); ExitOnForwardFailure ends ssh on any refusal. That is
    the moment the forwards work and costs nothing more. A probe (an ssh to the head that GETs the
    webserver) would cost another connection through ssh-proxy per (re)start and race this one; a
    connect to a local port cannot tell ssh's listener from another process's.
    """

    _CONFIRMED = (("remote", re.compile(r"remote forward success for: listen \S*?:(\d+),")),
                  ("local", re.compile(r"Local forwarding listening on \S+ port (\d+)\.")))
    # What `ssh -v` prints besides errors: not part of a failure's message.
    _CHATTER = ("debug", "OpenSSH_", "Authenticated to", "Transferred:", "Bytes per second:")

    def __init__(self, ssh_argv, env: dict, log, forwards: dict[str, tuple[str, int, int]]):
        self.ssh_argv = ssh_argv  # ssh_argv(*options) -> the ssh argv to the head
        self.env = env
        self.log = log
        self.forwards = {name: (direction, int(listen), int(target))
                         for name, (direction, listen, target) in forwards.items()}
        self.state = "starting"
        self.restarts = 0
        self.up = None  # asyncio.Event, set while every forward is up
        self._supervisor = BackgroundTask(self._supervise)
        self._process = None

    def start(self) -> None:
        import asyncio

        self.up = asyncio.Event()
        self._supervisor.start()

    def local_ports(self) -> dict[str, int]:
        """`{name: port}` of the local forwards (on this machine's 127.0.0.1)."""
        return {name: listen for name, (direction, listen, _) in self.forwards.items() if direction == "local"}

    def as_dict(self) -> dict:
        return {"state": self.state, "restarts": self.restarts, "local_ports": self.local_ports(),
                "forwards": {name: list(forward) for name, forward in self.forwards.items()}}

    def claim_local_ports(self) -> None:
        """Before each start: a free port for a local forward without one or whose port was taken."""
        import socket

        for name, (direction, listen, target) in self.forwards.items():
            if direction != "local":
                continue
            if listen:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ssh binds its listeners
                    try:
                        s.bind((WEBSERVER_HOST, listen))
                        continue
                    except OSError:
                        self.log.warning("tunnel: local port %d (%s) is taken, forwarding another", listen, name)
            self.forwards[name] = (direction, _free_port(), target)

    def _argv(self) -> list[str]:
        options = ["-v", "-N", "-o", "ExitOnForwardFailure=yes"]
        for direction, listen, target in self.forwards.values():
            options += ["-R" if direction == "remote" else "-L",
                        f"{WEBSERVER_HOST}:{listen}:{WEBSERVER_HOST}:{target}"]
        return self.ssh_argv(*options)

    async def _supervise(self) -> None:
        import asyncio
        import collections
        import subprocess

        failures = 0
        while True:
            self.claim_local_ports()
            self._process = await asyncio.create_subprocess_exec(
                *self._argv(), env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
            pending = set(self.forwards.values())
            errors = collections.deque(maxlen=4)  # ssh's (and ssh-proxy's) last non-debug lines
            while True:
                try:
                    raw = await self._process.stderr.readline()
                except ValueError:  # a line over the stream's limit: dropped
                    continue
                if not raw:
                    break
                line = raw.decode(errors="replace").strip()
                if line and not line.startswith(self._CHATTER):
                    errors.append(line)
                for direction, pattern in self._CONFIRMED:
                    match = pattern.search(line)
                    if match:
                        pending -= {f for f in pending if f[0] == direction and f[1] == int(match.group(1))}
                if not pending and not self.up.is_set():
                    self.state = "up"
                    failures = 0
                    self.up.set()
            await self._process.wait()
            self.up.clear()
            error = " ".join(errors)[-300:]
            delay = TUNNEL_BACKOFF_S[min(failures, len(TUNNEL_BACKOFF_S) - 1)]
            failures += 1
            self.restarts += 1
            self.state = f"down, restarting in {delay:g} s" + (f" ({error})" if error else "")
            self.log.warning("tunnel %s", self.state)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        await self._supervisor.stop()
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self.state = "stopped"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.returncode is None else None


def stale_tunnel_pids(known_hosts: str, vpn_ip: str) -> list[int]:
    """The reverse tunnels to `vpn_ip` a killed webserver left running: SSHTunnel starts ssh in
    a session of its own, so it outlives its webserver (and would hold the head's forward port)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if (argv and os.path.basename(argv[0]) == "ssh" and "-R" in argv and argv[-1] == f"{SSH_USER}@{vpn_ip}"
                and f"UserKnownHostsFile={known_hosts}" in argv):
            pids.append(int(entry))
    return pids


class ClusterNode:
    """One node of a cluster: what Ray sees (state, tags, IPs) and what it rents."""

    def __init__(self, cluster: "Cluster", node_id: str, node_config: dict, tags: dict, resources: dict,
                 labels: dict, timeout_s: float, requestor_versions: dict | None = None):
        import asyncio

        self.cluster = cluster
        self.node_id = node_id
        self.node_config = node_config
        self.tags = {str(k): str(v) for k, v in tags.items()}
        self.resources = resources
        self.labels = labels
        self.requestor_versions = requestor_versions  # {"python", "ray"} of the requesting provider
        self.node_type = self.tags.get(RAY_TAG_USER_NODE_TYPE) or self.tags.get(RAY_TAG_NODE_KIND) or "unknown"
        self.state = NodeState.PENDING
        self.state_log: list[str] = []
        self.state_log_at: list[float] = []  # when each state_log line was written (the status page's "since")
        self.internal_ip: str | None = None
        self.external_ip: str | None = None
        self.vpn_ip: str | None = None
        self.network_id: str | None = None  # its VPN's net API id (ssh-proxy)
        self.tunnel: SSHTunnel | None = None  # the head's way back to the webserver, and the user's to Ray
        self.provider_id: str | None = None
        self.provider_name: str | None = None
        self.price: dict | None = None
        self.error: str | None = None
        self.attempts = 0
        self.created_at = time.time()
        self.deadline_at = self.created_at + timeout_s
        self.timeout_s = timeout_s
        self.excluded: set[str] = set()
        self.agreement = None
        self.activity = None
        self.provisioning = None  # asyncio.Task
        self.monitor = None  # asyncio.Task
        self.changed = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self.state in (NodeState.PENDING, NodeState.RUNNING)

    @property
    def provider(self) -> str:
        return f"{self.provider_name or '?'} ({self.provider_id})"

    def log(self, message: str) -> None:
        self.state_log.append(message)
        self.state_log_at.append(time.time())
        self.cluster.service.log.info("%s/%s: %s", self.cluster.name, self.node_id, message)
        self.touch()

    def step(self, number: int) -> None:
        text = PROVISIONING_STEPS[number - 1].format(provider=self.provider)
        ending = "" if number == len(PROVISIONING_STEPS) else "..."
        self.log(f"[{number}/{len(PROVISIONING_STEPS)}] {text}{ending}")

    def touch(self) -> None:
        """Persist and wake whoever waits for a change of this node."""
        import asyncio

        self.cluster.service.records.node(self)
        self.changed.set()
        self.changed = asyncio.Event()

    def runtime_record(self) -> dict:
        """What a restarted webserver needs to re-adopt this node (ClusterRecords.node stores it)."""
        return {"agreement_id": self.agreement.id if self.agreement is not None else None,
                "activity_id": self.activity.id if self.activity is not None else None,
                "vpn_ip": self.vpn_ip, "network_id": self.network_id, "external_ip": self.external_ip,
                "provider_name": self.provider_name, "price": self.price,
                "node_config": self.node_config, "resources": self.resources, "labels": self.labels,
                "requestor_versions": self.requestor_versions, "timeout_s": self.timeout_s,
                # the head's tunnel: reopened with the same local ports (what `ray up` printed)
                "tunnel_forwards": self.tunnel.as_dict()["forwards"] if self.tunnel is not None else None}

    @classmethod
    def restored(cls, cluster: "Cluster", row: dict) -> "ClusterNode":
        """The node a previous webserver recorded (ClusterRecords.adoptable), not yet re-attached
        to its agreement and activity (NodeProvisioner.readopt does that)."""
        runtime = row["runtime"]
        node = cls(cluster, row["node_id"], runtime.get("node_config") or {}, row["tags"],
                   runtime.get("resources") or {}, runtime.get("labels") or {},
                   float(runtime.get("timeout_s") or DEFAULT_NODE_START_TIMEOUT), runtime.get("requestor_versions"))
        node.state_log = list(row["state_log"])
        node.state_log_at = [row["updated_at"]] * len(node.state_log)
        node.created_at, node.deadline_at, node.attempts = row["created_at"], row["deadline"], row["attempts"]
        node.provider_id, node.internal_ip = row["provider_id"], row["internal_ip"]
        for key in ("vpn_ip", "network_id", "external_ip", "provider_name", "price"):
            setattr(node, key, runtime.get(key))
        return node

    def cost_so_far(self) -> str:
        """GLM accepted so far for this node, from the Ledger (exact decimal)."""
        return str(self.cluster.service.payments.ledger.accepted_for_node(self.node_id))

    def as_dict(self) -> dict:
        return {
            "node_id": self.node_id,
            "cluster_name": self.cluster.name,
            "node_type": self.node_type,
            "state": self.state.value,
            "state_log": list(self.state_log),
            "state_log_at": list(self.state_log_at),
            "tags": dict(self.tags),
            "internal_ip": self.internal_ip,
            "external_ip": self.external_ip,
            "network_id": self.network_id,
            "tunnel": self.tunnel.state if self.tunnel is not None else None,
            "local_ports": self.tunnel.local_ports() if self.tunnel is not None else None,
            "provider_id": self.provider_id,
            "provider_name": self.provider_name,
            "price": self.price,
            "cost_so_far": self.cost_so_far(),
            "error": self.error,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "deadline_at": self.deadline_at,
        }


class Cluster:
    """The nodes of one Ray cluster, its VPN and its market pipelines (one per node_config)."""

    def __init__(self, service: "ClusterService", name: str, parameters: dict, runtime: dict | None = None):
        import asyncio

        runtime = runtime or {}  # what a previous webserver recorded (runtime_record): a re-adopted cluster
        self.service = service
        self.name = name
        self.parameters = parameters
        self.network = parameters.get("payment_network") or service.network
        self.nodes: dict[str, ClusterNode] = {}
        self.pipelines: dict[str, object] = {}
        self.vpn = None
        self.lock = asyncio.Lock()
        self.number = runtime.get("number") or len(service.clusters) % 254 + 1  # its VPN: 10.<number>.0.0/16
        self.keys = ClusterKeys(service.yagna.datadir, name)
        # What `ray-on-golem autostop` set for this session of the cluster ({"setting": dict | None}),
        # which outlives a webserver restart; None: the YAML's setting applies.
        self.autostop_override: dict | None = runtime.get("autostop_override")

    def runtime_record(self) -> dict:
        """What a restarted webserver needs to re-adopt the cluster (ClusterRecords.cluster_runtime)."""
        return {"number": self.number, "network_id": self.vpn.id if self.vpn is not None else None,
                "autostop_override": self.autostop_override}

    def current_autostop(self) -> dict | None:
        """The autostop this cluster runs under: what the CLI set last, else its YAML's."""
        if self.autostop_override is not None:
            return self.autostop_override["setting"]
        return autostop_setting(self.parameters.get("autostop"))

    def override_autostop(self, setting: dict | None) -> None:
        """`ray-on-golem autostop` (setting None: cancelled), kept until the cluster's session ends."""
        self.autostop_override = {"setting": setting}

    def new_session(self) -> None:
        """The first node of a new session (no live node): what the CLI set for the last one is gone."""
        self.autostop_override = None

    async def readopt_vpn(self, network_id: str | None) -> None:
        """Re-attach the VPN a previous webserver made (by its recorded id), with its addresses taken:
        the requestor's (golem-core gave it the first host) and the nodes' (re-posting a node is
        idempotent, as golem-core's refresh_nodes relies on), so a new node gets a free one."""
        if not network_id:
            return
        vpn = next((n for n in await self.service.golem.networks() if n.id == network_id), None)
        if vpn is None:
            return
        await vpn.add_requestor_ip(f"10.{self.number}.0.1")
        for node in self.nodes.values():
            if node.alive and node.vpn_ip and node.provider_id:
                await vpn.create_node(node.provider_id, node.vpn_ip)
        self.vpn = vpn

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in NodeState}
        for node in self.nodes.values():
            counts[node.state.value] += 1
        return counts

    async def ensure_vpn(self):
        async with self.lock:
            if self.vpn is None:
                # One network per cluster (the original shared one /16 between all clusters
                # and never released addresses): golem-core hands out the next free host.
                self.vpn = await self.service.golem.create_network(f"10.{self.number}.0.0/{CLUSTER_VPN_PREFIX}")
                self.service.records.cluster_runtime(self.name, self.runtime_record())
        return self.vpn

    async def pipeline(self, node_config: dict):
        """The market pipeline for one node_config, started on first use (allocation + demand)."""
        key = json.dumps(node_config, sort_keys=True)
        async with self.lock:
            pipeline = self.pipelines.get(key)
            if pipeline is None:
                service = self.service
                store = service.store
                spec = DemandSpec.from_node_config(node_config, self.network, service.yagna.registry_url)
                budget = BudgetControl.from_node_config(node_config)
                # The cluster's allocation (ClusterPayments): the pipeline allocates nothing itself.
                pipeline = MarketPipeline(
                    service.golem, spec, budget,
                    is_blacklisted=lambda provider_id: store.is_blocked(provider_id, self.network),
                    reputation=lambda provider_id: store.score(provider_id, self.network),
                    max_drafts=4, allocation=await service.payments.allocation(self, service.golem))
                try:
                    await pipeline.start()
                except BaseException:
                    await _quietly(pipeline.stop())  # a demand subscribed before the failure
                    raise
                self.pipelines[key] = pipeline  # only a started one: the next node retries a failed start
        return pipeline


class LeftoverRentals:
    """Agreements of our app session that yagna still holds Approved although no cluster of ours
    owns them (a crash before they were recorded, a terminate that failed), and their activities.

    One code path for `ray-on-golem cleanup` (in the webserver through ClusterService.cleanup, or
    directly when none runs) and for a restarted webserver (ClusterService.recover). It speaks
    yagna's REST API itself: golem-core 0.7.8 (ya-aioclient 0.6) cannot list agreements or the
    activities of one (docs/yagna-behaviour.md §3). Its HTTP calls run in a thread, its Store work in
    the caller's (sqlite3 objects stay in the thread that made them).
    """

    END_REASON = "cleanup"

    def __init__(self, api_url: str, app_key: str, app_session: str, records: "ClusterRecords"):
        self.api_url = api_url.rstrip("/")
        self._app_key = app_key  # secret: never in a message
        self.app_session = app_session
        self.records = records

    async def _call(self, method: str, path: str, body=None, timeout: float = 30.0):
        import asyncio

        return await asyncio.to_thread(self._request, method, path, body, timeout)

    def _request(self, method: str, path: str, body, timeout: float):
        import urllib.parse

        status, data = http_request(method, self.api_url + path, token=self._app_key, body=body, timeout=timeout)
        if status >= 400:
            message = data.get("message") if isinstance(data, dict) else data
            raise RayOnGolemError(f"{method} {urllib.parse.urlsplit(path).path}: HTTP {status}: {message}")
        return data

    async def find(self, before: float | None = None) -> dict:
        """`{"leftovers": [...], "owned": [...]}`: every Approved agreement of our app session
        (created before `before`, a time.time(), if given), split by whether a cluster owns it."""
        import urllib.parse

        query = {"appSessionId": self.app_session, "state": "Approved"}
        if before is not None:
            query["beforeDate"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before)) + f".{int(before % 1 * 1e6):06d}Z"
        entries = await self._call("GET", "/market-api/v1/agreements?" + urllib.parse.urlencode(query))
        owners = self.records.owned_agreements()  # read after the list: what was signed meanwhile is in it
        found = {"leftovers": [], "owned": []}
        for entry in entries or []:
            agreement_id = entry["id"]
            item = {"agreement_id": agreement_id, "created_at": _parse_rfc3339(entry.get("timestamp")),
                    "approved_at": _parse_rfc3339(entry.get("approvedDate"))}
            owner = owners.get(agreement_id)
            if owner is not None:
                found["owned"].append({**item, **owner})
                continue
            details = await self._call("GET", f"/market-api/v1/agreements/{urllib.parse.quote(agreement_id)}")
            offer = (details or {}).get("offer") or {}
            item["provider_id"] = offer.get("providerId")
            item["provider_name"] = (offer.get("properties") or {}).get("golem.node.id.name")
            activity_ids = await self._call("GET", "/activity-api/v1/activity?"
                                            + urllib.parse.urlencode({"agreementId": agreement_id}))
            item["activities"] = [{"activity_id": activity_id, "state": await self._activity_state(activity_id)}
                                  for activity_id in activity_ids or []]
            found["leftovers"].append(item)
        return found

    async def _activity_state(self, activity_id: str) -> str:
        try:
            state = await self._call("GET", f"/activity-api/v1/activity/{activity_id}/state", timeout=10.0)
            return str(((state or {}).get("state") or ["unknown"])[0])
        except (RayOnGolemError, ServiceUnavailable):
            return "unknown"

    async def end(self, leftover: dict) -> str:
        """Destroy its activities, then terminate it (reason `cleanup`); recorded either way. 'ended' or why not."""
        try:
            for activity in leftover["activities"]:
                if activity["state"] != "Terminated":
                    await self._call("DELETE", f"/activity-api/v1/activity/{activity['activity_id']}")  # idempotent in yagna
            try:
                await self._call("POST", f"/market-api/v1/agreements/{leftover['agreement_id']}/terminate",
                                 {"message": self.END_REASON})
            except RayOnGolemError as e:
                if "to Terminated" not in str(e):  # terminated meanwhile (by its provider): ended all the same
                    raise
            outcome = "ended"
        except (RayOnGolemError, ServiceUnavailable) as e:
            outcome = f"failed: {e}"
        self.records.leftover_ended(leftover, outcome)
        return outcome

    async def run(self, dry_run: bool, before: float | None = None) -> dict:
        """Find the leftovers and (unless `dry_run`) end them: the report `cleanup` prints."""
        found = await self.find(before)
        for leftover in found["leftovers"]:
            leftover["outcome"] = "would end" if dry_run else await self.end(leftover)
        return {"app_session_id": self.app_session, "dry_run": dry_run, **found}


def _parse_rfc3339(text) -> float | None:
    """yagna's timestamps (RFC 3339, `Z` or an offset, up to nanoseconds) as a time.time(); None if absent."""
    from datetime import datetime, timezone

    if not text:
        return None
    text = str(text).replace("Z", "+00:00")
    main, dot, rest = text.partition(".")
    if dot:  # Python parses at most microseconds
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{main}.{rest[:min(digits, 6)]}{rest[digits:]}"
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


class ClusterService:
    """All clusters of the webserver, the route façade of the node routes; it runs in the webserver's loop.

    It connects golem-core to the webserver's yagna (or local network) on first use and
    releases what a previous webserver left. Its parts own one concern each:
    `provisioner` (renting, SSH bring-up, monitoring and ending nodes) and `payments`
    (allocations, debit notes, invoices, budgets). Commands and files go by Ray's SSH runner.
    """

    def __init__(self, network: str, store: "Store", yagna: "YagnaService", state):
        import logging

        self.network = network
        self.store = store  # the webserver's: one sqlite connection per process
        self.yagna = yagna
        self._state = state  # () -> the webserver's state: starting, running or shutting_down
        self.records = ClusterRecords(store)
        self.clusters: dict[str, Cluster] = {}
        self.golem = None
        self.log = logging.getLogger("ray_on_golem.clusters")
        self._start_lock = None
        self.payments = ClusterPayments(store, self.records, self.clusters, self.log, self.stop_node)
        self.provisioner = NodeProvisioner(store, self.records, self.payments, self.log)
        self.autostop = AutostopWatch(self.clusters, self.provisioner, self.log)
        self._recovered = False  # recover() ran: until then the node routes answer 503

    # -- golem-core ---------------------------------------------------------------

    async def connect(self):
        """GolemNode on the webserver's yagna, with payment events (debit notes, invoices)."""
        import asyncio

        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.golem is None:
                from golem.node import GolemNode
                from golem.resources import NewDebitNote, NewInvoice

                yagna = self.yagna
                if self._state() != "running" or not yagna.api_url:
                    raise ServiceUnavailable(f"{yagna.kind} is not ready yet; retry in a moment")
                golem = GolemNode(app_key=yagna.app_key, api_url=yagna.api_url,
                                  app_session_id=app_session_id(yagna.datadir))
                await golem.start()
                self.golem = golem
                # Re-adopted agreements first: a document of theirs must find its account, not count as late.
                await self._readopt()
                await golem.event_bus.on(NewDebitNote, self._on_debit_note)
                await golem.event_bus.on(NewInvoice, self._on_invoice)
                # Documents that came while no webserver ran (golem-core's events start at its start).
                try:
                    async with GolemNode(app_key=yagna.app_key, api_url=yagna.api_url,
                                         collect_payment_events=False) as lister:
                        await self.payments.settle_received(golem, lister)
                except Exception as e:  # noqa: BLE001 - the next documents come as events; orphans still go
                    self.log.warning("settling the documents that came meanwhile failed: %s", _describe_error(e))
                await self._release_orphans()
                self.payments.start()
                self.autostop.start()
        return self.golem

    async def recover(self) -> None:
        """Once the webserver's yagna is ready: take back what a previous webserver left (crash, kill -9).

        Its clusters are re-adopted (`_readopt`: the nodes still alive keep running, the dead
        ones are ended and reported), then what belongs to no cluster is released: agreements
        and allocations through yagna (an allocation's funds stay reserved until it is released
        or its 10-year timeout passes), node rows at once (they would count as live: phantom
        nodes, `stop` refused). Until then the node routes answer 503 (the head's provider retries).
        """
        try:
            if self.records.adoptable() or self.records.open_agreements() or self.records.open_allocations():
                await self.connect()  # re-adopts (_readopt), then releases the rest (_release_orphans)
        finally:
            self._recovered = True
            live = {node_id for cluster in self.clusters.values() for node_id in cluster.nodes}
            ended = self.records.end_stale_nodes(live, "Terminated: the webserver running it stopped (crash or kill)")
            if ended:
                self.log.info("%d node(s) of a previous webserver marked terminated", ended)

    def _check_recovered(self) -> None:
        if not self._recovered:
            raise ServiceUnavailable(f"{self.yagna.kind} is not ready yet; retry in a moment" if self._state() != "running"
                                     else "the webserver is re-adopting the clusters of the previous one; retry in a moment")

    async def _readopt(self) -> None:
        """A restart keeps the cluster: rebuild each recorded cluster with live nodes, re-attach
        its VPN, allocation and nodes by id; NodeProvisioner.readopt keeps the nodes that are
        alive and ends the others, with why in their state log."""
        import asyncio

        for record in self.records.adoptable():
            name = record["name"]
            if name in self.clusters or record["network"] != self.network:
                continue
            cluster = self.clusters[name] = Cluster(self, name, record["parameters"], record["runtime"])
            rows = {row["node_id"]: row for row in record["nodes"]}
            for row in record["nodes"]:
                cluster.nodes[row["node_id"]] = ClusterNode.restored(cluster, row)
            try:
                await cluster.readopt_vpn(record["runtime"].get("network_id"))
            except Exception as e:  # noqa: BLE001 - without its VPN no node can be reached: they end below
                self.log.warning("cluster %s: re-attaching its VPN failed: %s", name, _describe_error(e))
            if record["allocation_id"]:
                self.payments.readopt_allocation(cluster, self.golem.allocation(record["allocation_id"]))
            for node in list(cluster.nodes.values()):
                await self.provisioner.readopt(node, rows[node.node_id])
            if any(n.alive for n in cluster.nodes.values()):
                self.autostop.configure(cluster, cluster.current_autostop())
            else:
                asyncio.create_task(self.provisioner.end_cluster(cluster))
            self.log.info("cluster %s re-adopted: %s", name, cluster.counts())

    async def _release_orphans(self) -> None:
        """Agreements and allocations a previous webserver left open that no re-adopted cluster
        holds: end them; then what yagna holds for our app session that the Store never recorded
        (a crash between approval and record), as `ray-on-golem cleanup` does."""
        held = {node.agreement.id for cluster in self.clusters.values() for node in cluster.nodes.values()
                if node.agreement is not None}
        held_allocations = {allocation.id for allocation in self.payments.allocations.values()}
        for row in self.records.open_agreements():
            if row["agreement_id"] in held:
                continue
            try:
                await self.golem.agreement(row["agreement_id"]).terminate("Ray on Golem restarted")
            except Exception as e:  # noqa: BLE001 - gone already is fine
                self.log.info("orphan agreement %s: %s", row["agreement_id"], e)
            self.records.agreement_ended(row["agreement_id"], "orphaned by a previous webserver")
        for allocation_id in self.records.open_allocations():
            if allocation_id in held_allocations:
                continue
            try:
                await self.golem.allocation(allocation_id).release()
            except Exception as e:  # noqa: BLE001 - released or expired already is fine
                self.log.info("orphan allocation %s: %s", allocation_id, e)
            self.records.allocation_released(allocation_id)
        rentals = LeftoverRentals(self.yagna.api_url, self.yagna.app_key, app_session_id(self.yagna.datadir),
                                  self.records)
        try:
            await self._end_leftovers(rentals, dry_run=False)
        except (RayOnGolemError, OSError) as e:  # `cleanup` can do it later
            self.log.warning("listing the agreements of our app session failed: %s", _describe_error(e))

    def leftovers(self) -> LeftoverRentals:
        """Our app session's agreements no cluster owns (`cleanup`; recover() may end them too)."""
        if self._state() != "running" or not self.yagna.api_url:
            raise ServiceUnavailable(f"{self.yagna.kind} is not ready yet; retry in a moment")
        return LeftoverRentals(self.yagna.api_url, self.yagna.app_key, app_session_id(self.yagna.datadir), self.records)

    async def cleanup(self, dry_run: bool) -> dict:
        """`ray-on-golem cleanup`: end the agreements of our app session that no cluster owns.

        A node still waiting for its agreement may hold one yagna approved and we have not
        recorded yet: only agreements created before the oldest such node was asked for count.
        """
        waiting = [n.created_at for c in self.clusters.values() for n in c.nodes.values()
                   if n.state == NodeState.PENDING and n.agreement is None]
        return await self._end_leftovers(self.leftovers(), dry_run, min(waiting) if waiting else None)

    async def _end_leftovers(self, rentals: LeftoverRentals, dry_run: bool, before: float | None = None) -> dict:
        report = await rentals.run(dry_run, before)
        for leftover in report["leftovers"]:
            self.log.info("cleanup: agreement %s of provider %s: %s", leftover["agreement_id"],
                          leftover.get("provider_name") or leftover.get("provider_id"), leftover["outcome"])
        return report

    # -- payments -------------------------------------------------------------------

    async def _on_debit_note(self, event) -> None:
        await self.payments.settle(event.resource, "debit_note")

    async def _on_invoice(self, event) -> None:
        await self.payments.settle(event.resource, "invoice")

    # -- what the routes call -----------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: cluster.counts() for name, cluster in self.clusters.items()}

    def cluster(self, name: str) -> Cluster:
        self._check_recovered()
        cluster = self.clusters.get(name)
        if cluster is None:
            raise NotFound(f"no cluster named {name!r}")
        return cluster

    def node(self, cluster_name: str, node_id: str) -> ClusterNode:
        node = self.cluster(cluster_name).nodes.get(node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r} in cluster {cluster_name!r}")
        return node

    def list_nodes(self, cluster_name: str, tag_filter: dict) -> list[ClusterNode]:
        """Pending and running nodes whose tags match (Ray: terminating counts as gone)."""
        self._check_recovered()
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            return []
        return [n for n in cluster.nodes.values() if n.alive and tags_match(n.tags, tag_filter)]

    async def request_nodes(self, cluster_name: str, parameters: dict, node_config: dict, tags: dict,
                            count: int, resources: dict, labels: dict,
                            requestor_versions: dict | None = None) -> list[ClusterNode]:
        """Create `count` pending nodes at once; each is provisioned in the background."""
        import asyncio

        if self._state() == "shutting_down":
            raise ServiceUnavailable("the webserver is shutting down")
        network = parameters.get("payment_network") or self.network
        if network != self.network:
            raise Conflict(f"this webserver pays on `{self.network}`, the cluster asks for `{network}`; "
                           f"stop it (`ray-on-golem stop`) or use webserver_port of another one")
        # Bad input is a 400 whatever the daemon's state (connect() answers 503 while it starts).
        try:
            timeout_s = parse_duration(parameters.get("node_start_timeout") or DEFAULT_NODE_START_TIMEOUT)
        except UsageError as e:
            raise UsageError(f"provider_parameters.node_start_timeout: {e}") from None
        self.payments.check_can_start(cluster_name, tags, parameters)
        # The checks of the cluster YAML (an image is required, ...): a 400 naming node_config.<field>.
        resolve_node_config(node_config, head=tags.get(RAY_TAG_NODE_KIND) == "head")
        self._check_recovered()
        await self.connect()
        if self.yagna.no_nodes_reason:  # before anything is rented
            raise Conflict(f"no Ray node can run on this network: {self.yagna.no_nodes_reason}")
        autostop = autostop_setting(parameters.get("autostop"))
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            cluster = self.clusters[cluster_name] = Cluster(self, cluster_name, parameters)
        if not any(n.alive for n in cluster.nodes.values()):
            cluster.new_session()
            self.autostop.configure(cluster, autostop)  # a new session of the cluster: its YAML's setting
        self.records.cluster(cluster_name, network, parameters)  # (again) running
        self.records.cluster_runtime(cluster_name, cluster.runtime_record())
        nodes = []
        for _ in range(count):
            node_id = f"node{self.records.next_node_number()}"
            node = ClusterNode(cluster, node_id, node_config, tags, resources, labels, timeout_s,
                               requestor_versions)
            cluster.nodes[node_id] = node
            node.touch()
            node.provisioning = asyncio.create_task(self.provisioner.provision(node))
            nodes.append(node)
        return nodes

    def set_tags(self, cluster_name: str, node_id: str, tags: dict) -> ClusterNode:
        node = self.node(cluster_name, node_id)
        node.tags.update({str(k): str(v) for k, v in tags.items()})
        node.touch()
        return node

    async def terminate(self, cluster_name: str, node_id: str) -> ClusterNode:
        """Leave `non_terminated_nodes` at once; release what it rents in the background."""
        node = self.node(cluster_name, node_id)
        if node.alive:
            self.stop_node(node, "Terminating: requested by Ray")
        return node

    def set_autostop(self, cluster_name: str, idle_minutes: float | None, down: bool) -> dict | None:
        """`ray-on-golem autostop`: a running cluster's new autostop (None cancels it)."""
        cluster = self.cluster(cluster_name)
        if not any(n.alive for n in cluster.nodes.values()):
            raise Conflict(f"cluster {cluster_name!r} has no live nodes")
        setting = None
        if idle_minutes is not None:
            setting = autostop_setting({"idle_minutes": idle_minutes, "down": down}, "autostop")
        cluster.override_autostop(setting)
        self.records.cluster_runtime(cluster_name, cluster.runtime_record())  # a restart keeps it
        return self.autostop.configure(cluster, setting)

    def stop_node(self, node: ClusterNode, message: str, error: str | None = None) -> None:
        """Ray, the budget or a breach ends a live node: `terminating` at once, released in the background."""
        self.provisioner.stop_node(node, message, error)

    def tunnels(self) -> dict[str, dict[str, dict]]:
        """`{cluster: {node: {state, restarts, local_ports, forwards}}}`: the tunnels of the live heads."""
        return {name: {node.node_id: node.tunnel.as_dict()
                       for node in cluster.nodes.values() if node.tunnel is not None}
                for name, cluster in self.clusters.items()}

    def node_counts(self) -> dict[str, dict[str, int]]:
        """`{cluster: {node_state: count}}` of every cluster: the stored ones and those held in memory.

        The clusters held in memory are counted from memory: never twice.
        """
        merged = {name: counts for name, counts in self.records.node_counts().items() if name not in self.clusters}
        merged.update(self.counts())
        return merged

    async def shutdown(self, force: bool = True) -> None:
        """On the webserver's shutdown: end every node, settle payments, stop pipelines."""
        import asyncio

        await self.autostop.stop()
        stops = []
        for cluster in self.clusters.values():
            for node in cluster.nodes.values():
                if node.alive:
                    self.provisioner.set_state(node, NodeState.TERMINATING, "Terminating: the webserver shuts down")
                    stops.append(self.provisioner.stop(node, end_cluster=False))
        await asyncio.gather(*stops, return_exceptions=True)
        await asyncio.gather(*(self.provisioner.end_cluster(c) for c in list(self.clusters.values())), return_exceptions=True)
        await self.payments.stop()
        if self.golem is not None:
            await _quietly(self.golem.aclose())
            self.golem = None

    async def detach(self) -> None:
        """`ray-on-golem stop --keep-clusters`: stop watching and paying and leave every node,
        agreement, activity, allocation and VPN as it is, for the next webserver to re-adopt
        (recover), as after a crash. golem-core's aclose would end them, so it is not called."""
        await self.autostop.stop()
        await self.payments.stop()
        for cluster in self.clusters.values():
            for node in cluster.nodes.values():
                await self.provisioner.detach(node)
            for pipeline in cluster.pipelines.values():  # demands only: the allocation is kept
                await _quietly(pipeline.stop())


class NodeProvisioner:
    """Rents and prepares nodes provider after provider, watches the running ones, and ends them.

    Whatever a node rents is recorded (ClusterRecords) before it is used and released on
    every path out; the agreements it signs are announced to ClusterPayments, which checks
    their bills.
    """

    def __init__(self, store: "Store", records: "ClusterRecords", payments: "ClusterPayments", log):
        self.store = store
        self.records = records
        self.payments = payments
        self.log = log

    def stop_node(self, node: ClusterNode, message: str, error: str | None = None) -> None:
        """`terminating` at once (Ray counts it gone); its release runs in the background.
        `error`: why it was stopped, shown to Ray as the node's error."""
        import asyncio

        if error is not None:
            node.error = error
        self.set_state(node, NodeState.TERMINATING, message)
        asyncio.create_task(self.stop(node))

    def set_state(self, node: ClusterNode, state: NodeState, message: str | None = None) -> None:
        node.state = state
        if message:
            node.log(message)
        else:
            node.touch()

    async def provision(self, node: ClusterNode) -> None:
        """Rent and prepare the node, provider after provider, until it runs or its deadline passes."""
        import asyncio

        cluster = node.cluster
        pipeline = None
        try:
            pipeline = await cluster.pipeline(node.node_config)
            while True:
                remaining = node.deadline_at - time.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                node.step(1)
                agreement, candidate = await asyncio.wait_for(pipeline.agreement(frozenset(node.excluded)),
                                                              remaining)
                # On the node before any further await: a deadline or cancellation from here on releases it.
                self._adopt(node, agreement, candidate)
                node.attempts += 1
                try:
                    await asyncio.wait_for(self._start_on(node, agreement, candidate),
                                           node.deadline_at - time.time())
                    break
                except NodeStartFailed as failure:
                    await self._provider_failed(node, candidate.provider_id, failure.kind, str(failure))
                    await self._release(node, f"start failed: {failure}")
                except asyncio.TimeoutError:
                    await self._release(node, "node_start_timeout reached")
                    raise
        except asyncio.TimeoutError:
            diagnosis = diagnose_funnel(pipeline.funnel if pipeline else None)
            node.error = (f"node_start_timeout of {format_duration(node.timeout_s)} reached after "
                          f"{node.attempts} provider(s) tried: {diagnosis}")
            await self._end_node(node, node.error)
            return
        except asyncio.CancelledError:
            await self._release(node, "node terminated while starting")
            raise
        except RayOnGolemError as e:
            node.error = str(e)
            await self._end_node(node, f"Failed: {e}")
            return
        except Exception as e:  # noqa: BLE001 - a node must end, never hang half-made
            self.log.exception("node %s failed", node.node_id)
            node.error = f"{type(e).__name__}: {e}"
            await self._end_node(node, f"Failed: {node.error}")
            return
        if node.state == NodeState.PENDING:
            node.state = NodeState.RUNNING
            node.step(len(PROVISIONING_STEPS))  # logs and persists the state change at once
            node.monitor = asyncio.create_task(self._monitor(node))

    def _adopt(self, node: ClusterNode, agreement, candidate) -> None:
        """The node holds a signed agreement: in memory and in the Store, without an await."""
        row = candidate.row
        node.agreement = agreement
        node.provider_id = candidate.provider_id
        node.provider_name = row.get("name")
        node.price = {"start": row.get("start_price"), "cpu_per_hour": row.get("cpu_per_hour"),
                      "env_per_hour": row.get("env_per_hour"), "expected_cost": row.get("expected_cost")}
        # Recorded before use: a crash from here on leaves a row to release.
        self.records.agreement(agreement.id, node, candidate.provider_id, node.price)
        self.payments.agreement_adopted(agreement.id, node)

    async def _start_on(self, node: ClusterNode, agreement, candidate) -> None:
        """Steps 2-6 on one provider; NodeStartFailed names what the provider did wrong."""
        from golem.resources.activity.commands import Deploy, Start

        cluster = node.cluster
        await self.payments.agreement_signed(node, agreement)
        self.store.record_event(candidate.provider_id, cluster.network, "agreement_ok", cluster_name=cluster.name)
        node.step(2)
        try:
            activity = await agreement.create_activity()
        except Exception as e:  # noqa: BLE001
            raise NodeStartFailed("start_failed", f"creating the activity failed: {_describe_error(e)}") from None
        node.activity = activity
        self.records.activity(activity.id, agreement.id)
        node.step(3)
        vpn = await cluster.ensure_vpn()
        try:
            node.vpn_ip = await vpn.create_node(candidate.provider_id)
        except Exception as e:  # noqa: BLE001
            raise NodeStartFailed("connection_failed", f"joining the VPN failed: {_describe_error(e)}") from None
        node.step(4)
        await self._batch(node, Deploy({"net": [vpn.deploy_args(node.vpn_ip)]}), kind="deploy_failed",
                          what="deploy")
        node.step(5)
        await self._batch(node, Start(), kind="start_failed", what="start")
        node.step(6)
        script = node_environment_script(node.node_id, node.vpn_ip)
        result = await self._batch(node, _run_command(script), kind="start_failed", what="bootstrap")
        fields = (result.stdout or "").split()
        node.internal_ip = fields[0] if fields else node.vpn_ip
        await self._check_versions(node)
        # Ray reaches nodes by SSH to their VPN address (through ssh-proxy): one address serves both.
        node.external_ip = node.internal_ip
        node.network_id = vpn.id
        await self._open_ssh(node)
        self.store.record_event(candidate.provider_id, cluster.network, "deploy_ok", cluster_name=cluster.name)

    async def _check_versions(self, node: ClusterNode) -> None:
        """The node's Python and Ray must be the requestor's (Ray refuses a cluster or client of
        other versions, with a less helpful message and only later): else the node ends, naming
        both and what to use. Not the provider's fault (the image is the user's choice): no penalty."""
        if not node.requestor_versions:
            return
        result = await self._batch(node, _run_command(NODE_VERSIONS_SCRIPT), kind="start_failed", what="version check")
        mismatch = version_mismatch(node.requestor_versions, (result.stdout or "").split(),
                                    ((node.node_config.get("demand") or {}).get("image_tag")))
        if mismatch:
            raise UsageError(mismatch)

    def _ssh_env(self, node: ClusterNode) -> dict:
        """Environment of our ssh children: ssh-proxy finds the net API and app key here, not in argv."""
        yagna = node.cluster.service.yagna
        env = dict(os.environ)
        if yagna.app_key:
            env["YAGNA_APPKEY"] = yagna.app_key
        if yagna.api_url:
            env["YAGNA_API_URL"] = yagna.api_url
        return env

    def _ssh_argv(self, node: ClusterNode, *args: str, first_contact: bool = False) -> list[str]:
        keys = node.cluster.keys
        proxy = ssh_proxy_command(node.cluster.service.yagna.datadir, node.network_id)
        return ["ssh", *ssh_options(keys.private_key, keys.known_hosts, proxy, first_contact=first_contact),
                *args, f"{SSH_USER}@{node.vpn_ip}"]

    async def run(self, node: ClusterNode, command: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run one shell command on a running node over SSH: (exit code, stdout, stderr)."""
        if node.state != NodeState.RUNNING or not node.network_id:
            raise Conflict(f"node {node.node_id} is {node.state.value}")
        return await self._ssh(node, self._ssh_argv(node, "-o", "ConnectTimeout=10") + [command],
                               timeout=timeout, output=True)

    async def _ssh(self, node: ClusterNode, argv: list[str], stdin: bytes | None = None,
                   timeout: float = 30.0, output: bool = False):
        """Run one ssh to the node: (exit code, stderr), with `output` (exit code, stdout, stderr)."""
        import asyncio
        import subprocess

        process = await asyncio.create_subprocess_exec(
            *argv, env=self._ssh_env(node), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if output else subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            code, out, err = 255, b"", f"no answer within {timeout:g} s".encode()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        else:
            code = process.returncode
        err = err.decode(errors="replace").strip()
        return (code, (out or b"").decode(errors="replace"), err) if output else (code, err)

    async def _open_ssh(self, node: ClusterNode) -> None:
        """Install the cluster key, start sshd as the Golem image expects, pin the host key at the
        first answer (on the head that first ssh also copies the webserver token, 0600, by stdin),
        then on the head open its tunnel."""
        import asyncio

        cluster = node.cluster
        keys = cluster.keys.ensure()
        keys.forget_host(node.vpn_ip)
        started = time.monotonic()
        await self._batch(node, _run_command(
            'mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh" && '
            f'echo {shlex.quote(keys.public_key())} >> "$HOME/.ssh/authorized_keys" && '
            'chmod 600 "$HOME/.ssh/authorized_keys" && '
            '(service ssh start >/dev/null 2>&1 || { mkdir -p /run/sshd && /usr/sbin/sshd; })'),
            kind="start_failed", what="starting sshd")
        sshd_started = time.monotonic()
        head = node.tags.get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD
        command, stdin = ["true"], None
        if head:  # the head's provider authenticates with the token: copied on the first contact
            datadir = cluster.service.yagna.datadir
            token = read_token(datadir)
            if token is None:
                raise RayOnGolemError(f"no webserver token in {datadir}")
            command = [f'umask 077 && mkdir -p "$HOME/{NODE_STATE_DIR}" && '
                       f'cat > "$HOME/{NODE_STATE_DIR}/{WEBSERVER_TOKEN_FILE}"']
            stdin = (token + "\n").encode()
        deadline = time.monotonic() + SSH_READY_TIMEOUT_S
        error = ""
        while time.monotonic() < deadline:
            code, error = await self._ssh(node, self._ssh_argv(node, "-o", "ConnectTimeout=10", first_contact=True)
                                          + command, stdin=stdin, timeout=20.0)
            if code == 0:
                break
            if "HOST IDENTIFICATION HAS CHANGED" in error or "Host key verification failed" in error:
                raise NodeStartFailed("connection_failed", f"the node's SSH host key changed: {error[-300:]}")
            await asyncio.sleep(0.5)
        else:
            raise NodeStartFailed("connection_failed", f"sshd did not answer within "
                                  f"{SSH_READY_TIMEOUT_S:g} s: {error[-300:]}")
        node.log(f"SSH answers (sshd started in {sshd_started - started:.1f} s, "
                 f"first answer {time.monotonic() - sshd_started:.1f} s later)")
        if head:
            await self._open_tunnel(node)

    async def _open_tunnel(self, node: ClusterNode, forwards: dict | None = None) -> None:
        """The head's provider reaches the webserver at its own 127.0.0.1:<webserver_port>; the
        user reaches the head's Ray client server and dashboard at free ports of this machine.
        `forwards`: a head's recorded `SSHTunnel.as_dict()["forwards"]` (same local ports again)."""
        import asyncio

        port = int(node.cluster.parameters.get("webserver_port") or DEFAULT_WEBSERVER_PORT)
        started = time.monotonic()
        node.tunnel = SSHTunnel(lambda *options: self._ssh_argv(node, *options), self._ssh_env(node), self.log,
                                forwards or {"webserver": ("remote", port, port),
                                             "client": ("local", 0, HEAD_RAY_CLIENT_PORT),
                                             "dashboard": ("local", 0, HEAD_DASHBOARD_PORT)})
        node.tunnel.start()
        try:
            await asyncio.wait_for(node.tunnel.up.wait(), SSH_READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise NodeStartFailed("connection_failed", f"the tunnel to the head did not come up: "
                                  f"{node.tunnel.state}") from None
        ports = node.tunnel.local_ports()
        node.log(f"Tunnel to the webserver up ({time.monotonic() - started:.1f} s); Ray client on "
                 f"{WEBSERVER_HOST}:{ports['client']}, dashboard on {WEBSERVER_HOST}:{ports['dashboard']}")

    async def _batch(self, node: ClusterNode, command, *, kind: str, what: str, timeout: float = DEPLOY_TIMEOUT_S):
        """Run one command as its own batch; NodeStartFailed(kind) when it fails."""
        try:
            batch = await node.activity.execute_commands(command)
            await batch.wait(timeout=timeout, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            raise NodeStartFailed(kind, f"{what} failed: {_describe_error(e)}") from None
        result = batch.events[-1] if batch.events else None
        if result is None or result.result != "Ok":
            message = (result.message if result else None) or "no result"
            stderr = ((result.stderr or "").strip()[-500:] if result else "")
            raise NodeStartFailed(kind, f"{what} failed: {message}" + (f": {stderr}" if stderr else ""))
        return result

    async def _provider_failed(self, node: ClusterNode, provider_id: str, kind: str, message: str) -> None:
        """Exclude the provider for this node, record it, blacklist it after repeated failures."""
        cluster = node.cluster
        node.excluded.add(provider_id)
        node.log(f"Provider {node.provider} failed: {message}; trying another provider")
        self.store.record_event(provider_id, cluster.network, kind, detail=message[:500], cluster_name=cluster.name)
        failures = self.records.recent_failures(provider_id, cluster.network, PROVIDER_FAILURE_WINDOW_S)
        if failures >= PROVIDER_FAILURES_BEFORE_BLACKLIST:
            self.store.block(provider_id, [cluster.network], duration=PROVIDER_BLACKLIST_S, source="auto",
                             reason=f"{failures} failed node starts within {format_duration(PROVIDER_FAILURE_WINDOW_S)}: "
                                    f"{message[:200]}")
            node.log(f"Provider {node.provider} blacklisted for {format_duration(PROVIDER_BLACKLIST_S)} "
                     f"after {failures} failures")

    async def _monitor(self, node: ClusterNode) -> None:
        """A running node whose activity ends (provider gone, died) ends too; Ray replaces it."""
        import asyncio

        while node.state == NodeState.RUNNING:
            await asyncio.sleep(ACTIVITY_MONITOR_INTERVAL_S)
            if node.state != NodeState.RUNNING or node.activity is None:
                return
            try:
                state = await node.activity.get_state()
                dead = "Terminated" in (state.state or []) or "Unresponsive" in (state.state or [])
                reason = state.error_message or state.reason or "activity terminated"
            except Exception as e:  # noqa: BLE001
                dead, reason = True, f"activity unreachable: {_describe_error(e)}"
            if dead and node.state == NodeState.RUNNING:
                node.error = f"provider {node.provider}: {reason}"
                self.store.record_event(node.provider_id, node.cluster.network, "activity_died",
                                        detail=reason[:500], cluster_name=node.cluster.name)
                self.stop_node(node, f"Activity ended on {node.provider}: {reason}")
                return

    # -- a restart keeps the cluster -----------------------------------------------------

    async def readopt(self, node: ClusterNode, row: dict) -> None:
        """A node a previous webserver ran (ClusterNode.restored): re-attach its agreement and
        activity by id; alive (activity Ready/Deployed and SSH answering through the VPN with the
        pinned host key), it runs on with its tunnel (head) and monitor; else it ends, with why."""
        import asyncio
        import signal

        golem = node.cluster.service.golem
        runtime = row["runtime"]
        if runtime.get("agreement_id"):
            node.agreement = golem.agreement(runtime["agreement_id"])
            self.payments.readopt_agreement(node, row)
        if runtime.get("activity_id"):
            node.activity = golem.activity(runtime["activity_id"])
        stale = stale_tunnel_pids(node.cluster.keys.known_hosts, node.vpn_ip or "-")
        for pid in stale:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass  # its own session (SSHTunnel): ssh and its ProxyCommand
        for _ in range(100):  # gone, so its local ports are free for the new tunnel (same ports)
            if not any(process_alive(pid) for pid in stale):
                break
            await asyncio.sleep(0.05)
        why = await self._why_dead(node, row)
        if why is None and node.tags.get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD:
            try:
                await self._open_tunnel(node, runtime.get("tunnel_forwards"))
            except RayOnGolemError as e:
                why = str(e)
        if why is not None:
            node.error = f"found dead after the webserver restarted: {why}"
            if row["state"] == NodeState.RUNNING.value:
                self.store.record_event(node.provider_id, node.cluster.network, "activity_died",
                                        detail=why[:500], cluster_name=node.cluster.name)
            self.set_state(node, NodeState.TERMINATING, f"Found dead after the webserver restarted: {why}")
            await self._end_node(node, "Terminated")
            return
        node.state = NodeState.RUNNING
        node.log(f"Re-adopted after the webserver restarted (activity, SSH{' and tunnel' if node.tunnel else ''} checked)")
        node.monitor = asyncio.create_task(self._monitor(node))

    async def _why_dead(self, node: ClusterNode, row: dict) -> str | None:
        """Why a recorded node cannot be re-adopted, or None when it is alive."""
        if row["state"] != NodeState.RUNNING.value:
            return f"it was {row['state']} when the webserver stopped"
        if node.activity is None or node.agreement is None or not node.network_id or not node.vpn_ip:
            return "its rental was not fully recorded"
        if node.cluster.vpn is None:
            return "its VPN is gone"
        try:
            state = await node.activity.get_state()
        except Exception as e:  # noqa: BLE001
            return f"its activity cannot be read: {_describe_error(e)}"
        states = [s for s in (state.state or []) if s]
        if not states or states[0] not in ("Ready", "Deployed"):
            reason = state.error_message or state.reason or ""
            return f"its activity is {states[0] if states else 'unknown'}" + (f" ({reason})" if reason else "")
        code, error = await self._ssh(node, self._ssh_argv(node, "-o", "ConnectTimeout=10") + ["true"], timeout=30.0)
        if code != 0:
            return f"SSH through the VPN does not answer: {error[-300:]}"
        return None

    # -- ending -------------------------------------------------------------------------

    async def _release(self, node: ClusterNode, reason: str) -> None:
        """Destroy the activity and terminate the agreement of the node's current provider."""
        activity, agreement = node.activity, node.agreement
        node.activity = node.agreement = None
        if node.tunnel is not None:
            await node.tunnel.stop()
        if node.vpn_ip:
            node.cluster.keys.forget_host(node.vpn_ip)
        if activity is not None:
            await _quietly(activity.destroy())
            self.records.activity_ended(activity.id)
        if agreement is not None:
            await _quietly(agreement.terminate(reason[:200]))
            self.records.agreement_ended(agreement.id, reason[:500])
            self.payments.agreement_ended(agreement.id, billed=activity is not None)

    async def _end_node(self, node: ClusterNode, message: str) -> None:
        import asyncio

        await self._release(node, message)
        self.set_state(node, NodeState.TERMINATED, message)
        cluster = node.cluster
        if node.provisioning is asyncio.current_task() and not any(n.alive for n in cluster.nodes.values()):
            # It never ran (deadline, failure): nothing else will end the cluster's
            # pipelines (allocation, demand) and VPN.
            asyncio.create_task(self.end_cluster(cluster))

    async def detach(self, node: ClusterNode) -> None:
        """`stop --keep-clusters`: stop watching the node and close its tunnel; its rentals stay as
        they are for the next webserver (readopt)."""
        import asyncio

        for task in (node.provisioning, node.monitor):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if node.tunnel is not None:
            await node.tunnel.stop()

    async def stop(self, node: ClusterNode, end_cluster: bool = True) -> None:
        import asyncio

        for task in (node.provisioning, node.monitor):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._end_node(node, "Terminated")
        cluster = node.cluster
        if end_cluster and not any(n.alive for n in cluster.nodes.values()):
            await self.end_cluster(cluster)

    async def end_cluster(self, cluster: Cluster) -> None:
        """Last node gone: wait a little for invoices, then stop pipelines and the VPN."""
        import asyncio

        deadline = time.monotonic() + INVOICE_WAIT_S
        while self.payments.awaiting_invoice(cluster) and time.monotonic() < deadline:
            if any(n.alive for n in cluster.nodes.values()):
                return  # a new node came: the cluster lives on
            await asyncio.sleep(0.2)
        # Under the lock Cluster.pipeline and ensure_vpn take: a node that comes while this
        # tears down waits, then gets a new pipeline, allocation and VPN, never the released ones.
        async with cluster.lock:
            if any(n.alive for n in cluster.nodes.values()):
                return
            pipelines, cluster.pipelines = list(cluster.pipelines.values()), {}
            for pipeline in pipelines:
                await _quietly(pipeline.stop())
            await self.payments.release_allocation(cluster)
            if cluster.vpn is not None:
                await _quietly(cluster.vpn.remove())
                cluster.vpn = None
            self.records.cluster_state(cluster.name, "stopped")


def _run_command(script: str):
    """ExeScript `run` of `/bin/sh -c script` (golem-core's Run with a string)."""
    from golem.resources.activity.commands import Run

    return Run(script)


# --- Autostop ---------------------------------------------------------------------
# `provider.parameters.autostop: {idle_minutes: N, down: true}` or `ray-on-golem autostop`:
# a cluster idle for N minutes is torn down whole, head included (Ray's
# idle_timeout_minutes only ever removes workers). Idle is what the head's Ray reports
# (AUTOSTOP_PROBE: jobs from the GCS job table, running and pending tasks and actors from
# the autoscaler's cluster status, as `ray status` shows them) plus the open `ray exec`/
# `submit`/`attach` sessions on the head: Ray's SSH runner opens each with `ssh -tt`, so
# they are the head's sshd sessions holding a terminal (our own probe and the reverse
# tunnel hold none).
# On the local network the times are divided by `local_network.time_scale`.

AUTOSTOP_CHECK_INTERVAL_S = 20.0  # how often the head is asked whether it is idle
AUTOSTOP_WARNING_S = 120.0  # the head's state log says the cluster goes down this much before
AUTOSTOP_PROBE_TIMEOUT_S = 60.0
# Run over SSH on the head with its environment file sourced: prints one JSON line. It
# reads the GCS directly (as `ray status` does, at the address `ray start` recorded) and
# never connects as a driver, so it does not count itself as a job. Terminal sessions
# are sshd's `user@pts/N` processes in the head's own network namespace (on the local
# network the nodes share this machine's processes).
AUTOSTOP_PROBE = r'''
import json, os, re
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import GcsClient
from ray.autoscaler.v2.sdk import get_cluster_status
address = canonicalize_bootstrap_address_or_die("auto")
jobs = GcsClient(address=address).get_all_job_info(skip_submission_job_info_field=True,
                                                   skip_is_running_tasks_field=True)
running_jobs = [j.job_id.hex() for j in jobs.values()
                if not j.is_dead and not j.config.ray_namespace.startswith("_ray_internal")]
status = get_cluster_status(address)
used = {u.resource_name: u.used for u in status.cluster_resource_usage
        if u.resource_name not in ("memory", "object_store_memory") and not u.resource_name.startswith("node:")}
demand = status.resource_demands  # request_resources() (cluster_constraint_demand) is a floor, not work
pending = sum(b.count for d in demand.ray_task_actor_demand + demand.placement_group_demand
              for b in d.bundles_by_count)
terminals = set()
own_net = os.readlink("/proc/self/ns/net")
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")
        match = re.match(r"sshd(?:-session)?: (\S+@pts/\d+)", title)
        if match and os.readlink("/proc/%s/ns/net" % pid) == own_net:
            terminals.add(match.group(1))
    except OSError:
        pass
print(json.dumps({"jobs": len(running_jobs), "resources_used": {k: v for k, v in used.items() if v > 0},
                  "pending_demand": pending, "sessions": len(terminals)}))
'''


def autostop_probe_command() -> str:
    """The shell command that runs AUTOSTOP_PROBE with the head's Python (the one that runs its Ray)."""
    return (f'if [ -f "$HOME/{NODE_STATE_DIR}/env" ]; then . "$HOME/{NODE_STATE_DIR}/env"; fi; '
            f"\"$(command -v python3 || command -v python)\" -c {shlex.quote(AUTOSTOP_PROBE)}")


def autostop_busy(report: dict | None, error: str | None = None) -> str | None:
    """Why the cluster is not idle, or None when it is: the whole idle rule, as a pure function.

    `report` is AUTOSTOP_PROBE's answer, `error` why the head could not be asked (then it
    counts as busy: a cluster is never stopped on a guess).
    """
    if error is not None or report is None:
        return f"cannot tell whether the head is idle: {error or 'no answer'}"
    if report.get("sessions"):
        return f"{report['sessions']} ray exec/submit/attach session(s) open"
    if report.get("jobs"):
        return f"{report['jobs']} job(s) running"
    if report.get("pending_demand"):
        return f"{report['pending_demand']} task(s)/actor(s) pending"
    used = report.get("resources_used") or {}
    if used:
        return "tasks or actors running (" + ", ".join(f"{v:g} {k}" for k, v in sorted(used.items())) + ")"
    return None


def autostop_setting(raw, path: str = "provider_parameters.autostop") -> dict | None:
    """The checked autostop block (AUTOSTOP_SCHEMA), None when absent; UsageError names the field."""
    if raw is None:
        return None
    issues: list = []
    setting = _walk(AUTOSTOP_SCHEMA, raw, path, issues, defaults=True)
    if issues:
        raise UsageError("; ".join(f"{where}: {message}" for where, message in issues))
    return setting


class Autostop:
    """One cluster's autostop: its setting and how long the cluster has been idle.

    `observe` is fed each check's verdict (autostop_busy) and answers what to do now:
    "busy", "idle", "warn" (once per idle stretch, AUTOSTOP_WARNING_S before) or "down".
    """

    def __init__(self, idle_minutes: float, down: bool = True, time_scale: float = 1.0):
        self.idle_minutes = idle_minutes
        self.down = down
        self.time_scale = time_scale
        self.idle_since: float | None = None
        self.busy_reason: str | None = "not checked yet"
        self.checked_at: float | None = None
        self.warned = False

    @property
    def idle_s(self) -> float:
        return self.idle_minutes * 60.0 / self.time_scale

    @property
    def check_interval_s(self) -> float:
        return max(1.0, AUTOSTOP_CHECK_INTERVAL_S / self.time_scale)

    @property
    def warning_s(self) -> float:
        return AUTOSTOP_WARNING_S / self.time_scale

    def observe(self, busy_reason: str | None, now: float) -> str:
        self.checked_at = now
        self.busy_reason = busy_reason
        if busy_reason is not None:
            self.idle_since = None
            self.warned = False
            return "busy"
        if self.idle_since is None:
            self.idle_since = now
        left = self.remaining(now)
        if left <= 0:
            return "down"
        if left <= self.warning_s and not self.warned:
            self.warned = True
            return "warn"
        return "idle"

    def remaining(self, now: float) -> float | None:
        """Seconds until the cluster goes down if it stays idle; None while it is busy."""
        if self.idle_since is None:
            return None
        return max(0.0, self.idle_since + self.idle_s - now)

    def as_dict(self, now: float) -> dict:
        return {"idle_minutes": self.idle_minutes, "down": self.down, "time_scale": self.time_scale,
                "idle_since": self.idle_since, "remaining_s": self.remaining(now), "busy": self.busy_reason,
                "checked_at": self.checked_at}


class AutostopWatch:
    """Asks every cluster with an autostop whether it is idle and tears the idle ones down.

    Owned by ClusterService; the head is asked over SSH (NodeProvisioner.run), the teardown goes through NodeProvisioner like a `ray down`, so every agreement
    is terminated and its invoice paid by ClusterPayments.
    """

    def __init__(self, clusters: dict, provisioner: "NodeProvisioner", log):
        self.clusters = clusters
        self.provisioner = provisioner
        self.log = log
        self._settings: dict[str, Autostop] = {}
        self._next_check: dict[str, float] = {}
        self._watching = BackgroundTask(self._watch)

    def configure(self, cluster: "Cluster", setting: dict | None) -> dict | None:
        """Set (or with None cancel) the cluster's autostop; the idle time counts from now."""
        if setting is None:
            self._settings.pop(cluster.name, None)
            return None
        # Idle minutes on the clock of the network the cluster rents from (the local network's --time-scale).
        autostop = Autostop(setting["idle_minutes"], setting.get("down", True), cluster.service.yagna.time_scale)
        self._settings[cluster.name] = autostop
        self._next_check[cluster.name] = 0.0
        return autostop.as_dict(time.time())

    def report(self) -> dict[str, dict]:
        now = time.time()
        return {name: autostop.as_dict(now) for name, autostop in self._settings.items()}

    def start(self) -> None:
        self._watching.start()

    async def stop(self) -> None:
        await self._watching.stop()

    async def _watch(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for name, autostop in list(self._settings.items()):
                cluster = self.clusters.get(name)
                if cluster is None or now < self._next_check.get(name, 0.0):
                    continue
                self._next_check[name] = now + autostop.check_interval_s
                try:
                    await self.check(cluster, autostop)
                except Exception:  # noqa: BLE001 - the watcher must survive one bad cluster
                    self.log.exception("autostop check of %s failed", name)

    def _head(self, cluster: "Cluster") -> "ClusterNode | None":
        for node in cluster.nodes.values():
            if node.state == NodeState.RUNNING and node.tags.get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD:
                return node
        return None

    async def check(self, cluster: "Cluster", autostop: Autostop) -> str:
        """One check: ask the head, decide (autostop_busy, Autostop.observe), act."""
        head = self._head(cluster)
        if head is None:
            autostop.observe("no running head", time.time())
            return "busy"
        report = error = None
        try:
            code, out, err = await self.provisioner.run(head, autostop_probe_command(),
                                                        timeout=AUTOSTOP_PROBE_TIMEOUT_S)
            if code != 0:
                error = f"the probe exited with {code}: {err.strip()[-300:]}"
            else:
                report = json.loads(out.strip().splitlines()[-1])
        except (RayOnGolemError, ValueError, IndexError) as e:
            error = str(e) or type(e).__name__
        busy = autostop_busy(report, error)
        action = autostop.observe(busy, time.time())
        if action == "warn":
            head.log(f"Autostop: idle since {format_time(autostop.idle_since)}; the cluster goes down in "
                     f"{format_duration(autostop.remaining(time.time()))} unless work arrives")
        elif action == "down" and autostop.down:
            self.tear_down(cluster, autostop)
        elif action == "down":
            head.log(f"Autostop: idle for {autostop.idle_minutes:g} minute(s); `down: false` keeps it")
            self._settings.pop(cluster.name, None)
        return action

    def tear_down(self, cluster: "Cluster", autostop: Autostop) -> None:
        """The whole cluster, head included: each node's state log records why."""
        self._settings.pop(cluster.name, None)
        why = (f"Terminating: autostop, the cluster was idle for {autostop.idle_minutes:g} minute(s) "
               f"(no task, actor or job running or pending, no ray exec/submit session)")
        self.log.info("%s: %s", cluster.name, why)
        for node in sorted(cluster.nodes.values(), key=lambda n: n.tags.get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD):
            if node.alive:
                self.provisioner.stop_node(node, why)


# --- Payments -------------------------------------------------------------------
# One allocation of `total_budget` per cluster, shared by its market pipelines. Instead
# of golem-core's DefaultPaymentManager (which accepts whatever passes golem-core's
# lenient checks, 5 minutes of grace, and only logs a failure), a debit note or invoice
# is accepted only when
#   1. its agreement is one our clusters signed (others belong to another requestor),
#   2. its amount follows the agreed linear prices: it matches its usage counters and
#      the counters fit the time that passed on our clock (an inflated one is rejected,
#      recorded and its provider blocked; the node is replaced),
#   3. the cluster's spending stays within `total_budget` after it.
# Each document is written to the ledger before it is accepted, with the amount
# accepting it adds to the spending (debit notes carry the running total of their
# activity, an invoice the final total of its agreement). Amounts are exact decimals.
#
# The budget policy watches every cluster each second: the spending plus what the
# running nodes may bill until their next payment (their next debit note, at most
# BUDGET_LOOKAHEAD_S ahead) must fit the budget; when it does not, workers are
# stopped newest first, then the head, each of them billed only up to the stop.

# `decimal` is imported inside the functions and the value classes are namedtuples, not
# dataclasses: `import ray_on_golem` stays fast for the CLI (decimal ~6 ms, dataclasses ~20 ms).
import collections

BILLING_GRACE_S = 5  # seconds a provider's counters may run ahead of our clock
# golem-core's tolerance between an amount and its usage counters (100 wei):
# providers round counters and amounts (validate_payment_calculated_cost).
AMOUNT_TOLERANCE = "1e-16"
BUDGET_STOP_MARGIN_S = 15.0  # a node being stopped is billed at most this much longer
# A node kept running must stay covered until its next payment (its next debit note), at
# least BUDGET_KEEP_MIN_S and at most BUDGET_LOOKAHEAD_S ahead, plus the stop margin.
BUDGET_KEEP_MIN_S = 10.0
BUDGET_LOOKAHEAD_S = 20.0
BUDGET_CHECK_INTERVAL_S = 1.0
BUDGET_WARNING_PERCENT = 80  # warn once this share of total_budget is committed
BILLING_BREACH_BLOCK_S = 30 * 86400.0  # a provider that overbills is blocked for 30 days
_WEI = "1e-18"
# The counters of a linear price (golem-core's USAGE_VECTOR_TO_PRICE_MAPPING names): time
# counters grow at most `threads` (CPU) or 1 (wall time) per second; size counters are
# capped by the offered size.
_TIME_COUNTERS = {"golem.usage.cpu_sec": "threads", "golem.usage.cpu-sec": "threads",
                  "golem.usage.duration_sec": 1, "golem.usage.duration-sec": 1}
_SIZE_COUNTERS = {"golem.usage.storage_gib": "golem.inf.storage.gib", "golem.usage.storage-gib": "golem.inf.storage.gib",
                  "golem.usage.gib": "golem.inf.mem.gib"}


_EXACT_CONTEXT = None


def _exactly():
    """`with _exactly():` enough digits that sums and products of 18-decimal amounts never round."""
    import decimal

    global _EXACT_CONTEXT
    if _EXACT_CONTEXT is None:
        _EXACT_CONTEXT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation])
    return decimal.localcontext(_EXACT_CONTEXT)


def glm(amount) -> str:
    """An amount for people and JSON: plain decimal notation, trailing zeros dropped."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- Amounts for people ---------------------------------------------------------------
# `glm()` above keeps every one of the 18 decimals (JSON, the ledger); people read these:
# three significant digits (`0.0372 GLM`), never more than six decimals, and a group of
# amounts shown together (a budget, a table and its total) shares one number of decimals
# so that what is printed adds up. `status`, `costs`, the status page and the state log use them.

AMOUNT_SIGNIFICANT_DIGITS = 3
AMOUNT_MAX_DECIMALS = 6


def amount_decimals(*amounts) -> int:
    """Decimals that show the smallest non-zero amount with 3 significant digits (at most 6)."""
    from decimal import Decimal

    places = 0
    for amount in amounts:
        value = abs(Decimal(str(amount)))
        if value:
            places = max(places, AMOUNT_SIGNIFICANT_DIGITS - 1 - value.adjusted())
    return max(0, min(AMOUNT_MAX_DECIMALS, places))


def format_glm(amount, decimals: int | None = None, unit: str = "GLM") -> str:
    """`0.037243465220196394` -> `0.0372 GLM`: rounded half-even to `decimals` (default: what
    `amount_decimals` gives), trailing zeros dropped; a non-zero amount that would print as 0
    is `< 0.000001`. `unit=""` leaves the unit off (table cells)."""
    from decimal import ROUND_HALF_EVEN, Decimal

    value = Decimal(str(amount))
    places = amount_decimals(value) if decimals is None else decimals
    shown = value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN)
    if value and not shown:
        text = f"< {glm(Decimal(1).scaleb(-places))}"
    else:
        text = glm(shown)
    return f"{text} {unit}" if unit else text


def format_glm_sum(parts, unit: str = "GLM") -> tuple[list[str], str, str | None]:
    """Parts and their total as shown together: every part rounded to one shared number of
    decimals, the total the sum of the rounded parts (a column adds up as printed). The third
    item says so when that sum differs from the exact total rounded alike, else None."""
    from decimal import ROUND_HALF_EVEN, Decimal

    values = [Decimal(str(p)) for p in parts]
    exact = sum(values, Decimal(0))
    places = amount_decimals(*values, exact)
    step = Decimal(1).scaleb(-places)
    rounded = [v.quantize(step, ROUND_HALF_EVEN) for v in values]
    total = sum(rounded, Decimal(0))
    note = None
    if total != exact.quantize(step, ROUND_HALF_EVEN):
        note = f"the parts are rounded: the exact total is {format_glm(exact, places, unit)}"
    return [format_glm(v, places, unit) for v in values], format_glm(total, places, unit), note


def format_budget(report: dict) -> dict[str, str]:
    """A cluster's budget (`ClusterPayments.report`) for people: total_budget, spent, reserved and
    remaining with shared decimals, `remaining` shown as the budget less the shown spent and
    reserved, so the three add up to the budget as printed; `note` says when they cannot."""
    from decimal import ROUND_HALF_EVEN, Decimal

    budget, spent, reserved, remaining = (Decimal(report[k]) for k in ("total_budget", "spent", "reserved",
                                                                          "remaining"))
    places = max(amount_decimals(spent, reserved, remaining), -min(0, budget.normalize().as_tuple().exponent))
    places = min(places, AMOUNT_MAX_DECIMALS)
    step = Decimal(1).scaleb(-places)
    spent_shown, reserved_shown = (v.quantize(step, ROUND_HALF_EVEN) for v in (spent, reserved))
    left = budget.quantize(step, ROUND_HALF_EVEN) - spent_shown - reserved_shown
    note = None
    if left < 0:
        left, note = Decimal(0), "spent and reserved exceed the budget"
    return {"total_budget": format_glm(budget, places), "spent": format_glm(spent_shown, places),
            "reserved": format_glm(reserved_shown, places), "remaining": format_glm(left, places),
            "burn_rate_per_hour": format_glm(report["burn_rate_per_hour"], unit="GLM/h"), "note": note}


def parse_amount(text, what: str):
    """A document's amount (a decimal string, docs/yagna-behaviour.md §3) as an exact Decimal."""
    from decimal import Decimal, InvalidOperation

    try:
        amount = Decimal(str(text))
    except InvalidOperation:
        raise ValueError(f"{what}: {text!r} is not a decimal amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{what}: {text!r} is not a non-negative amount")
    return amount


class PriceTerms(collections.namedtuple(
        "PriceTerms", "usage_vector prices start cpu_threads sizes debit_note_interval_s", defaults=((), None))):
    """The agreed linear price of one agreement: amount = start + Σ price_i · counter_i.

    `prices` per usage-vector entry, `start` the initial price (Decimals); `sizes` the offered size
    per size counter, in usage-vector order; `debit_note_interval_s` the agreed interval.
    """

    __slots__ = ()

    @classmethod
    def from_properties(cls, props: dict) -> "PriceTerms":
        """From the agreement's offer properties (docs/yagna-behaviour.md §3); ValueError if not checkable."""
        from golem.payload import defaults

        if props.get(defaults.PROP_PRICING_MODEL) != "linear":
            raise ValueError("the pricing model is not linear")
        vector = list(props.get(defaults.PROP_USAGE_VECTOR) or [])
        coeffs = list(props.get(defaults.PROP_PRICING_LINEAR_COEFFS) or [])
        if not vector or len(coeffs) != len(vector) + 1:
            raise ValueError("the linear coefficients do not match the usage vector")
        unknown = [c for c in vector if c not in _TIME_COUNTERS and c not in _SIZE_COUNTERS]
        if unknown:
            raise ValueError(f"usage counter(s) we cannot bound: {', '.join(unknown)}")
        # JSON numbers: str() gives back the offer's digits (Decimal(float) would not).
        prices = [parse_amount(c, "price") for c in coeffs]
        threads = int(props.get("golem.inf.cpu.threads") or 0)
        if threads < 1 and any(_TIME_COUNTERS.get(c) == "threads" for c in vector):
            raise ValueError("a CPU price without golem.inf.cpu.threads")
        sizes = tuple(parse_amount(props.get(_SIZE_COUNTERS[c]) or 0, _SIZE_COUNTERS[c])
                      for c in vector if c in _SIZE_COUNTERS)
        interval = props.get(defaults.PROP_DEBIT_NOTES_INTERVAL)
        return cls(tuple(vector), tuple(prices[:-1]), prices[-1], threads, sizes,
                   float(interval) if interval else None)

    def counter_caps(self, seconds):
        """The most each counter can read after `seconds` of an activity."""
        caps, sizes = [], iter(self.sizes)
        for counter in self.usage_vector:
            per_second = _TIME_COUNTERS.get(counter)
            if per_second is None:
                caps.append(next(sizes))
            else:
                caps.append(seconds * (self.cpu_threads if per_second == "threads" else 1))
        return caps

    def cost(self, counters):
        from decimal import Decimal

        with _exactly():
            return self.start + sum((p * c for p, c in zip(self.prices, counters)), Decimal(0))

    def max_cost(self, seconds):
        """The most the agreement can bill after `seconds` (every counter at its cap)."""
        from decimal import Decimal

        seconds = Decimal(str(max(0.0, float(seconds)))) if not isinstance(seconds, Decimal) else max(seconds, Decimal(0))
        with _exactly():
            return self.cost(self.counter_caps(seconds))

    @property
    def rate_per_hour(self):
        """The most it can bill per hour of running (the burn rate of a node)."""
        with _exactly():
            return self.max_cost(3600.0) - self.max_cost(0.0)

    def per_hour(self, counter_kind: str):
        """The agreed price per hour of one counter kind (`cpu` per thread, `duration`)."""
        from decimal import Decimal

        for counter, price in zip(self.usage_vector, self.prices):
            if counter.startswith(f"golem.usage.{counter_kind}"):
                return price * 3600
        return Decimal(0)

    def to_json(self) -> dict:
        return {"usage_vector": list(self.usage_vector), "prices": [str(p) for p in self.prices],
                "start": str(self.start), "cpu_threads": self.cpu_threads, "sizes": [str(s) for s in self.sizes],
                "debit_note_interval_s": self.debit_note_interval_s}

    @classmethod
    def from_json(cls, data: dict) -> "PriceTerms":
        from decimal import Decimal

        return cls(tuple(data["usage_vector"]), tuple(Decimal(p) for p in data["prices"]), Decimal(data["start"]),
                   int(data["cpu_threads"]), tuple(Decimal(s) for s in data.get("sizes") or ()),
                   data.get("debit_note_interval_s"))


class Verdict(collections.namedtuple("Verdict", "accept spend reason breach previous", defaults=(0, None, False, 0))):
    """What to do with one debit note or invoice: `accept`; `spend`, what accepting adds to the
    cluster's spending; `reason`, why not; `breach`, the provider billed more than the agreement
    allows; `previous`, what its activity (debit note) or agreement (invoice) had accepted before."""

    __slots__ = ()


class Spending:
    """The spending of one allocation (one cluster run) and the acceptance rules, pure.

    `decide` is the whole acceptance logic: no I/O, no clock (the caller measures the
    elapsed time), so it can be property-tested; an accepted verdict is already counted.
    """

    def __init__(self, budget, spent=None):
        from decimal import Decimal

        self.budget = budget
        self.spent = Decimal(0) if spent is None else spent
        self._accepted: dict[str, dict[str | None, Decimal]] = {}  # agreement -> activity (None: invoice) -> amount
        self._invoiced: set[str] = set()

    def accepted(self, agreement_id: str):
        """What the agreement's accepted documents add up to (its latest totals)."""
        from decimal import Decimal

        return sum(self._accepted.get(agreement_id, {}).values(), Decimal(0))

    def decide(self, terms: PriceTerms, kind: str, agreement_id: str, activity_id: str | None, amount,
               counters: list | None, elapsed_s: float) -> Verdict:
        with _exactly():
            verdict = self._judge(terms, kind, agreement_id, activity_id, amount, counters, elapsed_s)
            if verdict.accept:
                self.spent += verdict.spend
                scope = self._accepted.setdefault(agreement_id, {})
                if kind == "invoice":
                    scope.clear()
                    self._invoiced.add(agreement_id)
                scope[activity_id if kind == "debit_note" else None] = amount
        return verdict

    def restore(self, kind: str, agreement_id: str, activity_id: str | None, amount) -> None:
        """An accepted document from the ledger (a restarted webserver): counted as accepted, its
        spending already in `spent`, so the next document of its activity pays only its increase."""
        scope = self._accepted.setdefault(agreement_id, {})
        if kind == "invoice":
            scope.clear()
            self._invoiced.add(agreement_id)
        scope[activity_id if kind == "debit_note" else None] = amount

    def undo(self, agreement_id: str, activity_id: str | None, kind: str, verdict: Verdict) -> None:
        """Take back an accepted debit note whose acceptance failed at yagna (an invoice's is not
        undone: the activities' totals it replaced are gone, so its spending stays counted)."""
        if kind != "debit_note":
            return
        self.spent -= verdict.spend
        scope = self._accepted.setdefault(agreement_id, {})
        if verdict.previous:
            scope[activity_id] = verdict.previous
        else:
            scope.pop(activity_id, None)

    def _judge(self, terms, kind, agreement_id, activity_id, amount, counters, elapsed_s) -> Verdict:
        from decimal import Decimal

        tolerance = Decimal(AMOUNT_TOLERANCE)
        if agreement_id in self._invoiced:
            return Verdict(False, reason="the agreement was invoiced already")
        limit_s = Decimal(str(max(0.0, float(elapsed_s)))) + BILLING_GRACE_S
        if counters is not None:
            if len(counters) != len(terms.usage_vector):
                return Verdict(False, reason=f"{len(counters)} usage counters for a usage vector of "
                                             f"{len(terms.usage_vector)}", breach=True)
            used = [Decimal(str(c)) for c in counters]
            for name, value, cap in zip(terms.usage_vector, used, terms.counter_caps(limit_s)):
                if value < 0 or value > cap:
                    return Verdict(False, breach=True, reason=f"counter {name} = {glm(value)} is impossible "
                                   f"{elapsed_s:.0f} s into the agreement (at most {glm(cap)})")
            expected = terms.cost(used)
            if amount > expected + tolerance:
                return Verdict(False, breach=True, reason=f"{glm(amount)} GLM due, the agreed prices give "
                                                          f"{glm(expected)} for its usage counters")
        ceiling = terms.max_cost(limit_s)
        if amount > ceiling + tolerance:
            return Verdict(False, breach=True, reason=f"{glm(amount)} GLM due {elapsed_s:.0f} s into the agreement, "
                                                      f"the agreed prices allow at most {glm(ceiling)}")
        scope = self._accepted.get(agreement_id, {})
        before = self.accepted(agreement_id) if kind == "invoice" else scope.get(activity_id, Decimal(0))
        if amount < before:
            return Verdict(False, reason=f"{glm(amount)} GLM due is less than the {glm(before)} accepted before")
        spend = amount - before
        if self.spent + spend > self.budget:
            return Verdict(False, reason=f"accepting {glm(spend)} GLM more would spend {glm(self.spent + spend)} "
                                         f"of total_budget {glm(self.budget)}", previous=before)
        return Verdict(True, spend, previous=before)


def cluster_costs(ledger: "Ledger", cluster_name: str | None = None, now: float | None = None) -> list[dict]:
    """Per cluster, its nodes with provider, prices, runtime and cost (accepted GLM), from the Store."""
    from decimal import Decimal

    now = ledger.store.clock() if now is None else now
    clusters, spent_rows, node_rows = ledger.cost_rows(cluster_name)
    spent: dict[str, Decimal] = {}
    for agreement_id, amount in spent_rows:
        spent[agreement_id] = spent.get(agreement_id, Decimal(0)) + Decimal(amount)
    out = []
    for cluster in clusters:
        nodes: dict[str, dict] = {}
        for row in node_rows[cluster["name"]]:
            node = nodes.setdefault(row["node_id"], {
                "node_id": row["node_id"], "node_type": row["node_type"], "state": row["state"],
                "provider_id": None, "provider_name": None, "prices": None, "runtime_s": 0.0,
                "cost": Decimal(0), "agreements": 0})
            if row["agreement_id"] is None:
                continue
            node["agreements"] += 1
            node["provider_id"], node["provider_name"] = row["provider_id"], row["provider_name"]
            if row["pricing"]:
                terms = PriceTerms.from_json(json.loads(row["pricing"]))
                node["prices"] = {"start": glm(terms.start), "cpu_per_hour": glm(terms.per_hour("cpu")),
                                  "env_per_hour": glm(terms.per_hour("duration")),
                                  "cpu_threads": terms.cpu_threads}
            node["runtime_s"] += max(0.0, (row["terminated_at"] or now) - row["created_at"])
            node["cost"] += spent.get(row["agreement_id"], Decimal(0))
        total = sum((n["cost"] for n in nodes.values()), Decimal(0))
        for node in nodes.values():
            node["cost"] = glm(node["cost"])
            node["runtime_s"] = round(node["runtime_s"], 1)
        out.append({"cluster_name": cluster["name"], "network": cluster["network"], "state": cluster["state"],
                    "total_budget": cluster["total_budget"], "cost": glm(total), "nodes": list(nodes.values())})
    return out


class AgreementAccount:
    """One agreement of a cluster node, as payments see it: prices and billable time."""

    def __init__(self, agreement_id: str, node: "ClusterNode", provider_id: str, terms: PriceTerms,
                 started_at: float):
        self.agreement_id = agreement_id
        self.node = node
        self.provider_id = provider_id
        self.terms = terms
        self.started_at = started_at  # taken before the activity is created: never after the provider's start
        self.ended_at: float | None = None
        self.billed = True  # False once it ended without an activity: nothing will be invoiced
        self.settled = False  # its invoice was accepted or rejected
        self.breached = False  # it billed more than agreed (penalised once)

    def elapsed(self, now: float) -> float:
        return max(0.0, (self.ended_at if self.ended_at is not None else now) - self.started_at)

    def exposure(self, spending: Spending, until: float):
        """The most it may still bill beyond what was accepted, if it runs until `until`."""
        from decimal import Decimal

        if self.settled or not self.billed:
            return Decimal(0)
        end = self.ended_at if self.ended_at is not None else until
        with _exactly():
            bound = self.terms.max_cost(Decimal(str(max(0.0, end - self.started_at))) + BILLING_GRACE_S)
            return max(Decimal(0), bound - spending.accepted(self.agreement_id))

    def covered_until(self, now: float) -> float:
        """How far ahead a node kept running must be covered: until its next payment (the next
        debit note, within [BUDGET_KEEP_MIN_S, BUDGET_LOOKAHEAD_S]), then the time a stop takes."""
        ahead = BUDGET_LOOKAHEAD_S
        interval = self.terms.debit_note_interval_s
        if interval:
            ran = max(0.0, now - self.started_at)
            ahead = (int(ran // interval) + 1) * interval - ran
        return now + min(max(ahead, BUDGET_KEEP_MIN_S), BUDGET_LOOKAHEAD_S) + BUDGET_STOP_MARGIN_S


class ClusterPayments:
    """Allocations, the acceptance of debit notes and invoices, and the budget policy of all clusters."""

    def __init__(self, store: "Store", records: "ClusterRecords", clusters: dict, log, stop_node):
        self.store = store
        self.records = records
        self.clusters = clusters  # the ClusterService's clusters by name (read only here)
        self.log = log
        self._stop_node = stop_node  # (node, message, error): a node the budget or a breach ends
        self.ledger = Ledger(store)
        self.allocations: dict[str, object] = {}  # cluster name -> golem-core Allocation
        self.spending: dict[str, Spending] = {}  # cluster name -> spending of its allocation
        self.accounts: dict[str, AgreementAccount] = {}  # agreement id -> account
        self.exhausted: dict[str, str] = {}  # cluster name -> why the budget stopped it
        self.requested_budget: dict = {}  # cluster name -> total_budget of its latest node request
        self.warned: set[str] = set()
        self.invoice_due: set[str] = set()  # agreements that billed: end_cluster waits for their invoices
        self.agreement_node: dict[str, "ClusterNode"] = {}  # agreement id -> the node it was signed for
        self._lock = None
        self._watching = BackgroundTask(self._watch)

    # -- allocations ----------------------------------------------------------------

    def budget_of(self, parameters: dict):
        """`total_budget` as an exact Decimal: the YAML number as written (PyYAML gives a float;
        its repr is the shortest text that reads back the same)."""
        value = parameters.get("total_budget")
        if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
            raise ValueError(f"total_budget: {value!r} is not an amount")
        return parse_amount(5.0 if value is None else value, "total_budget")

    async def allocation(self, cluster: "Cluster", golem):
        """The cluster's one allocation of `total_budget` (on the GolemNode `golem`), made on first use."""
        from golem.resources import Allocation

        async with self.lock:
            allocation = self.allocations.get(cluster.name)
            if allocation is None:
                budget = self.requested_budget.get(cluster.name) or self.budget_of(cluster.parameters)
                try:
                    allocation = await Allocation.create_any_account(
                        golem, budget, cluster.network, cluster.parameters.get("payment_driver") or "erc20")
                except Exception as e:  # noqa: BLE001
                    raise ServiceUnavailable(f"could not allocate {glm(budget)} GLM on {cluster.network}: "
                                             f"{_describe_error(e)}") from None
                self.allocations[cluster.name] = allocation
                self.spending[cluster.name] = Spending(budget, self.ledger.spent(allocation.id))
                self.exhausted.pop(cluster.name, None)
                self.warned.discard(cluster.name)
                self.records.allocation(allocation.id, cluster.name, payment_platform(cluster.network),
                                                str(budget))
        return allocation

    def readopt_allocation(self, cluster: "Cluster", allocation) -> None:
        """A restarted webserver's cluster keeps its allocation; what it spent and what each
        agreement and activity accepted come back from the ledger, so nothing is paid twice."""
        spending = Spending(self.budget_of(cluster.parameters), self.ledger.spent(allocation.id))
        for row in self.ledger.accepted_documents(allocation.id):
            spending.restore(row["kind"], row["agreement_id"], row["activity_id"], parse_amount(row["amount"], "amount"))
        self.allocations[cluster.name] = allocation
        self.spending[cluster.name] = spending

    def readopt_agreement(self, node: "ClusterNode", row: dict) -> None:
        """A re-adopted node's agreement: its prices from the Store, billable from when it was signed."""
        agreement_id = node.agreement.id
        if row.get("pricing"):
            terms = PriceTerms.from_json(json.loads(row["pricing"]))
            self.accounts[agreement_id] = AgreementAccount(agreement_id, node, node.provider_id, terms,
                                                           row["agreement_created_at"] or node.created_at)
        self.agreement_adopted(agreement_id, node)

    async def settle_received(self, golem, lister) -> None:
        """Debit notes and invoices that came while no webserver ran (golem-core delivers events
        only from its start on): each one still RECEIVED is settled now, oldest first, as if it had
        just come; one the previous webserver was accepting when it died is accepted at yagna now.
        `lister`: a GolemNode of its own that lists them (golem-core refuses to list a resource kind
        into a node already holding one of them with data, ResourceMeta's "Repeated id", as `golem`
        may from events); they are settled as `golem`'s."""
        listed = (("debit_note", await lister.debit_notes()), ("invoice", await lister.invoices()))
        for kind, documents in listed:
            pending = []
            for document in documents:
                data = document.data
                if str(data.status).upper() != "RECEIVED" or self.records.agreement_owner(data.agreement_id) is None:
                    continue
                pending.append((data.timestamp, golem.debit_note(document.id) if kind == "debit_note"
                                else golem.invoice(document.id)))
            for _, document in sorted(pending, key=lambda item: item[0]):
                if self.ledger.known(document.id) == "accepting":
                    await self._finish_accepting(document, kind)
                else:
                    await self.settle(document, kind)

    async def _finish_accepting(self, document, kind: str) -> None:
        """The ledger counted it as spent, yagna never heard: accept it at yagna now."""
        data = document.data
        account = self.accounts.get(data.agreement_id)
        allocation = self.allocations.get(account.node.cluster.name) if account is not None else None
        if allocation is None:
            return
        amount = parse_amount(data.total_amount_due if kind == "debit_note" else data.amount, "amount")
        try:
            await document.accept(allocation, amount)
        except Exception as e:  # noqa: BLE001
            self.log.warning("accepting %s %s failed: %s", kind, document.id, _describe_error(e))
            return
        row = next(r for r in self.ledger.accepted_documents(allocation.id) if r["document_id"] == document.id)
        self.ledger.update(document.id, "accepted", spent=row["spent"])
        if kind == "invoice":
            account.settled = True
            self.invoice_due.discard(data.agreement_id)

    async def release_allocation(self, cluster: "Cluster") -> None:
        allocation = self.allocations.pop(cluster.name, None)
        for agreement_id in [a for a, account in self.accounts.items()
                             if account.node.cluster is cluster and (account.ended_at is not None
                                                                     or not account.node.alive)]:
            del self.accounts[agreement_id]  # settled or given up: the next run has a budget of its own
            # A later end_cluster must not wait for an invoice that comes late (recorded by _late) or never.
            self.invoice_due.discard(agreement_id)
            self.agreement_node.pop(agreement_id, None)
        if allocation is not None:
            await _quietly(allocation.release())
            self.records.allocation_released(allocation.id)

    @property
    def lock(self):
        import asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- agreements -----------------------------------------------------------------------

    def agreement_adopted(self, agreement_id: str, node: "ClusterNode") -> None:
        """A node holds a signed agreement: its invoice is due once it ends (unless it never billed)."""
        self.invoice_due.add(agreement_id)
        self.agreement_node[agreement_id] = node

    def awaiting_invoice(self, cluster: "Cluster") -> bool:
        """Whether an agreement of the cluster that billed has not been invoiced yet."""
        return any(agreement_id in self.invoice_due for agreement_id, node in self.agreement_node.items()
                   if node.cluster is cluster)

    async def agreement_signed(self, node: "ClusterNode", agreement) -> None:
        """Read the agreed prices before anything can be billed; NodeStartFailed if they cannot be checked."""
        try:
            data = await agreement.get_agreement_data()
            terms = PriceTerms.from_properties(dict(data.properties))
        except ValueError as e:
            raise NodeStartFailed("agreement_failed", f"its bills could not be checked: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise NodeStartFailed("agreement_failed", f"reading the agreement failed: {_describe_error(e)}") from None
        self.accounts[agreement.id] = AgreementAccount(agreement.id, node, node.provider_id, terms, time.time())
        self.ledger.pricing(agreement.id, terms.to_json())
        self.store.record_provider(node.provider_id, node.provider_name)

    def agreement_ended(self, agreement_id: str, billed: bool) -> None:
        """Its activity is gone: the provider's counters have stopped (an invoice follows if it billed)."""
        account = self.accounts.get(agreement_id)
        if account is not None and account.ended_at is None:
            account.ended_at = time.time()
            account.billed = billed
        if not billed:
            self.invoice_due.discard(agreement_id)  # no invoice to wait for

    # -- debit notes and invoices -----------------------------------------------------------

    async def settle(self, document, kind: str) -> None:
        """Accept one debit note or invoice of our agreements, or reject it (recorded, with why)."""
        try:
            data = await document.get_data(force=True)
        except Exception as e:  # noqa: BLE001
            self.log.warning("cannot read %s %s: %s", kind, document.id, _describe_error(e))
            return
        if str(data.status).upper() != "RECEIVED":
            return  # handled already (events come again after a restart)
        account = self.accounts.get(data.agreement_id)
        if account is None:
            self._late(document.id, kind, data)
            return
        node = account.node
        cluster = node.cluster
        spending = self.spending.get(cluster.name)
        allocation = self.allocations.get(cluster.name)
        activity_id = getattr(data, "activity_id", None) if kind == "debit_note" else None
        amount_text = data.total_amount_due if kind == "debit_note" else data.amount
        counters = getattr(data, "usage_counter_vector", None) if kind == "debit_note" else None
        async with self.lock:
            if self.ledger.known(document.id) is not None:
                return
            self.ledger.received(document.id, kind, data.agreement_id, activity_id, node.node_id, cluster.name,
                                 allocation.id if allocation is not None else None, str(amount_text))
            if spending is None or allocation is None:
                self.ledger.update(document.id, "rejected", reason="the cluster's allocation is released")
                return
            try:
                amount = parse_amount(amount_text, "amount")
                verdict = spending.decide(account.terms, kind, data.agreement_id, activity_id, amount,
                                          counters, account.elapsed(time.time()))
            except ArithmeticError as e:  # decimal.InvalidOperation: a malformed counter
                verdict = Verdict(False, reason=f"malformed: {e}", breach=True)
            except ValueError as e:
                verdict = Verdict(False, reason=str(e), breach=True)
            if not verdict.accept:
                self.ledger.update(document.id, "rejected", reason=verdict.reason)
                self.log.warning("%s %s of %s/%s rejected: %s", kind, document.id, cluster.name,
                                         node.node_id, verdict.reason)
                if kind == "invoice":
                    account.settled = True
                    self.invoice_due.discard(data.agreement_id)
                if verdict.breach:
                    self._penalise(account, f"{kind.replace('_', ' ')} {document.id}: {verdict.reason}")
                return
            # Written before yagna hears of it: a crash from here on counts it as spent.
            self.ledger.update(document.id, "accepting", spent=verdict.spend)
            try:
                await document.accept(allocation, amount)
            except Exception as e:  # noqa: BLE001 - e.g. yagna refuses: the allocation is short
                spending.undo(data.agreement_id, activity_id, kind, verdict)
                self.ledger.update(document.id, "failed", reason=_describe_error(e)[:500])
                self.log.warning("accepting %s %s failed: %s", kind, document.id, _describe_error(e))
                return
            self.ledger.update(document.id, "accepted", spent=verdict.spend)
        if kind == "invoice":
            account.settled = True
            self.invoice_due.discard(data.agreement_id)

    def _late(self, document_id: str, kind: str, data) -> None:
        """A document of one of our agreements whose cluster's allocation is released (or of a previous
        webserver's): nothing can pay it now; recorded with why, never silently dropped."""
        owner = self.records.agreement_owner(data.agreement_id)
        if owner is None or self.ledger.known(document_id) is not None:
            return  # another requestor's (a shared yagna), or recorded already
        amount = data.total_amount_due if kind == "debit_note" else data.amount
        self.ledger.received(document_id, kind, data.agreement_id, getattr(data, "activity_id", None),
                             owner["node_id"], owner["cluster_name"], None, str(amount))
        why = "arrived after its cluster's allocation was released (nothing left to pay it from)"
        self.ledger.update(document_id, "late", reason=why)
        self.log.warning("%s %s of %s/%s %s", kind, document_id, owner["cluster_name"], owner["node_id"], why)

    def _penalise(self, account: AgreementAccount, reason: str) -> None:
        """A provider billed more than agreed: record it, block it, replace the node."""
        if account.breached:
            return
        account.breached = True
        node, store, provider_id = account.node, self.store, account.provider_id
        network = node.cluster.network
        store.record_event(provider_id, network, "billing_breach", detail=reason[:500],
                           cluster_name=node.cluster.name)
        store.block(provider_id, [network], duration=BILLING_BREACH_BLOCK_S, source="auto",
                    reason=f"billed more than agreed: {reason[:300]}")
        if node.alive and node.agreement is not None and node.agreement.id == account.agreement_id:
            error = f"provider {node.provider} billed more than agreed: {reason}"
            self._stop_node(node, f"Stopping: {error}", error)

    # -- budget policy ------------------------------------------------------------------

    def start(self) -> None:
        self._watching.start()

    async def stop(self) -> None:
        await self._watching.stop()

    async def _watch(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(BUDGET_CHECK_INTERVAL_S)
            for cluster in list(self.clusters.values()):
                try:
                    self.enforce(cluster, time.time())
                except Exception:  # noqa: BLE001 - the watcher must survive one bad cluster
                    self.log.exception("budget check of %s failed", cluster.name)

    def _commitment(self, cluster: "Cluster", now: float, stopping: set[str]):
        """(spent, reserved): accepted so far, and the most the cluster's agreements may still bill
        if the nodes in `stopping` end within BUDGET_STOP_MARGIN_S and the others run until their next payment."""
        from decimal import Decimal

        spending = self.spending[cluster.name]
        reserved = Decimal(0)
        for account in self.accounts.values():
            node = account.node
            if node.cluster is not cluster:
                continue
            if account.ended_at is not None or node.node_id in stopping or not node.alive:
                until = now + BUDGET_STOP_MARGIN_S
            else:
                until = account.covered_until(now)
            reserved += account.exposure(spending, until)
        return spending.spent, reserved

    def enforce(self, cluster: "Cluster", now: float) -> list["ClusterNode"]:
        """Stop workers (newest first), then the head, until the budget covers what stays; return them."""
        spending = self.spending.get(cluster.name)
        if spending is None:
            return []
        alive = [n for n in cluster.nodes.values() if n.alive]
        heads = [n for n in alive if n.tags.get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD]
        order = sorted((n for n in alive if n not in heads), key=lambda n: n.created_at, reverse=True)
        order += sorted(heads, key=lambda n: n.created_at, reverse=True)
        stopping: set[str] = set()
        spent, reserved = self._commitment(cluster, now, stopping)
        if (spent + reserved) * 100 >= spending.budget * BUDGET_WARNING_PERCENT and cluster.name not in self.warned:
            self.warned.add(cluster.name)
            message = (f"Budget warning: {format_glm(spent + reserved)} of total_budget {format_glm(spending.budget)} "
                       f"committed ({format_glm(spent)} spent)")
            for node in alive:
                node.log(message)
        victims = []
        while spent + reserved > spending.budget and order:
            victim = order.pop(0)
            stopping.add(victim.node_id)
            victims.append(victim)
            spent, reserved = self._commitment(cluster, now, stopping)
        for node in victims:
            error = (f"stopped by the budget: total_budget {format_glm(spending.budget)} cannot cover the running "
                     f"nodes until their next payment ({format_glm(spent)} spent, {format_glm(reserved)} reserved)")
            self.exhausted[cluster.name] = error
            self._stop_node(node, f"Stopping: {error}", error)
        return victims

    def check_can_start(self, cluster_name: str, tags: dict, parameters: dict) -> None:
        """Nodes of a cluster the budget stopped are refused (the autoscaler would rent again and again);
        a new head (`ray up` again) after the old allocation is released gets a new budget: the
        `total_budget` of the latest request, which the next allocation takes."""
        try:
            budget = self.budget_of(parameters)
        except ValueError as e:  # names the field: "total_budget: ..."
            raise UsageError(f"provider_parameters.{e}") from None
        if budget <= 0:
            raise UsageError(f"provider_parameters.total_budget: expected an amount > 0, got {glm(budget)}")
        why = self.exhausted.get(cluster_name)
        if why is not None and (tags.get(RAY_TAG_NODE_KIND) != RAY_NODE_KIND_HEAD or cluster_name in self.allocations):
            raise Conflict(f"cluster {cluster_name!r} was {why}; raise total_budget and run `ray up` again")
        self.requested_budget[cluster_name] = budget

    def report(self, cluster: "Cluster", now: float | None = None) -> dict:
        """What `status` shows for one cluster: spent, reserved, remaining, burn rate, warning."""
        from decimal import ROUND_DOWN, ROUND_UP, Decimal

        wei = Decimal(_WEI)
        now = time.time() if now is None else now
        spending = self.spending.get(cluster.name)
        budget = spending.budget if spending else self.budget_of(cluster.parameters)
        if spending is None:
            spent = reserved = Decimal(0)
        else:
            spent, reserved = self._commitment(cluster, now, set())
        burn = sum((a.terms.rate_per_hour for a in self.accounts.values()
                    if a.node.cluster is cluster and a.ended_at is None and a.node.alive), Decimal(0))
        committed = spent + reserved
        warning = None
        if committed * 100 >= budget * BUDGET_WARNING_PERCENT:
            warning = (f"{glm((committed * 100 / budget).quantize(Decimal('0.1')))}% of total_budget "
                       f"{format_glm(budget)} committed")
        if cluster.name in self.exhausted:
            warning = self.exhausted[cluster.name]
        return {"total_budget": glm(budget), "spent": glm(spent), "reserved": glm(reserved.quantize(wei, ROUND_UP)),
                "remaining": glm(max(Decimal(0), budget - committed).quantize(wei, ROUND_DOWN)),
                "burn_rate_per_hour": glm(burn.quantize(wei, ROUND_UP)), "warning": warning}

    def budgets(self) -> dict[str, dict]:
        return {name: self.report(cluster) for name, cluster in self.clusters.items()}

    def costs(self, cluster_name: str | None = None) -> dict:
        """The `costs` route: the Store's per-node costs, plus the live budget of running clusters."""
        if cluster_name is not None and not self.records.has_cluster(cluster_name):
            raise NotFound(f"no cluster named {cluster_name!r}")
        clusters = cluster_costs(self.ledger, cluster_name)
        for entry in clusters:
            cluster = self.clusters.get(entry["cluster_name"])
            if cluster is not None:
                entry["budget"] = self.report(cluster)
        return {"clusters": clusters}


###############################################################################
# 8. Webserver ################################################################
###############################################################################

WEBSERVER_TOKEN_FILE = "webserver.token"
WEBSERVER_PID_FILE = "webserver.pid"
WEBSERVER_RUNTIME_FILE = "webserver.json"  # port, pid, yagna kind/URL/pid: lets stop/status find it (no secrets)
WEBSERVER_RUN_LOCK = "webserver.run.lock"  # held by the running webserver: one per data dir
WEBSERVER_LOG_FILE = "webserver.log"
WEBSERVER_LOG_MAX_BYTES = 5 * 1024 * 1024
WEBSERVER_LOG_BACKUPS = 3
MAX_REQUEST_HEAD = 16 * 1024  # request line + headers (431 beyond)
MAX_REQUEST_LINE = 8 * 1024  # the request line (414 beyond) or one header line (431 beyond)
MAX_REQUEST_HEADERS = 100  # header lines (431 beyond), as http.server
MAX_REQUEST_BODY = 1024 * 1024
KEEPALIVE_IDLE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this
REQUEST_READ_TIMEOUT = 30.0  # a started request must arrive whole within this
MAX_CONNECTIONS = 256  # open client connections; one more is answered 503 and closed


def read_pidfile(datadir: str) -> tuple[int, int | None] | None:
    """`(pid, start_time)` from `<datadir>/webserver.pid` (`PID START_TIME`), None if absent or garbled."""
    try:
        with open(os.path.join(datadir, WEBSERVER_PID_FILE)) as f:
            fields = f.read().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (FileNotFoundError, ValueError, IndexError):
        return None


def write_pidfile(datadir: str, pid: int) -> None:
    """Record `pid` with its start time, so a reused pid is never mistaken for the webserver."""
    write_secret_file(os.path.join(datadir, WEBSERVER_PID_FILE), f"{pid} {proc_start_time(pid) or 0}\n")


def live_pid(datadir: str) -> tuple[int, int | None] | None:
    """The pidfile's process if it still runs and is the same process (PID-reuse safe), else None."""
    entry = read_pidfile(datadir)
    if entry and process_alive(entry[0], entry[1] or None):
        return entry
    return None


def read_runtime(datadir: str) -> dict:
    """`<datadir>/webserver.json` as the running (or last crashed) webserver wrote it; {} if none."""
    import json

    try:
        with open(os.path.join(datadir, WEBSERVER_RUNTIME_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


RUN_LOCK_TAKEN = "another webserver already runs with data dir"  # `start` looks for it in webserver.out


class _SecretRedactor:
    """logging.Filter that blanks known secrets (token, app key) out of every record: defence in depth."""

    def __init__(self):
        self.secrets: set[str] = set()

    def filter(self, record) -> bool:
        import logging

        secrets = [secret for secret in self.secrets if secret]  # "" would match between every character
        if secrets:
            record.msg, record.args = self._redact(record.getMessage(), secrets), None
            if record.exc_info and not record.exc_text:
                # What Formatter.format would render: it uses exc_text as given once set.
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self._redact(record.exc_text, secrets)
            if record.stack_info:
                record.stack_info = self._redact(record.stack_info, secrets)
        return True

    @staticmethod
    def _redact(text: str, secrets: list[str]) -> str:
        for secret in secrets:
            text = text.replace(secret, "[***]")
        return text


def setup_webserver_logging(datadir: str, redactor: _SecretRedactor | None = None):
    """Log to `<datadir>/webserver.log`, rotated by size; returns the `ray_on_golem` logger."""
    import logging
    import logging.handlers

    handler = logging.handlers.RotatingFileHandler(
        os.path.join(datadir, WEBSERVER_LOG_FILE), maxBytes=WEBSERVER_LOG_MAX_BYTES,
        backupCount=WEBSERVER_LOG_BACKUPS, encoding="utf-8",
    )  # fmt: skip
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)-7s] [%(name)s] %(message)s"))
    if redactor is not None:
        handler.addFilter(redactor)
    os.chmod(handler.baseFilename, 0o600)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Python warnings (aiohttp, golem-core) into the rotated log, not the unrotated webserver.out.
    logging.captureWarnings(True)
    return logging.getLogger("ray_on_golem")


def load_or_create_token(datadir: str) -> str:
    """The webserver's bearer token, `<datadir>/webserver.token` (0600), created on first start."""
    import secrets

    path = os.path.join(datadir, WEBSERVER_TOKEN_FILE)
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # someone loosened it: a readable token is an open door
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    write_secret_file(path, token + "\n")
    return token


def read_token(datadir: str) -> str | None:
    try:
        with open(os.path.join(datadir, WEBSERVER_TOKEN_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


class Request:
    """One parsed HTTP request; `params` holds the `{name}` parts of the matched route pattern."""

    __slots__ = ("method", "path", "query", "version", "headers", "body", "params")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], body: bytes):
        path, _, query = target.partition("?")
        self.method, self.path, self.version = method, path, version
        self.query = query
        self.headers, self.body = headers, body
        self.params: dict[str, str] = {}

    def query_params(self) -> dict[str, str]:
        import urllib.parse

        return dict(urllib.parse.parse_qsl(self.query))

    def json(self) -> dict:
        """The body as a JSON object (empty body: `{}`); UsageError (400) otherwise."""
        import json

        if not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as e:
            raise UsageError(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise UsageError("request body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise UsageError("request body must be a JSON object")
        return data

    def fields(self, spec: dict[str, tuple[type, object]]) -> dict:
        """Validate the JSON body against `{field: (type, default)}`; unknown or mistyped fields are a 400."""
        data = self.json()
        unknown = sorted(set(data) - set(spec))
        if unknown:
            raise UsageError(f"unknown field {unknown[0]!r} (expected: {', '.join(sorted(spec))})")
        out = {}
        for name, (kind, default) in spec.items():
            if name in data and data[name] is None:  # an explicit null is never a default
                raise UsageError(f"field {name!r} must be {kind.__name__}, got null")
            value = data.get(name, default)
            # bool is an int in Python; a JSON `1` is not a valid `force`.
            if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise UsageError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
            out[name] = value
        return out


class Router:
    """The route table as data: (method, path pattern) -> handler method name; `{name}` matches one segment."""

    def __init__(self, routes):
        import re

        self._static: dict[str, dict[str, str]] = {}
        self._patterns: list[tuple[re.Pattern, dict[str, str]]] = []
        for method, pattern, name in routes:
            if "{" in pattern:
                regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
                for existing, methods in self._patterns:
                    if existing.pattern == regex.pattern:
                        methods[method] = name
                        break
                else:
                    self._patterns.append((regex, {method: name}))
            else:
                self._static.setdefault(pattern, {})[method] = name

    def match(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        """The handler name and path params; NotFound (404) or MethodNotAllowed (405)."""
        import urllib.parse

        methods, params = self._static.get(path), {}
        if methods is None:
            for regex, candidate in self._patterns:
                m = regex.match(path)
                if m:
                    methods = candidate
                    params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                    break
            else:
                raise NotFound(f"no route {path}")
        name = methods.get(method)
        if name is None:
            raise MethodNotAllowed(f"{method} not allowed on {path} (allowed: {', '.join(sorted(methods))})",
                                   sorted(methods))
        return name, params


# --- Status page (`ray-on-golem dashboard`) ------------------------------------------
# A read-only page served by this webserver: clusters, budgets, spending over time, nodes
# and their bring-up steps, the live market funnels, providers, warnings. Its HTML, CSS and
# JS are the constants below (inside the pyz, nothing fetched from elsewhere); the page
# polls GET /dashboard/data. The page never holds the bearer token: `ray-on-golem dashboard`
# asks (with the token) for a one-time login code, and GET /login?code=... trades it for an
# HttpOnly, SameSite=Strict session cookie. The cookie admits only the page's GET routes;
# every route that changes something still needs the bearer token (no CSRF through the page).

DASHBOARD_CODE_TTL_S = 120.0  # a login link works once, within this
DASHBOARD_SESSION_TTL_S = 12 * 3600.0
DASHBOARD_MAX_SESSIONS = 64  # oldest dropped first: codes nobody redeemed cannot pile up
DASHBOARD_REFRESH_S = 2.0
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class Response:
    """A non-JSON answer of a route (page, script, redirect): `_respond` sends it as it is."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
                 headers: list[str] | None = None):
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers or []


class LoginSessions:
    """One-time login codes and the browser sessions they open; in memory (a restart logs out)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._codes: dict[str, float] = {}  # code -> expiry
        self._sessions: dict[str, float] = {}  # session id -> expiry

    def _purge(self) -> None:
        now = self.clock()
        for table in (self._codes, self._sessions):
            for key in [k for k, expiry in table.items() if expiry <= now]:
                del table[key]
            while len(table) > DASHBOARD_MAX_SESSIONS:
                del table[next(iter(table))]

    def new_code(self) -> str:
        import secrets

        self._purge()
        code = secrets.token_urlsafe(24)
        self._codes[code] = self.clock() + DASHBOARD_CODE_TTL_S
        return code

    def redeem(self, code: str) -> str | None:
        """A new session id for a valid code, which is used up; None for an unknown, used or expired one."""
        import secrets

        self._purge()
        if self._codes.pop(code, None) is None:
            return None
        session = secrets.token_urlsafe(32)
        self._sessions[session] = self.clock() + DASHBOARD_SESSION_TTL_S
        return session

    def valid(self, session: str | None) -> bool:
        expiry = self._sessions.get(session or "")
        return expiry is not None and expiry > self.clock()


class Dashboard:
    """The status page of one webserver: login, the page's routes and the data it shows."""

    PAGE_PATHS = ("/dashboard", "/dashboard/data", "/dashboard/app.js", "/dashboard/app.css")
    LOGIN_PATH = "/login"

    def __init__(self, server: "Webserver", clusters: "ClusterService", store: "Store"):
        self.server = server  # its port, status() and network
        self.clusters = clusters  # live clusters: nodes' steps, market funnels
        self.store = store  # reputation and blocks
        self.ledger = Ledger(store)
        self.sessions = LoginSessions()

    # -- who may see it -------------------------------------------------------------------

    @property
    def cookie_name(self) -> str:
        return f"rog_session_{self.server.port}"  # cookies ignore ports: one name per webserver

    def _local_host(self, request: Request) -> bool:
        """The Host a browser sends for our URL (a DNS-rebound name never gets the cookie's routes)."""
        return request.headers.get("host") in (f"{WEBSERVER_HOST}:{self.server.port}", f"localhost:{self.server.port}")

    def _session(self, request: Request) -> str | None:
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie_name:
                return value
        return None

    def admits(self, request: Request) -> bool:
        """Without the bearer token: the login route, and the page's GET routes with a live session."""
        if request.method != "GET" or not self._local_host(request):
            return False
        if request.path == self.LOGIN_PATH:
            return True  # the route checks the code itself
        return request.path in self.PAGE_PATHS and self.sessions.valid(self._session(request))

    def login_code(self) -> dict:
        code = self.sessions.new_code()
        return {"code": code, "url": f"http://{WEBSERVER_HOST}:{self.server.port}{self.LOGIN_PATH}?code={code}",
                "expires_in_s": DASHBOARD_CODE_TTL_S}

    def login(self, request: Request) -> Response:
        session = self.sessions.redeem(request.query_params().get("code", ""))
        if session is None:
            return self._html(401, DASHBOARD_LOGIN_FAILED_HTML)
        cookie = (f"{self.cookie_name}={session}; HttpOnly; SameSite=Strict; Path=/; "
                  f"Max-Age={int(DASHBOARD_SESSION_TTL_S)}")
        return Response(303, headers=[f"Set-Cookie: {cookie}", "Location: /dashboard", *self._security_headers()])

    # -- the page ---------------------------------------------------------------------------

    @staticmethod
    def _security_headers() -> list[str]:
        return [f"Content-Security-Policy: {DASHBOARD_CSP}", "X-Content-Type-Options: nosniff",
                "Referrer-Policy: no-referrer", "Cache-Control: no-store", "X-Frame-Options: DENY"]

    def _html(self, status: int, text: str) -> Response:
        return Response(status, text.encode(), "text/html; charset=utf-8", self._security_headers())

    def page(self) -> Response:
        return self._html(200, DASHBOARD_HTML)

    def script(self) -> Response:
        return Response(200, DASHBOARD_JS.encode(), "text/javascript; charset=utf-8", self._security_headers())

    def style(self) -> Response:
        return Response(200, DASHBOARD_CSS.encode(), "text/css; charset=utf-8", self._security_headers())

    # -- what it shows ------------------------------------------------------------------------

    def data(self) -> dict:
        """Everything the page shows, the amounts exact and as people read them (format_glm)."""
        server = self.server
        status = server.status()
        live = self.clusters.clusters
        costs = {entry["cluster_name"]: entry for entry in cluster_costs(self.ledger)}
        clusters = []
        for name, counts in sorted(status["clusters"].items()):
            clusters.append(self._cluster(name, counts, status["budgets"].get(name), costs.get(name), live.get(name)))
        return {
            "generated_at": time.time(),
            "refresh_s": DASHBOARD_REFRESH_S,
            "webserver": {"version": status["version"], "state": status["state"], "url": status["url"],
                          "network": server.network, "uptime": format_duration(status["uptime"]),
                          "yagna": status["yagna"]["kind"]},
            "warnings": status["warnings"],
            "clusters": clusters,
            "providers": self._providers([(n["provider_id"], n["provider_name"], f"{c['name']}/{n['node_id']} ({n['state']})")
                                          for c in clusters for n in c["nodes"] if n["provider_id"]]),
        }

    def _cluster(self, name: str, counts: dict, budget: dict | None, cost: dict | None, cluster) -> dict:
        from decimal import Decimal

        nodes = (cost or {}).get("nodes", [])
        shown_costs, shown_total, note = format_glm_sum([n["cost"] for n in nodes])
        logs = self.clusters.records.state_logs(name)
        live_nodes = cluster.nodes if cluster is not None else {}
        out_nodes = []
        for node, shown in zip(nodes, shown_costs):
            held = live_nodes.get(node["node_id"])
            lines = held.state_log if held is not None else logs.get(node["node_id"], [])
            times = held.state_log_at if held is not None else []
            steps = [{"text": text, "at": times[i] if i < len(times) else None} for i, text in enumerate(lines)]
            prices = node["prices"] or {}
            out_nodes.append({
                "node_id": node["node_id"], "node_type": node["node_type"], "state": node["state"],
                "provider_name": node["provider_name"], "provider_id": node["provider_id"],
                "prices": {k: format_glm(prices[k], unit="GLM/h" if k != "start" else "GLM")
                           for k in ("start", "cpu_per_hour", "env_per_hour") if prices.get(k) not in (None, "")},
                "runtime": format_duration(node["runtime_s"]), "cost": node["cost"], "cost_shown": shown,
                "steps": steps, "error": held.error if held is not None else None,
            })
        out_nodes.sort(key=lambda n: (n["state"] == "terminated", n["node_id"]))
        entry = {
            "name": name, "state": (cost or {}).get("state", "unknown"), "network": (cost or {}).get("network"),
            "counts": counts, "live_nodes": sum(n for state, n in counts.items() if state != "terminated"),
            "cost": (cost or {}).get("cost", "0"), "cost_shown": shown_total, "cost_note": note,
            "budget": budget, "budget_shown": format_budget(budget) if budget else None,
            "nodes": out_nodes, "spending": self._spending(name), "funnels": self._funnels(cluster),
        }
        if budget:
            total = Decimal(budget["total_budget"]) or Decimal(1)
            entry["budget_fractions"] = {k: float(Decimal(budget[k]) / total) for k in ("spent", "reserved", "remaining")}
        return entry

    def _spending(self, name: str) -> dict:
        """The cluster's spending over time: one point per accepted debit note or invoice (cumulative)."""
        from decimal import Decimal

        points, total = [], Decimal(0)
        for row in self.ledger.rows(name):
            if row["status"] not in ("accepting", "accepted") or not Decimal(row["spent"] or "0"):
                continue
            total += Decimal(row["spent"])
            points.append({"at": row["settled_at"] or row["created_at"], "spent": glm(total), "kind": row["kind"]})
        points.sort(key=lambda p: p["at"])
        for point in points:
            point["shown"] = format_glm(point["spent"])
        return {"start": self.clusters.records.first_allocation_at(name), "points": points}

    @staticmethod
    def _funnels(cluster) -> list[dict]:
        """The live market funnel of each node type the cluster rents (network-stats' counts)."""
        if cluster is None:
            return []
        out = []
        for key, pipeline in list(cluster.pipelines.items()):
            types = sorted({n.node_type for n in cluster.nodes.values()
                            if json.dumps(n.node_config, sort_keys=True) == key})
            funnel = pipeline.funnel.as_dict()
            out.append({"node_types": types, "funnel": funnel["funnel"], "errors": funnel["errors"]})
        return out

    def _providers(self, rented: list[tuple[str, str | None, str]], limit: int = 40) -> list[dict]:
        """Providers of this network with reputation and blocks: the ones the page's nodes rented
        (`rented`: provider id, name, node), then the blocked and scored ones, best first."""
        store, network = self.store, self.server.network
        names: dict[str, str | None] = {}
        nodes: dict[str, list[str]] = {}
        for provider_id, name, node in rented:
            names[provider_id] = names.get(provider_id) or name
            nodes.setdefault(provider_id, []).append(node)
        rows = {r["node_id"]: r for r in store.reputation([network])}
        out = [{"node_id": node_id, "name": row.get("name") or names.get(node_id),
                "nodes": nodes.get(node_id, []), "score": row.get("score"),
                "success_rate": row.get("success_rate"), "uptime": row.get("uptime"),
                "blocked": bool(row.get("blocked")), "reason": row.get("reason"),
                "blocked_until": format_time(row["blocked_until"]) if row.get("blocked_until") else None}
               for node_id, row in [*rows.items(), *((n, {}) for n in names if n not in rows)]]
        out.sort(key=lambda p: (not p["nodes"], not p["blocked"], -(p["score"] or 0), p["node_id"]))
        return out[:limit]


DASHBOARD_LOGIN_FAILED_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Ray on Golem: login link used up</title>
<link rel="icon" href="data:,"></head>
<body><main><h1>This login link is used up or expired</h1>
<p>Each link opens the status page once, within two minutes. Run <code>ray-on-golem dashboard</code> for a new one.</p>
</main></body></html>
"""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Ray on Golem</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/dashboard/app.css">
<script src="/dashboard/app.js" defer></script></head>
<body><header><h1>Ray on Golem</h1><div id="server">loading…</div></header>
<main><section id="warnings"></section><section id="clusters"></section>
<section id="providers-section"><h2>Providers</h2><div id="providers"></div></section></main>
<footer id="updated"></footer></body></html>
"""

DASHBOARD_CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #e3e6ec; --spent: #3b5bdb; --reserved: #f08c00;
        --remaining: #d3f9d8; --bad: #c92a2a; --card: #ffffff; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 1.5em; padding: .8em 1.5em; background: #1d2330; color: #fff; }
header h1 { margin: 0; font-size: 1.3em; }
#server { color: #c9d1e0; }
main { padding: 1em 1.5em; max-width: 1200px; }
h2 { font-size: 1.15em; margin: .2em 0 .6em; }
h3 { font-size: 1em; margin: 1em 0 .4em; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 1em 1.2em; margin-bottom: 1.2em; }
.muted { color: var(--muted); }
.warn { background: #fff4e6; border: 1px solid #ffd8a8; border-radius: 6px; padding: .4em .8em; margin: .3em 0; }
.bad { color: var(--bad); }
.state { display: inline-block; padding: 0 .5em; border-radius: 1em; background: #edf2ff; font-size: .9em; }
.state.terminated, .state.stopped { background: #f1f3f5; color: var(--muted); }
.state.pending { background: #fff4e6; }
.state.running { background: #d3f9d8; }
.counts { margin-left: .6em; }
.bar { width: 100%; height: 16px; display: block; border-radius: 4px; }
.bar .spent { fill: var(--spent); } .bar .reserved { fill: var(--reserved); } .bar .remaining { fill: var(--remaining); }
.legend span { margin-right: 1.2em; white-space: nowrap; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .3em; vertical-align: -1px; }
.swatch.spent { background: var(--spent); } .swatch.reserved { background: var(--reserved); }
.swatch.remaining { background: var(--remaining); border: 1px solid #b2f2bb; }
svg.spend { width: 100%; max-width: 640px; height: 180px; display: block; }
svg.spend .axis { stroke: #adb5bd; stroke-width: 1; }
svg.spend .line { fill: none; stroke: var(--spent); stroke-width: 2; }
svg.spend .point { fill: var(--spent); }
svg.spend text { font-size: 11px; fill: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em .3em 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: .9em; }
td.num, th.num { text-align: right; }
details.steps summary { cursor: pointer; }
ol.steps { margin: .2em 0 0; padding-left: 1em; list-style: none; font-size: .9em; }
td.num, td.nowrap { white-space: nowrap; }
ol.steps li { color: var(--muted); }
ol.steps li.current { color: var(--ink); font-weight: 600; }
.stuck { color: var(--reserved); font-weight: 600; }
.funnel td.barcell { width: 45%; }
.funnel .fbar { height: 10px; background: var(--spent); border-radius: 3px; min-width: 1px; }
footer { padding: 0 1.5em 1.5em; color: var(--muted); font-size: .85em; }
code { background: #f1f3f5; padding: 0 .3em; border-radius: 3px; }
"""

DASHBOARD_JS = r"""
"use strict";
// The status page: polls /dashboard/data and draws it. Text goes in with textContent only
// (provider names come from the market); amounts arrive formatted by the server.
const SVG = "http://www.w3.org/2000/svg";
let refreshMs = 2000, timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString([], {hour12: false}) : "";
}

function ago(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const m = Math.floor(seconds / 60), s = seconds % 60, h = Math.floor(m / 60);
  return h ? `${h}h ${m % 60}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function budgetBar(cluster) {
  const shown = cluster.budget_shown, f = cluster.budget_fractions;
  const box = el("div", {"class": "budget"});
  const bar = svg("svg", {"class": "bar", viewBox: "0 0 1000 16", preserveAspectRatio: "none", role: "img"});
  let x = 0;
  for (const part of ["spent", "reserved", "remaining"]) {
    const w = Math.max(0, Math.min(1000 - x, f[part] * 1000));
    const rect = svg("rect", {"class": part, x: x, y: 0, width: w, height: 16});
    rect.append(svg("title", {}, `${shown[part]} ${part}`));
    bar.append(rect);
    x += w;
  }
  box.append(bar);
  const legend = el("div", {"class": "legend"});
  for (const part of ["spent", "reserved", "remaining"]) {
    legend.append(el("span", {}, el("i", {"class": "swatch " + part}),
      el("b", {"data-role": "budget-" + part, "data-exact": cluster.budget[part]}, shown[part]), " " + part));
  }
  legend.append(el("span", {}, "of ", el("b", {"data-role": "budget-total", "data-exact": cluster.budget.total_budget},
                                        shown.total_budget)));
  legend.append(el("span", {}, "burn rate up to ",
    el("b", {"data-role": "burn-rate", "data-exact": cluster.budget.burn_rate_per_hour}, shown.burn_rate_per_hour)));
  box.append(legend);
  if (shown.note) box.append(el("div", {"class": "muted"}, shown.note));
  if (cluster.budget.warning) box.append(el("div", {"class": "warn", "data-role": "budget-warning"}, cluster.budget.warning));
  return box;
}

function spendChart(cluster, now) {
  const spending = cluster.spending, points = spending.points;
  const W = 640, H = 180, L = 92, R = 12, T = 12, B = 26;
  const chart = svg("svg", {"class": "spend", viewBox: `0 0 ${W} ${H}`, role: "img",
                            "data-points": points.length});
  chart.append(svg("title", {}, `Spending of ${cluster.name} over time`));
  const t0 = spending.start || (points.length ? points[0].at : now);
  const t1 = Math.max(now, t0 + 1);
  const ymax = Math.max(1e-18, ...points.map(p => Number(p.spent)));
  const X = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const Y = v => H - B - v / ymax * (H - B - T);
  chart.append(svg("line", {"class": "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}));
  chart.append(svg("line", {"class": "axis", x1: L, y1: T, x2: L, y2: H - B}));
  chart.append(svg("text", {x: L - 6, y: T + 4, "text-anchor": "end"}, points.length ? points[points.length - 1].shown : "0 GLM"));
  chart.append(svg("text", {x: L - 6, y: H - B, "text-anchor": "end"}, "0"));
  chart.append(svg("text", {x: L, y: H - 8}, clock(t0)));
  chart.append(svg("text", {x: W - R, y: H - 8, "text-anchor": "end"}, clock(t1)));
  let path = `M ${X(t0)} ${Y(0)}`, last = 0;
  for (const p of points) {
    path += ` L ${X(p.at)} ${Y(last)} L ${X(p.at)} ${Y(Number(p.spent))}`;
    last = Number(p.spent);
  }
  path += ` L ${X(t1)} ${Y(last)}`;
  chart.append(svg("path", {"class": "line", d: path}));
  for (const p of points) {
    const dot = svg("circle", {"class": "point", cx: X(p.at), cy: Y(Number(p.spent)), r: 3.5,
                               "data-spent": p.spent});
    dot.append(svg("title", {}, `${clock(p.at)}: ${p.shown} spent (${p.kind.replace("_", " ")})`));
    chart.append(dot);
  }
  if (!points.length) chart.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "nothing paid yet"));
  return chart;
}

const openSteps = new Set();  // nodes whose step list the user opened: kept open across refreshes

function stepList(node, now) {
  // The latest step as the summary (a pending node: since when); every numbered step inside.
  const box = el("details", {"class": "steps", "data-node": node.node_id});
  box.open = node.state === "pending" || openSteps.has(node.node_id);
  box.addEventListener("toggle", () => box.open ? openSteps.add(node.node_id) : openSteps.delete(node.node_id));
  const last = node.steps[node.steps.length - 1];
  const summary = el("summary", {}, last ? last.text : "waiting to start");
  if (last && node.state === "pending" && last.at) {
    summary.append(el("span", {"class": "stuck", "data-role": "since"}, ` since ${clock(last.at)} (${ago(now - last.at)})`));
  }
  box.append(summary);
  const list = el("ol", {"class": "steps"});
  node.steps.forEach((step, i) => {
    const item = el("li", {"class": i === node.steps.length - 1 ? "current step" : "step"}, step.text);
    if (step.at) item.append(el("span", {"class": "muted"}, " " + clock(step.at)));
    list.append(item);
  });
  box.append(list);
  return box;
}

function nodesTable(cluster, now) {
  const table = el("table", {"class": "nodes"});
  table.append(el("thead", {}, el("tr", {}, ...["node", "type", "state", "provider", "start", "cpu/h", "env/h",
    "runtime", "cost", "steps"].map(h => el("th", {"class": ["cost", "runtime"].includes(h) ? "num" : null}, h)))));
  const body = el("tbody");
  for (const n of cluster.nodes) {
    body.append(el("tr", {"class": "node", "data-node": n.node_id, "data-state": n.state},
      el("td", {}, n.node_id), el("td", {}, n.node_type),
      el("td", {}, el("span", {"class": "state " + n.state}, n.state)),
      el("td", {title: n.provider_id || ""}, n.provider_name || n.provider_id || "–"),
      el("td", {}, n.prices.start || ""), el("td", {}, n.prices.cpu_per_hour || ""),
      el("td", {}, n.prices.env_per_hour || ""), el("td", {"class": "num"}, n.runtime),
      el("td", {"class": "num", "data-role": "node-cost", "data-exact": n.cost}, n.cost_shown),
      el("td", {}, stepList(n, now), n.error ? el("div", {"class": "bad"}, n.error) : null)));
  }
  table.append(body);
  table.append(el("tfoot", {}, el("tr", {}, el("td", {colspan: 8}, "total"),
    el("td", {"class": "num", "data-role": "cluster-cost", "data-exact": cluster.cost}, cluster.cost_shown),
    el("td", {"class": "muted"}, cluster.cost_note || ""))));
  return table;
}

function funnelBox(funnel) {
  const box = el("div", {"class": "funnel"});
  box.append(el("h3", {}, "Market funnel: " + (funnel.node_types.join(", ") || "node type")));
  const max = Math.max(1, ...funnel.funnel.map(s => s.count));
  const table = el("table");
  for (const stage of funnel.funnel) {
    const bar = el("div", {"class": "fbar"});
    bar.style.width = `${stage.count / max * 100}%`;
    table.append(el("tr", {"data-stage": stage.stage}, el("td", {}, stage.stage),
      el("td", {"class": "num", "data-role": "stage-count"}, stage.count), el("td", {"class": "barcell"}, bar)));
  }
  box.append(table);
  if (funnel.errors.length) {
    box.append(el("h3", {}, "Negotiation errors"));
    const errors = el("table", {"class": "errors"});
    for (const e of funnel.errors) errors.append(el("tr", {}, el("td", {}, e.reason), el("td", {"class": "num"}, e.count)));
    box.append(errors);
  }
  return box;
}

function clusterCard(cluster, now) {
  const card = el("article", {"class": "card cluster", "data-cluster": cluster.name});
  const counts = Object.entries(cluster.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ");
  card.append(el("h2", {}, cluster.name, " ", el("span", {"class": "state " + cluster.state}, cluster.state),
    el("span", {"class": "counts muted"}, el("b", {"data-role": "live-nodes"}, cluster.live_nodes),
       " live node" + (cluster.live_nodes === 1 ? "" : "s") + (counts ? ` (${counts})` : ""))));
  if (cluster.budget) card.append(el("h3", {}, "Budget ", el("span", {"class": "muted"}, "(this run)")), budgetBar(cluster));
  card.append(el("h3", {}, "Spending over time ", el("span", {"class": "muted"}, "(every run of this cluster)")),
              spendChart(cluster, now));
  card.append(el("h3", {}, "Nodes"), nodesTable(cluster, now));
  for (const funnel of cluster.funnels) card.append(funnelBox(funnel));
  return card;
}

function providersTable(providers) {
  if (!providers.length) return el("p", {"class": "muted"}, "No providers known yet.");
  const table = el("table");
  table.append(el("thead", {}, el("tr", {}, ...["provider", "name", "our nodes", "score", "success", "uptime",
    "blocked"].map(h => el("th", {}, h)))));
  const fmt = v => v === null || v === undefined ? "" : Number(v).toFixed(3);
  for (const p of providers) {
    const blocked = p.blocked ? `yes${p.blocked_until ? " until " + p.blocked_until : ""}${p.reason ? ": " + p.reason : ""}` : "no";
    table.append(el("tr", {"class": p.blocked ? "bad" : null, "data-provider": p.node_id}, el("td", {}, p.node_id),
      el("td", {}, p.name || ""), el("td", {}, p.nodes.join(", ")), el("td", {}, fmt(p.score)), el("td", {}, fmt(p.success_rate)), el("td", {}, fmt(p.uptime)), el("td", {}, blocked)));
  }
  return table;
}

function render(data) {
  const now = data.generated_at, ws = data.webserver;
  document.getElementById("server").textContent =
    `${ws.version} · ${ws.state} · ${ws.network} network (${ws.yagna}) · up ${ws.uptime} · ${ws.url}`;
  const warnings = document.getElementById("warnings");
  warnings.replaceChildren(...data.warnings.map(w => el("div", {"class": "warn server-warning"}, w)));
  const clusters = document.getElementById("clusters");
  clusters.replaceChildren(...(data.clusters.length ? data.clusters.map(c => clusterCard(c, now))
    : [el("p", {"class": "card muted"}, "No clusters yet: `ray up` one.")]));
  document.getElementById("providers").replaceChildren(providersTable(data.providers));
  const updated = document.getElementById("updated");
  updated.textContent = "Updated " + clock(now);
  updated.setAttribute("data-generated-at", String(now));
}

async function refresh() {
  try {
    const response = await fetch("/dashboard/data", {credentials: "same-origin", cache: "no-store"});
    if (response.status === 401) {
      document.getElementById("updated").textContent =
        "Signed out (the webserver restarted or the session expired): run `ray-on-golem dashboard` again.";
      return;
    }
    const data = await response.json();
    refreshMs = (data.refresh_s || 2) * 1000;
    render(data);
  } catch (e) {
    document.getElementById("updated").textContent = "The webserver does not answer (stopped?): " + e;
  }
  timer = setTimeout(refresh, refreshMs);
}

document.addEventListener("DOMContentLoaded", refresh);
"""


class WebserverHandler:
    """The webserver's routes, in the style of `http.server`: one coroutine method per route.

    Each takes the Request and returns a JSON-able dict (sent as 200) or raises a
    RayOnGolemError (sent as its http_status with `{"error": message}`). A later
    section adds a route by adding a method and a row to ROUTES.
    """

    ROUTES = (
        ("GET", "/status", "status"),
        ("GET", "/wallet", "wallet"),
        ("POST", "/shutdown", "shutdown"),
        # Node routes (section 7): what GolemNodeProvider and GolemCommandRunner call.
        ("GET", "/clusters", "list_clusters"),
        ("POST", "/clusters/{cluster}/nodes", "request_nodes"),
        ("GET", "/clusters/{cluster}/nodes", "list_nodes"),
        ("GET", "/clusters/{cluster}/nodes/{node}", "node_data"),
        ("DELETE", "/clusters/{cluster}/nodes/{node}", "terminate_node"),
        ("POST", "/clusters/{cluster}/nodes/{node}/tags", "set_node_tags"),
        ("POST", "/clusters/{cluster}/autostop", "set_autostop"),
        # `ray-on-golem cleanup` (section 7, LeftoverRentals): `{"dry_run": bool}`.
        ("POST", "/cleanup", "cleanup"),
        # Payments (section 7): per node provider, prices, runtime and cost; `?cluster=NAME`.
        ("GET", "/costs", "costs"),
        # The status page (Dashboard): /login and the GET /dashboard routes admit its session cookie too.
        ("POST", "/dashboard/login-codes", "dashboard_login_code"),
        ("GET", "/login", "dashboard_login"),
        ("GET", "/dashboard", "dashboard_page"),
        ("GET", "/dashboard/app.js", "dashboard_script"),
        ("GET", "/dashboard/app.css", "dashboard_style"),
        ("GET", "/dashboard/data", "dashboard_data"),
    )

    def __init__(self, server: "Webserver", clusters: "ClusterService"):
        self.server = server  # status, wallet, shutdown
        self.clusters = clusters  # node routes (commands: its `commands`) and costs (its `payments`)

    async def status(self, request: Request) -> dict:
        return self.server.status()

    async def wallet(self, request: Request) -> dict:
        return await self.server.wallet_status()

    async def shutdown(self, request: Request) -> dict:
        body = request.fields({"force": (bool, False), "keep_clusters": (bool, False)})
        return self.server.request_shutdown(force=body["force"], keep_clusters=body["keep_clusters"])

    # -- node routes (section 7) ------------------------------------------------------

    def _node(self, request: Request) -> "ClusterNode":
        return self.clusters.node(request.params["cluster"], request.params["node"])

    async def list_clusters(self, request: Request) -> dict:
        return {"clusters": self.clusters.counts()}

    async def request_nodes(self, request: Request) -> dict:
        # `local` is taken and ignored: earlier versions' provider sent it (a head's autoscaler brought
        # up before an upgrade still does, to the upgraded webserver that re-adopted its cluster).
        body = request.fields({
            "provider_parameters": (dict, {}), "node_config": (dict, {}), "tags": (dict, {}),
            "count": (int, 1), "resources": (dict, {}), "labels": (dict, {}), "local": (dict, None),
            "requestor_versions": (dict, None),
        })  # fmt: skip
        if not 1 <= body["count"] <= 100:
            raise UsageError(f"count: expected 1..100 nodes, got {body['count']}")
        if not all(isinstance(v, str) for v in body["tags"].values()):
            raise UsageError("tags: values must be strings")
        nodes = await self.clusters.request_nodes(
            request.params["cluster"], body["provider_parameters"], body["node_config"], body["tags"],
            body["count"], body["resources"], body["labels"], body["requestor_versions"])
        return {"nodes": [node.as_dict() for node in nodes]}

    async def set_autostop(self, request: Request) -> dict:
        body = request.fields({"idle_minutes": (float, None), "down": (bool, True), "cancel": (bool, False)})
        if body["cancel"] == (body["idle_minutes"] is not None):
            raise UsageError("idle_minutes: give it, or cancel: true (not both)")
        return {"cluster": request.params["cluster"],
                "autostop": self.clusters.set_autostop(request.params["cluster"], body["idle_minutes"], body["down"])}

    async def cleanup(self, request: Request) -> dict:
        body = request.fields({"dry_run": (bool, False)})
        return await self.clusters.cleanup(body["dry_run"])

    async def list_nodes(self, request: Request) -> dict:
        """Non-terminated nodes; `?tag.KEY=VALUE` filters (a node must have every key with that value)."""
        tag_filter = {k[4:]: v for k, v in request.query_params().items() if k.startswith("tag.")}
        nodes = self.clusters.list_nodes(request.params["cluster"], tag_filter)
        return {"nodes": [node.as_dict() for node in nodes]}

    async def node_data(self, request: Request) -> dict:
        return self._node(request).as_dict()

    async def terminate_node(self, request: Request) -> dict:
        node = await self.clusters.terminate(request.params["cluster"], request.params["node"])
        return node.as_dict()

    async def set_node_tags(self, request: Request) -> dict:
        body = request.fields({"tags": (dict, None)})
        if body["tags"] is None or not all(isinstance(v, str) for v in body["tags"].values()):
            raise UsageError("tags: expected an object of string values")
        return self.clusters.set_tags(request.params["cluster"], request.params["node"], body["tags"]).as_dict()

    async def costs(self, request: Request) -> dict:
        return self.clusters.payments.costs(request.query_params().get("cluster") or None)

    # -- the status page (Dashboard) ----------------------------------------------------

    async def dashboard_login_code(self, request: Request) -> dict:
        request.fields({})
        return self.server.dashboard.login_code()

    async def dashboard_login(self, request: Request) -> Response:
        return self.server.dashboard.login(request)

    async def dashboard_page(self, request: Request) -> Response:
        return self.server.dashboard.page()

    async def dashboard_script(self, request: Request) -> Response:
        return self.server.dashboard.script()

    async def dashboard_style(self, request: Request) -> Response:
        return self.server.dashboard.style()

    async def dashboard_data(self, request: Request) -> dict:
        return self.server.dashboard.data()



# Request headers: no control characters but tab (NUL, CR, ...); these may come once (a repeat with
# another value is a 400: two parsers could read different bodies or identities).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SINGLE_HEADERS = ("content-length", "transfer-encoding", "host")
UNAUTHORIZED_MESSAGE = ("missing or wrong bearer token: send `Authorization: Bearer <token>` with the token "
                        f"in the webserver's data dir ({WEBSERVER_TOKEN_FILE})")


class HttpTransport:
    """The webserver's HTTP/1.1 side, as the local network's HttpServer: keep-alive connections, one
    request parser, one response writer, one error exit (`send_error`, in the style of http.server),
    and a reaper for idle or slow clients. Each parsed Request goes to `dispatch`, a coroutine
    returning `(status, JSON payload, extra headers)`.

    golem_localnet.py keeps its own copy (it reads line by line and takes chunked bodies; the two files
    never import each other); tests/test_http_core.py runs one table of requests against both and keeps
    them answering alike.
    """

    def __init__(self, dispatch, host: str, port: int, authorized=None):
        self.dispatch = dispatch
        # (request head, body not read yet) -> bool, asked before any body byte is read: a stranger's
        # body is never read.
        self.authorized = authorized
        self.host, self.port = host, port
        self.closing = False  # once set, every answer closes its connection
        self._server = None
        # writer -> (timeout, since) while waiting for the client, None while handling a request.
        self._connections: dict = {}
        self._reaper = None

    async def start(self) -> int:
        """Bind and serve; the bound port (`port` 0 picks a free one). ServiceUnavailable if it cannot bind."""
        import asyncio

        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self.host, self.port, limit=MAX_REQUEST_HEAD, backlog=512
            )
        except OSError as e:
            raise ServiceUnavailable(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        self._reaper = asyncio.get_running_loop().create_task(self._reap_connections())
        return self.port

    def begin_close(self) -> None:
        """From now on every answer closes its connection (a shutdown has begun)."""
        self.closing = True

    def close(self) -> None:
        """Stop taking connections and close the open ones."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        if self._reaper is not None:
            self._reaper.cancel()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader, writer) -> None:
        """Serve one keep-alive connection: read a request, dispatch it, answer; repeat."""
        import asyncio

        connections, clock = self._connections, asyncio.get_running_loop().time
        if len(connections) >= MAX_CONNECTIONS:
            try:
                await self.send_error(writer, 503, f"too many connections (at most {MAX_CONNECTIONS})")
            except ConnectionError:
                pass
            writer.close()
            return
        try:
            while True:
                # Timeouts are the reaper's job (one task, not a timer per request): see _reap_connections.
                connections[writer] = (KEEPALIVE_IDLE_TIMEOUT, clock())
                try:
                    parsed = await self._read_request(reader, writer, lambda: connections.__setitem__(
                        writer, (REQUEST_READ_TIMEOUT, clock())))
                except RayOnGolemError as e:
                    await self.send_error(writer, e.http_status, str(e))
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # client went away or was reaped
                if parsed is None:
                    return
                request, keep_alive = parsed
                connections[writer] = None  # handling: never reaped
                status, payload, headers = await self.dispatch(request)
                keep_alive = keep_alive and not self.closing
                await self._respond(writer, status, payload, keep_alive, headers)
                if not keep_alive:
                    return
        except ConnectionError:
            pass
        finally:
            connections.pop(writer, None)
            writer.close()

    async def _reap_connections(self) -> None:
        """Close connections idle past KEEPALIVE_IDLE_TIMEOUT or slower than REQUEST_READ_TIMEOUT to send a request."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = loop.time()
            for writer, waiting in list(self._connections.items()):
                if waiting is not None and now - waiting[1] > waiting[0]:
                    writer.close()

    async def _read_request(self, reader, writer, started) -> tuple[Request, bool] | None:
        """Parse one request (None: the client closed between requests); `started()` once its head came
        (the body must then come within REQUEST_READ_TIMEOUT, the head within KEEPALIVE_IDLE_TIMEOUT).

        The checks, in order: request line (414, 400, version), header lines (431, 400: control
        characters, a repeated Content-Length that differs or a second Authorization), the body's framing
        (Content-Length only: chunked is a 400 here), the size (413) and the token (401), both before
        any body byte is read. The head is read in one piece (one await: status polls stay cheap).
        """
        import asyncio

        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            data = await reader.read(MAX_REQUEST_HEAD)  # what the stream buffered: tell 414 from 431
            if len(data.split(b"\n", 1)[0]) > MAX_REQUEST_LINE:
                raise BadRequestHead("request line too long", 414) from None
            raise BadRequestHead("request head too large", 431) from None
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None
        started()
        lines = head[:-4].decode("latin-1").split("\r\n")
        if len(lines[0]) > MAX_REQUEST_LINE:
            raise BadRequestHead("request line too long", 414)
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise BadRequestHead("malformed request line") from None
        if (version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/") or not method
                or _CONTROL_CHARACTERS.search(target)):
            raise BadRequestHead("malformed request line")
        if len(lines) > MAX_REQUEST_HEADERS + 1 or any(len(line) > MAX_REQUEST_LINE for line in lines):
            raise BadRequestHead("request head too large", 431)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name or _CONTROL_CHARACTERS.search(line):
                raise BadRequestHead("malformed header line")
            name, value = name.lower(), value.strip()
            if name in headers:
                if name in _SINGLE_HEADERS and headers[name] != value or name == "authorization":
                    raise BadRequestHead(f"conflicting {name} headers")
                value = headers[name] if name in _SINGLE_HEADERS else f"{headers[name]}, {value}"
            headers[name] = value
        if "transfer-encoding" in headers:
            raise BadRequestHead("chunked request bodies are not supported: send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or not length_text.isascii():
            raise BadRequestHead("malformed Content-Length")
        length = int(length_text)
        if length > MAX_REQUEST_BODY:
            raise PayloadTooLarge(f"request body over {MAX_REQUEST_BODY} bytes")
        if self.authorized is not None and not self.authorized(Request(method, target, version, headers, b"")):
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this before a large body
        body = await reader.readexactly(length) if length else b""
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        return Request(method, target, version, headers, body), keep_alive

    async def send_error(self, writer, status: int, message: str, headers: dict | None = None) -> None:
        """The one error exit of the parser: a JSON `{"error": message}` and the connection closes."""
        await self._respond(writer, status, {"error": message}, False, headers)

    @staticmethod
    async def _respond(writer, status: int, payload, keep_alive: bool, headers: dict | None = None) -> None:
        import json
        from http import HTTPStatus

        if isinstance(payload, Response):  # the status page's HTML, script, redirect
            status, body, content_type, extra = payload.status, payload.body, payload.content_type, payload.headers
        else:
            body, content_type, extra = json.dumps(payload).encode(), "application/json", []
        head = [f"HTTP/1.1 {status} {_REASONS.get(status) or HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", *extra]  # fmt: skip
        if not keep_alive:
            head.append("Connection: close")
        if status == 401:
            head.append("WWW-Authenticate: Bearer")
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()


class IdleShutdown:
    """`start --idle-timeout`: the webserver stops after this long without a live node.

    Fed the live node count once a second (`observe`); it stops the webserver the way
    `ray-on-golem stop` does, which stops yagna or the local network only if it started it.
    """

    def __init__(self, idle_timeout_s: float | None, now: float):
        self.idle_timeout_s = idle_timeout_s
        self.idle_since: float | None = now  # a new webserver has no cluster yet

    def observe(self, live_nodes: int, now: float) -> bool:
        """True when the webserver should stop now."""
        if live_nodes:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        return self.idle_timeout_s is not None and now - self.idle_since >= self.idle_timeout_s

    def remaining(self, now: float) -> float | None:
        if self.idle_timeout_s is None or self.idle_since is None:
            return None
        return max(0.0, self.idle_since + self.idle_timeout_s - now)

    def as_dict(self, now: float, live_nodes: int) -> dict:
        """For `status`: with live nodes there is no time left to show, whatever the last tick saw."""
        return {"idle_timeout_s": self.idle_timeout_s, "idle_since": None if live_nodes else self.idle_since,
                "remaining_s": None if live_nodes else self.remaining(now)}


class Webserver:
    """The long-running service: owns yagna, serves the routes, shuts down gracefully.

    Everything long-running (golem-core is asyncio) lives in this event loop:
    `run()` binds 127.0.0.1, then brings yagna up while already answering
    `status` (state `starting`), so `start` can tell a slow yagna from a dead webserver.
    Its constructor builds its parts (see docs/internals.md, "Object graph"): the yagna
    service, the Store (this process's one sqlite connection), the cluster service, the
    route handler and the HTTP transport.
    """

    handler_class = WebserverHandler

    def __init__(self, datadir: str, port: int = DEFAULT_WEBSERVER_PORT, network: str = "local",
                 idle_timeout: float | None = None, local_network: dict | None = None):
        import time

        self.datadir = ensure_datadir(datadir)
        self.network = network
        self.state = "starting"  # starting -> running -> shutting_down
        self.warnings: list[str] = []
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.redactor = _SecretRedactor()
        self.yagna = YagnaService(network, self.datadir, local_network=local_network)
        self.store = Store(self.datadir)
        self.cluster_service = ClusterService(network, self.store, self.yagna, lambda: self.state)
        self.router = Router(self.handler_class.ROUTES)
        self.handler = self.handler_class(self, self.cluster_service)
        self.dashboard = Dashboard(self, self.cluster_service, self.store)
        self.transport = HttpTransport(self._dispatch, WEBSERVER_HOST, port, self._authorized)
        self.exit_code = 0
        self._token = b""
        self._stopped = None  # asyncio.Event, set when shutdown is complete
        self._run_lock_fd: int | None = None
        self._watcher = None
        self._bring_up_task = None
        self.keep_clusters = False  # `stop --keep-clusters`: the clusters outlive this process
        self._log = None
        self.idle_shutdown = IdleShutdown(idle_timeout, time.time())
        self._idle_watcher = None

    @property
    def port(self) -> int:
        return self.transport.port

    # -- status and shutdown (used by the route methods) ------------------------

    def uptime(self) -> float:
        import time

        return round(time.monotonic() - self._started_monotonic, 3)

    def clusters(self) -> dict[str, dict[str, int]]:
        return self.cluster_service.node_counts()

    def live_nodes(self) -> int:
        """Nodes that still hold an agreement: everything not `terminated`."""
        return sum(n for counts in self.clusters().values() for state, n in counts.items() if state != "terminated")

    def status(self) -> dict:
        return {
            "version": __version__,
            "state": self.state,
            "shutting_down": self.state == "shutting_down",
            "datadir": self.datadir,
            "url": f"http://{WEBSERVER_HOST}:{self.port}",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": self.uptime(),
            "yagna": self.yagna.info(),
            "clusters": self.clusters(),
            # Payments (section 7): spent, reserved, remaining and burn rate per cluster.
            "budgets": self.cluster_service.payments.budgets(),
            # The heads' SSH tunnels: back to this webserver, and the local forwards (section 7, SSHTunnel).
            "tunnels": self.cluster_service.tunnels(),
            # Autostop (section 7): each cluster's setting and time to go.
            "autostop": self.cluster_service.autostop.report(),
            # `start --idle-timeout`: the setting and the time left without a cluster.
            "idle_shutdown": self.idle_shutdown.as_dict(time.time(), self.live_nodes()),
            "warnings": self.yagna.warnings + self.warnings,
        }

    async def wallet_status(self) -> dict:
        """The requestor's identity (wallet address), platform, payment accounts and allocations."""
        import asyncio

        if self.state == "starting":
            raise ServiceUnavailable(f"{self.yagna.kind} is still starting")
        result = {
            "payment_network": self.network,
            "payment_platform": self.yagna.payment_platform,
            "wallet_address": self.yagna.identity,
            "accounts": [],
            "allocations": [],
            "balance": None,
            "errors": [],
        }
        for key, path in (("accounts", "/payment-api/v1/requestorAccounts"), ("allocations", "/payment-api/v1/allocations")):
            try:
                result[key] = await asyncio.to_thread(self.yagna.get, path)
            except RayOnGolemError as e:
                result["errors"].append(str(e))
        if self.yagna.kind == "yagna":
            # Balances come only from the chain (`yagna payment status`); offline it
            # fails with "Server is unreachable" (docs/yagna-behaviour.md §5) and we say so.
            try:
                import json

                out = await asyncio.to_thread(
                    self.yagna.yagna_cli, "payment", "status", "--network", self.network, "--json"
                )
                result["balance"] = json.loads(out)
            except (RayOnGolemError, ValueError) as e:
                result["errors"].append(str(e))
        return result

    def request_shutdown(self, force: bool = False, keep_clusters: bool = False) -> dict:
        """Start a graceful shutdown; a 409 while nodes live unless `force` (which terminates them
        first) or `keep_clusters` (which leaves them, and the daemon, to the next webserver)."""
        import asyncio

        if force and keep_clusters:
            raise UsageError("keep_clusters: not together with force")
        if self.state == "shutting_down":
            return {"shutdown": "already_shutting_down", "live_nodes": self.live_nodes()}
        live = self.live_nodes()
        if keep_clusters:
            self._log.info("shutdown requested, clusters kept (live nodes: %d)", live)
            asyncio.get_running_loop().create_task(self.shutdown(keep_clusters=True))
            return {"shutdown": "will_shutdown_keeping_clusters", "live_nodes": live}
        if live and not force:
            per_cluster = {name: sum(n for state, n in counts.items() if state != "terminated")
                           for name, counts in sorted(self.clusters().items())}  # fmt: skip
            where = ", ".join(f"{name} ({n})" for name, n in per_cluster.items() if n)
            raise Conflict(f"{live} live node(s) in cluster(s) {where}; a forced shutdown terminates them")
        self._log.info("shutdown requested%s (live nodes: %d)", " with force" if force else "", live)
        asyncio.get_running_loop().create_task(self.shutdown(force))
        return {"shutdown": "forced_shutdown" if force else "will_shutdown", "live_nodes": live}

    async def shutdown(self, force: bool = False, keep_clusters: bool = False) -> None:
        """End the clusters, stop taking requests, stop yagna if ours; then `run()` returns.
        With `keep_clusters` the clusters and the daemon stay, and webserver.json stays as the
        record the next webserver adopts them from (as after a crash)."""
        import asyncio

        if self.state == "shutting_down":
            return
        self.state = "shutting_down"
        self.keep_clusters = keep_clusters
        self.transport.begin_close()
        self.yagna.cancel_start()
        await asyncio.sleep(0)  # let the response to POST /shutdown go out first
        try:
            if keep_clusters:
                await self.cluster_service.detach()
            else:
                await self.cluster_service.shutdown(force)
        except Exception:  # noqa: BLE001 - a failure here must not keep yagna alive
            self._log.exception("ending the clusters failed")
        self.transport.close()
        starting = self._bring_up_task
        if starting is not None and starting is not asyncio.current_task() and not starting.done():
            await asyncio.wait([starting])  # returns promptly: _wait_ready sees `cancelled`
        if keep_clusters:
            self._log.info("%s left running for the clusters", self.yagna.kind)
        else:
            outcome = await asyncio.to_thread(self.yagna.stop)
            self._log.info("%s: %s", self.yagna.kind, outcome)
        self._stopped.set()

    # -- process lifecycle ---------------------------------------------------------

    def _take_run_lock(self) -> None:
        """One webserver per data dir: an flock held for the process lifetime (released by the kernel on death)."""
        import fcntl

        fd = os.open(os.path.join(self.datadir, WEBSERVER_RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_pidfile(self.datadir)
            owner = f" (pid {pid[0]})" if pid else ""
            raise Conflict(f"{RUN_LOCK_TAKEN} {self.datadir}{owner}") from None
        self._run_lock_fd = fd
        write_pidfile(self.datadir, os.getpid())  # only the lock holder writes it: it always names the owner

    def _write_runtime_files(self) -> None:
        import json

        write_pidfile(self.datadir, os.getpid())
        runtime = {"pid": os.getpid(), "port": self.port, "url": f"http://{WEBSERVER_HOST}:{self.port}",
                   "network": self.network, "started_at": self.started_at, "yagna": self.yagna.info(),
                   "yagna_pid_start_time": self.yagna.pid_start_time}  # fmt: skip
        write_secret_file(os.path.join(self.datadir, WEBSERVER_RUNTIME_FILE), json.dumps(runtime))

    def _remove_runtime_files(self, keep_runtime: bool = False) -> None:
        pid = read_pidfile(self.datadir)
        if pid and pid[0] == os.getpid():
            for name in (WEBSERVER_PID_FILE,) + (() if keep_runtime else (WEBSERVER_RUNTIME_FILE,)):
                try:
                    os.unlink(os.path.join(self.datadir, name))
                except FileNotFoundError:
                    pass

    async def run(self) -> int:
        """Serve until shut down (route, SIGTERM or SIGINT); return the exit code."""
        import asyncio
        import signal

        self._log = setup_webserver_logging(self.datadir, self.redactor)
        self._take_run_lock()
        # Holding the run lock, any runtime file left is a dead webserver's.
        self.yagna.adopt_orphan(read_runtime(self.datadir))
        token = load_or_create_token(self.datadir)
        self.redactor.secrets.add(token)
        self._token = f"Bearer {token}".encode()
        self._stopped = asyncio.Event()
        try:
            await self.transport.start()
        except ServiceUnavailable:
            self._remove_runtime_files()  # the pidfile `start` wrote for us: no stale pointer left
            raise
        self._write_runtime_files()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.shutdown(force=True)))
        self._log.info("listening on http://%s:%d (pid %d, data dir %s)", WEBSERVER_HOST, self.port, os.getpid(), self.datadir)
        print(f"Ray on Golem webserver {__version__} listening on http://{WEBSERVER_HOST}:{self.port} (pid {os.getpid()}); "
              f"log: {os.path.join(self.datadir, WEBSERVER_LOG_FILE)}", flush=True)  # fmt: skip
        self._bring_up_task = loop.create_task(self._bring_up())
        await self._stopped.wait()
        await self.transport.wait_closed()
        self._remove_runtime_files(keep_runtime=self.keep_clusters)
        self.store.close()
        self._log.info("stopped, bye")
        return self.exit_code

    async def _bring_up(self) -> None:
        """Connect to or start the daemon (a blocking job, in a thread); then serve as `running`."""
        import asyncio

        try:
            await asyncio.to_thread(self.yagna.start)
        except RayOnGolemError as e:
            if self.state == "shutting_down":
                return  # cancelled by the shutdown, which stops what was started
            self._log.error("cannot start: %s", e)
            print(f"ray-on-golem: error: {e}", file=sys.stderr, flush=True)
            self.exit_code = e.exit_code
            await self.shutdown()
            return
        if self.state == "starting":
            self.redactor.secrets.add(self.yagna.app_key)
            self._write_runtime_files()
            self.state = "running"
            self._log.info("ready: %s at %s", self.yagna.kind, self.yagna.api_url)
            self._watcher = asyncio.get_running_loop().create_task(self._watch_yagna())
            self._idle_watcher = asyncio.get_running_loop().create_task(self._watch_idle())
            try:
                await self.cluster_service.recover()
            except Exception as e:  # noqa: BLE001 - the webserver serves; the next node request retries
                self._log.warning("releasing what a previous webserver left failed: %s", _describe_error(e))
            import gc

            # What start-up allocated lives as long as the process: out of the collector's sight,
            # a full collection no longer walks it (tens of ms of stall at the p99 otherwise).
            gc.freeze()

    async def _watch_idle(self) -> None:
        """`--idle-timeout`: with no live node for that long, shut down (as `ray-on-golem stop`)."""
        import asyncio

        while self.state == "running":
            await asyncio.sleep(1.0)
            if self.state == "running" and self.idle_shutdown.observe(self.live_nodes(), time.time()):
                self._log.info("no cluster for %s (--idle-timeout): stopping",
                               format_duration(self.idle_shutdown.idle_timeout_s))
                self.request_shutdown()
                return

    async def _watch_yagna(self) -> None:
        """Turn an early exit of our daemon into a status warning."""
        import asyncio

        while self.state == "running" and self.yagna.started_by_us and not self.yagna.stopped:
            await asyncio.sleep(1.0)
            if self.state == "running":
                self.yagna.check_exited()

    # -- requests ----------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        """The bearer token, checked before routing or reading a body: a stranger learns nothing."""
        import hmac

        # The status page's login route and, with its session cookie, its GET routes need no token.
        return ((bool(self._token) and hmac.compare_digest(request.headers.get("authorization", "").encode(), self._token))
                or self.dashboard.admits(request))

    async def _dispatch(self, request: Request) -> tuple[int, dict, dict | None]:
        """Route and call the handler (the transport checked the token); every failure becomes a
        JSON error, never a traceback."""
        try:
            name, request.params = self.router.match(request.method, request.path)
            return 200, await getattr(self.handler, name)(request), None
        except MethodNotAllowed as e:
            return e.http_status, {"error": str(e)}, {"Allow": ", ".join(e.allowed)}
        except RayOnGolemError as e:
            return e.http_status, {"error": str(e)}, None
        except RecursionError:  # json: a body nested deeper than the interpreter's recursion limit
            return 400, {"error": "request body is not valid JSON: nested too deeply"}, None
        except Exception:  # noqa: BLE001 - the client gets a message, the log gets the traceback
            self._log.exception("%s %s failed", request.method, request.path)
            return 500, {"error": f"internal error in {request.method} {request.path}; see {WEBSERVER_LOG_FILE}"}, None


###############################################################################
# 9. Daemon control ###########################################################
###############################################################################

WEBSERVER_START_LOCK = "webserver.lock"  # held by `start` from its check to readiness: one spawn at a time
WEBSERVER_OUT_FILE = "webserver.out"  # the webserver's stdout/stderr: what it says before logging is set up
WEBSERVER_START_TIMEOUT = 180.0  # covers a real yagna's start (~4 s offline, more on a busy machine)
WEBSERVER_STOP_TIMEOUT = 60.0
WEBSERVER_BIND_GRACE = 5.0  # a webserver holding its data dir answers within ms; this much before we call it hung
_HTTP_ERRORS = {400: UsageError, 401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 409: Conflict,
                413: PayloadTooLarge, 503: ServiceUnavailable}


class WebserverClient:
    """HTTP client of the webserver (CLI, node provider): bearer token from the data dir, one keep-alive connection."""

    def __init__(self, datadir: str | None = None, port: int | None = None, timeout: float = 10.0):
        self.datadir = datadir or default_datadir()
        self.port = port if port is not None else read_runtime(self.datadir).get("port", DEFAULT_WEBSERVER_PORT)
        self.url = f"http://{WEBSERVER_HOST}:{self.port}"
        self.timeout = timeout
        self._connection = None

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """Call a route; the webserver's `{"error": ...}` comes back as the matching RayOnGolemError."""
        # No token file yet: ask anyway. Nothing listening is ServiceUnavailable; a webserver
        # of another data dir answers 401, which `status` turns into a clear Conflict.
        token = read_token(self.datadir)
        if self._connection is None:
            self._connection = HTTPConnection(WEBSERVER_HOST, self.port, self.timeout)
        self._connection.timeout = timeout or self.timeout
        try:
            status, data = http_request(method, self.url + path, token=token, body=body, connection=self._connection)
        except ServiceUnavailable:
            self._connection = None
            raise ServiceUnavailable(f"no webserver answers on {self.url}") from None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else str(data)
            raise _HTTP_ERRORS.get(status, RayOnGolemError)(message or f"HTTP {status}")
        return data

    def status(self) -> dict | None:
        """The status route, or None when nothing answers."""
        try:
            return self.request("GET", "/status", timeout=3.0)
        except ServiceUnavailable:
            return None
        except Unauthorized:
            raise Conflict(f"the webserver on {self.url} does not accept the token in {self.datadir}: "
                           "it serves another data directory (use another --port)") from None  # fmt: skip

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _start_lock(datadir: str):
    """Context manager: an exclusive flock on `<datadir>/webserver.lock` (concurrent `start`s queue here)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        fd = os.open(os.path.join(datadir, WEBSERVER_START_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    return held()


def _failure_report(datadir: str, reason: str) -> str:
    lines = [f"Starting the webserver failed: {reason}"]
    for name in (WEBSERVER_LOG_FILE, WEBSERVER_OUT_FILE):
        tail = tail_lines(os.path.join(datadir, name), 20)
        if tail:
            lines.append(f"Last lines of {os.path.join(datadir, name)}:")
            lines.extend(f"    {line}" for line in tail)
    return "\n".join(lines)


def start_webserver(datadir: str, port: int, network: str, timeout: float = WEBSERVER_START_TIMEOUT, out=print,
                    idle_timeout: float | None = None, local_network: dict | None = None) -> int:
    """Spawn the webserver detached unless one already runs; wait until it serves. Returns the exit code."""
    import subprocess
    import time

    ensure_datadir(datadir)
    client = WebserverClient(datadir, port)
    with _start_lock(datadir):
        status = client.status()
        if status and status["state"] == "shutting_down":
            out("The webserver is shutting down; waiting for it to stop before starting a new one...")
            wait_process_exit(status["pid"], proc_start_time(status["pid"]), timeout)
            status = client.status()
        if status:
            out(f"Not starting the webserver, as it's already running on {client.url} (pid {status['pid']}).")
            if os.path.realpath(status["datadir"]) != os.path.realpath(datadir):
                out(f"Warning: its data directory is {status['datadir']}, not {datadir}.")
            if status["yagna"]["payment_network"] != network:
                out(f"Warning: it uses payment network `{status['yagna']['payment_network']}`, not `{network}`.")
            if status["state"] == "starting":  # another `start` spawned it: wait for it like that one does
                return _wait_running(client, None, datadir, timeout, out, pid=status["pid"])
            return EXIT_OK
        elsewhere = read_runtime(datadir).get("port")
        if elsewhere not in (None, port):
            other = WebserverClient(datadir, elsewhere).status()
            if other:
                out(f"A webserver for {datadir} already runs on http://{WEBSERVER_HOST}:{elsewhere} (pid {other['pid']}).")
                out(f"Stop it first (`ray-on-golem stop`) to start one on port {port}.")
                return EXIT_FAILED
        running = live_pid(datadir)
        if running:
            # A webserver that holds the data dir but does not answer yet is binding: give it a moment.
            status = _answer_within(client, running, WEBSERVER_BIND_GRACE)
            if status:
                out(f"Not starting the webserver, as it's already running on {client.url} (pid {running[0]}).")
                return _wait_running(client, None, datadir, timeout, out, pid=running[0])
            out(f"A webserver process (pid {running[0]}) runs but does not answer on {client.url}.")
            out("Stop it with `ray-on-golem stop --kill`, then start again.")
            return EXIT_FAILED
        cmd, env = python_module_command(
            "ray_on_golem", "webserver", "--port", str(port), "--network", network, "--datadir", datadir,
            *(("--idle-timeout", f"{idle_timeout:g}s") if idle_timeout is not None else ()),
            *local_network_args(local_network),
        )
        out(f"Starting webserver on {client.url}...")
        log = open_rotated_log(os.path.join(datadir, WEBSERVER_OUT_FILE), 1024 * 1024, backups=1)
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, close_fds=True, cwd=datadir,
            )  # fmt: skip
        finally:
            log.close()
        started = time.monotonic()
        code = _wait_running(client, process, datadir, timeout, out)
        if code == EXIT_OK:
            out(f"Starting webserver done in {time.monotonic() - started:.1f} s.")
        return code


def _wait_running(client: WebserverClient, process, datadir: str, timeout: float, out, pid: int | None = None) -> int:
    """Poll the status route until `running`; report the log tail if the process dies or time runs out.

    `process` is the child we spawned; else `pid` is a webserver someone else spawned.
    """
    import signal
    import time

    deadline = time.monotonic() + timeout
    start_time = proc_start_time(pid) if pid else None
    while True:
        if process is not None and process.poll() is not None:
            # Lost the race for the data dir to a webserver started by hand at the same moment: wait for that one.
            holder = _run_lock_holder(datadir, process.pid)
            if holder:
                out(f"Another webserver (pid {holder[0]}) took the data directory first; waiting for it.")
                process, pid, start_time = None, holder[0], holder[1]
                continue
            out(_failure_report(datadir, f"the webserver exited with code {process.returncode}"))
            return EXIT_FAILED
        if pid is not None and not process_alive(pid, start_time):
            out(_failure_report(datadir, f"the webserver (pid {pid}) exited while starting"))
            return EXIT_FAILED
        status = client.status()
        if status and status["state"] == "running":
            yagna = status["yagna"]
            out(f"Webserver is running on {client.url} (pid {status['pid']}); "
                f"{yagna['kind']} {yagna['version'] or ''} at {yagna['url']}.".replace("  ", " "))  # fmt: skip
            return EXIT_OK
        if time.monotonic() >= deadline:
            if process is not None:
                stop_process(process.pid, proc_start_time(process.pid), signal.SIGTERM, 10.0)
            out(_failure_report(datadir, f"no answer within {timeout:.0f} s"))
            return EXIT_FAILED
        time.sleep(0.02)


def _answer_within(client: WebserverClient, process: tuple[int, int | None], grace: float) -> dict | None:
    """Poll the status route for `grace` seconds while the process lives; its status or None."""
    import time

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process_alive(*process):
        status = client.status()
        if status:
            return status
        time.sleep(0.02)
    return None


def _run_lock_holder(datadir: str, our_child: int) -> tuple[int, int | None] | None:
    """The other webserver our child lost the run lock to (it said so in webserver.out), once its pidfile names it."""
    import time

    if not any(RUN_LOCK_TAKEN in line for line in tail_lines(os.path.join(datadir, WEBSERVER_OUT_FILE), 5)):
        return None
    deadline = time.monotonic() + WEBSERVER_BIND_GRACE
    while time.monotonic() < deadline:
        holder = live_pid(datadir)
        if holder and holder[0] != our_child:
            return holder
        time.sleep(0.02)
    return None


def _kill_leftovers(datadir: str, pid: int, start_time: int | None, out) -> None:
    """SIGKILL the webserver and the daemon it had started (from webserver.json): nothing may be left."""
    import signal

    runtime = read_runtime(datadir)
    how = stop_process(pid, start_time, signal.SIGKILL, 5.0)
    out(f"Process {pid} {'terminated' if how != 'gone' else 'was already gone'}.")
    yagna = runtime.get("yagna") or {}
    if runtime.get("pid") == pid and yagna.get("started_by_us") and yagna.get("pid"):
        ypid, ystart = yagna["pid"], runtime.get("yagna_pid_start_time")
        # SIGINT first: yagna closes its databases cleanly (docs/yagna-behaviour.md §5).
        if stop_process(ypid, ystart, signal.SIGINT, YAGNA_STOP_TIMEOUT) != "gone":
            out(f"Stopped the {yagna['kind']} it had started (pid {ypid}).")
    for name in (WEBSERVER_PID_FILE, WEBSERVER_RUNTIME_FILE):
        try:
            os.unlink(os.path.join(datadir, name))
        except FileNotFoundError:
            pass


def stop_webserver(datadir: str, port: int | None, force: bool, kill: bool,
                   timeout: float = WEBSERVER_STOP_TIMEOUT, out=print, keep_clusters: bool = False) -> int:  # fmt: skip
    """Graceful shutdown through the route; `kill` ends a process that does not answer or exit in time."""
    client = WebserverClient(datadir, port)
    pidfile = live_pid(datadir)
    status = client.status()
    if status is None:
        if pidfile and kill:
            out(f"No webserver answers on {client.url}; killing its process (pid {pidfile[0]}).")
            _kill_leftovers(datadir, pidfile[0], pidfile[1], out)
            return EXIT_OK
        if pidfile:
            out(f"No webserver answers on {client.url}, but its process runs (pid {pidfile[0]}).")
            out("Use `ray-on-golem stop --kill` to end it.")
            return EXIT_FAILED
        out(f"No webserver found on: {client.url}.")
        stale = read_pidfile(datadir)
        if stale:
            os.unlink(os.path.join(datadir, WEBSERVER_PID_FILE))
            out(f"Removed a stale pid file (pid {stale[0]} is not running).")
        return EXIT_OK
    pid = status["pid"]
    start_time = pidfile[1] if pidfile and pidfile[0] == pid else proc_start_time(pid)
    if status["shutting_down"]:
        out("The webserver is already shutting down.")
    else:
        out("Forcing webserver shutdown (terminating nodes, settling payments)..." if force
            else "Requesting webserver shutdown, leaving the clusters running..." if keep_clusters
            else "Requesting webserver shutdown...")  # fmt: skip
        try:
            client.request("POST", "/shutdown", {"force": force, "keep_clusters": keep_clusters})
        except Conflict as e:
            out(f"Cannot stop the webserver: {e}.")
            out("Use `ray-on-golem stop --force` to terminate them and settle payments first.")
            return EXIT_FAILED
        except ServiceUnavailable:
            pass  # it went away between status and shutdown: the wait below tells
    client.close()
    if wait_process_exit(pid, start_time, timeout):
        yagna = status["yagna"]
        if keep_clusters:
            out(f"Webserver stopped (pid {pid}); its clusters and the {yagna['kind']} they use are left running: "
                "`ray-on-golem start` re-adopts them.")
        elif yagna["started_by_us"]:
            out(f"Webserver stopped (pid {pid}), and the {yagna['kind']} it had started (pid {yagna['pid']}).")
        else:
            out(f"Webserver stopped (pid {pid}); {yagna['kind']} at {yagna['url']} left running (started externally).")
        return EXIT_OK
    if kill:
        out(f"The webserver did not exit within {timeout:.0f} s.")
        _kill_leftovers(datadir, pid, start_time, out)
        return EXIT_OK
    out(f"The webserver is still running (pid {pid}) after {timeout:.0f} s. Use `ray-on-golem stop --kill` to end it.")
    return EXIT_FAILED


def webserver_status(datadir: str, port: int | None) -> dict:
    """What `status` shows: the status route if it answers, else what the pidfile says and what a
    webserver that died (kill -9) left running."""
    client = WebserverClient(datadir, port)
    status = client.status()
    report = {"running": status is not None, "url": client.url, "datadir": datadir, "webserver": status}
    if status is None:
        stale = read_pidfile(datadir)
        alive = live_pid(datadir)
        report["pid"] = alive[0] if alive else None
        report["stale_pidfile"] = stale[0] if stale and not alive else None
        report["left_running"] = left_running(datadir)
    else:
        report["pid"] = status["pid"]
        if status.get("yagna", {}).get("kind") == "localnet":
            report["localnet_isolation"] = localnet_isolation(datadir)
    return report


def localnet_isolation(datadir: str) -> dict | None:
    """How the local network of this data dir makes its nodes (its localnet.json): `namespaces`
    (VM-like machines) or `sandbox` (shared loopback), and why when it fell back."""
    import json

    try:
        with open(os.path.join(datadir, "localnet", "localnet.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return {"mode": state.get("isolation") or "sandbox", "reason": state.get("isolation_reason")}


def left_running(datadir: str) -> dict | None:
    """What a webserver that is gone left behind: the daemon it started (from `webserver.json`, if that
    process still runs, with a probe of its API) and the rentals the store has not seen ended, each
    with its state on that daemon when it answers. None if nothing is left."""
    runtime = read_runtime(datadir)
    daemon_info = runtime.get("yagna") or {}
    daemon = None
    if daemon_info.get("started_by_us") and process_alive(int(daemon_info.get("pid") or 0),
                                                          runtime.get("yagna_pid_start_time")):
        daemon = {"kind": daemon_info.get("kind"), "pid": daemon_info["pid"], "url": daemon_info.get("url"),
                  "answers": False}
        if daemon["url"]:
            try:
                http_request("GET", f"{daemon['url']}/me", timeout=2.0)
                daemon["answers"] = True
            except (ServiceUnavailable, UsageError):
                pass
    rentals = {"nodes": [], "agreements": [], "activities": [], "allocations": []}
    if os.path.exists(os.path.join(datadir, DB_FILENAME)):
        with Store(datadir) as store:
            rentals = store.unsettled_rentals()
    if daemon is None and not any(rentals.values()):
        return None
    key = _local_network_app_key(datadir) if daemon and daemon["answers"] and daemon["kind"] == "localnet" else None
    if key:  # ask the network itself: the store only knows what the dead webserver had recorded
        probes = {"agreements": ("agreement_id", "/market-api/v1/agreements/{}"),
                  "activities": ("activity_id", "/activity-api/v1/activity/{}/state"),
                  "allocations": ("allocation_id", "/payment-api/v1/allocations/{}")}
        for kind, (id_key, route) in probes.items():
            for row in rentals[kind]:
                row["on_network"] = _probe_rental(daemon["url"] + route.format(row[id_key]), key)
    return {"daemon": daemon, **rentals}


def _local_network_app_key(datadir: str) -> str | None:
    try:
        with open(os.path.join(datadir, "localnet", "appkey")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _probe_rental(url: str, key: str) -> str:
    """`Approved`, `Ready`, `present` ...: what the network says of one rental; `gone` on a 404."""
    try:
        status, body = http_request("GET", url, token=key, timeout=5.0)
    except ServiceUnavailable:
        return "unknown"
    if status == 404:
        return "gone"
    if status != 200 or not isinstance(body, dict):
        return "unknown"
    state = body.get("state")
    if isinstance(state, list):  # activity state: [current, next]
        state = state[0]
    return str(state) if state else "present"


_SINGULAR = {"nodes": "node", "agreements": "agreement", "activities": "activity", "allocations": "allocation"}


def _left_running_lines(left: dict) -> list[str]:
    """The warning `status` prints about what a dead webserver left, and what each thing is."""
    def alive(rows):
        return [r for r in rows if r.get("on_network", "unknown") != "gone"]

    daemon = left["daemon"]
    parts = []
    if daemon:
        what = "the local network" if daemon["kind"] == "localnet" else "yagna"
        parts.append(f"{what} it started (pid {daemon['pid']}, {daemon['url']}, "
                     f"{'answering' if daemon['answers'] else 'not answering'})")
    for kind in ("nodes", "agreements", "activities", "allocations"):
        rows = alive(left[kind])
        if rows:
            parts.append(f"{len(rows)} {kind if len(rows) > 1 else _SINGULAR[kind]}")
    if not parts:
        return []
    lines = ["Warning: the webserver is gone but left running: " + ", ".join(parts) + "."]
    for row in alive(left["nodes"]):
        lines.append(f"   node {row['node_id']} of cluster {row['cluster_name']} ({row['state']}, "
                     f"provider {row['provider_id'] or '-'})")
    for kind, id_key in (("agreements", "agreement_id"), ("activities", "activity_id"),
                         ("allocations", "allocation_id")):
        for row in alive(left[kind]):
            state = f" ({row['on_network']} on the network)" if "on_network" in row else ""
            lines.append(f"   {_SINGULAR[kind]} {row[id_key]}{state}")
    lines.append("They may still cost money: `ray-on-golem start` takes them over and ends what no "
                 "cluster needs.")
    return lines


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts + [f"{seconds}s"])


def format_autostop(autostop: dict) -> str:
    """One status line: the cluster's autostop setting and its time to go."""
    scale = f", time scale {autostop['time_scale']:g}" if autostop.get("time_scale", 1.0) != 1.0 else ""
    what = "down" if autostop.get("down", True) else "report only"
    text = f"autostop after {autostop['idle_minutes']:g} idle minute(s) ({what}{scale}): "
    if autostop.get("remaining_s") is not None:
        return text + f"idle, {_format_duration(autostop['remaining_s'])} to go"
    return text + f"busy ({autostop.get('busy') or 'not checked yet'})"


def connect_lines(local_ports: dict | None) -> list[str]:
    """How a user reaches a cluster through its head's local forwards (`status`, the end of `ray up`)."""
    if not local_ports:
        return []
    return [f'ray.init("ray://{WEBSERVER_HOST}:{local_ports["client"]}")',
            f"Dashboard: http://{WEBSERVER_HOST}:{local_ports['dashboard']}"]


def format_status(report: dict) -> str:
    """The human status text, as in the original's `status` (docs/yagna-behaviour.md §7) plus yagna and clusters."""
    status = report["webserver"]
    if status is None:
        lines = [f"The webserver doesn't seem to be listening on {report['url']}."]
        if report["pid"]:
            lines.append(f"However, the webserver seems to be running under pid: {report['pid']}.")
            lines.append("You may use the `ray-on-golem stop --kill` command to terminate it.")
        elif report["stale_pidfile"]:
            lines.append(f"A stale pid file points to pid {report['stale_pidfile']}, which is not the webserver any "
                         "more; `ray-on-golem start` replaces it.")  # fmt: skip
        if report.get("left_running"):
            lines.extend(_left_running_lines(report["left_running"]))
        return "\n".join(lines)
    yagna = status["yagna"]
    state = {"running": "Running", "starting": "Starting", "shutting_down": "Shutting down"}[status["state"]]
    origin = "started by the webserver" if yagna["started_by_us"] else "started externally"
    clusters = status["clusters"]
    lines = [
        f"Ray on Golem webserver {status['version']}",
        f"   Listening on:     {status['url']}",
        f"   Status:           {state} (pid {status['pid']}, up {_format_duration(status['uptime'])})",
        f"   Data directory:   {status['datadir']}",
        f"   Yagna:            {yagna['kind']} {yagna['version'] or '(version unknown)'} at "
        f"{yagna['url'] or '(not yet connected)'}, {origin}",
        f"   Payment network:  {yagna['payment_network']} ({yagna['payment_platform']})",
    ]
    isolation = report.get("localnet_isolation")
    if isolation:
        lines.append("   Local nodes:      " + ("VM-like (own network, mount, PID namespaces; cgroup limits)"
                                               if isolation["mode"] == "namespaces" else
                                               "sandbox (shared loopback)" + (f": {isolation['reason']}"
                                                                              if isolation["reason"] else "")))
    if clusters:
        lines.append("   Clusters:")
        for name, counts in sorted(clusters.items()):
            summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n) or "no nodes"
            lines.append(f"\t{name}: {summary}")
            budget = (status.get("budgets") or {}).get(name)
            for node_id, tunnel in sorted(((status.get("tunnels") or {}).get(name) or {}).items()):
                lines.append(f"\t  tunnel from head {node_id}: {tunnel['state']}"
                             + (f" ({tunnel['restarts']} restart(s))" if tunnel["restarts"] else ""))
                lines.extend(f"\t  {line}" for line in connect_lines(tunnel.get("local_ports")))
            if budget:
                shown = format_budget(budget)
                lines.append(f"\t  budget {shown['total_budget']}: {shown['spent']} spent, "
                             f"{shown['reserved']} reserved, {shown['remaining']} remaining"
                             f"{' (' + shown['note'] + ')' if shown['note'] else ''}; "
                             f"burn rate up to {shown['burn_rate_per_hour']}")
                if budget.get("warning"):
                    lines.append(f"\t  warning: {budget['warning']}")
            autostop = (status.get("autostop") or {}).get(name)
            if autostop:
                lines.append("\t  " + format_autostop(autostop))
    else:
        lines.append("   Clusters:         none")
    idle = status.get("idle_shutdown") or {}
    if idle.get("idle_timeout_s") is not None:
        left = (f"{_format_duration(idle['remaining_s'])} left" if idle.get("remaining_s") is not None
                else "clusters running")
        lines.append(f"   Idle shutdown:    after {format_duration(idle['idle_timeout_s'])} without a cluster ({left})")
    if status["warnings"]:
        lines.append("   Server warnings:")
        lines.extend(f"\t{w}" for w in status["warnings"])
    else:
        lines.append("   Server warnings:  none")
    return "\n".join(lines)


###############################################################################
# 10. Ray integration #########################################################
###############################################################################
# Ray loads `provider: {type: external, module: ray_on_golem.GolemNodeProvider}`
# with importlib + getattr (ray/autoscaler/_private/loader.py), in the `ray up`
# process on this machine AND in the autoscaler (monitor) process on the head
# node. Both instances are thin clients of the one webserver, which owns all
# cluster state. Ray is imported only inside the methods below; the module-level
# `__getattr__` (PEP 562) combines each mixin with its Ray base class on first use.


# Set in the environment of every node (see section 7): code running on a node
# (the head's autoscaler) knows it is inside the cluster.
ON_GOLEM_NETWORK_ENV = "ON_GOLEM_NETWORK"
# On the head, the provider rides out a webserver restart (kill -9, then `ray-on-golem start`):
# every failed autoscaler update is an error in the head's monitor log and a lost round; Ray's v1
# StandardAutoscaler raises after AUTOSCALER_MAX_NUM_FAILURES (5) in a row
# (ray/autoscaler/_private/autoscaler.py). So a call waits for the webserver this long
# (connection refused or reset, or 503 while it re-adopts its clusters) instead of failing.
WEBSERVER_RESTART_WAIT_S = 180.0
WEBSERVER_RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)


class _ThreadClients:
    """One section-9 WebserverClient per thread: Ray calls the provider from many
    threads (NodeLauncher, NodeUpdaterThreads, the v2 adapter's executor) and a
    keep-alive connection must not be shared between them."""

    def __init__(self, datadir: str, port: int):
        import threading as _threading
        self.datadir = datadir
        self.port = port
        self.url = f"http://{WEBSERVER_HOST}:{port}"
        self._local = _threading.local()

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
        import logging

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = WebserverClient(self.datadir, self.port, timeout=timeout)
        # Only on the head (the autoscaler): `ray up` on this machine says at once that nothing answers.
        wait_s = WEBSERVER_RESTART_WAIT_S if os.environ.get(ON_GOLEM_NETWORK_ENV) else 0.0
        deadline = time.monotonic() + wait_s
        attempt = 0
        while True:
            try:
                # A keep-alive connection the webserver closed while idle is retried fresh by HTTPConnection.
                return client.request(method, path, body)
            except ServiceUnavailable as e:  # nothing listening, or 503: never a 4xx
                delay = WEBSERVER_RETRY_BACKOFF_S[min(attempt, len(WEBSERVER_RETRY_BACKOFF_S) - 1)]
                if time.monotonic() + delay > deadline:
                    raise ServiceUnavailable(
                        f"the Ray on Golem webserver does not answer on {self.url}"
                        + (f" (waited {wait_s:g} s)" if wait_s else "") + "; start it with "
                        f"`ray-on-golem start --datadir {self.datadir}`") from None
                logging.getLogger("ray_on_golem.provider").warning(
                    "%s %s: %s; retrying in %g s (a restarting webserver is waited for up to %g s)",
                    method, path, e, delay, wait_s)
                attempt += 1
                time.sleep(delay)


def _node_path(cluster_name: str, node_id: str | None = None, action: str = "") -> str:
    """Path of a node route: `/clusters/{cluster}/nodes[/{node}[/{action}]]`."""
    import urllib.parse as _urlparse
    path = f"/clusters/{_urlparse.quote(cluster_name, safe='')}/nodes"
    if node_id is not None:
        path += f"/{_urlparse.quote(node_id, safe='')}"
    if action:
        path += f"/{action}"
    return path


def webserver_client_for(provider_config: dict) -> _ThreadClients:
    """The webserver a provider instance talks to: `provider.parameters` on this
    machine; on the head, what prepare_for_head_node wrote (absolute data dir)."""
    params = provider_config.get("parameters") or {}
    datadir = provider_config.get("_webserver_datadir") or params.get("webserver_datadir") or default_datadir()
    port = provider_config.get("_webserver_port") or params.get("webserver_port") or DEFAULT_WEBSERVER_PORT
    return _ThreadClients(os.path.abspath(os.path.expanduser(datadir)), int(port))


# What nodes run when the YAML gives no start commands (Ray's external provider
# has no defaults, docs/yagna-behaviour.md §6). $NODE_IP (the node's VPN address) comes
# from the node's environment file (section 7).
DEFAULT_HEAD_START_RAY_COMMANDS = [
    "ray stop",
    "ray start --head --node-ip-address=$NODE_IP --port=6379 --disable-usage-stats "
    "--autoscaling-config=~/ray_bootstrap_config.yaml",
]
DEFAULT_WORKER_START_RAY_COMMANDS = [
    "ray stop",
    "ray start --address=$RAY_HEAD_IP:6379 --node-ip-address=$NODE_IP",
]


def bootstrap_cluster_config(cluster_config: dict) -> dict:
    """`GolemNodeProvider.bootstrap_config`: validate, resolve, start the services.

    Runs in `ray up` before the confirmation prompt (commands.py::_bootstrap_config),
    so a bad YAML stops here with the field path and nothing is spent. Each node
    type gets its merged `node_config` (what Ray passes to create_node), the
    provider parameters their defaults, and the start commands Ray lacks.
    """
    import copy

    from ray.autoscaler._private.cli_logger import cli_logger

    config = copy.deepcopy(cluster_config)
    provider = config.get("provider") or {}
    # Keys Ray or we add to the provider block (`_config_cache_path`, ...) are not the user's.
    checked = dict(config, provider={k: v for k, v in provider.items() if not str(k).startswith("_")}
                   if isinstance(provider, dict) else provider)
    resolved = load_cluster_config(checked)
    for warning in resolved.warnings:
        cli_logger.warning("{}", warning)
    for name, node_type in resolved.node_types.items():
        config["available_node_types"][name]["node_config"] = node_type.node_config
    provider["parameters"] = json.loads(json.dumps(resolved.parameters))
    config["auth"] = config.get("auth") or {}
    if not config.get("head_start_ray_commands"):
        config["head_start_ray_commands"] = list(DEFAULT_HEAD_START_RAY_COMMANDS)
    if not config.get("worker_start_ray_commands"):
        config["worker_start_ray_commands"] = list(DEFAULT_WORKER_START_RAY_COMMANDS)
    if os.environ.get(ON_GOLEM_NETWORK_ENV):
        return config  # on the head (ray rsync, Tune): the services are the laptop's
    params = resolved.parameters
    datadir = os.path.abspath(os.path.expanduser(params.get("webserver_datadir") or default_datadir()))
    # Ray's SSHCommandRunner reaches nodes through ssh-proxy with the cluster's key (made here,
    # never sent over HTTP); Ray copies the key to the head (~/ray_bootstrap_key.pem) for the workers.
    keys = ClusterKeys(ensure_datadir(datadir), config["cluster_name"]).ensure()
    config["auth"].update(ssh_user=SSH_USER, ssh_private_key=keys.private_key,
                          ssh_proxy_command=ssh_proxy_command(datadir, "@" + config["cluster_name"]))
    # This version of ray_on_golem goes to every node, first on its PYTHONPATH (node_environment_script).
    module = _ZIPAPP or os.path.abspath(__file__)
    config["file_mounts"] = dict(config.get("file_mounts") or {})
    config["file_mounts"][f"~/{NODE_STATE_DIR}/lib/{os.path.basename(module)}"] = module
    code = start_webserver(datadir, int(params["webserver_port"]), resolved.payment_network,
                           out=lambda line: cli_logger.print("{}", line),
                           idle_timeout=params.get("webserver_idle_timeout"),
                           local_network=_local_network_options(params.get("local_network"), None)
                           if resolved.payment_network == "local" else None)
    if code != EXIT_OK:
        raise ServiceUnavailable(f"the Ray on Golem webserver could not be started (see {datadir})")
    return config


def _print_node_progress(cli_logger, seen: dict, nodes: list) -> None:
    """Print the state-log lines of `nodes` not printed yet (ray up's head progress)."""
    for node in nodes:
        log = node.get("state_log") or []
        for line in log[seen.get(node["node_id"], 0):]:
            cli_logger.print("{}: {}", node["node_id"], line)
        seen[node["node_id"]] = len(log)


def requestor_versions() -> dict:
    """This process's Python and Ray, sent with every node request (checked against the node's)."""
    import platform

    import ray

    return {"python": platform.python_version(), "ray": ray.__version__}


def ray_error(error: RayOnGolemError, *, context: str = "", launch: bool = False) -> Exception:
    """The one translation of our errors into Ray's: what `ray up/exec/down` print.

    Ray's CLI prints a `click.ClickException` as `Error: <message>` with no traceback (we keep
    our exit code); with `launch`, a worker that cannot start is Ray's `NodeLaunchException`
    (ray/autoscaler/node_launch_exception.py), which the autoscaler reports and retries.
    """
    message = f"{context}: {error}" if context else str(error)
    if launch:
        from ray.autoscaler.node_launch_exception import NodeLaunchException

        return NodeLaunchException("ray-on-golem", message, None)
    import click

    exception = click.ClickException(message)
    exception.exit_code = error.exit_code
    return exception


def ray_command_failed(node_id: str, cmd: str, message: str, exit_code: int | None, exit_on_fail: bool) -> Exception:
    """A command that failed on a node, as Ray's runners report it: `ProcessRunnerError`
    (ray/autoscaler/_private/subprocess_output_util.py), or a CLI error with `exit_on_fail`."""
    if exit_on_fail:
        import click

        return click.ClickException(f"Command failed on node {node_id} ({message}):\n\n  {cmd}\n")
    from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError

    return ProcessRunnerError(f"Command failed on node {node_id}: {message}", "ssh_command_failed",
                              code=exit_code, command=cmd)


class GolemNodeProviderMixin:
    """Ray's external node provider: every call is one request to the webserver.

    `GolemNodeProvider` is this mixin over Ray's `NodeProvider`
    (ray/autoscaler/node_provider.py), combined on first use (see `__getattr__`).

    Holds no cluster state of its own, only the node data of its latest
    listing so `is_running`/`node_tags`/IPs called right after
    `non_terminated_nodes` (v2 adapter, ray up) need no extra request.
    """

    def __init__(self, provider_config: dict, cluster_name: str):
        import threading as _threading
        super().__init__(provider_config, cluster_name)
        self._client = webserver_client_for(provider_config)
        self._lock = _threading.Lock()
        self._cache: dict[str, dict] = {}
        if not os.environ.get(ON_GOLEM_NETWORK_ENV):
            self._print_how_to_connect_after_ray_up()

    def _print_how_to_connect_after_ray_up(self) -> None:
        """`ray up` ends with how to connect: Ray fires `cluster_booting_completed` once the head is set
        up (ray/autoscaler/_private/commands.py::get_or_create_head_node, just before its "Useful
        commands"), in `ray up` (and `ray exec --start`) only. Registered once per cluster and process."""
        from ray.autoscaler._private.event_system import CreateClusterEvent, global_event_system

        event = CreateClusterEvent.cluster_booting_completed
        for callback in global_event_system.callback_map.get(event, []):
            if getattr(callback, "__name__", "") == "_print_how_to_connect" and \
                    getattr(callback.__self__, "cluster_name", None) == self.cluster_name:
                return
        global_event_system.add_callback_handler(event, self._print_how_to_connect)

    def _print_how_to_connect(self, event: dict) -> None:
        from ray.autoscaler._private.cli_logger import cli_logger

        try:
            head = self._node(event["head_node_id"], fresh=True)
        except Exception:  # noqa: BLE001 - another cluster's head (SDK), or the webserver gone: no hint
            return
        lines = connect_lines(head.get("local_ports"))
        if lines:
            cli_logger.newline()
            cli_logger.print("Connect to the cluster (the webserver forwards these ports while the cluster runs):")
            for line in lines:
                cli_logger.print("  {}", line)

    # -- helpers ----------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None):
        try:
            return self._client.request(method, path, body)
        except RayOnGolemError as exc:
            raise ray_error(exc) from None

    def _remember(self, nodes: list) -> None:
        with self._lock:
            for node in nodes:
                self._cache[node["node_id"]] = node

    def _node(self, node_id: str, fresh: bool = False) -> dict:
        if not fresh:
            with self._lock:
                cached = self._cache.get(node_id)
            if cached is not None:
                return cached
        node = self._call("GET", _node_path(self.cluster_name, node_id))
        self._remember([node])
        return node

    # -- NodeProvider -----------------------------------------------------
    def non_terminated_nodes(self, tag_filters: dict) -> list:
        import urllib.parse as _urlparse
        query = _urlparse.urlencode({f"tag.{k}": v for k, v in (tag_filters or {}).items()})
        path = _node_path(self.cluster_name) + (f"?{query}" if query else "")
        nodes = self._call("GET", path)["nodes"]
        self._remember(nodes)
        return [node["node_id"] for node in nodes]

    def is_running(self, node_id: str) -> bool:
        return self._node(node_id)["state"] == "running"

    def is_terminated(self, node_id: str) -> bool:
        # Polled by NodeUpdater.wait_ready: always ask, never the cache.
        return self._node(node_id, fresh=True)["state"] in ("terminating", "terminated")

    def node_tags(self, node_id: str) -> dict:
        return dict(self._node(node_id)["tags"])

    def internal_ip(self, node_id: str):
        node = self._node(node_id)
        if not node.get("internal_ip"):
            node = self._node(node_id, fresh=True)
        return node.get("internal_ip")

    def external_ip(self, node_id: str):
        node = self._node(node_id)
        if not node.get("external_ip"):
            node = self._node(node_id, fresh=True)
        return node.get("external_ip")

    def set_node_tags(self, node_id: str, tags: dict) -> None:
        node = self._call("POST", _node_path(self.cluster_name, node_id, "tags"), {"tags": tags})
        self._remember([node])

    def create_node(self, node_config: dict, tags: dict, count: int):
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        body = {
            "provider_parameters": self.provider_config.get("parameters") or {},
            "node_config": node_config or {},
            "tags": tags or {},
            "count": count,
            "resources": resources or {},
            "labels": labels or {},
            "requestor_versions": requestor_versions(),
        }
        try:
            nodes = self._client.request("POST", _node_path(self.cluster_name), body)["nodes"]
        except RayOnGolemError as exc:
            # A worker that cannot start is Ray's NodeLaunchException (it retries); the head is fatal.
            raise ray_error(exc, launch=(tags or {}).get(RAY_TAG_NODE_KIND) != RAY_NODE_KIND_HEAD) from None
        self._remember(nodes)
        if (tags or {}).get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD and not os.environ.get(
            ON_GOLEM_NETWORK_ENV
        ):
            nodes = self._wait_for_head(nodes)
        return {node["node_id"]: node for node in nodes}

    def _wait_for_head(self, nodes: list) -> list:
        """`ray up` only: follow the head's state log until it runs or ends.

        The head is visible (pending) at once, so Ray's 50 s fetch window
        is never at risk; waiting here lets the user see the provisioning
        steps and, if the node ends, the webserver's diagnosis instead of
        Ray's generic "wait_ready aborting".
        """
        from ray.autoscaler._private.cli_logger import cli_logger

        seen: dict = {}
        cli_logger.print("Ray on Golem {}: requested {} node(s)", __version__, len(nodes))
        ids = [node["node_id"] for node in nodes]
        while True:
            nodes = [self._node(node_id, fresh=True) for node_id in ids]
            _print_node_progress(cli_logger, seen, nodes)
            states = {node["state"] for node in nodes}
            if states <= {"running"}:
                return nodes
            if states & {"terminating", "terminated"}:
                reason = "; ".join(n.get("error") or "terminated" for n in nodes)
                raise ray_error(RayOnGolemError(f"head node failed to start: {reason}"))
            time.sleep(0.2)

    def terminate_node(self, node_id: str):
        node = self._call("DELETE", _node_path(self.cluster_name, node_id))
        self._remember([node])
        return {node_id: node}

    def terminate_nodes(self, node_ids: list):
        # One request per node, but without waiting for the activities to end:
        # the webserver releases them in the background (ray down polls).
        result = {}
        for node_id in node_ids:
            result.update(self.terminate_node(node_id))
        return result

    def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner,
                           use_internal_ip, docker_config=None):
        if docker_config and docker_config.get("container_name"):
            raise ray_error(UsageError("docker: Ray on Golem nodes run no docker; remove the `docker` section"))
        runner_cls = globals().get("GolemCommandRunner") or __getattr__("GolemCommandRunner")
        return runner_cls(log_prefix, node_id, self, auth_config, cluster_name, process_runner, use_internal_ip)

    @staticmethod
    def bootstrap_config(cluster_config: dict) -> dict:
        try:
            return bootstrap_cluster_config(cluster_config)
        except RayOnGolemError as exc:
            raise ray_error(exc) from None

    def prepare_for_head_node(self, cluster_config: dict) -> dict:
        # The head's autoscaler reaches the same webserver through the reverse tunnel at its own
        # 127.0.0.1:<port>, with the token the bring-up copied (0600) to ~/.ray_on_golem: the
        # token itself never goes into the config (NodeProvisioner._open_tunnel).
        import copy

        config = copy.deepcopy(cluster_config)
        config["provider"]["_webserver_datadir"] = f"~/{NODE_STATE_DIR}"
        config["provider"]["_webserver_port"] = self._client.port
        return config

    @staticmethod
    def fillout_available_node_types_resources(cluster_config: dict) -> dict:
        # Ray calls this before its schema check (commands.py::_bootstrap_config), which refuses the
        # legacy `head_node`/`worker_nodes` the original's YAMLs set to `true` "to satisfy checks":
        # Ray ignores them (util.py::check_legacy_fields), so they go here, as the original did.
        return {k: v for k, v in cluster_config.items() if k not in LEGACY_RAY_KEYS}


class GolemCommandRunnerMixin:
    """Ray's own SSHCommandRunner (ray/autoscaler/_private/command_runner.py), with host keys
    pinned: Ray turns checking off (StrictHostKeyChecking=no, known_hosts /dev/null); here the
    cluster's known_hosts holds each node's key from the bring-up's first contact, checked
    strictly. On the head (ON_GOLEM_NETWORK) the head pins its workers at its own first contact.

    `GolemCommandRunner` is this mixin over Ray's `SSHCommandRunner`, combined on first use
    (see `__getattr__`). Commands, `ray attach`, port forwards and rsync are Ray's.
    """

    def __init__(self, log_prefix, node_id, provider, auth_config, cluster_name, process_runner, use_internal_ip):
        super().__init__(log_prefix, node_id, provider, auth_config, cluster_name, process_runner, use_internal_ip)
        on_head = bool(os.environ.get(ON_GOLEM_NETWORK_ENV))
        keys = ClusterKeys(provider._client.datadir, cluster_name)
        self.ssh_options.arg_dict.update(UserKnownHostsFile=keys.known_hosts,
                                         StrictHostKeyChecking="accept-new" if on_head else "yes")


# The Ray base class each mixin is combined with on first use: importing it imports Ray.
_RAY_BASES = {
    "GolemNodeProvider": (GolemNodeProviderMixin, "ray.autoscaler.node_provider", "NodeProvider"),
    "GolemCommandRunner": (GolemCommandRunnerMixin, "ray.autoscaler._private.command_runner", "SSHCommandRunner"),
}


# --- The original's module path ---------------------------------------------------
# Ray imports `provider.module` minus its last part (ray/_private/utils.py::import_attr), so the
# original's `ray_on_golem.provider.node_provider.GolemNodeProvider` needs the modules
# `ray_on_golem.provider` and `ray_on_golem.provider.node_provider`. This module is one file,
# so it declares itself a package without a directory (`__path__ = []`) and a meta-path finder
# makes those two as alias modules; their `GolemNodeProvider` is this module's (Ray imported
# only when it is first read).

class _ProviderAliasFinder:
    """Finds and loads the alias modules `ray_on_golem.provider[.node_provider]` (PEP 451)."""

    NAMES = {".".join(PROVIDER_MODULE_ALIAS.split(".")[:n]) for n in (2, 3)}

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):
        if fullname not in cls.NAMES:
            return None
        import importlib.machinery

        is_package = fullname.count(".") == 1
        return importlib.machinery.ModuleSpec(fullname, cls, is_package=is_package)

    @staticmethod
    def create_module(spec):
        return None  # a plain module object

    @staticmethod
    def exec_module(module) -> None:
        if module.__spec__.submodule_search_locations is not None:
            module.__path__ = []
        module.__doc__ = f"Alias of `{PROVIDER_MODULE}` under the original project's module path."

        def forward(name: str):
            if name != "GolemNodeProvider" or not module.__name__.endswith(".node_provider"):
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
            import importlib

            return getattr(importlib.import_module(PROVIDER_MODULE.rsplit(".", 1)[0]), name)

        module.__getattr__ = forward


__path__: list = []  # see above: submodules only from _ProviderAliasFinder
if not any(getattr(finder, "__name__", "") == "_ProviderAliasFinder" for finder in sys.meta_path):
    sys.meta_path.append(_ProviderAliasFinder)


def __getattr__(name: str):
    """PEP 562: combine a mixin with its Ray base class on first access, then cache the class."""
    if name in globals():
        return globals()[name]
    if name not in _RAY_BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    mixin, module, base = _RAY_BASES[name]
    cls = type(name, (mixin, getattr(importlib.import_module(module), base)),
               {"__module__": __name__, "__doc__": mixin.__doc__, "__qualname__": name})
    globals()[name] = cls
    return cls


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


# -- pythonpath, install-pth ----------------------------------------------------

PTH_FILENAME = "ray_on_golem.pth"


def module_location() -> str:
    """Where `import ray_on_golem` finds this module: the zipapp, or the directory holding ray_on_golem.py."""
    return _ZIPAPP or os.path.dirname(os.path.abspath(__file__))


def cmd_pythonpath(args) -> int:
    """The shell line that lets a Ray installation load the provider from here (`eval "$(...)"`)."""
    import shlex

    print(f"export PYTHONPATH={shlex.quote(module_location())}${{PYTHONPATH:+:$PYTHONPATH}}")
    return EXIT_OK


def cmd_install_pth(args) -> int:
    """Write (or remove) a `.pth` in this Python's site-packages naming this module's location.

    `site` adds each existing path a `.pth` lists to sys.path at every start of that Python, so
    `ray up` (and the webserver it starts) imports `ray_on_golem` from the pyz with nothing to export.
    """
    import sysconfig

    site_packages = sysconfig.get_paths()["purelib"]
    pth = os.path.join(site_packages, PTH_FILENAME)
    if args.remove:
        try:
            os.unlink(pth)
        except FileNotFoundError:
            print(f"Nothing to remove: {pth} does not exist.")
            return EXIT_OK
        print(f"Removed {pth}.")
        return EXIT_OK
    location = module_location()
    tmp = f"{pth}.tmp.{os.getpid()}"
    try:
        os.makedirs(site_packages, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{location}\n")
        os.replace(tmp, pth)
    except OSError as err:
        raise RayOnGolemError(f"cannot write {pth}: {err.strerror} (run it with the Python of the Ray "
                              "installation, e.g. `~/ray-venv/bin/python ray-on-golem.pyz install-pth`)") from None
    print(f"Wrote {pth}: {sys.executable} now imports ray_on_golem from {location}.")
    if any(os.path.exists(os.path.join(site_packages, name)) for name in ("ray_on_golem.py", "ray_on_golem")):
        _warn(f"a ray_on_golem installed in {site_packages} comes first; `pip uninstall ray-on-golem` to use {location}")
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


def _add_pythonpath(commands, common) -> None:
    p = commands.add_parser("pythonpath", help="print the PYTHONPATH line that lets Ray load the provider from here",
                            description="Print `export PYTHONPATH=...` naming this pyz (or checkout): "
                                        "`eval \"$(python3 ray-on-golem.pyz pythonpath)\"` before `ray up`.")
    p.set_defaults(func=cmd_pythonpath)


def _add_install_pth(commands, common) -> None:
    p = commands.add_parser("install-pth", help="make this Python (e.g. a Ray venv's) load the provider from here",
                            description="Write ray_on_golem.pth into the site-packages of the Python running "
                                        "this command, so it imports ray_on_golem from this pyz (or checkout): "
                                        "`~/ray-venv/bin/python ray-on-golem.pyz install-pth`.")
    p.add_argument("--remove", action="store_true", help="remove the .pth instead")
    p.set_defaults(func=cmd_install_pth)


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


# -- services: webserver, start, stop, status ---------------------------------------

def _port_arg(value: str) -> int:
    import argparse  # already loaded by build_parser

    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _listen_port_arg(value: str) -> int:
    return 0 if value.strip() == "0" else _port_arg(value)


def _seconds_arg(value: str) -> float:
    import argparse  # already loaded by build_parser

    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive number of seconds")
    return seconds


def _payment_network_arg(value: str) -> str:
    import argparse  # already loaded by build_parser

    if value in DEAD_PAYMENT_NETWORKS:
        raise argparse.ArgumentTypeError(DEAD_PAYMENT_NETWORKS[value])
    if value not in PAYMENT_NETWORKS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(PAYMENT_NETWORKS)}")
    return value


def cmd_webserver(args) -> int:
    """Run the webserver in the foreground until shut down."""
    import asyncio

    return asyncio.run(Webserver(_datadir(args), args.port, args.network, idle_timeout=args.idle_timeout,
                                 local_network=_local_network_from_args(args)).run())


def cmd_start(args) -> int:
    return start_webserver(_datadir(args), args.port, args.network, args.timeout, idle_timeout=args.idle_timeout,
                           local_network=_local_network_from_args(args))


def _local_network_from_args(args) -> dict:
    """`--local-providers` etc.: the cluster YAML's `local_network` block on the command line
    (a relative profile from the working directory: the webserver runs in the data dir)."""
    block = {key: getattr(args, f"local_{key}") for key in YagnaService.LOCALNET_FLAGS
             if getattr(args, f"local_{key}") is not None}
    return _local_network_options(block, None)


def local_network_args(local_network: dict | None) -> list[str]:
    """The `webserver` flags that carry a `local_network` block to the process that starts it."""
    args = []
    for key in YagnaService.LOCALNET_FLAGS:
        if (local_network or {}).get(key) is not None:
            args += [f"--local-{key.replace('_', '-')}", str(local_network[key])]
    return args


def cmd_stop(args) -> int:
    return stop_webserver(_datadir(args), args.port, args.force, args.kill, args.timeout,
                          keep_clusters=args.keep_clusters)


def cmd_status(args) -> int:
    if args.watch:
        return _watch_status(args)
    report = webserver_status(_datadir(args), args.port)
    if args.json:
        _print_json(report)
    else:
        text = format_status(report)
        first, _, rest = text.partition("\n")
        print(_paint(first, "cyan" if report["running"] else "yellow"), *([rest] if rest else []), sep="\n")
    return EXIT_OK


def _watch_status(args) -> int:
    """`status --watch`: the same text every `--interval` s, redrawn in place on a terminal
    (ANSI home + clear), one block after another otherwise; `--json` prints one object a line."""
    import json

    tty = sys.stdout.isatty()
    try:
        while True:
            report = webserver_status(_datadir(args), args.port)
            if args.json:
                print(json.dumps(report, default=str), flush=True)
            else:
                text = format_status(report)
                first, _, rest = text.partition("\n")
                stamp = time.strftime("%H:%M:%S")
                screen = "\n".join([_paint(first, "cyan" if report["running"] else "yellow"), *([rest] if rest else []),
                                    f"(every {args.interval:g} s, {stamp}; Ctrl-C to stop)"])
                print(("\033[H\033[2J" if tty else "") + screen + ("" if tty else "\n"), flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_dashboard(args) -> int:
    """Print a one-time login URL of the status page and open it in a browser where there is one."""
    datadir = _datadir(args)
    client = WebserverClient(datadir, args.port)
    try:
        if client.status() is None:
            raise ServiceUnavailable(f"no webserver answers on {client.url}: `ray up` or `ray-on-golem start` first")
        login = client.request("POST", "/dashboard/login-codes")
    finally:
        client.close()
    print(f"Status page of the webserver on {client.url} (the link works once, "
          f"within {login['expires_in_s']:.0f} s):")
    print(f"  {login['url']}")
    if args.no_browser:
        return EXIT_OK
    # A console browser (lynx, w3m) cannot run the page: only a graphical one is opened.
    graphical = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    opened = False
    if graphical:
        import webbrowser

        try:
            opened = webbrowser.open(login["url"], new=2)
        except webbrowser.Error:
            opened = False
    if not opened:
        print(f"No graphical browser here: open the link in one that reaches 127.0.0.1:{client.port} "
              f"(from another machine: `ssh -L {client.port}:127.0.0.1:{client.port} THIS_HOST`).")
    return EXIT_OK


_NETWORK_HELP = (f"payment network: `local` runs the local Golem network, the others the real yagna "
                 f"(default: {DEFAULT_SERVICE_NETWORK})")  # fmt: skip


def _add_webserver(commands, common) -> None:
    p = commands.add_parser("webserver", parents=[common], help="run Ray on Golem's webserver in the foreground",
                            description="Run the webserver in the foreground; it connects to yagna (or the "
                                        "local network) or starts it, and stops what it started on exit.")  # fmt: skip
    p.add_argument("-p", "--port", type=_listen_port_arg, default=DEFAULT_WEBSERVER_PORT,
                   help=f"port on 127.0.0.1 (default: {DEFAULT_WEBSERVER_PORT}; 0 picks a free one)")  # fmt: skip
    p.add_argument("--network", type=_payment_network_arg, default=DEFAULT_SERVICE_NETWORK, help=_NETWORK_HELP)
    _add_idle_timeout(p)
    _add_local_network(p)
    p.set_defaults(func=cmd_webserver)


def _duration_arg(value: str) -> float:
    import argparse

    try:
        return parse_duration(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_idle_timeout(p) -> None:
    p.add_argument("--idle-timeout", type=_duration_arg, default=None, metavar="DURATION",
                   help="stop the webserver (and yagna or the local network, if it started them) after this "
                        "long without a cluster, e.g. 30m (default: never)")


def _add_local_network(p) -> None:
    group = p.add_argument_group("local network", "used when it starts the local network "
                                 "(`--network local`); a running one is kept as it is")
    group.add_argument("--local-providers", type=_local_network_arg("providers"), default=None, metavar="N",
                       help="number of simulated providers (default: 8)")
    group.add_argument("--local-seed", type=_local_network_arg("seed"), default=None, metavar="N",
                       help="population seed (default: 0)")
    group.add_argument("--local-profile", type=_local_network_arg("profile"), default=None, metavar="FILE",
                       help="population profile (JSON or YAML, see README)")
    group.add_argument("--local-time-scale", type=_local_network_arg("time_scale"), default=None, metavar="X",
                       help="the local network's clock runs X times faster (default: 1)")


def _local_network_arg(key: str):
    """An argparse type checking a `--local-*` value as the YAML's `local_network.<key>` is checked."""
    check = LOCAL_NETWORK_SCHEMA[key][1]

    def parse(value: str):
        import argparse  # already loaded by build_parser

        converted = value
        for convert in (int, float) if key != "profile" else ():
            try:
                converted = convert(value)
                break
            except ValueError:
                pass
        try:
            return check(converted)
        except _Invalid as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not {e}") from None

    return parse


def _add_start(commands, common) -> None:
    p = commands.add_parser("start", parents=[common], help="start the webserver and yagna in the background",
                            description="Start the webserver detached, with yagna or the local network; "
                                        "wait until it serves. Says so if it already runs.")  # fmt: skip
    p.add_argument("-p", "--port", type=_port_arg, default=DEFAULT_WEBSERVER_PORT,
                   help=f"port on 127.0.0.1 (default: {DEFAULT_WEBSERVER_PORT})")  # fmt: skip
    p.add_argument("--network", type=_payment_network_arg, default=DEFAULT_SERVICE_NETWORK, help=_NETWORK_HELP)
    p.add_argument("--timeout", type=_seconds_arg, default=WEBSERVER_START_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait until it serves (default: {WEBSERVER_START_TIMEOUT:.0f})")  # fmt: skip
    _add_idle_timeout(p)
    _add_local_network(p)
    p.set_defaults(func=cmd_start)


def _add_stop(commands, common) -> None:
    p = commands.add_parser("stop", parents=[common], help="stop the webserver and the yagna it started",
                            description="Shut the webserver down gracefully; it stops yagna only if it "
                                        "started it. Refuses while clusters have live nodes unless --force "
                                        "(end them) or --keep-clusters (leave them to the next start).")  # fmt: skip
    p.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-f", "--force", action="store_true",
                     help="stop even with live nodes: terminate them and settle payments first")  # fmt: skip
    how.add_argument("--keep-clusters", action="store_true",
                     help="stop only the webserver: the clusters (nodes, agreements, payments due) and yagna "
                          "stay, and the next `ray-on-golem start` re-adopts them (e.g. to upgrade Ray on Golem)")
    p.add_argument("-k", "--kill", action="store_true", help="kill the process if it does not answer or exit in time")
    p.add_argument("--timeout", type=_seconds_arg, default=WEBSERVER_STOP_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for the process to exit (default: {WEBSERVER_STOP_TIMEOUT:.0f})")  # fmt: skip
    p.set_defaults(func=cmd_stop)


def _add_status(commands, common) -> None:
    p = commands.add_parser("status", parents=[common], help="show the webserver's status",
                            description="Show the webserver, yagna, clusters and warnings; or, when "
                                        "nothing answers, what the pid file says.")  # fmt: skip
    p.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=_interval_arg, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes with --watch (default: 2)")
    p.set_defaults(func=cmd_status)


def _interval_arg(value: str) -> float:
    import argparse  # already loaded by build_parser

    seconds = _seconds_arg(value)
    if seconds < 0.1:
        raise argparse.ArgumentTypeError(f"{value!r} is below 0.1 seconds")
    return seconds


def _add_dashboard(commands, common) -> None:
    p = commands.add_parser("dashboard", parents=[common], help="open the status page in a browser",
                            description="Print a one-time login link of the webserver's status page (clusters, "
                                        "budgets, spending, nodes and their steps, market, providers) and open "
                                        "it in a browser where there is one.")  # fmt: skip
    p.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    p.add_argument("--no-browser", action="store_true", help="only print the link")
    p.set_defaults(func=cmd_dashboard)


# --- network-stats --------------------------------------------------------------


def _add_network_stats(commands, common) -> None:
    parser = commands.add_parser(
        "network-stats", parents=[common], help="scan the market: what your budget buys, before spending anything",
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
    parser.add_argument("--concurrency", type=int, default=DEFAULT_NEGOTIATION_CONCURRENCY, metavar="N",
                        help=f"negotiations at once (default {DEFAULT_NEGOTIATION_CONCURRENCY})")
    parser.add_argument("--response-timeout", type=float, default=DEFAULT_PROPOSAL_RESPONSE_TIMEOUT,
                        metavar="SECONDS", help="how long a provider may take to answer a counter-proposal "
                                                f"(default {DEFAULT_PROPOSAL_RESPONSE_TIMEOUT:g})")
    parser.set_defaults(func=cmd_network_stats)


def cmd_network_stats(args) -> int:
    """Scan the market for `--duration` minutes with one node type's demand and budget."""
    import math

    if not (args.duration > 0 and math.isfinite(args.duration)):
        raise UsageError(f"--duration: must be a positive number of minutes, got {args.duration:g}")
    if not (args.response_timeout > 0 and math.isfinite(args.response_timeout)):
        raise UsageError(f"--response-timeout: must be a positive number of seconds, got {args.response_timeout:g}")
    if args.concurrency < 1:
        raise UsageError(f"--concurrency: must be at least 1, got {args.concurrency}")
    config = load_cluster_config(args.cluster_config)  # exit 2 with the field path
    node_type = args.node_type or config.head_node_type
    if node_type not in config.node_types:
        available = ", ".join(f"`{name}`" for name in config.node_types)
        raise UsageError(f"--node-type: node type `{node_type}` is not in available_node_types "
                         f"(available: {available}){_did_you_mean(node_type, config.node_types)}")
    datadir = (_datadir(args) if args.datadir else
               os.path.expanduser(config.parameters.get("webserver_datadir") or default_datadir()))
    scan = NetworkStatsScan(
        node_type, config.node_config(node_type), config.payment_network,
        payment_driver=config.parameters["payment_driver"], total_budget=config.total_budget,
        datadir=datadir, concurrency=args.concurrency, response_timeout=args.response_timeout,
        local_network=_local_network_options(config.parameters.get("local_network"), args.cluster_config))
    return scan.run(args.duration, as_json=args.json, show_providers=args.providers)


def _local_network_options(block: dict | None, config_path: str | None) -> dict:
    """`local_network` with a relative `profile` taken from the YAML's directory, as users write it
    (from the working directory when the path is unknown: Ray hands the provider a dict)."""
    options = dict(block or {})
    if options.get("profile"):
        base = os.path.dirname(os.path.abspath(config_path)) if config_path else os.getcwd()
        options["profile"] = os.path.join(base, os.path.expanduser(options["profile"]))
    return options


class NetworkStatsScan:
    """One `network-stats` run: connect, scan with the MarketPipeline, print, clean up."""

    def __init__(self, node_type: str, node_config: dict, payment_network: str, *,
                 payment_driver: str = "erc20", total_budget: float = 5.0, datadir: str | None = None,
                 concurrency: int = DEFAULT_NEGOTIATION_CONCURRENCY,
                 response_timeout: float = DEFAULT_PROPOSAL_RESPONSE_TIMEOUT, local_network: dict | None = None):
        self.node_type = node_type
        self.local_network = local_network or {}
        self.node_config = node_config
        self.payment_network = payment_network
        self.payment_driver = payment_driver
        self.total_budget = total_budget
        self.datadir = datadir or default_datadir()
        self.concurrency = concurrency
        self.response_timeout = response_timeout
        self.interrupted = False

    # -- running ------------------------------------------------------------------

    def run(self, duration_min: float, as_json: bool = False, show_providers: bool = False,
            out=None, err=None) -> int:
        import asyncio
        import json

        out = out or sys.stdout
        err = err or sys.stderr
        budget = BudgetControl.from_node_config(self.node_config)
        if not as_json:
            print(f"Gathering stats data for {duration_min:g} minute{'s' * (duration_min != 1)}...",
                  file=out, flush=True)
        pipeline = asyncio.run(self._scan(budget, duration_min * 60, err))
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

    async def _scan(self, budget: BudgetControl, duration_s: float, err):
        import asyncio
        import signal

        _quiet_golem_logging(self.datadir)
        loop = asyncio.get_running_loop()
        stop_event = asyncio.Event()

        def on_signal(name: str):
            if not stop_event.is_set():  # the first signal ends the scan; cleanup is bounded
                self.interrupted = True
                print(f"\nReceived {name}, exiting...", file=err, flush=True)
                stop_event.set()

        yagna = store = None
        for sig, name in ((signal.SIGINT, "CTRL-C"), (signal.SIGTERM, "SIGTERM")):
            loop.add_signal_handler(sig, on_signal, name)
        try:
            # a local network it starts is stopped below; a running one is left alone
            yagna = await loop.run_in_executor(
                None, start_yagna_for, self.payment_network, self.datadir, self.local_network)
            warning = await loop.run_in_executor(
                None, top_up_testnet_wallet, yagna, self.payment_network, self.payment_driver)
            if warning:
                print(f"{PACKAGE_NAME}: warning: {warning}", file=err, flush=True)
            spec = DemandSpec.from_node_config(self.node_config, self.payment_network, yagna.registry_url)
            store = Store(self.datadir)
            progress = _ProgressLine(err, duration_s) if err.isatty() else None
            node = golem_node_for(yagna, collect_payment_events=False)
            await node.start()
            try:
                pipeline = MarketPipeline(
                    node, spec, budget, total_budget=self.total_budget,
                    payment_driver=self.payment_driver, concurrency=self.concurrency,
                    response_timeout=self.response_timeout,
                    **market_store_callbacks(store, self.payment_network))
                await pipeline.scan(duration_s, stop_event,
                                    on_progress=progress and (lambda e, r: progress.show(e, r, pipeline)))
            finally:
                if progress:
                    progress.clear()
                await node.aclose()
            return pipeline
        finally:
            if store is not None:
                store.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if yagna is not None:
                await loop.run_in_executor(None, yagna.stop)


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


# --- costs --------------------------------------------------------------------------


def _add_costs(commands, common) -> None:
    parser = commands.add_parser(
        "costs", parents=[common], help="what each node of a cluster cost: provider, prices, runtime, GLM",
        description="List the nodes of a cluster (or of every cluster) with their provider, agreed prices, "
                    "runtime and the GLM accepted for them, from the spending ledger. A running "
                    "webserver adds each live cluster's budget.")
    parser.add_argument("cluster", nargs="?", metavar="CLUSTER", help="cluster name (default: every cluster)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd_costs)


def cmd_costs(args) -> int:
    import urllib.parse

    datadir = _datadir(args)
    client = WebserverClient(datadir)
    report = None
    if client.status() is not None:
        query = f"?cluster={urllib.parse.quote(args.cluster)}" if args.cluster else ""
        try:
            report = client.request("GET", f"/costs{query}")
        finally:
            client.close()
    else:  # the ledger survives the webserver: read it directly
        with Store(datadir) as store:
            if args.cluster and not ClusterRecords(store).has_cluster(args.cluster):
                raise NotFound(f"no cluster named {args.cluster!r}")
            report = {"clusters": cluster_costs(Ledger(store), args.cluster)}
    if args.json:
        _print_json(report)
        return EXIT_OK
    if not report["clusters"]:
        print("No clusters found.")
        return EXIT_OK
    for entry in report["clusters"]:
        # The node costs with shared decimals; the cluster's total is their sum as printed.
        costs, total, note = format_glm_sum([node["cost"] for node in entry["nodes"]], unit="")
        budget_text = format_glm(entry["total_budget"]) if entry["total_budget"] else "(none)"
        print(_paint(f"Cluster {entry['cluster_name']} ({entry['network']}, {entry['state']}): "
                     f"{total or '0'} GLM of total_budget {budget_text}", "cyan"))
        if note:
            print(f"  ({note})")
        budget = entry.get("budget")
        if budget:
            shown = format_budget(budget)
            print(f"  {shown['spent']} spent, {shown['reserved']} reserved, {shown['remaining']} remaining"
                  f"{' (' + shown['note'] + ')' if shown['note'] else ''}; "
                  f"burn rate up to {shown['burn_rate_per_hour']}")
            if budget.get("warning"):
                _warn(f"cluster {entry['cluster_name']}: {budget['warning']}")
        rows = []
        for node, cost in zip(entry["nodes"], costs):
            prices = node["prices"] or {}
            provider = node["provider_name"] or node["provider_id"] or ""
            rows.append([node["node_id"], node["node_type"], node["state"], provider,
                         *(format_glm(prices[k], unit="") if prices.get(k) not in (None, "") else ""
                           for k in ("start", "cpu_per_hour", "env_per_hour")),
                         format_duration(node["runtime_s"]), cost])
        _print_table(["NODE", "TYPE", "STATE", "PROVIDER", "START", "CPU/H", "ENV/H", "RUNTIME", "COST (GLM)"], rows)
    return EXIT_OK


def _add_autostop(commands, common) -> None:
    parser = commands.add_parser(
        "autostop", parents=[common], help="tear a running cluster down after N idle minutes",
        description="Set or cancel the autostop of a running cluster (as `provider.parameters.autostop` "
                    "does from the YAML): once no task, actor or job runs or waits on it and no "
                    "`ray exec`/`submit` session is open for IDLE_MINUTES, the whole cluster, head "
                    "included, is torn down and paid up.")
    parser.add_argument("cluster", metavar="CLUSTER", help="cluster name (`cluster_name` of its YAML)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-i", "--idle-minutes", type=float, metavar="N", help="idle minutes before it goes down")
    group.add_argument("--cancel", action="store_true", help="cancel the cluster's autostop")
    parser.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    parser.set_defaults(func=cmd_autostop)


def cmd_autostop(args) -> int:
    import urllib.parse

    if args.idle_minutes is not None and not 0 < args.idle_minutes < float("inf"):
        raise UsageError(f"--idle-minutes: expected a number > 0, got {args.idle_minutes:g}")
    client = WebserverClient(_datadir(args), args.port)
    try:
        if client.status() is None:
            raise ServiceUnavailable(f"no webserver is listening on {client.url}; is the cluster up?")
        body = {"cancel": True} if args.cancel else {"idle_minutes": float(args.idle_minutes)}
        answer = client.request("POST", f"/clusters/{urllib.parse.quote(args.cluster, safe='')}/autostop", body)
    finally:
        client.close()
    if answer["autostop"] is None:
        print(f"Cluster {args.cluster}: autostop cancelled")
    else:
        print(f"Cluster {args.cluster}: {format_autostop(answer['autostop'])}")
    return EXIT_OK


def _add_cleanup(commands, common) -> None:
    parser = commands.add_parser(
        "cleanup", parents=[common], help="end agreements and activities in yagna that no cluster of ours owns",
        description="List the agreements yagna holds Approved for this data dir's app session (never another "
                    "application's) and end those no cluster node owns: destroy their activities, then "
                    "terminate them (reason `cleanup`). Asks the running webserver; with none running, "
                    "talks to yagna or the local network directly ($YAGNA_APPKEY or the local network's key). "
                    "Agreements of nodes recorded as running are kept (a restarted webserver adopts them).")
    parser.add_argument("--dry-run", action="store_true", help="show what would be ended; change nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-p", "--port", type=_port_arg, default=None, help="port (default: the running webserver's)")
    parser.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args) -> int:
    import asyncio

    datadir = _datadir(args)
    client = WebserverClient(datadir, args.port)
    try:
        running = client.status() is not None
        if running:  # the webserver owns golem-core and the clusters: it decides what is owned
            report = client.request("POST", "/cleanup", {"dry_run": args.dry_run}, timeout=300.0)
    finally:
        client.close()
    if not running:
        url = yagna_api_url(datadir)
        with Store(datadir) as store:
            rentals = LeftoverRentals(url, vpn_app_key(datadir), app_session_id(datadir), ClusterRecords(store))
            try:
                report = asyncio.run(rentals.run(args.dry_run))
            except ServiceUnavailable:
                raise ServiceUnavailable(f"no yagna or local network answers on {url}: start the services "
                                         "(`ray-on-golem start`) or set YAGNA_API_URL") from None
    failed = [r for r in report["leftovers"] if r["outcome"].startswith("failed")]
    if args.json:
        _print_json(report)
        return EXIT_FAILED if failed else EXIT_OK
    _print_cleanup(report)
    return EXIT_FAILED if failed else EXIT_OK


def _print_cleanup(report: dict) -> None:
    """What `cleanup` found and did, for people: one row per leftover, then what it kept."""
    leftovers, owned = report["leftovers"], report["owned"]
    if not leftovers:
        print("No leftover agreements: every Approved agreement of this data dir's app session belongs "
              "to a cluster node." if owned else "No Approved agreements of this data dir's app session.")
    else:
        done = [r for r in leftovers if r["outcome"] in ("ended", "would end")]
        print(f"{'Would end' if report['dry_run'] else 'Ended'} {len(done)} of {len(leftovers)} leftover "
              "agreement(s) (no cluster owns them):")
        _print_table(["AGREEMENT", "PROVIDER", "SINCE", "ACTIVITIES", "RESULT"], [
            [r["agreement_id"], f"{r.get('provider_name') or '?'} ({r.get('provider_id') or '?'})",
             format_time(r.get("approved_at") or r.get("created_at")),
             ", ".join(f"{a['activity_id']} ({a['state']})" for a in r["activities"]) or "none",
             r["outcome"]] for r in leftovers])
    for r in owned:
        print(f"Kept {r['agreement_id']}: node {r['node_id']} of cluster {r['cluster_name']}")


def cmd_ssh_proxy(args) -> int:
    datadir = args.datadir or default_datadir()
    network_id = args.network_id
    if network_id.startswith("@"):
        # `@CLUSTER` (Ray's ProxyCommand): the VPN of the cluster's node at this IP, from the webserver.
        client = WebserverClient(datadir)
        try:
            nodes = client.request("GET", _node_path(network_id[1:]))["nodes"]
        finally:
            client.close()
        found = [n.get("network_id") for n in nodes if n.get("internal_ip") == args.ip and n.get("network_id")]
        if not found:
            raise NotFound(f"cluster {network_id[1:]!r} has no running node at {args.ip}")
        network_id = found[0]
    recorded = (read_runtime(datadir).get("yagna") or {}).get("url")
    proxy = VpnTcpProxy(args.api_url or vpn_net_api_url(datadir, recorded), vpn_app_key(datadir),
                        network_id, args.ip, args.port)
    proxy.connect()
    return proxy.run()


def _add_ssh_proxy(commands, common) -> None:
    p = commands.add_parser(
        "ssh-proxy", parents=[common], help="stdio to a node's TCP port through the VPN (ssh's ProxyCommand)",
        description="Connect stdin/stdout to IP:PORT of a node of VPN NETWORK_ID through the net API's "
                    "WebSocket, e.g. ssh -o ProxyCommand='ray-on-golem ssh-proxy NET %h %p' root@IP. "
                    "The app key comes from $YAGNA_APPKEY or the data dir, never from the command line.")
    p.add_argument("network_id", metavar="NETWORK_ID", help="the VPN's id (net API), or @CLUSTER: the VPN of "
                                                           "that cluster's node at IP (asks the webserver)")
    p.add_argument("ip", metavar="IP", help="the node's VPN address")

    def port(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise argparse.ArgumentTypeError(f"PORT must be 1..65535, got {text!r}")
        return int(text)

    import argparse

    p.add_argument("port", metavar="PORT", type=port, help="TCP port on the node (22 for sshd)")
    p.add_argument("--api-url", metavar="URL", help="the net API (default: $YAGNA_NET_URL, $YAGNA_API_URL, "
                                                    "the local network of the data dir, http://127.0.0.1:7465)")
    p.set_defaults(func=cmd_ssh_proxy)


def cmd_ssh(args) -> int:
    """An interactive shell (or COMMAND) on a node: OpenSSH with the cluster's key and pinned host key."""
    datadir = args.datadir or default_datadir()
    client = WebserverClient(datadir)
    try:
        nodes = client.request("GET", _node_path(args.cluster))["nodes"]
    finally:
        client.close()
    running = [n for n in nodes if n["state"] == "running" and n.get("internal_ip")]
    if args.node:
        chosen = [n for n in running if args.node in (n["node_id"], n["internal_ip"])]
    else:
        chosen = [n for n in running if n["tags"].get(RAY_TAG_NODE_KIND) == RAY_NODE_KIND_HEAD]
    if not chosen:
        what = f"node {args.node!r}" if args.node else "head node"
        raise NotFound(f"cluster {args.cluster!r} has no running {what} (running: "
                       f"{', '.join(n['node_id'] for n in running) or 'none'})")
    keys = ClusterKeys(datadir, args.cluster)
    if not os.path.exists(keys.private_key):
        raise NotFound(f"no key pair for cluster {args.cluster!r} in {datadir} (made by `ray up`)")
    proxy = ssh_proxy_command(datadir, "@" + args.cluster)
    argv = ["ssh", *ssh_options(keys.private_key, keys.known_hosts, proxy, first_contact=False),
            *(["-t"] if sys.stdin.isatty() else []), f"{SSH_USER}@{chosen[0]['internal_ip']}", *([args.command] if args.command else [])]
    sys.stdout.flush()
    os.execvp("ssh", argv)
    return EXIT_FAILED  # not reached


def _add_ssh(commands, common) -> None:
    p = commands.add_parser("ssh", parents=[common], help="a shell on a node of a cluster (OpenSSH through the VPN)",
                            description="Run a shell, or COMMAND, on the head (or NODE: a node id or VPN IP) of "
                                        "CLUSTER, with the cluster's key and pinned host keys.")
    p.add_argument("cluster", metavar="CLUSTER", help="cluster_name of the cluster YAML")
    p.add_argument("node", metavar="NODE", nargs="?", help="node id (e.g. node3) or VPN IP; default: the head")
    p.add_argument("-c", "--command", metavar="COMMAND", help="run this instead of an interactive shell")
    p.set_defaults(func=cmd_ssh)


def build_parser() -> "argparse.ArgumentParser":
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
    _add_webserver(commands, common)
    _add_start(commands, common)
    _add_stop(commands, common)
    _add_status(commands, common)
    _add_dashboard(commands, common)
    _add_network_stats(commands, common)
    _add_costs(commands, common)
    _add_autostop(commands, common)
    _add_cleanup(commands, common)
    _add_ssh_proxy(commands, common)
    _add_ssh(commands, common)
    _add_pythonpath(commands, common)
    _add_install_pth(commands, common)
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
