"""Student training throughput with `run.channels_last` on vs off, through the real engine.

Each case builds the engine on Fashion-MNIST (real data loader, recorded crops) and times
whole hard-label training steps, alternating the two layouts so machine noise hits both:

    .venv/bin/python bench/bench_channels_last.py
    .venv/bin/python bench/bench_channels_last.py --models mobilenetv3_small_050 resnet18 --steps 30

Prints images/s for each layout and their ratio, as measured in this run.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from meal_ray.config import load_config
from meal_ray.engine import Engine


def engine_for(model: str, channels_last: bool, size: int, batch: int) -> Engine:
    cfg = load_config(data=dict(
        name="bench", mode="pretrain", teachers=dict(source="none"),
        data=dict(dataset="fashion-mnist", image_size=size, crop_scale=[0.85, 1.0], crop_pct=1.0,
                  mean=[0.2860], std=[0.3530], train_subset=4000),
        student=dict(model=model, num_classes=10), optim=dict(batch_size=batch, lr=0.01),
        run=dict(channels_last=channels_last, log_every=0)))
    return Engine.for_job(cfg, log=lambda s: None)


def images_per_s(engine: Engine, steps: int) -> float:
    batches = itertools.islice(itertools.cycle(list(itertools.islice(engine.batches(), steps))), steps)
    engine.student.train()
    start = time.perf_counter()
    n = 0
    for batch in batches:
        engine.train_step(batch)
        n += batch.labels.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenetv3_small_050", "resnet10t", "resnet18"])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"student training steps, batch {args.batch}, {args.size} px, {args.threads} threads, "
          f"best of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':28s} {'NCHW img/s':>11s} {'NHWC img/s':>11s} {'NHWC/NCHW':>10s}")
    for model in args.models:
        engines = {cl: engine_for(model, cl, args.size, args.batch) for cl in (False, True)}
        for e in engines.values():  # warm-up (oneDNN picks its kernels on the first steps)
            images_per_s(e, 3)
        best = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for cl, e in engines.items():
                best[cl] = max(best[cl], images_per_s(e, args.steps))
        print(f"{model:28s} {best[False]:11.0f} {best[True]:11.0f} {best[True] / best[False]:9.2f}x")


if __name__ == "__main__":
    main()
