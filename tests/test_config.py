"""`ray-on-golem validate` and `load_cluster_config`: mistakes are caught with their field path."""

from __future__ import annotations

import copy
import datetime
import json

import pytest
import yaml

import ray_on_golem as rog
from conftest import SAMPLE_CLUSTER


def sample() -> dict:
    return yaml.safe_load(SAMPLE_CLUSTER.read_text())


def write(tmp_path, config: dict, name="cluster.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def setter(dotted: str, value):
    """Mutation that sets a nested key; `available_node_types.<type>` names contain dots, so use '/'."""
    def apply(config):
        keys = dotted.split("/")
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return apply


def deleter(dotted: str):
    def apply(config):
        keys = dotted.split("/")
        node = config
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return apply


P = "provider/parameters/"
NC = P + "node_config/"
WORKER = "available_node_types/ray.worker.default/"

BAD_CONFIGS = [
    # (id, mutation, field path in the message, a phrase of the message)
    ("port-type", setter(P + "webserver_port", "4578x"), "provider.parameters.webserver_port", "expected an integer"),
    ("port-range", setter(P + "webserver_port", 70000), "provider.parameters.webserver_port", "<= 65535"),
    ("budget-negative", setter(P + "total_budget", -5), "provider.parameters.total_budget", "found -5"),
    ("budget-string", setter(P + "total_budget", "five"), "provider.parameters.total_budget", "expected a number"),
    ("bool-is-not-number", setter(P + "total_budget", True), "provider.parameters.total_budget", "found true"),
    ("start-price-negative", setter(NC + "budget_control/max_start_price", -1),
     "provider.parameters.node_config.budget_control.max_start_price", "expected a number >= 0"),
    ("unknown-key", setter(NC + "budget_control/max_start_prize", 1),
     "provider.parameters.node_config.budget_control.max_start_prize", "did you mean `max_start_price`"),
    ("unknown-parameter", setter(P + "payment_netwrok", "local"),
     "provider.parameters.payment_netwrok", "did you mean `payment_network`"),
    ("unknown-top-level", setter("max_worker", 3), "max_worker", "did you mean `max_workers`"),
    ("tag-and-hash", setter(NC + "demand/image_hash", "a" * 56),
     "provider.parameters.node_config.demand", "Either the `image_tag` or `image_hash` is allowed, not both"),
    ("neither-tag-nor-hash", deleter(NC + "demand/image_tag"),
     "provider.parameters.node_config.demand", "Either the `image_tag` or `image_hash` is required"),
    ("bad-hash", setter(NC + "demand/image_hash", "xyz"), "provider.parameters.node_config.demand.image_hash",
     "sha3 hash"),
    ("network-unknown", setter(P + "payment_network", "ethereum"), "provider.parameters.payment_network",
     "expected one of local, holesky, polygon"),
    ("network-typo", setter(P + "payment_network", "holeksy"), "provider.parameters.payment_network",
     "did you mean `holesky`"),
    ("network-goerli", setter(P + "payment_network", "goerli"), "provider.parameters.payment_network",
     "goerli was shut down"),
    ("network-mumbai", setter(P + "payment_network", "mumbai"), "provider.parameters.payment_network",
     "mumbai was shut down"),
    ("network-mainnet", setter(P + "payment_network", "mainnet"), "provider.parameters.payment_network",
     "use `polygon`"),
    ("cpu-load-zero", setter(NC + "budget_control/per_cpu_expected_usage/cpu_load", 0),
     "provider.parameters.node_config.budget_control.per_cpu_expected_usage.cpu_load", "> 0"),
    ("usage-incomplete", deleter(NC + "budget_control/per_cpu_expected_usage/duration_hours"),
     "provider.parameters.node_config.budget_control.per_cpu_expected_usage.duration_hours", "required"),
    ("outbound-not-url", setter(NC + "demand/outbound_urls", ["pypi.org"]),
     "provider.parameters.node_config.demand.outbound_urls", "http(s) URLs"),
    ("timeout-words", setter(P + "node_start_timeout", "ten minutes"), "provider.parameters.node_start_timeout",
     "duration"),
    ("local-network-providers", setter(P + "local_network/providers", 0),
     "provider.parameters.local_network.providers", "expected an integer >= 1"),
    ("node-type-override-type", setter(WORKER + "node_config/demand/min_cpu_threads", 1.5),
     "available_node_types.ray.worker.default.node_config.demand.min_cpu_threads", "expected an integer >= 0"),
    ("node-type-unknown-key", setter(WORKER + "node_config/demand/min_cpus", 2),
     "available_node_types.ray.worker.default.node_config.demand.min_cpus", "did you mean"),
    ("node-type-both-images", setter(WORKER + "node_config/demand/image_hash", "b" * 56),
     "available_node_types.ray.worker.default.node_config.demand", "not both"),
    ("node-type-min-gt-max", setter(WORKER + "min_workers", 9),
     "available_node_types.ray.worker.default.min_workers", "at most max_workers (2)"),
    ("node-type-no-resources", deleter(WORKER + "resources"),
     "available_node_types.ray.worker.default.resources", "required"),
    ("head-type-missing", setter("head_node_type", "ray.head.defualt"), "head_node_type",
     "did you mean `ray.head.default`"),
    ("provider-type", setter("provider/type", "aws"), "provider.type", "expected `external`"),
    ("provider-bad-module", setter("provider/module", "ray_on_golem.node_provider.GolemNodeProvider"),
     "provider.module", "expected `ray_on_golem.GolemNodeProvider` (or the original's "
                        "`ray_on_golem.provider.node_provider.GolemNodeProvider`)"),
    ("commands-not-strings", setter("setup_commands", [1, 2]), "setup_commands", "list of shell commands"),
    ("autostop-zero", setter(P + "autostop", {"idle_minutes": 0}), "provider.parameters.autostop.idle_minutes",
     "expected a number > 0"),
    ("autostop-no-minutes", setter(P + "autostop", {"down": True}), "provider.parameters.autostop.idle_minutes",
     "required"),
    ("autostop-down-not-bool", setter(P + "autostop", {"idle_minutes": 5, "down": "yes"}),
     "provider.parameters.autostop.down", "true or false"),
    ("optimal-below-minimal", setter(NC + "budget_control/payment_interval_hours", {"minimal": 12, "optimal": 1}),
     "provider.parameters.node_config.budget_control.payment_interval_hours.optimal", ">= minimal"),
    # issue 16: each of these was exit 1 "internal error" or a problem without its name
    ("budget-control-empty", setter(NC + "budget_control", None),
     "provider.parameters.node_config.budget_control", "found an empty block"),
    ("node-type-budget-control-empty", setter(WORKER + "node_config/budget_control", None),
     "available_node_types.ray.worker.default.node_config.budget_control", "found an empty block"),
    ("parameters-not-mapping", setter("provider/parameters", "x"), "provider.parameters",
     "expected a mapping, found 'x' (str)"),
    ("empty-key-top-level", setter("", 1), "''", "unknown key"),
    ("empty-key-nested", setter(NC + "", 1), "provider.parameters.node_config.''", "unknown key"),
    ("number-key", lambda c: c["provider"]["parameters"]["node_config"]["demand"].update({7: 1}), "provider.parameters.node_config.demand.7",
     "expected a text key, found 7 (int)"),
    ("budget-infinite", setter(P + "total_budget", float("inf")), "provider.parameters.total_budget", "at most"),
    ("workers-beyond-sqlite", setter("max_workers", 10 ** 30), "max_workers", "at most"),
    ("timeout-infinite", setter(P + "node_start_timeout", float("inf")), "provider.parameters.node_start_timeout",
     "duration"),
    ("name-is-a-date", setter("cluster_name", datetime.date(2024, 1, 1)), "cluster_name", "(date); quote it"),
]


@pytest.mark.parametrize("mutate, path, phrase", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_field(run_cli, tmp_path, datadir, mutate, path, phrase):
    config = sample()
    mutate(config)
    proc = run_cli("validate", write(tmp_path, config))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    line = next(ln for ln in proc.stderr.splitlines() if path + ":" in ln)
    assert phrase in line
    assert len(set(proc.stderr.splitlines())) == len(proc.stderr.splitlines()), proc.stderr  # none twice
    assert not datadir.exists()  # nothing else happened


SAMPLE_TEXT = SAMPLE_CLUSTER.read_text()
DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("text, line", [
    # PyYAML builds it, Python will not: int() refuses more than 4300 digits
    (SAMPLE_TEXT.replace("max_workers: 2", "max_workers: " + "9" * 5000, 1),
     "max_workers: expected a number of at most 4300 digits, found a 5000-digit number (cluster config"),
    # PyYAML's composer recurses: a RecursionError before any check
    (SAMPLE_TEXT + f"\nmetadata: {{deep: {DEEP}}}\n", "metadata.deep[0]...: nested deeper than 50 levels"),
    (SAMPLE_TEXT + f"\nsetup_commands: {DEEP}\n", "setup_commands[0][0]...: nested deeper than 50 levels"),
    (SAMPLE_TEXT + "\nmetadata: &a [*a]\n", "metadata[0]: an alias refers to the value that contains it"),
    (SAMPLE_TEXT + "\nmetadata: {a: &a [1, 1, 1, 1, 1, 1, 1, 1], b: &b [*a, *a, *a, *a, *a, *a, *a, *a],"
                   " c: &c [*b, *b, *b, *b, *b, *b, *b, *b], d: &d [*c, *c, *c, *c, *c, *c, *c, *c],"
                   " e: &e [*d, *d, *d, *d, *d, *d, *d, *d], f: [*e, *e, *e, *e, *e, *e, *e, *e]}\n",
     "metadata.f: more than 200000 values once aliases are expanded"),
    (SAMPLE_TEXT.replace("cluster_name: golem-cluster", "cluster_name: 2024-13-45"),
     "cluster_name: cannot read '2024-13-45' (str) as timestamp: month must be in 1..12"),
])
def test_yaml_beyond_its_limits_names_the_field(run_cli, tmp_path, text, line):
    assert text != SAMPLE_TEXT
    path = tmp_path / "c.yaml"
    path.write_text(text)
    proc = run_cli("validate", path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"ray-on-golem: error: {line}"), proc.stderr[:500]
    assert "internal error" not in proc.stderr


def test_a_provider_level_problem_is_printed_once(run_cli, tmp_path):
    """Both node types inherit the provider level's node_config: its mistake is one problem, not two."""
    config = sample()
    deleter(NC + "demand/image_tag")(config)
    setter(NC + "budget_control/per_cpu_expected_usage", {"cpu_load": 0.5})(config)
    proc = run_cli("validate", write(tmp_path, config))
    assert proc.returncode == 2
    assert proc.stderr.count("provider.parameters.node_config.demand: Either the `image_tag`") == 1, proc.stderr
    assert proc.stderr.count("per_cpu_expected_usage.duration_hours: required key is missing") == 1, proc.stderr
    assert "3 problems in the cluster config" in proc.stderr  # the worker sets its own `demand`: blamed too
    assert len(set(proc.stderr.splitlines())) == len(proc.stderr.splitlines())


def test_all_problems_reported_at_once(run_cli, tmp_path):
    config = sample()
    setter(P + "total_budget", -1)(config)
    setter(NC + "demand/min_mem_gb", 4)(config)
    proc = run_cli("validate", write(tmp_path, config))
    assert proc.returncode == 2
    assert "2 problems in the cluster config" in proc.stderr
    assert "provider.parameters.total_budget: expected a number > 0, found -1 (int)" in proc.stderr
    assert "provider.parameters.node_config.demand.min_mem_gb: unknown key; did you mean `min_mem_gib`?" in proc.stderr


@pytest.mark.parametrize("content, phrase", [
    ("provider: [unclosed\n", "line 2, column 1: not valid YAML"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("", "expected a mapping at the top level"),
])
def test_not_a_cluster_yaml(run_cli, tmp_path, content, phrase):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    proc = run_cli("validate", path)
    assert proc.returncode == 2
    assert phrase in proc.stderr and str(path) in proc.stderr


def test_missing_file(run_cli, tmp_path):
    proc = run_cli("validate", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert "nope.yaml: no such file" in proc.stderr


def test_sample_resolves_per_node_type(run_cli):
    proc = run_cli("validate", SAMPLE_CLUSTER, "--json")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["provider"]["parameters"]["payment_network"] == "local"
    assert resolved["provider"]["module"] == "ray_on_golem.GolemNodeProvider"
    head = resolved["node_types"]["ray.head.default"]
    worker = resolved["node_types"]["ray.worker.default"]
    assert head["head"] and not worker["head"]
    assert head["node_config"]["priority_subnet_tag"] == "ray-on-golem-heads"
    assert worker["node_config"]["priority_subnet_tag"] is None
    # the worker's own min_cpu_threads wins; everything else comes from the provider level
    assert worker["node_config"]["demand"]["min_cpu_threads"] == 2
    assert head["node_config"]["demand"]["min_cpu_threads"] == 1
    assert worker["node_config"]["demand"]["image_tag"] == head["node_config"]["demand"]["image_tag"]
    assert worker["node_config"]["budget_control"]["payment_interval_hours"] == {"minimal": 12, "optimal": 12}
    assert resolved["provider"]["parameters"]["node_start_timeout"] == 600


def test_sample_text_output(run_cli):
    proc = run_cli("validate", SAMPLE_CLUSTER)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0].startswith(f"{SAMPLE_CLUSTER}: valid (cluster `golem-cluster`")
    assert "node type `ray.worker.default` (worker, min_workers 0, max_workers 2):" in proc.stdout
    assert "  node_config.demand.min_cpu_threads: 2" in proc.stdout
    assert "\033[" not in proc.stdout  # not a terminal: no colour


def test_lists_replace_and_dicts_merge():
    config = sample()
    setter(NC + "demand/outbound_urls", ["https://a.example", "https://b.example"])(config)
    setter(WORKER + "node_config/demand/outbound_urls", ["https://c.example"])(config)
    setter(WORKER + "node_config/budget_control/max_start_price", 0.1)(config)
    resolved = rog.load_cluster_config(config)
    worker = resolved.node_config("ray.worker.default")
    head = resolved.node_config("ray.head.default")
    assert worker["demand"]["outbound_urls"] == ["https://c.example"]
    assert head["demand"]["outbound_urls"] == ["https://a.example", "https://b.example"]
    assert worker["budget_control"]["max_start_price"] == 0.1
    assert worker["budget_control"]["max_cpu_per_hour_price"] == 0.5  # merged from the provider level
    assert worker["budget_control"]["per_cpu_expected_usage"]["cpu_load"] == 0.8


def test_defaults_of_the_original():
    minimal = {
        "provider": {"type": "external", "module": "ray_on_golem.GolemNodeProvider",
                     "parameters": {"node_config": {"demand": {"image_tag": "golem/ray-on-golem:x"}}}},
        "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {}}},
    }
    resolved = rog.load_cluster_config(minimal)
    params = resolved.parameters
    assert params["payment_network"] == "holesky"  # as the original, for real use
    assert (params["webserver_port"], params["total_budget"], params["payment_driver"]) == (4578, 5.0, "erc20")
    assert params["ray_gcs_expose_port"] == 6379 and params["enable_registry_stats"] is True
    assert resolved.node_start_timeout == 600
    node = resolved.node_config("ray.head.default")
    assert node["subnet_tag"] == "public"
    assert node["demand"]["capabilities"] == ["vpn", "inet"] and node["demand"]["runtime"] == "vm"
    assert node["budget_control"]["per_cpu_expected_usage"] is None
    assert resolved.auth["ssh_user"] == "root"
    assert resolved.cluster_name == "default" and resolved.head_node_type == "ray.head.default"
    with pytest.raises(rog.UsageError, match="did you mean `ray.head.default`"):
        resolved.node_config("ray.head.defaul")


def test_config_error_api():
    config = sample()
    setter(P + "total_budget", 0)(config)
    with pytest.raises(rog.ConfigError) as caught:
        rog.load_cluster_config(config)
    assert caught.value.path == "provider.parameters.total_budget"
    assert caught.value.exit_code == 2 and caught.value.http_status == 400
    assert caught.value.issues == [("provider.parameters.total_budget", "expected a number > 0, found 0 (int)")]


def test_local_network_block_on_a_real_network_warns(run_cli, tmp_path):
    config = sample()
    setter(P + "payment_network", "holesky")(config)
    proc = run_cli("validate", write(tmp_path, config))
    assert proc.returncode == 0
    assert "local_network is used only with payment_network: local" in proc.stderr


@pytest.mark.parametrize("text, seconds", [(90, 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0),
                                           ("1d", 86400.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("600", 600.0)])
def test_parse_duration(text, seconds):
    assert rog.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "-5m", 0, "1h 30", True, None])
def test_parse_duration_rejects(text):
    with pytest.raises(rog.UsageError):
        rog.parse_duration(text)


def test_validation_does_not_mutate_input():
    config = sample()
    before = copy.deepcopy(config)
    rog.load_cluster_config(config)
    assert config == before


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

# No timing in tests (the machine is shared): no deadline, no "too slow" health check.
untimed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

_leaves = st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=3)
_keys = st.sampled_from("abcd")
_values = _leaves | st.dictionaries(_keys, _leaves | st.dictionaries(_keys, _leaves, max_size=3), max_size=4)


@untimed
@given(st.dictionaries(st.sampled_from("abcd"), _values), st.dictionaries(st.sampled_from("abcd"), _values))
def test_merge_override_wins_lists_replace_dicts_merge(base, override):
    merged = rog.merge_node_config(base, override)
    assert set(merged) == set(base) | set(override)
    for key, value in merged.items():
        if key not in override:
            assert value == base[key]
        elif isinstance(override[key], dict) and isinstance(base.get(key), dict):
            assert value == rog.merge_node_config(base[key], override[key])
        else:
            assert value == override[key]  # lists and scalars replace


@untimed
@given(st.integers(min_value=1, max_value=10 ** 8))
def test_format_duration_round_trips(seconds):
    assert rog.parse_duration(rog.format_duration(seconds)) == seconds


def test_resolve_one_node_config():
    """What the node provider does with the node_config Ray hands to create_node."""
    common = {"demand": {"image_tag": "golem/ray-on-golem:x", "outbound_urls": ["https://a.example"]}}
    worker = rog.resolve_node_config({"demand": {"min_cpu_threads": 4, "outbound_urls": []}}, common)
    assert worker["demand"]["image_tag"] == "golem/ray-on-golem:x" and worker["demand"]["outbound_urls"] == []
    assert worker["demand"]["min_cpu_threads"] == 4 and worker["priority_subnet_tag"] is None
    head = rog.resolve_node_config({}, common, head=True)
    assert head["priority_subnet_tag"] == "ray-on-golem-heads"
    with pytest.raises(rog.ConfigError) as caught:
        rog.resolve_node_config({"demand": {"image_hash": "c" * 56}}, common)
    assert caught.value.path == "node_config.demand"
    with pytest.raises(rog.ConfigError) as caught:
        rog.resolve_node_config({"budget_control": {"max_start_price": -1}}, common)
    assert caught.value.path == "node_config.budget_control.max_start_price"


def test_a_recursive_value_from_rays_loader_is_a_config_error():
    """`ray up` reads the YAML with yaml.safe_load, which builds `metadata: &a [*a]` as a list that
    contains itself; the provider's validation names it instead of looping."""
    config = sample()
    loop: list = [1]
    loop.append(loop)
    config["metadata"] = {"loop": loop, "shared": [loop, loop]}
    with pytest.raises(rog.ConfigError) as caught:
        rog.load_cluster_config(config)
    assert caught.value.issues[0][0].startswith("metadata.")
    assert "an alias refers to the value that contains it" in caught.value.issues[0][1]
