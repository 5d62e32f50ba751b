"""The Ray Train worker loop: one Engine per worker, a checkpoint per epoch, metrics to MLflow from rank 0."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from meal_ray.cluster import quiet_train_reports
from meal_ray.config import load_config
from meal_ray.errors import CheckpointError
from meal_ray.source_registry import source_class

STATE_FILE = "state.pt"


def save_state(state: dict, directory: Path) -> None:
    """``state.pt`` in ``directory``, complete or absent (written aside, then renamed)."""
    tmp = Path(directory) / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, Path(directory) / STATE_FILE)


def load_state(directory: Path, device="cpu") -> dict:
    """A checkpoint's state, unpickling nothing but tensors and plain values (``weights_only=True``)."""
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)


def resume_state(checkpoint_dir: Path, device="cpu", log=print) -> tuple[dict, Path, list]:
    """The state of Ray Train's latest checkpoint or, when that is unreadable (truncated on disk, not a plain-tensor
    file), of the newest earlier one that loads, saying so. Returns (state, directory used, directories skipped)."""
    checkpoint_dir = Path(checkpoint_dir)
    earlier = sorted((p for p in checkpoint_dir.parent.glob("checkpoint_*")
                      if p.is_dir() and p.name < checkpoint_dir.name), reverse=True)
    skipped = []
    for candidate in [checkpoint_dir] + earlier:
        try:
            state = load_state(candidate, device)
        except Exception as e:  # truncated zip, EOF, a pickled payload refused by weights_only
            log(f"checkpoint {candidate.name} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "trying the one before it")
            skipped.append(candidate)
            continue
        if skipped:
            log(f"resuming from {candidate.name} (epoch {state['epoch']}) instead of the unreadable "
                f"{', '.join(p.name for p in skipped)}")
        return state, candidate, skipped
    raise CheckpointError(f"no readable checkpoint in {checkpoint_dir.parent} ({len(skipped)} tried, all unreadable): "
                       "start the run again with --overwrite, or restore the checkpoint files")


def _optimizer_norm(optimizer) -> float:
    """A fingerprint of the optimizer's momentum buffers, logged at a resume: a user (or a test) can compare it
    with the checkpoint's and see that the momentum came back, not a fresh optimizer's zeros."""
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
    from meal_ray.progress import PROGRESS_FILE, ProgressWriter

    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    cfg = load_config(data=loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Train V2 patches print() to tee into its logger, so every line would reach the driver twice;
    # write to stdout directly, and keep Train's per-report INFO lines (a full dict each) out of it.
    # Rank 0's lines also go to progress.json, which the driver shows (Ray's forwarding of worker output is off
    # unless --verbose).
    progress = (ProgressWriter(Path(loop_config["output_dir"]) / PROGRESS_FILE, cfg.name, cfg.optim.epochs,
                               teachers=cfg.mode == "distill")
                if rank == 0 and loop_config.get("output_dir") else None)

    def log(s: str) -> None:
        if rank == 0:
            sys.stdout.write(f"[meal-ray] {s}\n")
            sys.stdout.flush()
            if progress is not None:
                progress.message(s)

    quiet_train_reports()
    source = source_class(cfg.teachers.source).from_config(cfg, device)
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda m: m.to(device))
    engine = Engine.for_job(cfg, source=source, device=device, wrap_model=wrap, log=log,
                            crop_sampler=source.crop_sampler())  # the cache replays its own crops
    engine.progress = progress
    history: list = []
    start_info = {"start_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        if Path(checkpoint.path).is_dir():  # local or shared storage: earlier checkpoints are there to fall back on
            state, _, skipped = resume_state(Path(checkpoint.path), device, log)
        else:
            with checkpoint.as_directory() as d:
                state, skipped = load_state(d, device), []
        engine.load_state_dict(state)
        history = state.get("history", [])
        start_info = {"start_epoch": engine.epoch, "resume_skipped_checkpoints": len(skipped)}
        log(f"resumed from checkpoint at epoch {engine.epoch} (optimizer momentum norm "
            f"{_optimizer_norm(engine.optimizer):.12g}, as saved)")
    classes = engine.classes

    def on_epoch_end(epoch: int, metrics: dict, result) -> None:
        metrics = dict(metrics, epoch=epoch, **start_info)
        history.append(metrics)
        if progress is not None:  # the driver owns the MLflow run: it logs them
            progress.metrics(metrics)
        state = engine.state_dict()  # on every rank: it gathers each rank's random streams
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state.update(history=history, val=result.to_dict(classes))
                save_state(state, Path(d))
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    try:
        engine.fit(on_epoch_end)
    finally:
        source.close()
