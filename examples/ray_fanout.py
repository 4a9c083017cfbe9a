"""Fan 20 sandboxes out over a Ray cluster and count where they ran.

    .venv/bin/python examples/ray_fanout.py                    # a local 2-node Ray cluster
    .venv/bin/python examples/ray_fanout.py --address auto     # an existing cluster

Each sandbox runs a small Python job and is stopped; placement puts each one on the least-loaded
node with a free ``capsa_slots`` slot and waits for one when every node is full. Without
``--address`` it starts a local cluster of two nodes with 5 slots each (``ray.cluster_utils``), so
20 sandboxes run in waves. (On a machine whose Ray must stay on loopback, run it in
``unshare -n`` after ``ip link set lo up``: see docs/scale-out.md.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

from ray.cluster_utils import Cluster

import capsa.ray as cray
import ray

JOB = "import hashlib, socket; print(socket.gethostname(), hashlib.sha256(b'x' * 10**6).hexdigest()[:8])"


async def one(index: int) -> tuple[str, str]:
    builder = cray.sandbox().memory_mb(256).placement_timeout(300)
    async with await builder.build() as sbx:
        result = await sbx.agent.exec("python3").args(["-c", JOB]).run()
        assert result.exit_code == 0, result.stderr
        return sbx.node_id, result.stdout.strip()


async def fan_out(count: int) -> None:
    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    per_node = collections.Counter(node for node, _ in results)
    print(f"{count} sandboxes in {time.monotonic() - started:.1f}s")
    for node, n in sorted(per_node.items()):
        print(f"node {node[:12]}: {n} sandboxes")
    await cray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description="20 sandboxes through Ray")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    if args.address:
        ray.init(address=args.address, logging_level="warning", log_to_driver=False)
        asyncio.run(fan_out(args.count))
        return
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"capsa_slots": 5})
    try:
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        asyncio.run(fan_out(args.count))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
