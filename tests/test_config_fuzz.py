"""Mutated cluster YAML against `ray-on-golem validate` and against the check `ray up` runs before its
prompt (issue 16).

Property: a config is valid (exit 0) or refused with exit 2 and a field path for every problem;
never a traceback, never exit 1 "internal error". Seeds: `sample-cluster.yaml` and the original's
three configs (`tests/data/original-configs/`, as is and pointed at our module). Mutations: tree edits
(hostile values, deleted, added and misspelt keys), hostile scalars in place of a line's value, and
raw text edits (bytes that are not UTF-8, unbalanced brackets, anchors).

Bounded for CI (a few seconds, a fixed sequence of examples); `ROG_FUZZ_EXAMPLES=5000` runs a longer,
random search for release checks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE_CLUSTER, cli_env
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ray_on_golem as rog

ORIGINALS = sorted((REPO / "tests" / "data" / "original-configs").glob("*.yaml"))
OUR_MODULE = 'module: "ray_on_golem.GolemNodeProvider"'


def _seeds() -> list[tuple[str, str]]:
    seeds = [("sample-cluster.yaml", SAMPLE_CLUSTER.read_text())]
    for path in ORIGINALS:
        text = path.read_text()
        seeds.append((path.name, text))
        seeds.append((f"{path.name} (our module)", re.sub(r'module: "[^"]+"', OUR_MODULE, text)))
    return seeds


SEEDS = _seeds()
EXAMPLES = int(os.environ.get("ROG_FUZZ_EXAMPLES", "0"))
# CI: a fixed sequence of examples (no flakes from a new random draw); release checks: a random search.
fuzz = settings(max_examples=EXAMPLES or 120, derandomize=not EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- mutations ------------------------------------------------------------------------------

KNOWN_KEYS = sorted({*rog.RAY_CONFIG_SCHEMA, *rog.PROVIDER_PARAMETERS_SCHEMA, *rog.NODE_CONFIG_SCHEMA,
                     *rog.NODE_TYPE_SCHEMA, *rog.AUTH_SCHEMA, *rog.LOCAL_NETWORK_SCHEMA,
                     "provider", "auth", "available_node_types", "parameters", "module", "type",
                     "cpu_load", "duration_hours", "max_cost", "minimal", "optimal", "image_tag"})


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10 ** 18, max_value=10 ** 100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.just(""), st.just(" "),
    st.dates(), st.datetimes(), st.binary(max_size=4), st.sampled_from(["4578x", "10m", "-5", "golem/x:1"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(-3, 3), st.just(""), st.none(),
                 st.booleans())
values = st.one_of(
    leaves,
    st.lists(leaves, max_size=3),
    st.dictionaries(keys, leaves, max_size=3),
    st.integers(1, 80).map(_nested),  # PyYAML's composer recurses: deep nesting was a RecursionError
)

# Scalars PyYAML reads in surprising ways, put in place of a line's value.
HOSTILE_SCALARS = [
    "", "x", "-1", "0", "9" * 5000, "-" + "9" * 4400, "1" * 4300, "[" * 60 + "]" * 60, "{a: " * 60 + "1" + "}" * 60,
    ".inf", "-.inf", ".nan", "1e400", "2024-13-45", "2024-01-01", "2024-01-01 10:00:00", "!!binary aGk=",
    "!!set {a, b}", "!!omap [a: 1]", "&x [*x]", "&y {a: *y}", "*undefined", "{: 1}", "{'': 1}", "[1, [2, [3]]]",
    "~", "0x1F", "0o17", "1_000", "!!python/object/apply:os.system [true]", '"\\x00"', "'''", "|", ">-",
    "null", "yes", "No", "!!int x", "!!float x", "!!timestamp x", "? a", "- a", "@", "`x`", "%YAML 1.1",
]
# Text edits of the YAML itself.
SNIPPETS = [b"[", b"]", b"{", b"}", b": ", b"- ", b"&a ", b"*a", b"\t", b"'", b'"', b"\x00", b"\xff", b"\xc3",
            b"\n  x: 1\n", b"\n- 1\n", b"!!set ", b"? ", b"---\n", b"...\n", b"\r", b"\xef\xbb\xbf", b"9" * 4400]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, sub in node.items():
            yield from _paths(sub, prefix + (key,))
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _paths(sub, prefix + (i,))


def _parent(root, path):
    for key in path[:-1]:
        root = root[key]
    return root


def _ours(path) -> bool:
    """Where Ray's schema lets anything through to the provider: `provider` and each `node_config`."""
    return path[:1] == ("provider",) or (path[:1] == ("available_node_types",) and path[2:3] == ("node_config",))


