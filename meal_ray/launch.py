"""Ray Train launchers for `meal-ray pretrain` and `meal-ray distill` (Ray lives here, not in the engine).

The driver prepares the output directory, checks the teachers, opens the MLflow run, and
runs a ``TorchTrainer`` whose workers each hold only the student and the discriminator; rank 0
streams per-epoch metrics to MLflow and every epoch is a Ray Train checkpoint. The driver then
exports the final student (timm-loadable), writes ``metrics.json`` and the plots.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from meal_ray.config import JobConfig, load_config
from meal_ray.errors import ConfigError, OutputDirError

STATE_FILE = "state.pt"
RUN_FILE = "run.json"


# ----------------------------------------------------------------------------- worker side


def build_source(cfg: JobConfig, device):
    """The soft-label source named by ``teachers.source`` (one training loop for all of them)."""
    from meal_ray.soft_labels import LocalSoftLabels, NoSoftLabels

    if cfg.teachers.source == "none":
        return NoSoftLabels()
    if cfg.teachers.source == "local":
        from meal_ray.ensemble import TeacherEnsemble

        ensemble = TeacherEnsemble.from_specs(cfg.teachers.models, autocast=cfg.teachers.autocast)
        ensemble.check_student(cfg.student.num_classes, cfg.data.in_chans)
        return LocalSoftLabels(ensemble, device)
    from meal_ray.serving import ServedSoftLabels

    source = ServedSoftLabels(cfg.teachers.app_name, prefetch=cfg.teachers.prefetch)
    source.check_student(cfg.student.num_classes, cfg.data.in_chans)
    return source


def _optimizer_norm(optimizer) -> float:
    """A fingerprint of the optimizer's momentum buffers (to show a resumed run restored them)."""
    total = 0.0
    for state in optimizer.state_dict()["state"].values():
        buf = state.get("momentum_buffer")
        if buf is not None:
            total += float(buf.double().pow(2).sum())
    return total ** 0.5


def _quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report() with its whole metrics dict at INFO (logger named by file path)."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception:  # another Ray version: keep its logs
        pass


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
    _quiet_train_reports()
    source = build_source(cfg, device)
    wrap = ray.train.torch.prepare_model if world > 1 else (lambda m: m.to(device))
    engine = Engine(cfg, source=source, device=device, wrap_model=wrap, log=log)
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
    tracker = Tracker(loop_config.get("tracking_uri"), loop_config.get("run_id"), log=log) if rank == 0 else None
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


# ----------------------------------------------------------------------------- driver side


def prepare_output(cfg: JobConfig, resume: bool, overwrite: bool) -> dict:
    """Refuse to mix runs in one directory; return the saved run record when resuming."""
    out = cfg.output_dir
    record_path = out / RUN_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if overwrite:
            shutil.rmtree(out)
        elif resume:
            old, new = dict(record["config"]), cfg.to_dict()
            for d in (old, new):
                d["optim"] = {k: v for k, v in d["optim"].items() if k != "epochs"}
                d["run"] = {k: v for k, v in d["run"].items() if k not in ("tracking_uri", "log_every")}
            diff = sorted(k for k in new if old.get(k) != new.get(k))
            if diff:
                raise OutputDirError(
                    f"{out} holds a run with a different config (sections {', '.join(diff)} differ); "
                    "resume with the same config (only optim.epochs may grow), or use --overwrite / another --output."
                )
            return record
        else:
            raise OutputDirError(
                f"{out} already holds a run ({record.get('mode')} of {record.get('student')}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --output."
            )
    elif resume:
        raise OutputDirError(f"--resume: {out} holds no run to resume; drop --resume to start one.")
    out.mkdir(parents=True, exist_ok=True)
    return {}


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, start_local: bool = True,
               log_to_driver: bool = True) -> None:
    """Connect to a cluster (``address``, else RAY_ADDRESS), else start an embedded local Ray.

    With ``start_local=False`` it only connects (``auto`` finds a cluster on this machine).
    Inside `ray job submit` RAY_ADDRESS points at the job's cluster, so jobs join it.
    """

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or (None if start_local else "auto")
    if address:
        _token_auth_for(address)
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=log_to_driver)


