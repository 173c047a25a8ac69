#!/usr/bin/env bash
# The main job on the local Golem network, as a user runs it:
# start a cluster, submit the fan-out example (the autoscaler adds workers), show the
# cluster, tear it down. Usage: examples/demo.sh [PYTHON]   (default: python3 with Ray installed)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-${PYTHON:-python3}}
ray() { "$py" -m ray.scripts.scripts "$@"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # `module: ray_on_golem.GolemNodeProvider`
cluster=sample-cluster.yaml
trap 'ray down -y "$cluster" >/dev/null 2>&1 || true' EXIT   # never leave a cluster behind

ray up -y --no-config-cache "$cluster"
ray submit --no-config-cache "$cluster" examples/fan_out.py 6 15
ray exec --no-config-cache "$cluster" 'ray status'
ray submit --no-config-cache "$cluster" examples/actor.py
ray down -y "$cluster"
trap - EXIT
"$py" ray_on_golem.py stop
