"""`meal-ray demo` stages: MEAL V2's claims end to end on Fashion-MNIST, on one machine.

Stages (each reused from the output directory when already finished, resumed from its last checkpoint when
stopped midway): two hard-label
teachers, a hard-label student initialization, then two arms from that same initialization
for the same number of epochs: a hard-label control and MEAL V2 (served-ensemble soft labels +
discriminator, no hard labels). Everything is evaluated on the 10000-image test set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from meal_ray.cache import MANIFEST, SCHEMA_VERSION, SoftLabelCache
from meal_ray.config import JobConfig, LossConfig, OptimConfig, config_differences, load_config
from meal_ray.data.datasets import FASHION_MNIST_CLASSES
from meal_ray.demo.report import (
    CONTROL,
    DATA,
    cache_vs_served,
    evaluate_seed,
    evaluate_shared,
    format_summary,
    format_table,
    gain_over_control,
    log_demo_run,
    main_arm,
    plot_demo,
    row_of,
    summarize,
    write_text,
)
from meal_ray.errors import CacheError, CheckpointError, ConfigError, ModelNotFoundError
from meal_ray.progress import format_duration

DEMO_APP = "meal-ray-demo-teachers"

PRESETS = {
    # --quick: shows the whole pipeline in minutes; the gain is not expected here.
    "quick": dict(subset=6000, val_subset=None, teacher_epochs=2, init_epochs=2, arm_epochs=2, arm_lr=0.05, cutmix=True,
                  batch=128, teachers=("resnet18", "resnet10t"), student="mobilenetv3_small_050", student_size=64),
    # full: the teachers are pretrained on all 60000 training images (like the paper's, pretrained models well above the
    # student); the student (init and both arms) trains on a stratified 10000-image subset, so the control's hard labels
    # carry less than the teachers know. With teachers and student on the same 20000 images the teachers ended <1 point
    # above the control and MEAL V2 lost to it (README, the demo section's last paragraph). The test set is always the
    # whole 10000 images. The student trains at 64 px (the teachers' soft labels come from the same crop resized to
    # their 32 px): at 32 px its last feature map is 1x1 and it underfits (measured init: 83.7% after 8 epochs at 32 px,
    # 88.5% after 10 at 64 px).
    # Both arms use CutMix (the paper's option: beta 1, prob 1) for 40 epochs: on a mixed image the hard label is
    # only the area ratio, while the teachers describe the image itself (measured, seed 0: MEAL V2 - control +1.79
    # with CutMix, +0.36 without at 40 epochs, +0.06 without at 15).
    "full": dict(subset=10000, teacher_subset=None, val_subset=None, teacher_epochs=5, init_epochs=10, arm_epochs=40,
                 arm_lr=0.05, cutmix=True, batch=128, teachers=("resnet18", "resnet10t"),
                 student="mobilenetv3_small_050", student_size=64),
}


def _stage_config(name: str, mode: str, out: Path, model: str, epochs: int, preset: dict, seed: int,
                  tracking_uri: Optional[str], **over) -> JobConfig:
    data = dict(DATA, train_subset=over.pop("train_subset", preset["subset"]), val_subset=preset["val_subset"])
    data["image_size"] = over.pop("image_size", DATA["image_size"])  # served teachers resize the student's crop
    base = dict(
        name=name, mode=mode, data=data,
        student=dict(model=model, num_classes=10, weights=over.pop("weights", None)),
        teachers=over.pop("teachers", dict(source="none")),
        optim=dict(dict(epochs=epochs, batch_size=preset["batch"]), **over.pop("optim", {})),
        loss=over.pop("loss", {}),
        run=dict(num_workers=1, cpus_per_worker=2, seed=seed, output=str(out / name), tracking_uri=tracking_uri,
                 experiment="meal-ray-demo", log_every=50),
    )
    return load_config(data=base)


def _reusable(cfg: JobConfig) -> bool:
    """A finished stage (metrics + export) of this very config: :func:`_same_stage`."""
    from meal_ray.models import is_export_dir

    out = cfg.output_dir
    return ((out / "metrics.json").is_file() and is_export_dir(out / "student") and _same_stage(cfg))


def _resumable(cfg: JobConfig) -> bool:
    """An unfinished stage of this very config (:func:`_same_stage`, in the same place) with a checkpoint: a demo
    stopped mid-stage (Ctrl-C, a lost machine) continues from its last epoch, and ends with the weights an
    uninterrupted stage would have (the engine restores every random stream), instead of training it again."""
    out = cfg.output_dir
    checkpoints = [p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir()]
    return bool(checkpoints) and not (out / "metrics.json").is_file() and _same_stage(cfg, moved=False)


def _same_stage(cfg: JobConfig, moved: bool = True) -> bool:
    """The stage recorded in ``cfg.output_dir/run.json`` is ``cfg``: its saved config equals ``cfg`` up to the
    tracking URI and (``moved``) the demo directory's location (a moved demo keeps its stages), and it started
    from the same weights files' contents (a teacher or student init trained again elsewhere has the same path but
    other weights). The saved config is read back through today's config classes, so a stage finished before a
    setting existed (it takes its default) is still reused."""
    from meal_ray.train.driver import input_digests

    out = cfg.output_dir
    if not (out / "run.json").is_file():
        return False
    try:
        record = json.loads((out / "run.json").read_text())
        saved = load_config(data=record["config"]).to_dict()
    except (ConfigError, KeyError, ValueError):  # a setting since removed or renamed: run the stage again
        return False
    if "inputs" in record and record["inputs"] != input_digests(cfg):
        return False
    moved_from, moved_to = Path(saved["run"]["output"]).parent, out.parent
    if moved_from != moved_to:  # the demo directory was moved or copied: its stages name their inputs under it
        if not moved:  # Ray Train's checkpoint records name the old place
            return False
        saved = _rebased(saved, str(moved_from), str(moved_to))
    return not config_differences(saved, cfg.to_dict(), ignore=["run.tracking_uri"])


def _rebased(value, old_root: str, new_root: str):
    """``value`` (a config dict) with every path under ``old_root`` moved under ``new_root``."""
    if isinstance(value, dict):
        return {k: _rebased(v, old_root, new_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, old_root, new_root) for v in value]
    if isinstance(value, str) and (value == old_root or value.startswith(old_root + os.sep)):
        return new_root + value[len(old_root):]
    return value


class DemoClock:
    """The whole demo's ETA: the work left in the stages still to run (training: epochs x images; a relabel: crops
    still to label), each kind of work (the model trained, or ``relabel``) at the pace measured on that kind so far.
    A kind not measured yet goes at the running stage's pace when it is that kind, else at the pace of all the work
    measured so far. Stages the plan found finished (reused) are planned with no work."""

    def __init__(self, stages: Sequence[tuple]):
        self.stages = [(str(kind), int(work)) for kind, work in stages]  # in run order: (kind, work left)
        self.index = 0  # the running stage
        self.spent_s: dict = {}  # per kind: seconds spent, work done
        self.done_work: dict = {}
        self.started = time.monotonic()

    def start(self, kind: str, work: int) -> str:
        """The next stage starts: its kind and the work it has left now (0 when reused)."""
        if self.index >= len(self.stages):  # a stage the plan did not count
            self.stages.append((kind, work))
        else:
            self.stages[self.index] = (kind, work)
        self.started = time.monotonic()
        return f"stage {self.index + 1}/{len(self.stages)}"

    def finish(self, trained: bool, work: Optional[int] = None) -> None:
        """The running stage ended; ``work`` is what it did when that differs from what it planned (a resumed
        relabel labels only the shards it lacked)."""
        kind, planned = self.stages[self.index]
        if trained:
            self.spent_s[kind] = self.spent_s.get(kind, 0.0) + time.monotonic() - self.started
            self.done_work[kind] = self.done_work.get(kind, 0) + (planned if work is None else work)
        self.index += 1

    def _pace(self, kind: str, running: Optional[float]) -> Optional[float]:
        """Seconds per unit of ``kind``'s work, or None before anything can tell."""
        if self.done_work.get(kind):
            return self.spent_s[kind] / self.done_work[kind]
        if kind == self.stages[self.index][0] and running is not None:
            return running
        done = sum(self.done_work.values())
        return sum(self.spent_s.values()) / done if done else running

    def suffix(self, stage_eta_s: Optional[float]) -> str:
        """`` | demo: stage 3/9, ETA 21m04s`` for the live progress line (``stage_eta_s``: the running stage's own)."""
        kind, work = self.stages[self.index]
        running = None if stage_eta_s is None else (time.monotonic() - self.started + stage_eta_s) / max(work, 1)
        if stage_eta_s is None:  # the stage has only begun: its kind's pace, if measured before
            pace = self._pace(kind, None)
            stage_eta_s = None if pace is None else work * pace
        eta = stage_eta_s
        for later, left in self.stages[self.index + 1:]:
            pace = self._pace(later, running) if left else 0.0
            eta = None if eta is None or pace is None else eta + left * pace
        return f" | demo: stage {self.index + 1}/{len(self.stages)}, ETA {format_duration(eta)}"


