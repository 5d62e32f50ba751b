"""Relabel scale-out, measured in one run: `meal-ray relabel` with 1 and then 2 Ray Data actors, each on a node of its
own core.

    .venv/bin/python bench/bench_relabel_scale.py             # ~4 min on 2 cores
    .venv/bin/python bench/bench_relabel_scale.py --passes 2  # a smoke run

Starts a head (no task CPUs) and two 1-CPU nodes, each a `ray start` under `taskset` on a core of its own (the
LocalCluster of bench_cluster.py), and relabels the same passes of Fashion-MNIST crops (teachers resnet18 + resnet10t
in each actor, random weights, 32 px) with 1 actor and then with 2, into two caches. Prints the crops/s between each
run's first and last finished shard (the actors' start-up left out) and their ratio (goal >= 1.8x), the node each
actor ran on (Ray's state), and checks that the two caches hold the same shards byte for byte.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cache import _config, _machine, _teachers  # noqa: E402
from bench_cluster import BIN, LocalCluster, wait_nodes  # noqa: E402


def timed_relabel(cfg, out: Path, passes: int, shard_size: int, actors: int, address: str) -> dict:
    """One relabel; the steady crops/s from the times its shards were reported finished."""
    from meal_ray.train.relabel import relabel

    finished = []  # (time, shards done) per "[relabel] shard ... (k/N)" line

    def log(line: str) -> None:
        m = re.search(r"^\[relabel\] shard \S+ \((\d+)/(\d+)\)", line)
        if m:
            finished.append((time.perf_counter(), int(m.group(1))))

    start = time.perf_counter()
    summary = relabel(cfg, out, passes=passes, shard_size=shard_size, actors=actors, address=address, log=log)
    wall = time.perf_counter() - start
    (t0, k0), (t1, k1) = finished[0], finished[-1]
    steady = (k1 - k0) * shard_size / max(t1 - t0, 1e-9)
    return {"crops": summary["crops"], "wall_s": wall, "steady": steady, "whole": summary["crops"] / wall}


def actor_nodes() -> dict:
    """ShardLabeler actors (alive or finished) per node, from the GCS actor table (no dashboard on this head)."""
    import ray

    nodes: dict = {}
    for actor in ray._private.state.actors().values():
        if "ShardLabeler" in actor.get("ActorClassName", ""):
            node = ((actor.get("Address") or {}).get("NodeID") or actor.get("NodeID") or "?")[:8]
            nodes[node] = nodes.get(node, 0) + 1
    return nodes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=6000, help="training images per pass")
    parser.add_argument("--passes", type=int, default=6, help="passes relabelled by each run")
    parser.add_argument("--shard-size", type=int, default=1000, help="crops per shard")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("bench_relabel_scale needs 2 cores (one per relabel node)")
        return 2
    from meal_ray.cache import SoftLabelCache
    from meal_ray.config import load_config

    root = Path(tempfile.mkdtemp(prefix="bench-relabel-"))
    temp = Path(f"/tmp/rbr{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    teachers = _teachers(root)
    base = _config(root, teachers, "local", args.subset, epochs=1).to_dict()
    cfg = load_config(data=dict(base, run=dict(base["run"], cpus_per_worker=1)))
    print(f"machine: {_machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"relabel: {args.passes} passes x {args.subset} Fashion-MNIST crops (32 px, CutMix), shards of "
          f"{args.shard_size}, teachers resnet18 + resnet10t in each actor; nodes: a head (no task CPUs) and two 1-CPU "
          f"nodes on cores {cores[0]} and {cores[1]}, each a `ray start` under taskset\n")
    cluster = LocalCluster(temp)
    try:
        cluster.start(",".join(map(str, cores)), 0, head=True)
        cluster.start(str(cores[0]), 1)
        cluster.start(str(cores[1]), 1)
        from meal_ray.cluster import ensure_ray

        os.environ.pop("RAY_AUTH_MODE", None)
        ensure_ray(cluster.address)
        wait_nodes(3)
        runs = {}
        for actors in (1, 2):
            runs[actors] = timed_relabel(cfg, root / f"cache-{actors}", args.passes, args.shard_size, actors,
                                         cluster.address)
            r = runs[actors]
            print(f"{actors} actor(s): {r['crops']} crops in {r['wall_s']:.1f} s ({r['whole']:.0f} crops/s with "
                  f"start-up), {r['steady']:.0f} crops/s between the first and last shard", flush=True)
        print(f"actors per node (both runs): {actor_nodes()}")
        one, two = (SoftLabelCache(root / f"cache-{n}") for n in (1, 2))
        same = {k: e["sha256"] for k, e in one.shards.items()} == {k: e["sha256"] for k, e in two.shards.items()}
        print(f"\n2 actors / 1 actor: {runs[2]['steady'] / runs[1]['steady']:.2f}x steady (goal >= 1.8x), "
              f"{runs[2]['whole'] / runs[1]['whole']:.2f}x with start-up; the two caches' shards byte-identical: "
              f"{same}")
        return 0 if same else 1
    finally:
        import ray

        ray.shutdown()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