def _token_auth_for(address: str) -> None:
    """Send this machine's Ray auth token to an explicit address too.

    Ray 2.60 turns token authentication on for new local clusters (token in ~/.ray/auth_token)
    but a client only sends the token to a cluster it found by itself (``auto``); connecting to
    an explicit ``host:port`` of such a cluster then fails with InvalidAuthToken. Do what Ray
    does for ``auto`` (only when RAY_AUTH_MODE is unset and a token exists); clusters without
    authentication accept such clients too.
    """
    if address == "auto" or os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # another Ray version: leave it to RAY_AUTH_MODE
        pass


def run_job(cfg: JobConfig, resume: bool = False, overwrite: bool = False, address: Optional[str] = None,
            log=print) -> dict:
    """Run a pretrain or distill job end to end and return the final metrics record."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from meal_ray.tracking import Tracker, default_tracking_uri

    record = prepare_output(cfg, resume, overwrite)
    out = cfg.output_dir
    needed = cfg.run.num_workers * cfg.run.cpus_per_worker + 1
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
    if cfg.mode == "distill" and cfg.teachers.source == "served":
        from meal_ray.serving import ServedSoftLabels

        ServedSoftLabels(cfg.teachers.app_name).check_student(cfg.student.num_classes, cfg.data.in_chans)
    uri = cfg.run.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, record.get("mlflow_run_id"), log=log)
    run_id = tracker.start(cfg.run.experiment, cfg.name, cfg.to_dict(), tags={"meal_ray.mode": cfg.mode})
    record = {"name": cfg.name, "mode": cfg.mode, "student": cfg.student.model, "config": cfg.to_dict(),
              "mlflow_run_id": run_id, "tracking_uri": uri, "started": record.get("started", time.time())}
    _write_json(out / RUN_FILE, record)
    config_path = out / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracker.log_artifact(config_path)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id,
                           "threads": max(1, int(cfg.run.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=RunConfig(
            name="train", storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )
    log(f"[meal-ray] {cfg.mode} {cfg.student.model}: {cfg.run.num_workers} worker(s), {cfg.optim.epochs} epochs, "
        f"output {out}, MLflow run {run_id} at {uri}")
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    return finish(cfg, result.checkpoint, tracker, log)


def finish(cfg: JobConfig, checkpoint, tracker, log=print) -> dict:
    """Export the final student, write metrics.json and plots, and attach them to the MLflow run."""
    from meal_ray.engine import build_student, student_data_config
    from meal_ray.models import export_model
    from meal_ray.plots import plot_per_class, plot_training_curves

    out = cfg.output_dir
    if checkpoint is None:
        raise ConfigError("training produced no checkpoint (optim.epochs already reached?)")
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    student = build_student(load_config(data=dict(cfg.to_dict(), student=dict(cfg.to_dict()["student"], weights=None,
                                                                                pretrained=False))))
    student.load_state_dict(state["student"])
    val = state["val"]
    classes = list(val["per_class"].keys())
    export_model(student.eval(), out / "student", student_data_config(cfg), label_names=classes)
    metrics = {"top1": val["top1"], "top5": val["top5"], "per_class": val["per_class"], "epochs": state["epoch"],
               "count": val["count"], "history": state["history"], "mlflow_run_id": tracker.run_id}
    _write_json(out / "metrics.json", metrics)
    plots = [plot_training_curves(state["history"], out / "training_curves.png", f"{cfg.mode}: {cfg.student.model}"),
             plot_per_class(classes, {cfg.student.model: list(val["per_class"].values())}, out / "per_class.png")]
    tracker.log_metrics({f"val_acc/{c.replace('/', '-')}": a for c, a in val["per_class"].items()}, step=state["epoch"])
    tracker.log_metrics({"final_top1": val["top1"], "final_top5": val["top5"]}, step=state["epoch"])
    for p in plots + [out / "metrics.json"]:
        tracker.log_artifact(p)
    tracker.log_artifact(out / "student", "student")
    tracker.end("FINISHED")
    log(f"[meal-ray] done: top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  student export {out / 'student'}")
    return metrics


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