def run_stage(cfg: JobConfig, log, parent_run_id: Optional[str] = None, clock: Optional[DemoClock] = None) -> dict:
    """Train a stage, resume it from its checkpoint when it was stopped midway, or reuse it when finished; either
    way its MLflow run is nested under the demo's run ``parent_run_id`` (a reused stage as a short run that names the
    run which trained it)."""
    from meal_ray.train.driver import run_job

    clock = clock or DemoClock([])
    reused = _reusable(cfg)
    resume = not reused and _resumable(cfg)
    which = clock.start(*_stage_work(cfg, reused, resume))
    if reused:
        log(f"[demo] {which}: reusing finished stage {cfg.name} ({cfg.output_dir})")
        link_reused_stage(cfg, parent_run_id)
        clock.finish(trained=False)
        return json.loads((cfg.output_dir / "metrics.json").read_text())
    log(f"[demo] {which}: {cfg.name}, {cfg.mode} {cfg.student.model} for {cfg.optim.epochs} epochs"
        + (" (resuming its last checkpoint)" if resume else ""))
    result = run_job(cfg, resume=resume, overwrite=not resume, log=log, parent_run_id=parent_run_id,
                     tags={"meal_ray.stage": cfg.name},
                     progress_suffix=clock.suffix)
    clock.finish(trained=True)
    return result


