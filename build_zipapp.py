#!/usr/bin/env python3
"""Build `dist/ray-on-golem.pyz`: one file to drop on a host that has Python 3 and nothing else.

    python build_zipapp.py [--output dist/ray-on-golem.pyz] [--no-golem]

The zip holds `ray_on_golem.py`, `golem_localnet.py`, a `__main__.py`, and pure-Python copies of PyYAML,
golem-core and its whole dependency tree as installed in the Python running this script, plus
setuptools' `pkg_resources` (textX imports it; setuptools 81+ dropped it, hence `setuptools<81`).

- A `.so` cannot be imported from a zip, so C extensions are left out: PyYAML falls back to its pure
  loader by itself, aiohttp/multidict/yarl/frozenlist/propcache need their `*_NO_EXTENSIONS`
  variables, which `ray_on_golem` sets when it is imported from a zip.
- zipimport never writes bytecode, and compiling on every start costs ~1.5 s: every `.py` gets a
  `.pyc` beside it (the layout zipimport looks for), as an unchecked hash-based pyc (PEP 552) so it is
  used whatever the zip's timestamps. Another Python version ignores them (magic number) and
  compiles from the `.py` instead.
- The dependencies sit in one inner, stored `bundle.zip`, not at the zip's root: zipimport parses the
  whole central directory (~4000 entries, ~25 ms) on every start, even for `--help`. golem-core and
  textX must be on disk anyway (they open their grammar files by path), so `ray_on_golem.ZipappBundle`
  extracts the bundle once per content hash to ~/.cache and puts it on sys.path, on the first import
  of a bundled package (its import hook) or `prepare_bundled_imports()`.
- `bundle.json` at the root holds the bundle's sha256 (the cache key, checked against the extraction's
  `.complete` marker) and its top-level import names (what the hook answers for).
- `__main__.py` runs `ray_on_golem.main()`, or golem_localnet's command line for `... localnet ARGS`.
- The `*.dist-info` metadata is kept: some packages look up their own version at import.
- `bundled-versions.json` at the root lists the bundled distributions: `ray-on-golem version` reads it
  instead of importlib.metadata (too slow for a cold start).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import importlib.util
import io
import json
import marshal
import os
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("ray_on_golem.py", "golem_localnet.py")
ROOTS = ("PyYAML", "golem-core", "setuptools")
# From setuptools only what textX needs: pkg_resources (with its own vendored packages).
ONLY_PACKAGES = {"setuptools": ("pkg_resources",)}
# Compiled or build-only files: never importable from a zip, or not needed at run time.
SKIP_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".pyc", ".pyo", ".c", ".h", ".cpp", ".pyx", ".pxd", ".pyi")
DIST_INFO_FILES = ("METADATA", "entry_points.txt", "top_level.txt", "WHEEL")
BUNDLE = "bundle.zip"  # the dependencies, one inner zip: see the module docstring
MANIFEST = "bundle.json"  # the bundle's sha256 and top-level names (ray_on_golem.ZipappBundle reads it)
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # reproducible zips

MAIN = '''\
"""Entry point of ray-on-golem.pyz: `python3 ray-on-golem.pyz COMMAND ...`.

`python3 ray-on-golem.pyz localnet ARGS...` runs golem_localnet.py's command line instead.
"""
import sys

import ray_on_golem  # first: it installs the hook that finds the bundled dependencies

if sys.argv[1:2] == ["localnet"]:
    import golem_localnet

    sys.exit(golem_localnet.main(sys.argv[2:]))
sys.exit(ray_on_golem.main())
'''


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_ok(requirement: str) -> bool:
    """Keep a requirement unless its environment marker excludes this Python, or it is an extra."""
    _, _, marker = requirement.partition(";")
    if not marker.strip():
        return True
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # setuptools<81 vendors it
        from pkg_resources.extern.packaging.markers import Marker
    return Marker(marker).evaluate()


def dependency_tree(roots=ROOTS) -> list[metadata.Distribution]:
    """The installed distributions needed by `roots`, each once, in discovery order."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop(0)
        key = _normalize(name)
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"build_zipapp: {name} is not installed in {sys.executable}; install the pinned "
                             "dependencies first (./dev does)") from None
        seen[key] = dist
        for requirement in dist.requires or []:
            if _marker_ok(requirement):
                todo.append(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))
    return list(seen.values())


