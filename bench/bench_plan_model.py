"""`meal-ray plan`'s model against measurement: predicted vs measured student img/s and teacher utilisation, one run.

    .venv/bin/python bench/bench_plan_model.py                 # ~7 min on 2 cores
    .venv/bin/python bench/bench_plan_model.py --subset 6000   # ~3.5 min, noisier

The model (meal_ray.train.plan.predict_served) predicts a served run from the student's hard-label img/s (here
measured first, with the same engine), the served path's ceiling and each replica's crops/s: the student goes at its
hard-label pace times the ceiling unless the teachers' replicas answer fewer crops/s, then at their capacity; a
teacher is busy that pace over its capacity. The ceiling is the served client's own cost on the student's cores:
served img/s from emulated teachers that answer at once over hard-label img/s, measured before and after the
configurations below and averaged. The teachers are emulated replicas of known crops/s (``args.emulate``: they
sleep as a teacher of that speed computes, so they take none of the student's cores) and four configurations are
run: student-bound (capacity 2x the demand), balanced (1.25x: the plan's own headroom), and teacher-bound (0.5x with
one replica, 0.3x each with two). Measured: the student's img/s over one epoch after a warm-up epoch, and each
teacher's utilisation = the crops its replicas answered in that epoch (every crop goes to every teacher once: the
epoch's images; no request was asked twice, checked) over what they could answer in that time. Goal: within 10%.
The table also shows the model without the ceiling (hard-label pace), as `meal-ray plan` uses it unless
``--student-throughput`` is given as hard-label img/s times a measured ceiling.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_served import deploy, epoch_rate, job, machine, served, teachers  # noqa: E402

CONFIGS = (("student-bound", 2.0, 1), ("balanced (plan headroom)", 1.25, 1), ("teacher-bound", 0.5, 1),
           ("teacher-bound, 2 replicas", 0.3, 2))


def check_plan_model(demand: float, models: list, measure) -> list:
    """Run CONFIGS with ``measure(crops_per_s, replicas) -> {"img_s", "wait", "retries"}`` (emulated teachers at that
    rate, the student served by them) and print predicted against measured; returns the rows. ``demand``: hard-label
    img/s. The served path's ceiling (teachers that answer at once) is measured before and after CONFIGS and
    averaged, so a drift of this machine's speed during the run weighs on both sides alike."""
    from meal_ray.train.plan import TeacherPlan, predict_served

    before = measure(1e9, 1)["img_s"]
    rows = []
    for name, factor, replicas in CONFIGS:
        rate = factor * demand
        measured = measure(rate, replicas)
        if measured["retries"]:  # a crop asked twice would be answered twice: the utilisation below undercounts
            print(f"warning: {measured['retries']} request(s) asked again in '{name}'")
        rows.append((name, factor, replicas, measured))
    after = measure(1e9, 1)["img_s"]
    ceiling = (before + after) / 2 / demand
    print(f"served path's ceiling, teachers that answer at once: {before:.0f} img/s before, {after:.0f} after "
          f"/ {demand:.0f} hard -> {ceiling:.2f}")
    print("| configuration | replica crops/s (x demand) | replicas | predicted img/s, hard-label pace (ratio) "
          "| predicted img/s, with the ceiling | measured img/s | ratio | predicted utilisation | measured | ratio "
          "| teacher wait |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for name, factor, replicas, measured in rows:
        rate = factor * demand
        plans = [TeacherPlan(m["name"], m["model"], rate, "emulated", replicas, 0.0) for m in models]
        hard_pace = predict_served(demand, plans)[0]
        pace, busy = predict_served(demand, plans, ceiling)
        busy, img_s, wait = min(busy.values()), measured["img_s"], measured["wait"]
        measured_busy = img_s / (replicas * rate)
        worst = max(worst, abs(img_s / pace - 1), abs(measured_busy / busy - 1))
        print(f"| {name} | {factor * demand:.0f} ({factor:g}x) | {replicas} | {hard_pace:.0f} "
              f"({img_s / hard_pace:.2f}) | {pace:.0f} | {img_s:.0f} | {img_s / pace:.2f} | {100 * busy:.0f}% | "
              f"{100 * measured_busy:.0f}% | {measured_busy / busy:.2f} | {100 * wait:.1f}% |")
    print(f"largest disagreement, with the ceiling: {100 * worst:.1f}% (goal: within 10%)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=20000, help="training images per epoch (6000: quicker, noisier)")
    args = parser.parse_args(argv)

    import ray

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    models = teachers(Path(tempfile.mkdtemp(prefix="bench-plan-")))
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"one Ray node (Serve's processes share the student's cores; bench_cluster.py runs this check with the "
          f"student on cores of its own); student mobilenetv3_small_050 at 64 px, batch 128, CutMix, {args.subset} "
          f"Fashion-MNIST images per epoch, prefetch 8; teachers {', '.join(m['name'] for m in models)} emulated; "
          "second epoch timed\n")
    ray.init(num_cpus=(os.cpu_count() or 2) + 4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})

    def measure(rate: float, replicas: int) -> dict:
        deploy(models, replicas, {"crops_per_s": rate})
        return served(job(args.subset, "served", models, prefetch=8))

    try:
        demand = epoch_rate(job(args.subset, "none", models))["img_s"]
        print(f"hard labels (the plan's demand): {demand:.0f} img/s")
        check_plan_model(demand, models, measure)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