def _stage_work(cfg: JobConfig, reused: bool, resume: bool) -> tuple:
    """A training stage's (kind, work left) for the demo's ETA: its model, and epochs x training images; none when
    reused, and only the epochs after its checkpoint when resumed (else the stage's pace would read too fast)."""
    done = cfg.optim.epochs if reused else _checkpoint_epoch(cfg.output_dir) if resume else 0
    return cfg.student.model, (cfg.optim.epochs - done) * (cfg.data.train_subset or 60000)


def _planned_stage_work(cfg: JobConfig) -> tuple:
    """:func:`_stage_work` as the stage will find itself when it starts."""
    reused = _reusable(cfg)
    return _stage_work(cfg, reused, not reused and _resumable(cfg))


def _checkpoint_epoch(out: Path) -> int:
    """The epoch of a stage's newest readable checkpoint, where its resume continues; 0 when none loads."""
    from meal_ray.train.worker import resume_state

    checkpoints = sorted(p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())
    try:
        return int(resume_state(checkpoints[-1], log=lambda line: None)[0]["epoch"])
    except (CheckpointError, IndexError, KeyError):
        return 0


def link_reused_stage(cfg: JobConfig, parent_run_id: Optional[str]) -> Optional[str]:
    """A nested run ``<stage> (reused)`` under the demo's run: the stage's config, tags and final top-1/top-5, and
    ``meal_ray.reused_run_id`` naming the MLflow run that trained it. Returns its run id."""
    from meal_ray.tracking import Tracker, default_tracking_uri
    from meal_ray.train.driver import tracking_datasets, tracking_tags

    if not parent_run_id:
        return None
    out = cfg.output_dir
    trained_by = json.loads((out / "run.json").read_text()).get("mlflow_run_id") or ""
    metrics = json.loads((out / "metrics.json").read_text())
    tracker = Tracker(cfg.run.tracking_uri or default_tracking_uri())
    note = (f"Stage {cfg.name} was trained earlier (MLflow run {trained_by or 'unknown'}; files in {out}) and reused "
            "by this demo run, not retrained.")
    run_id = tracker.start(cfg.run.experiment, f"{cfg.name} (reused)", cfg.to_dict(),
                           tags=dict(tracking_tags(cfg), **{"meal_ray.stage": cfg.name, "meal_ray.reused": "true",
                                                            "meal_ray.reused_run_id": trained_by,
                                                            "mlflow.note.content": note}),
                           parent_run_id=parent_run_id, datasets=tracking_datasets(cfg))
    tracker.log_metrics({"final_top1": metrics["top1"], "final_top5": metrics["top5"]}, step=metrics.get("epochs", 0))
    tracker.end()
    return run_id


def open_demo_run(tracking_uri: Optional[str], name: str, params: dict, tags: dict, spool_dir: Path, log):
    """The demo's parent MLflow run (a model-training experiment ``meal-ray-demo``); every stage nests under it."""
    from meal_ray.tracking import Tracker

    tracker = Tracker(tracking_uri, log=log, spool_dir=spool_dir)
    tracker.start("meal-ray-demo", name, params, tags=tags)
    return tracker


