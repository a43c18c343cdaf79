"""Watch Ray's autoscaler add worker nodes for work the cluster cannot hold, and remove them once idle.

    RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=1 --autoscaling-config=cluster/fake-multinode.yaml --block
    python cluster/autoscaling_demo.py --address auto --actors 4 --out autoscaling.json

Starts `--actors` actors of one CPU each (more CPUs than the head has), waits until every one is placed, prints
the alive nodes (`ray.nodes()`) as they change, kills the actors and waits until the autoscaler has removed the
idle workers (after the config's idle_timeout_minutes). Works against any autoscaling cluster, the fake
multi-node one above included; `--out` writes the timeline as JSON (tests/integration/test_autoscaling.py
reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ray


@ray.remote(num_cpus=1)
class Holder:
    """Holds one CPU until killed."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


class NodeWatch:
    """Alive nodes over time, and with `roles` ({role: actor class name prefix}) the node of each alive actor of
    those classes: a row each time either changes (cluster/autoscaling_honed.py watches train workers and
    Serve replicas this way)."""

    def __init__(self, roles: dict[str, str] | None = None) -> None:
        self.start = time.monotonic()
        self.roles = roles or {}
        self.rows: list[dict] = []

    def placed(self) -> dict[str, dict[str, str]]:
        """{role: {actor id: node id}} of the alive actors of each role."""
        found: dict[str, dict[str, str]] = {role: {} for role in self.roles}
        if self.roles:
            # straight from the GCS actor table: no dashboard round trip on every poll
            for actor in ray._private.state.actors(actor_state_name="ALIVE").values():
                for role, prefix in self.roles.items():
                    if actor["ActorClassName"].startswith(prefix):
                        found[role][actor["ActorID"]] = actor["Address"]["NodeID"]
        return found

    def alive(self, event: str | None = None) -> set[str]:
        nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        placed, last = self.placed(), self.rows[-1] if self.rows else None
        if event or not last or set(nodes) != set(last["nodes"]) or any(placed[r] != last[r] for r in placed):
            row = {"t": round(time.monotonic() - self.start, 1), "nodes": sorted(nodes), "cpus": sum(nodes.values()),
                   "event": event, **placed}
            self.rows.append(row)
            where = "".join(f", {role}s on {len(set(on.values()))} node(s): {len(on)}" for role, on in placed.items())
            print(f"[autoscaling] {row['t']:6.1f}s  {len(nodes)} node(s), {row['cpus']:g} CPUs{where}"
                  + (f"  ← {event}" if event else ""), flush=True)
        return set(nodes)

    def wait(self, done, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.alive()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no change after {timeout_s:.0f}s; nodes: {self.rows[-1]}")
            time.sleep(0.5)


def place(holders: list, watch: NodeWatch, timeout_s: float) -> list[str]:
    """The node of each actor, once all are placed (the autoscaler adds nodes meanwhile)."""
    refs = [h.node.remote() for h in holders]
    pending, deadline = refs, time.monotonic() + timeout_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(refs)} actors still unplaced after {timeout_s:.0f}s")
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        watch.alive()
    watch.alive(f"all {len(refs)} actors placed")
    return ray.get(refs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="the cluster's GCS address (default: auto)")
    parser.add_argument("--actors", type=int, default=4, help="1-CPU actors to start (default 4)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each scaling step")
    parser.add_argument("--out", help="write the timeline here as JSON")
    args = parser.parse_args()

    ray.init(address=args.address, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    watch = NodeWatch()
    watch.alive("start")
    holders = [Holder.remote() for _ in range(args.actors)]
    try:
        placed = place(holders, watch, args.timeout)
    finally:
        for h in holders:
            ray.kill(h)
    watch.alive("actors killed")
    released_at = watch.rows[-1]["t"]
    watch.wait(lambda alive: alive == {head}, args.timeout)
    watch.alive("idle workers removed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"head": head, "actor_nodes": placed, "released_at": released_at, "timeline": watch.rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
