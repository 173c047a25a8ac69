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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ray-on-golem` console script and `python -m ray_on_golem`."""
    raise SystemExit("not built yet")


if __name__ == "__main__":
    sys.exit(main())
