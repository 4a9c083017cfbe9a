"""A Ray driver for netns_suite.py's driver-kill test: connects to ADDRESS, warms a pool of one
sandbox per node, builds one sandbox on each node, prints the QEMU pids and the host actors' pids
 as one JSON line, then sleeps until it is killed."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import capsa.ray as cray
import ray
from capsa.ray._placement import placer


async def main() -> None:
    recipe = cray.sandbox().memory_mb(256)
    await cray.warm(recipe.cpus(1), per_node=1)
    vms = [await recipe.node(label=f"zone={zone}").build() for zone in ("a", "b")]
    hosts = list(placer().hosts.values())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait for the pools to fill: they must die too
        pids = [pid for h in hosts for pid in await h.actor.vm_pids.remote()]
        if len(pids) >= len(vms) + len(hosts):
            break
        await asyncio.sleep(0.2)
    report = {"vm_pids": pids, "actor_pids": [h.pid for h in hosts]}
    print(json.dumps(report), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    ray.init(address=sys.argv[1], logging_level="warning", log_to_driver=False)
    asyncio.run(main())