def _cached_config(meal: JobConfig, out: Path, *, tag: str, crops_tag: str, seed: int,
                   top_k: Optional[int] = None) -> tuple:
    """(the cache arm's config, its cache folder): MEAL V2 from a relabel of the MEAL V2 arm's crops (same student,
    init, schedule, CutMix, seed). ``top_k`` < classes trains on only the k largest stored probabilities per crop
    (``teachers.cache_top_k``: what a top-k relabel holds, from the same crops and teachers), as stage
    ``meal-v2-cache-top<k>``. The cache is named by what changes its crops only (CutMix, the teachers, the passes), so
    ablations of the loss or the optimizer share the default arm's."""
    base = meal.to_dict()
    cache_dir = out / f"cache{crops_tag}-seed{seed}"
    name = f"meal-v2-cache{tag}{f'-top{top_k}' if top_k else ''}-seed{seed}"
    cached = load_config(data=dict(base, name=name, run=dict(base["run"], output=str(out / name)),
                                   teachers=dict(base["teachers"], source="cache", cache=str(cache_dir),
                                                 cache_top_k=top_k)))
    return cached, cache_dir


def _crops_to_label(cached: JobConfig, cache_dir: Path, passes: int) -> int:
    """What the relabel before the cache arm has left: passes x training crops, less what the cache already holds."""
    try:
        held = sum(int(e["rows"]) for e in SoftLabelCache(cache_dir).shards.values())
    except CacheError:  # none yet, or one of an older schema (relabelled from scratch)
        held = 0
    return max(passes * (cached.data.train_subset or 60000) - held, 0)


def _run_cache_arm(meal: JobConfig, cached: JobConfig, cache_dir: Path, passes: int, log,
                   parent_run_id: Optional[str] = None, clock: Optional[DemoClock] = None) -> None:
    """Relabel the MEAL V2 arm's crops once, as a stage of its own (in-process teachers in a Ray Data actor; resumed
    shard by shard when the cache is partly there), then train the cache arm from it, no teachers running. A
    finished cache arm needs its cache no more: neither runs again."""
    from meal_ray.train.relabel import relabel

    clock = clock or DemoClock([])
    if not _reusable(cached):
        schema = _cache_schema(cache_dir)
        if schema not in (None, SCHEMA_VERSION):  # the demo's own derived data, from an older meal-ray
            log(f"[demo] {cache_dir} is a cache of schema v{schema} (this meal-ray writes v{SCHEMA_VERSION}): "
                "relabelling it")
            shutil.rmtree(cache_dir)
        crops = _crops_to_label(cached, cache_dir, passes)
        which = clock.start("relabel", crops)
        log(f"[demo] {which}: {cache_dir.name}, relabel {passes} passes of {meal.name}'s crops with its teachers "
            f"({crops} crops to label)")
        base = meal.to_dict()
        relabel_cfg = load_config(data=dict(base, teachers=dict(base["teachers"], source="local")))
        done = relabel(relabel_cfg, cache_dir, passes=passes, actors=1, log=log, progress_suffix=clock.suffix)
        clock.finish(trained=bool(done["labelled"]), work=done["labelled"])
    run_stage(cached, log, parent_run_id, clock)


def _cache_schema(root: Path) -> Optional[int]:
    try:
        return json.loads((root / MANIFEST).read_text()).get("schema_version")
    except (OSError, ValueError):
        return None


def _arm_tags(no_discriminator, weight_decay, hard_label_weight, student_init, cutmix=None,
              authors_d_lr=False, teachers=None, teacher_epochs=None) -> tuple:
    """Stage-name suffixes (control, MEAL V2) for non-default ablation flags, so ablation arms never replace the
    default ones. The control is tagged only by the flags that change it (weight decay, random init, CutMix other
    than the preset's): a ``--no-discriminator``, ``--hard-label-weight``, ``--authors-d-lr``, ``--teachers`` or
    ``--teacher-epochs`` ablation reuses the default control."""
    wd = f"-wd{weight_decay:g}" if weight_decay else ""
    init = "-random-init" if student_init == "random" else ""
    hard = f"-hard{hard_label_weight:g}" if hard_label_weight else ""
    mix = "" if cutmix is None else "-cutmix" if cutmix else "-no-cutmix"
    d_lr = "-authors-dlr" if authors_d_lr else ""
    ensemble = _teachers_tag(teachers, teacher_epochs)
    return wd + mix + init, ("-no-disc" if no_discriminator else "") + d_lr + ensemble + wd + hard + mix + init


def _teachers_tag(teachers: Optional[Sequence[str]], teacher_epochs: Optional[int] = None) -> str:
    """The suffix of the stages and cache folders of another teacher ensemble (``--teachers`` and/or
    ``--teacher-epochs``), e.g. ``-teachers-resnet18+regnety_004``, ``-teachers-e15``: its soft labels differ, so its
    MEAL V2 arms and caches never replace the preset ensemble's."""
    parts = ["+".join(teachers)] if teachers else []
    parts += [f"e{teacher_epochs}"] if teacher_epochs else []
    return f"-teachers-{'-'.join(parts)}" if parts else ""


