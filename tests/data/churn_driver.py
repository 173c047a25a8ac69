"""Churn for the soak test (tests/test_faults.py), run on the head with `ray submit`: CYCLES times,
ask the autoscaler for WORKERS more CPUs, wait until the workers joined, withdraw the request and
wait until they left again (idle_timeout_minutes)."""

import sys
import time

import ray
from ray.autoscaler.sdk import request_resources

cycles, workers = int(sys.argv[1]), int(sys.argv[2])
ray.init(address="auto")


def alive() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


for cycle in range(cycles):
    request_resources(num_cpus=1 + workers)  # the head has 1 CPU
    while alive() < 1 + workers:
        time.sleep(1)
    print(f"CYCLE {cycle} UP", flush=True)
    request_resources(num_cpus=0)
    while alive() > 1:
        time.sleep(1)
    print(f"CYCLE {cycle} DOWN", flush=True)
print("CHURN DONE", flush=True)