def distribution_files(dist: metadata.Distribution) -> list[tuple[str, Path]]:
    """(path in zip, path on disk) of a distribution's importable files and package data."""
    only = ONLY_PACKAGES.get(_normalize(dist.metadata["Name"]))
    out = []
    for file in dist.files or []:
        parts = file.parts
        if parts[0] == ".." or parts[0].endswith((".egg-info", ".data")) or "__pycache__" in parts:
            continue
        # Metadata stays (semantic_version and pkg_resources look themselves up at import); the
        # file list and signatures do not.
        if parts[0].endswith(".dist-info") and file.name not in DIST_INFO_FILES:
            continue
        if file.name.endswith(SKIP_SUFFIXES):
            continue
        if only and parts[0] not in only:
            continue
        source = Path(file.locate())
        if source.is_file():
            out.append(("/".join(parts), source))
    return out


def _pyc(source: bytes, name: str) -> bytes:
    """An unchecked hash-based pyc (PEP 552: flags=0b01), valid whatever the file's mtime."""
    code = compile(source, name, "exec", dont_inherit=True, optimize=0)
    header = importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + importlib.util.source_hash(source)
    return header + marshal.dumps(code)


def _with_pycs(entries: dict[str, bytes]) -> dict[str, bytes]:
    for arcname in [a for a in entries if a.endswith(".py")]:
        try:
            entries[arcname[:-3] + ".pyc"] = _pyc(entries[arcname], arcname)
        except SyntaxError:  # e.g. py2-only files some packages ship: leave them as source
            pass
    return entries


def top_level_names(bundle: dict[str, bytes]) -> list[str]:
    """The importable top-level names of the bundle (`yaml`, `golem`, `typing_extensions`, ...)."""
    names = set()
    for arcname in bundle:
        first, sep, _ = arcname.partition("/")
        if sep and not first.endswith(".dist-info") and first.isidentifier():
            names.add(first)  # a package (regular or namespace)
        elif not sep and arcname.endswith(".py") and arcname[:-3].isidentifier():
            names.add(arcname[:-3])
    return sorted(names)


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for arcname in sorted(entries):
            info = zipfile.ZipInfo(arcname, FIXED_DATE)
            info.compress_type = compression
            info.external_attr = 0o644 << 16
            zf.writestr(info, entries[arcname])
    return buffer.getvalue()


def build(output: Path, *, with_golem: bool = True) -> dict:
    """Write the zipapp; returns a summary (file count, size, bundled versions)."""
    roots = ROOTS if with_golem else ("PyYAML",)
    dists = dependency_tree(roots)
    bundle: dict[str, bytes] = {}
    for dist in dists:
        for arcname, source in distribution_files(dist):
            bundle.setdefault(arcname, source.read_bytes())
    versions = {dist.metadata["Name"]: dist.version for dist in dists}
    entries = _with_pycs({"__main__.py": MAIN.encode(), **{m: (HERE / m).read_bytes() for m in MODULES}})
    entries["bundled-versions.json"] = json.dumps(versions, indent=1, sort_keys=True).encode()
    entries[BUNDLE] = _zip(_with_pycs(bundle))
    entries[MANIFEST] = json.dumps({"sha256": hashlib.sha256(entries[BUNDLE]).hexdigest(),
                                    "top_level": top_level_names(bundle)}, indent=1).encode()

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    outer = {k: v for k, v in entries.items() if k != BUNDLE}
    buffer = io.BytesIO(_zip(outer))
    with zipfile.ZipFile(buffer, "a") as zf:  # the inner zip stored as is: seekable without inflating
        info = zipfile.ZipInfo(BUNDLE, FIXED_DATE)
        info.external_attr = 0o644 << 16
        zf.writestr(info, entries[BUNDLE], compress_type=zipfile.ZIP_STORED)
    tmp.write_bytes(b"#!/usr/bin/env python3\n" + buffer.getvalue())
    tmp.chmod(0o755)
    os.replace(tmp, output)
    return {"output": str(output), "files": len(outer) + 1 + len(bundle), "bytes": output.stat().st_size,
            "bundled": versions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the ray-on-golem zipapp.")
    parser.add_argument("--output", "-o", type=Path, default=HERE / "dist" / "ray-on-golem.pyz")
    parser.add_argument("--no-golem", action="store_true", help="bundle PyYAML only (no golem-core tree)")
    args = parser.parse_args(argv)
    summary = build(args.output, with_golem=not args.no_golem)
    print(f"built {summary['output']}: {summary['files']} files, {summary['bytes'] / 1e6:.1f} MB, "
          f"{len(summary['bundled'])} distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