def _teacher_stage(arch: str, teacher_epochs: Optional[int]) -> str:
    """A teacher's stage name: ``teacher-<arch>``, or ``teacher-<arch>-e<N>`` when ``--teacher-epochs`` trains it
    another length than the preset's, so the preset's teacher (and the arms distilled from it) stay."""
    return f"teacher-{arch}" + (f"-e{teacher_epochs}" if teacher_epochs else "")


def _check_teachers(teachers: Optional[Sequence[str]], preset_teachers: Sequence[str]) -> Optional[list]:
    """``--teachers`` as a list of known timm names, or None when it is the preset's own ensemble (same stages,
    same names); refused before any training when empty, repeated or unknown."""
    from meal_ray.models import check_model_name

    if teachers is None:
        return None
    names = [t.strip() for t in teachers if t.strip()]
    if not names:
        raise ConfigError("--teachers needs at least one timm model name, e.g. --teachers "
                          f"{','.join(preset_teachers)},regnety_004")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise ConfigError(f"--teachers names {', '.join(repeated)} twice; each teacher is one architecture (its stage "
                          "is teacher-<name>), so list each once.")
    for name in names:
        if ":" in name or "/" in name:
            raise ConfigError(f"--teachers: {name!r} is not an architecture name; the demo trains its teachers from "
                              "scratch on Fashion-MNIST, so give timm names such as resnet18 or regnety_004.")
        try:
            check_model_name(name)
        except ModelNotFoundError as e:
            raise ConfigError(f"--teachers: {e}") from None
    return None if tuple(names) == tuple(preset_teachers) else names


def _length_tags(preset_epochs: int, arm_epochs: Optional[int], cache_passes: int) -> tuple:
    """(stage and report tag, cache folder tag): arms of another length than the preset's are tagged ``-e<N>`` (they
    never replace the default arms), and a cache of other than one pass per preset epoch ``-p<P>`` (a cache holds a
    fixed number of passes, so a longer one cannot reuse the default folder)."""
    return (f"-e{arm_epochs}" if arm_epochs not in (None, preset_epochs) else "",
            f"-p{cache_passes}" if cache_passes and cache_passes != preset_epochs else "")


@dataclass(frozen=True)
class DemoPlan:
    """What a demo invocation decided before training anything: where it writes, the preset and seeds, the ablation
    flags with the stage-name tags they give (control, MEAL V2, cache), the arms' CutMix and student size, the cache
    arm, and where MLflow is."""

    out: Path
    preset: dict
    preset_name: str
    seeds: list
    ablation: dict
    control_tag: str
    tag: str
    cache_tag: str
    student_size: int
    arm_cutmix: bool
    tracking_uri: Optional[str]
    cache_passes: int
    cache_top_k: Optional[int]
    classes: int
    served_arm: bool = True
    passes_tag: str = ""  # the cache folders' tag when the cache is not one pass per preset epoch


