"""An actor keeps state between calls, wherever the cluster placed it.

    ray submit sample-cluster.yaml examples/actor.py
"""

import ray


@ray.remote(num_cpus=1)
class Counter:
    def __init__(self) -> None:
        self.value = 0

    def add(self, amount: int) -> int:
        self.value += amount
        return self.value

    def node(self) -> str:
        return ray.util.get_node_ip_address()


def main() -> None:
    ray.init(address="auto")
    counter = Counter.remote()
    for i in range(1, 6):
        total = ray.get(counter.add.remote(i))
    print(f"counter = {total} (actor on node {ray.get(counter.node.remote())})")


if __name__ == "__main__":
    main()
