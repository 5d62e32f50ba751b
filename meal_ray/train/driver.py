"""The Ray Train driver for `meal-ray pretrain` and `meal-ray distill` (Ray lives here, not in the engine).

The driver checks the job (before Ray starts), prepares the output directory, checks the
soft-label source, opens the MLflow run, and runs a ``TorchTrainer`` whose workers each hold
only the student and the discriminator (:mod:`meal_ray.train.worker`); every epoch is a Ray
Train checkpoint. It then exports the final student (timm-loadable), writes ``metrics.json``
and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from meal_ray.cluster import ensure_ray, user_error
from meal_ray.config import JobConfig, load_config
from meal_ray.errors import CheckpointError, ConfigError, ModelNotFoundError, OutputDirError
from meal_ray.files import write_text_atomic
from meal_ray.models import check_model_name, check_weights_fit
from meal_ray.sources.registry import source_class
from meal_ray.train.worker import load_state, train_loop_per_worker

RUN_FILE = "run.json"


def check_output(cfg: JobConfig, resume: bool, overwrite: bool) -> dict:
    """Refuse to mix runs in one directory (nothing is touched here); return the saved run record when resuming."""
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"the output {out} is a file, not a directory; choose another --output (run.output).")
    record_path = out / RUN_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if overwrite:
            return {}
        if resume:
            old, new = dict(record["config"]), cfg.to_dict()
            for d in (old, new):
                d["optim"] = {k: v for k, v in d["optim"].items() if k != "epochs"}
                d["run"] = {k: v for k, v in d["run"].items()
                            if k not in ("tracking_uri", "log_every", "register_model")}
            diff = sorted(k for k in new if old.get(k) != new.get(k))
            if diff:
                raise OutputDirError(
                    f"{out} holds a run with a different config (sections {', '.join(diff)} differ); "
                    "resume with the same config (only optim.epochs may grow), or use --overwrite / another --output."
                )
            return record
        raise OutputDirError(
            f"{out} already holds a run ({record.get('mode')} of {record.get('student')}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output."
        )
    if resume:
        raise OutputDirError(f"--resume: {out} holds no run to resume; drop --resume to start one.")
    return {}


def prepare_output(cfg: JobConfig, resume: bool, overwrite: bool) -> dict:
    """:func:`check_output`, then clear the directory for ``--overwrite`` and create it (after every check passed)."""
    record = check_output(cfg, resume, overwrite)
    out = cfg.output_dir
    if overwrite and (out / RUN_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return record


def check_job(cfg: JobConfig, source=None) -> None:
    """Everything checkable on the driver before Ray starts: model names, weights files, the dataset (there, readable,
    the student's class count), the source's config. Errors here are clear messages, not worker tracebacks."""
    from meal_ray.data.datasets import load_datasets

    check_model_name(cfg.student.model)
    if cfg.student.weights and not Path(cfg.student.weights).exists():
        raise ModelNotFoundError(f"student.weights {cfg.student.weights!r} not found: give a meal-ray export "
                                 "directory or a weights file (.safetensors/.pth).")
    if cfg.student.weights:
        check_weights_fit(cfg.student.model, cfg.student.weights, cfg.student.num_classes, cfg.data.in_chans)
    load_datasets(cfg.data, cfg.student.num_classes)
    (source or source_class(cfg.teachers.source)).check_config(cfg)


def input_digests(cfg: JobConfig) -> dict:
    """sha256 of every weights file the job starts from (student init, teachers), by config key: a config names
    files by path, so two runs of one config can start from different weights; run.json keeps what this one read."""
    from meal_ray.ensemble import file_sha256, weights_file

    specs = [("student.weights", cfg.student)]
    if cfg.teachers.source in ("local", "served"):
        specs += [(f"teachers.models.{i}.weights", t) for i, t in enumerate(cfg.teachers.models)]
    out = {}
    for key, spec in specs:
        path = weights_file(spec)
        if path is not None and path.is_file():
            out[key] = file_sha256(path)
    return out


def tracking_tags(cfg: JobConfig) -> dict:
    """What a run is, as MLflow tags a person filters on: mode, student, dataset, the teacher set."""
    tags = {"meal_ray.mode": cfg.mode, "meal_ray.student": cfg.student.model, "meal_ray.dataset": dataset_name(cfg),
            "meal_ray.teacher_source": cfg.teachers.source}
    if cfg.teachers.source != "none":
        tags["meal_ray.teachers"] = ", ".join(t.model for t in cfg.teachers.models)
        tags["meal_ray.teacher_weights"] = ", ".join(str(t.weights or "hub") for t in cfg.teachers.models)
    return tags


def dataset_name(cfg: JobConfig) -> str:
    d = cfg.data
    return d.dataset if d.dataset != "imagefolder" else f"imagefolder:{Path(d.root or '.').resolve().name}"


def tracking_datasets(cfg: JobConfig) -> list:
    """The training and evaluation data as MLflow run inputs (name, source, subset; digest over what selects it)."""
    from meal_ray.tracking import dataset_input

    d = cfg.data
    source = str(Path(d.root).resolve()) if d.root else d.dataset
    out = []
    for split, subset, context in (("train", d.train_subset, "training"), ("val", d.val_subset, "evaluation")):
        select = {"dataset": d.dataset, "root": source, "split": split, "subset": subset, "seed": cfg.run.seed}
        out.append(dataset_input(f"{dataset_name(cfg)}/{split}", source, context, select,
                                 {"split": split, "subset": subset or "all", "num_classes": cfg.student.num_classes,
                                  "image_size": d.image_size}))
    return out


def run_job(cfg: JobConfig, resume: bool = False, overwrite: bool = False, address: Optional[str] = None,
            log=print, parent_run_id: Optional[str] = None, tags: Optional[dict] = None,
            progress_suffix: Callable[[Optional[float]], str] = lambda eta_s: "") -> dict:
    """Run a pretrain or distill job end to end and return the final metrics record. ``parent_run_id`` nests the
    MLflow run under that run (the demo's stages); ``tags`` are added to the run's. While it trains, a live progress
    line (``progress_suffix(stage ETA)`` appended: the demo's whole-demo ETA) and rank 0's log lines are shown
    through ``log``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from meal_ray.progress import PROGRESS_FILE, ProgressView
    from meal_ray.tracking import Tracker, default_tracking_uri

    source = source_class(cfg.teachers.source)
    check_job(cfg, source)  # before Ray starts: names, files, config
    check_output(cfg, resume, overwrite)
    needed = cfg.run.num_workers * cfg.run.cpus_per_worker + 1
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
    source.preflight(cfg)  # e.g. the served teachers run, speak our protocol and are the job's teachers
    record = prepare_output(cfg, resume, overwrite)  # only now is anything on disk touched
    out = cfg.output_dir
    uri = cfg.run.tracking_uri or default_tracking_uri()
    tracker = Tracker(uri, record.get("mlflow_run_id"), log=log, spool_dir=out)
    run_id = tracker.start(cfg.run.experiment, cfg.name, cfg.to_dict(), tags=dict(tracking_tags(cfg), **(tags or {})),
                           parent_run_id=parent_run_id, datasets=tracking_datasets(cfg))
    record = {"name": cfg.name, "mode": cfg.mode, "student": cfg.student.model, "config": cfg.to_dict(),
              "inputs": input_digests(cfg), "mlflow_run_id": run_id, "tracking_uri": uri,
              "started": record.get("started", time.time())}
    _write_json(out / RUN_FILE, record)
    config_path = out / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracker.log_artifact(config_path)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id, "output_dir": str(out),
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
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # a previous attempt's lines are not this one's
    try:
        with ProgressView(out / PROGRESS_FILE, print_line=log, suffix=progress_suffix, label=f"{cfg.mode} {cfg.name}"):
            result = trainer.fit()
    except BaseException as e:
        tracker.end("FAILED")
        error = user_error(e)  # a worker's own message (named problem and fix), not Ray's traceback
        if error is None:
            raise
        kept = sorted(p.name for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())
        if kept and not isinstance(error, CheckpointError):  # unreadable checkpoints: resuming is no fix
            error.args = (f"{error}\n[the run's checkpoints are kept, newest {kept[-1]}: fix the cause and run the "
                          "same command with --resume]",)
        raise error from None
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
        state = load_state(Path(d))
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
    info = tracker.log_model(out / "student", cfg.run.register_model and str(cfg.run.register_model),
                             step=state["epoch"])
    if info is not None:
        metrics.update(mlflow_model_uri=info.model_uri, registered_model=cfg.run.register_model,
                       registered_model_version=info.registered_model_version)
        _write_json(out / "metrics.json", metrics)
    tracker.end("FINISHED")
    log(f"[meal-ray] done: top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%  student export {out / 'student'}")
    if info is not None:
        registered = (f"; registered as {cfg.run.register_model} version {info.registered_model_version}"
                      if info.registered_model_version else "")
        log(f"[meal-ray] MLflow model {info.model_uri} (mlflow.pytorch.load_model){registered}")
    url = tracker.url()
    if url:
        log(f"[meal-ray] MLflow run: {url}" + ("" if tracker.uri.startswith("http") else
                                              f" (after `mlflow ui --backend-store-uri {tracker.uri}`)"))
    return metrics


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))