def run_demo(output: str, *, quick: bool = False, seeds: Sequence[int] = (0,), no_discriminator: bool = False,
             weight_decay: float = 0.0, hard_label_weight: float = 0.0, student_init: str = "pretrained",
             cutmix: Optional[bool] = None, tracking_uri: Optional[str] = None, address: Optional[str] = None,
             log=print, preset: Optional[dict] = None, cache_passes: int = 0,
             cache_top_k: Optional[int] = None, authors_d_lr: bool = False, served_arm: bool = True,
             arm_epochs: Optional[int] = None, teachers: Optional[Sequence[str]] = None,
             teacher_epochs: Optional[int] = None) -> dict:
    """Teachers once, then per seed: student init, control arm, MEAL V2 arm; a table per seed and mean ± std.

    ``cutmix`` overrides the preset's CutMix in both arms (an ablation); ``preset`` replaces the quick/full
    settings (tests use tiny models). ``cache_passes`` > 0 adds a third arm: MEAL V2 from a soft-label cache of that
    many passes, relabelled once per seed with the same teachers (``meal-ray relabel``), no teachers running;
    ``cache_top_k`` trains the cache arm on the top k stored probabilities only and reports into ``ablation-top<k>``;
    ``authors_d_lr`` puts MEAL V2's discriminator on the student's schedule, as the authors' code does.
    ``served_arm=False`` (with a cache arm) runs MEAL V2 from the cache alone, no teachers served: the cheap way to
    an ablation row, reported into its own ``ablation<flags>-cache-only`` folder. ``arm_epochs`` trains both arms
    (control and MEAL V2, from the same init) for that many epochs instead of the preset's: patient distillation, in
    stages and a report tagged ``-e<N>``; give it a cache of as many passes so its crops stay fresh. ``teachers``
    (timm names) replaces the preset's ensemble: a third teacher or a stronger one; the preset's teachers keep their
    stages (teacher ``i`` trains on seed ``i``), the MEAL V2 arms and their cache are tagged ``-teachers-<a>+<b>...``,
    and the control and init (no teachers in them) are shared with the default run. ``teacher_epochs`` trains the
    teachers that long instead of the preset's (a stronger ensemble), as stages ``teacher-<arch>-e<N>`` beside the
    preset's, with the MEAL V2 arms and cache tagged ``-teachers-e<N>``."""
    from meal_ray.cluster import ensure_ray

    preset_name = "custom" if preset else "quick" if quick else "full"
    preset = dict(preset or PRESETS[preset_name])
    for flag, value, key in (("--arm-epochs", arm_epochs, "arm_epochs"), ("--teacher-epochs", teacher_epochs,
                                                                        "teacher_epochs")):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1 (default: the preset's {preset[key]}).")
    epochs_tag, passes_tag = _length_tags(preset["arm_epochs"], arm_epochs, cache_passes)
    preset["arm_epochs"] = arm_epochs or preset["arm_epochs"]
    teachers = _check_teachers(teachers, preset["teachers"])
    teacher_epochs = None if teacher_epochs == preset["teacher_epochs"] else teacher_epochs
    preset["teacher_epochs"] = teacher_epochs or preset["teacher_epochs"]
    preset["teachers"] = tuple(teachers or preset["teachers"])
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if cache_passes < 0:
        raise ConfigError(f"--cache-passes={cache_passes} must be >= 0 (0: no cache arm).")
    classes = len(FASHION_MNIST_CLASSES)
    if not served_arm and not cache_passes:
        raise ConfigError("--no-served-arm leaves MEAL V2 only its cache arm: add --cache-passes N (e.g. 40).")
    if cache_top_k is not None and (not cache_passes or not 1 <= cache_top_k <= classes):
        raise ConfigError(f"--cache-top-k={cache_top_k} needs --cache-passes > 0 and a value between 1 and the "
                          f"{classes} classes.")
    try:  # the arms' own validation, before hours of teacher training rather than after
        OptimConfig(weight_decay=weight_decay).validate()
        LossConfig(hard_label_weight=hard_label_weight).validate()
    except ConfigError as e:
        raise ConfigError(f"demo ablation flags (--weight-decay, --hard-label-weight): {e}") from None
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, 6))  # logical CPUs: teacher replicas + a train worker
    preset_cutmix = bool(preset.get("cutmix", False))
    arm_cutmix = preset_cutmix if cutmix is None else bool(cutmix)
    ablation = dict(no_discriminator=no_discriminator, weight_decay=weight_decay, hard_label_weight=hard_label_weight,
                    student_init=student_init, cutmix=None if arm_cutmix == preset_cutmix else arm_cutmix,
                    authors_d_lr=authors_d_lr, teachers=teachers, teacher_epochs=teacher_epochs)
    control_tag, tag = _arm_tags(**ablation)
    control_tag, tag = control_tag + epochs_tag, tag + epochs_tag
    student_size = preset.get("student_size", DATA["image_size"])
    cache_tag = (f"-top{cache_top_k}" if cache_top_k else "") + ("" if served_arm else "-cache-only")
    parent = open_demo_run(
        tracking_uri, f"demo-{preset_name}{tag}{cache_tag}-seeds{'-'.join(map(str, seeds))}",
        dict(ablation, seeds="-".join(map(str, seeds)), preset=preset_name, settings=preset, cache_passes=cache_passes,
             cache_top_k=cache_top_k),
        {"meal_ray.mode": "demo", "meal_ray.dataset": DATA["dataset"], "meal_ray.student": preset["student"],
         "meal_ray.teachers": ", ".join(preset["teachers"])}, out, log)
    try:
        plan = DemoPlan(out=out, preset=preset, preset_name=preset_name, seeds=seeds, ablation=ablation,
                        control_tag=control_tag, tag=tag, cache_tag=cache_tag, student_size=student_size,
                        arm_cutmix=arm_cutmix, tracking_uri=tracking_uri, cache_passes=cache_passes,
                        cache_top_k=cache_top_k, classes=classes, served_arm=served_arm, passes_tag=passes_tag)
        results = _run_demo(plan, log, parent)
    except BaseException:
        parent.end("FAILED")
        raise
    return results


