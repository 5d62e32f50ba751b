"""The Ray Train worker loop: one Engine per worker, a checkpoint per epoch, metrics to MLflow from rank 0."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from meal_ray.cluster import quiet_train_reports
from meal_ray.config import load_config
from meal_ray.sources.registry import source_class

STATE_FILE = "state.pt"


def _optimizer_norm(optimizer) -> float:
    """A fingerprint of the optimizer's momentum buffers (to show a resumed run restored them)."""
    total = 0.0
    for state in optimizer.state_dict()["state"].values():
        buf = state.get("momentum_buffer")
        if buf is not None:
            total += float(buf.double().pow(2).sum())
    return total ** 0.5


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from meal_ray.engine import Engine
    from meal_ray.tracking import Tracker

    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    cfg = load_config(data=loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Train V2 patches print() to tee into its logger, so every line would reach the driver twice;
    # write to stdout directly, and keep Train's per-report INFO lines (a full dict each) out of it.
    log = (lambda s: (sys.stdout.write(f"[meal-ray] {s}\n"), sys.stdout.flush())) if rank == 0 else (lambda s: None)
    quiet_train_reports()
    source = source_class(cfg.teachers.source).from_config(cfg, device)
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda m: m.to(device))
    crop_sampler = source.crop_sampler() if hasattr(source, "crop_sampler") else None  # the cache replays its crops
    engine = Engine.for_job(cfg, source=source, device=device, wrap_model=wrap, log=log, crop_sampler=crop_sampler)
    history: list = []
    start_info = {"start_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        engine.load_state_dict(state)
        history = state.get("history", [])
        start_info = {"start_epoch": engine.epoch, "resume_optimizer_norm": _optimizer_norm(engine.optimizer)}
        log(f"resumed from checkpoint at epoch {engine.epoch}")
    tracker = (Tracker(loop_config.get("tracking_uri"), loop_config.get("run_id"), log=log,
                       spool_dir=loop_config.get("output_dir") or cfg.output_dir)
               if rank == 0 else None)
    classes = engine.classes

    def on_epoch_end(epoch: int, metrics: dict, result) -> None:
        metrics = dict(metrics, epoch=epoch, **start_info)
        history.append(metrics)
        if tracker:
            tracker.log_metrics(metrics, step=epoch)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state = engine.state_dict()
                state.update(history=history, val=result.to_dict(classes))
                tmp = Path(d) / (STATE_FILE + ".tmp")
                torch.save(state, tmp)
                os.replace(tmp, Path(d) / STATE_FILE)  # a checkpoint is complete or absent
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    try:
        engine.fit(on_epoch_end)
    finally:
        source.close()
