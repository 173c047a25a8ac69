"""Fan out small tasks over the cluster and print which nodes ran them.

    ray submit sample-cluster.yaml examples/fan_out.py [TASKS] [SECONDS]

Each task needs one CPU and sleeps a little, so more tasks than the head's CPU
make the autoscaler add workers; the summary shows how many ran on each node.
"""

import collections
import socket
import sys
import time

import ray


@ray.remote(num_cpus=1)
def where_am_i(seconds: float) -> str:
    time.sleep(seconds)
    return ray.util.get_node_ip_address()


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    ray.init(address="auto")
    started = time.monotonic()
    counts = collections.Counter(ray.get([where_am_i.remote(seconds) for _ in range(tasks)]))
    print(f"{tasks} tasks in {time.monotonic() - started:.1f} s on {len(counts)} node(s) "
          f"(submitted from {socket.gethostname()}):")
    for ip, n in sorted(counts.items()):
        print(f"  {ip}: {n} task(s)")
    print(f"NODES {len(counts)}")


if __name__ == "__main__":
    main()