@dataclass(frozen=True)
class SeedStages:
    """One seed's stages, configured before anything trains (so the ETA knows which are finished): the student's
    init (None from a random init), the control, MEAL V2 from the served teachers (trained when ``served``), and
    the cache arm with its cache folder (None without a cache)."""

    init: Optional[JobConfig]
    control: JobConfig
    meal: JobConfig
    served: bool
    cached: Optional[JobConfig]
    cache_dir: Optional[Path]


def _run_demo(plan: DemoPlan, log, parent) -> dict:
    """The stages in order (teachers, then each seed's init and arms), then the report."""
    teacher_stages = _teacher_stages(plan)
    teachers = [{"name": f"teacher{i}", "model": cfg.student.model, "weights": str(cfg.output_dir / "student")}
                for i, cfg in enumerate(teacher_stages)]
    seeds = [_seed_stages(plan, seed, teachers) for seed in plan.seeds]
    clock = DemoClock(_planned_work(teacher_stages, seeds, plan.cache_passes))
    for cfg in teacher_stages:
        run_stage(cfg, log, parent.run_id, clock)
    runs = _run_seeds(plan, teachers, seeds, log, parent.run_id, clock)
    return _report(plan, runs, log, parent)


def _planned_work(teacher_stages: list, seeds: list, passes: int) -> list:
    """Each stage's (kind, work left) in the order they run, for the whole demo's ETA: finished stages plan none,
    and a relabel is a stage of its own (before its cache arm) unless that arm is finished."""
    planned = [_planned_stage_work(cfg) for cfg in teacher_stages]
    for stages in seeds:
        for cfg in (stages.init, stages.control, stages.meal if stages.served else None):
            if cfg is not None:
                planned.append(_planned_stage_work(cfg))
        if stages.cached is not None:
            if not _reusable(stages.cached):
                planned.append(("relabel", _crops_to_label(stages.cached, stages.cache_dir, passes)))
            planned.append(_planned_stage_work(stages.cached))
    return planned


def _teacher_stages(plan: DemoPlan) -> list:
    """The teachers' stages, each pretrained with hard labels on its own seed (every demo seed distills from the
    same ensemble)."""
    preset = plan.preset
    return [_stage_config(_teacher_stage(arch, plan.ablation["teacher_epochs"]), "pretrain", plan.out, arch,
                          preset["teacher_epochs"], preset, i, plan.tracking_uri,
                          train_subset=preset.get("teacher_subset", preset["subset"]),
                          optim=dict(lr=0.1, lr_schedule="cosine", weight_decay=5e-5))
            for i, arch in enumerate(preset["teachers"])]