@st.composite
def tree_mutations(draw, only_ours: bool = False) -> tuple[str, bytes]:
    """A seed parsed, edited as data (1-3 edits) and written back as YAML."""
    name, text = draw(st.sampled_from(SEEDS))
    config = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(config) if _ours(p)] if only_ours and isinstance(config, dict) else []
        path = draw(st.sampled_from(paths or list(_paths(config))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "rename"]))
        if not path:
            if action == "replace":
                config = draw(values)
            continue
        parent, last = _parent(config, path), path[-1]
        node = parent[last]
        if action == "replace":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(node, dict):
            node[draw(keys)] = draw(values)
        elif action == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(keys, st.just(str(last)[:-1]), st.just(str(last) + "s"), st.just(str(last).upper())))
            try:
                parent[new] = parent.pop(last)
            except TypeError:  # an unhashable key cannot be made
                pass
    event(f"seed {name}")
    return name, yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()


@st.composite
def scalar_mutations(draw) -> tuple[str, bytes]:
    """A seed with the value of one or two `key: value` lines replaced by a hostile scalar."""
    name, text = draw(st.sampled_from(SEEDS))
    lines = text.splitlines()
    candidates = [i for i, line in enumerate(lines) if re.match(r"^\s*[\w.\"]+:", line)]
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.sampled_from(candidates))
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {draw(st.sampled_from(HOSTILE_SCALARS))}"
    return name, ("\n".join(lines) + "\n").encode()


@st.composite
def text_mutations(draw) -> tuple[str, bytes]:
    """A seed with 1-3 raw edits: snippets inserted, slices deleted, lines doubled, the end cut off."""
    name, text = draw(st.sampled_from(SEEDS))
    data = text.encode()
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "insert", "delete", "double", "truncate"]))
        if action == "insert":
            data = data[:pos] + draw(st.sampled_from(SNIPPETS)) + data[pos:]
        elif action == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 40)):]
        elif action == "double":
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end + 1
            data = data[:end] + data[start:end] + data[end:]
        else:
            data = data[:pos]
    return name, data


any_mutation = st.one_of(tree_mutations(), scalar_mutations(), text_mutations())

# ---- the property -----------------------------------------------------------------------------

WHOLE_FILE_PROBLEMS = ("not valid YAML", "expected a mapping at the top level", "cannot be read")