def _seed_stages(plan: DemoPlan, seed: int, teachers: list) -> SeedStages:
    """A seed's stages: the student's good initialization (hard labels), then the arms from it with the same epochs
    (the control, MEAL V2 from the served teachers, MEAL V2 from the cache)."""
    out, preset, ablation, tracking_uri = plan.out, plan.preset, plan.ablation, plan.tracking_uri
    arm_optim = dict(lr=preset["arm_lr"], lr_schedule="cosine", weight_decay=ablation["weight_decay"],
                     cutmix=plan.arm_cutmix)
    init, init_weights = None, None
    if ablation["student_init"] == "pretrained":
        init = _stage_config(f"student-init-seed{seed}", "pretrain", out, preset["student"], preset["init_epochs"],
                             preset, seed, tracking_uri, image_size=plan.student_size,
                             optim=dict(lr=0.1, lr_schedule="cosine", weight_decay=5e-5))
        init_weights = str(init.output_dir / "student")
    control = _stage_config(f"control{plan.control_tag}-seed{seed}", "pretrain", out, preset["student"],
                            preset["arm_epochs"], preset, seed, tracking_uri, weights=init_weights,
                            image_size=plan.student_size, optim=arm_optim)
    meal = _stage_config(
        f"meal-v2{plan.tag}-seed{seed}", "distill", out, preset["student"], preset["arm_epochs"], preset,
        seed, tracking_uri, weights=init_weights, image_size=plan.student_size,
        optim=dict(arm_optim, d_lr_schedule="student" if ablation["authors_d_lr"] else "constant"),
        teachers=dict(source="served", app_name=DEMO_APP,
                      models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        loss=dict(discriminator="off" if ablation["no_discriminator"] else "reference",
                  hard_label_weight=ablation["hard_label_weight"]))
    cached, cache_dir = None, None
    if plan.cache_passes:
        crops_tag = ("" if ablation["cutmix"] is None else "-cutmix" if ablation["cutmix"] else "-no-cutmix") \
            + _teachers_tag(ablation["teachers"], ablation["teacher_epochs"]) + plan.passes_tag
        cached, cache_dir = _cached_config(meal, out, tag=plan.tag, crops_tag=crops_tag, seed=seed,
                                           top_k=plan.cache_top_k)
    return SeedStages(init=init, control=control, meal=meal, served=plan.served_arm, cached=cached,
                      cache_dir=cache_dir)


def _run_seeds(plan: DemoPlan, teachers: list, seeds: list, log, parent_id: str, clock: DemoClock) -> list:
    """Per seed: its stages in order, then the test set. The teachers are served only while a served arm still has
    to train."""
    from ray import serve

    from meal_ray.cluster import start_serve_without_http
    from meal_ray.serve.app import build_app

    shared = evaluate_shared(teachers, plan.out)
    runs, served = [], False
    try:
        for n, (seed, stages) in enumerate(zip(plan.seeds, seeds)):
            log(f"[demo] seed {seed} ({n + 1}/{len(plan.seeds)})")
            if stages.init is not None:
                run_stage(stages.init, log, parent_id, clock)
            run_stage(stages.control, log, parent_id, clock)
            if stages.served:
                if not served and not _reusable(stages.meal):
                    log("[demo] starting the teacher ensemble as a Ray Serve application")
                    start_serve_without_http()
                    serve.run(build_app({"teachers": teachers}), name=DEMO_APP, route_prefix=None)
                    served = True
                run_stage(stages.meal, log, parent_id, clock)
            if stages.cached is not None:
                _run_cache_arm(stages.meal, stages.cached, stages.cache_dir, plan.cache_passes, log, parent_id,
                               clock)
            log(f"[demo] seed {seed}: evaluating on the 10000-image test set")
            init_weights = None if stages.init is None else str(stages.init.output_dir / "student")
            runs.append(evaluate_seed(seed, shared, init_weights, stages.control,
                                      stages.meal if stages.served else None, stages.cached))
            log(format_table(runs[-1]["rows"], runs[-1]["per_class"]))
    finally:
        if served:
            serve.delete(DEMO_APP)
    return runs


def _report(plan: DemoPlan, runs: list, log, parent) -> dict:
    """results.json, the exports (the first seed's arms), plots, tables and the demo's MLflow run; an ablation
    reports into its own folder so the default run's results are never replaced."""
    from meal_ray.tracking import ui_hint

    first = runs[0]
    arm = main_arm(first["meal"])
    report = plan.out / f"ablation{plan.tag}{plan.cache_tag}" if plan.tag or plan.cache_tag else plan.out
    report.mkdir(exist_ok=True)
    for name, cfg in (("student", first["meal"] or first["cached"]), ("control", first["control"])):
        shutil.rmtree(report / name, ignore_errors=True)
        shutil.copytree(cfg.output_dir / "student", report / name)
    summary = summarize(runs)
    results = {
        "preset": plan.preset_name, "settings": dict(plan.preset, cutmix=plan.arm_cutmix,
                                                     cache_passes=plan.cache_passes, cache_top_k=plan.cache_top_k),
        "seeds": plan.seeds, "ablation": plan.ablation, "served_arm": plan.served_arm,
        "summary": summary,
        "gain_over_control": gain_over_control(summary, arm),
        "cache_vs_served": cache_vs_served(summary),
        "exports": {"student": {"seed": first["seed"], "top1": row_of(first["rows"], arm)["top1"]},
                    "control": {"seed": first["seed"], "top1": row_of(first["rows"], CONTROL)["top1"]}},
        "runs": [{k: r[k] for k in ("seed", "rows", "per_class", "gain_over_control")} for r in runs],
    }
    write_text(report / "results.json", json.dumps(results, indent=2))
    plot_demo(report, runs)
    tables = format_summary(summary, results["gain_over_control"], plan.seeds, arm) + "\n\n" + format_table(
        first["rows"], first["per_class"], title=f"Seed {first['seed']} (the exports in student/ and control/)")
    if plan.cache_top_k:
        tables = (f"Cache arm: the top {plan.cache_top_k} of {plan.classes} teacher probabilities per crop, the rest "
                  "spread evenly over the other classes (FKD's marginal smoothing)\n\n" + tables)
    write_text(report / "results.md", tables + "\n")
    log(tables)
    log_demo_run(report, results, parent)
    url = parent.url()
    if url:
        log(f"[demo] MLflow: {url}{ui_hint(parent.uri)}: the demo's run, each stage a run nested under it")
    return results