def validate_in_process(path: Path, *args: str) -> tuple[int, str, str]:
    """`ray-on-golem validate PATH` through `main()`, as the console script runs it, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rog.main(["validate", str(path), *args])
    return code, out.getvalue(), err.getvalue()


def assert_refused_with_field_paths(error: rog.ConfigError) -> None:
    assert error.exit_code == 2
    for path, message in error.issues:
        assert path or any(p in message for p in WHOLE_FILE_PROBLEMS), (path, message)
        assert "Traceback" not in message
    assert len(set(error.issues)) == len(error.issues), error.issues  # no problem twice


def check_validate(path: Path) -> None:
    code, out, err = validate_in_process(path)
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert out == "" and err.startswith("ray-on-golem: error: "), err
        lines = err.splitlines()
        assert len(set(lines)) == len(lines), err
        try:
            rog.load_cluster_config(str(path))
        except rog.ConfigError as error:
            assert_refused_with_field_paths(error)
            event(f"validate: exit 2, {'field path' if error.path else 'whole file'}")
        except rog.UsageError as error:  # the file itself: no such file, not readable
            assert any(p in str(error) for p in WHOLE_FILE_PROBLEMS), error
            event("validate: exit 2, whole file")
        else:
            pytest.fail(f"exit 2 but the config loads: {err}")
    else:
        event("validate: valid")
        code, out, err = validate_in_process(path, "--json")
        assert code == 0, err
        assert json.loads(out)["source"] == str(path)


@fuzz
@given(any_mutation)
def test_validate_names_the_field_or_accepts(tmp_path_factory, case):
    name, data = case
    path = tmp_path_factory.mktemp("fuzz") / "cluster.yaml"
    path.write_bytes(data)
    check_validate(path)


@pytest.fixture(scope="module")
def ray_prepare():
    """What `ray up` does to the YAML before our provider's `bootstrap_config` sees it (Ray's own steps)."""
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    def prepare(text: bytes):
        """ray/autoscaler/_private/commands.py::_bootstrap_config up to `bootstrap_config`."""
        config = yaml.safe_load(text)  # `ray up` reads the file with yaml.safe_load
        config = prepare_config(config)
        json.dumps([config], sort_keys=True)  # the config cache's key
        config = rog.GolemNodeProvider.fillout_available_node_types_resources(config)
        validate_config(config)
        return config

    # On a head node the provider validates but starts no services: what we want here.
    saved = os.environ.get(rog.ON_GOLEM_NETWORK_ENV)
    os.environ[rog.ON_GOLEM_NETWORK_ENV] = "1"
    yield prepare
    if saved is None:
        os.environ.pop(rog.ON_GOLEM_NETWORK_ENV)
    else:
        os.environ[rog.ON_GOLEM_NETWORK_ENV] = saved


@fuzz
@given(st.one_of(tree_mutations(only_ours=True), tree_mutations(only_ours=True), tree_mutations(), scalar_mutations()))
def test_ray_up_validation_names_the_field_or_accepts(ray_prepare, case):
    """The same property for `GolemNodeProvider.bootstrap_config` (`bootstrap_cluster_config`), on what
    Ray's own loader and schema let through (what they refuse is Ray's answer, counted as such)."""
    name, data = case
    try:
        config = ray_prepare(data)
    except Exception as error:  # noqa: BLE001 - Ray's YAML loader or schema refused it before us
        event(f"ray up: refused by Ray itself ({type(error).__name__})")
        return
    before = copy.deepcopy(config)
    try:
        resolved = rog.bootstrap_cluster_config(config)
    except rog.ConfigError as error:
        assert_refused_with_field_paths(error)
        event("ray up: exit 2 with field paths")
    else:
        event("ray up: valid")
        json.dumps(resolved)  # Ray caches the resolved config as JSON
        for node_type in resolved["available_node_types"].values():
            assert rog.resolve_node_config(node_type["node_config"]) == node_type["node_config"]
    assert config == before  # the provider never edits Ray's copy


# ---- a few cases through the real CLIs ----------------------------------------------------------

RAY_BIN = Path(sys.executable).parent / "ray"
SAMPLE_TEXT = SAMPLE_CLUSTER.read_text()

def _sample_with(edit) -> str:
    config = yaml.safe_load(SAMPLE_TEXT)
    edit(config["provider"])
    return yaml.safe_dump(config, sort_keys=False)


CLI_CASES = [
    # (id, YAML text, field path in the output); Ray's own loader and schema let these through to us
    ("empty-budget-control", _sample_with(lambda p: p["parameters"]["node_config"].update(budget_control=None)),
     "provider.parameters.node_config.budget_control"),
    ("parameters-x", _sample_with(lambda p: p.update(parameters="x")), "provider.parameters"),
    ("empty-key", _sample_with(lambda p: p["parameters"]["node_config"].update({"": 1})),
     "provider.parameters.node_config.''"),
    ("infinite-budget", _sample_with(lambda p: p["parameters"].update(total_budget=float("inf"))),
     "provider.parameters.total_budget"),
]


@pytest.mark.parametrize("text, field", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_validate_cli(run_cli, tmp_path, text, field):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    proc = run_cli("validate", path)
    assert proc.returncode == 2, proc.stderr
    assert f"{field}: " in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.ray
@pytest.mark.skipif(not RAY_BIN.exists(), reason=f"the ray CLI is not installed next to {sys.executable}")
@pytest.mark.parametrize("text, field", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_ray_up_cli(tmp_path, datadir, text, field):
    """`ray up` stops before its prompt with our field path, starts nothing and prints no traceback."""
    text = re.sub(r"webserver_port: .*", "webserver_port: 1", text)  # never the user's webserver
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "tmp").mkdir()
    env = cli_env(datadir, home, {"PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp"),
                                  "RAY_USAGE_STATS_ENABLED": "0"})
    proc = subprocess.run([str(RAY_BIN), "up", "--no-config-cache", str(path)], input="y\n", capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"{field}: " in out and "Traceback" not in out, out[-3000:]
    assert "Confirm" not in out and "[y/N]" not in out
    assert not datadir.exists()  # nothing started, nothing spent


def test_seeds_are_what_the_fuzz_starts_from():
    """The unmutated seeds: ours and the original's are valid, with the original's module path (an alias
    of ours) as well as pointed at our module."""
    codes = {}
    for name, text in SEEDS:
        try:
            rog.load_cluster_config(yaml.safe_load(text))
            codes[name] = 0
        except rog.ConfigError as error:
            codes[name] = error.path
    assert codes["sample-cluster.yaml"] == 0
    assert {codes[f"{p.name} (our module)"] for p in ORIGINALS} == {0}
    assert {codes[p.name] for p in ORIGINALS} == {0}
