"""`meal-ray demo`: MEAL V2's claims end to end on Fashion-MNIST, on one machine.

Stages (each reused from the output directory when already finished): two hard-label
teachers, a hard-label student initialization, then two arms from that same initialization
for the same number of epochs: a hard-label control and MEAL V2 (served-ensemble soft labels +
discriminator, no hard labels). Everything is evaluated on the 10000-image test set.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Optional

from meal_ray.config import JobConfig, load_config

SIMILAR = ("T-shirt/top", "Shirt", "Pullover", "Coat")
DISSIMILAR = ("Trouser", "Bag", "Sandal", "Ankle boot")
DEMO_APP = "meal-ray-demo-teachers"

DATA = dict(dataset="fashion-mnist", image_size=32, crop_scale=[0.35, 1.0], crop_pct=0.875,
            mean=[0.2860], std=[0.3530])
PRESETS = {
    # --quick: shows the whole pipeline in minutes; the gain is not expected here.
    "quick": dict(subset=6000, val_subset=None, teacher_epochs=2, init_epochs=2, arm_epochs=2, batch=128,
                  teachers=("resnet18", "resnet10t"), student="mobilenetv3_small_050"),
    "full": dict(subset=None, val_subset=None, teacher_epochs=8, init_epochs=8, arm_epochs=12, batch=128,
                 teachers=("resnet18", "resnet10t"), student="mobilenetv3_small_050"),
}


def _stage_config(name: str, mode: str, out: Path, model: str, epochs: int, preset: dict, seed: int,
                  tracking_uri: Optional[str], **over) -> JobConfig:
    data = dict(DATA, train_subset=preset["subset"], val_subset=preset["val_subset"])
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


def _run_or_reuse(cfg: JobConfig, log) -> dict:
    from meal_ray.launch import run_job
    from meal_ray.models import is_export_dir

    out = cfg.output_dir
    metrics = out / "metrics.json"
    if metrics.is_file() and is_export_dir(out / "student"):
        saved = json.loads((out / "run.json").read_text())["config"]
        if saved == cfg.to_dict() or _same_but_tracking(saved, cfg.to_dict()):
            log(f"[demo] reusing finished stage {cfg.name} ({out})")
            return json.loads(metrics.read_text())
    log(f"[demo] stage {cfg.name}: {cfg.mode} {cfg.student.model} for {cfg.optim.epochs} epochs")
    return run_job(cfg, overwrite=True, log=log)


def _same_but_tracking(a: dict, b: dict) -> bool:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for d in (a, b):
        d["run"].pop("tracking_uri", None)
    return a == b


def run_demo(output: str, quick: bool = False, seed: int = 0, no_discriminator: bool = False,
             weight_decay: float = 0.0, hard_label_weight: float = 0.0, student_init: str = "pretrained",
             tracking_uri: Optional[str] = None, address: Optional[str] = None, log=print) -> dict:
    from ray import serve

    from meal_ray.evaluate_export import evaluate_export
    from meal_ray.launch import ensure_ray
    from meal_ray.models import count_parameters, load_export
    from meal_ray.serving import build_app

    preset = PRESETS["quick" if quick else "full"]
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import os

    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, 6))  # logical CPUs: teacher replicas + a train worker

    # 1. teachers and the student's good initialization (hard labels), reused when finished
    teachers = []
    for i, arch in enumerate(preset["teachers"]):
        cfg = _stage_config(f"teacher-{arch}", "pretrain", out, arch, preset["teacher_epochs"], preset, seed + i,
                            tracking_uri, optim=dict(lr=0.1, lr_schedule="cosine", weight_decay=5e-5))
        _run_or_reuse(cfg, log)
        teachers.append({"name": f"teacher{i}", "model": arch, "weights": str(cfg.output_dir / "student")})
    init_weights = None
    if student_init == "pretrained":
        cfg = _stage_config("student-init", "pretrain", out, preset["student"], preset["init_epochs"], preset, seed,
                            tracking_uri, optim=dict(lr=0.1, lr_schedule="cosine", weight_decay=5e-5))
        _run_or_reuse(cfg, log)
        init_weights = str(cfg.output_dir / "student")

    # 2. the two arms from the same initialization, same epochs
    arm_optim = dict(lr=0.01, lr_schedule="step", lr_milestones=[max(1, int(preset["arm_epochs"] * 0.6))],
                     weight_decay=weight_decay)
    suffix = f"-seed{seed}"
    control = _stage_config(f"control{suffix}", "pretrain", out, preset["student"], preset["arm_epochs"], preset,
                            seed, tracking_uri, weights=init_weights, optim=arm_optim)
    meal = _stage_config(
        f"meal-v2{suffix}", "distill", out, preset["student"], preset["arm_epochs"], preset, seed, tracking_uri,
        weights=init_weights, optim=arm_optim,
        teachers=dict(source="served", app_name=DEMO_APP, models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        loss=dict(discriminator="off" if no_discriminator else "reference", hard_label_weight=hard_label_weight))
    _run_or_reuse(control, log)
    log("[demo] starting the teacher ensemble as a Ray Serve application")
    serve.run(build_app({"teachers": teachers}), name=DEMO_APP, route_prefix=None)
    try:
        _run_or_reuse(meal, log)
    finally:
        serve.delete(DEMO_APP)

    # 3. evaluate everything on the test set
    log("[demo] evaluating on the 10000-image test set")
    rows, per_class = [], {}
    exports = {t["model"]: t["weights"] for t in teachers}
    if init_weights:
        exports["student init"] = init_weights
    exports["control (hard labels)"] = str(control.output_dir / "student")
    exports["MEAL V2 (ensemble soft labels)"] = str(meal.output_dir / "student")
    for label, path in exports.items():
        result, classes = evaluate_export(path)
        per_class[label] = dict(zip(classes, result.per_class))
        model = load_export(path)
        rows.append(dict(model=label, arch=model.pretrained_cfg.get("architecture", ""),
                         top1=result.top1, top5=result.top5, params=count_parameters(model)))
    ens = _evaluate_ensemble(teachers)
    per_class["teacher ensemble"] = ens["per_class"]
    rows.insert(len(teachers), dict(model="teacher ensemble", arch="+".join(t["model"] for t in teachers),
                                    top1=ens["top1"], top5=ens["top5"],
                                    params=sum(r["params"] for r in rows[:len(teachers)])))
    for r in rows:
        r["gap_to_ensemble"] = r["top1"] - ens["top1"]
        pc = per_class[r["model"]]
        r["similar_classes"] = statistics.mean(pc[c] for c in SIMILAR)
        r["dissimilar_classes"] = statistics.mean(pc[c] for c in DISSIMILAR)

    # 4. results.json, exports, plots, table
    for name, cfg in (("student", meal), ("control", control)):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(cfg.output_dir / "student", out / name)
    results = {"preset": "quick" if quick else "full", "seed": seed, "rows": rows, "per_class": per_class,
               "ablation": dict(no_discriminator=no_discriminator, weight_decay=weight_decay,
                                hard_label_weight=hard_label_weight, student_init=student_init),
               "gain_over_control": rows[-1]["top1"] - rows[-2]["top1"]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plots(out, per_class, control, meal)
    table = format_table(rows, per_class)
    (out / "results.md").write_text(table + "\n")
    log(table)
    _log_demo_run(out, results, tracking_uri)
    return results


def _evaluate_ensemble(teachers) -> dict:
    from torch.utils.data import DataLoader

    from meal_ray.config import DataConfig, TeacherSpec
    from meal_ray.data import EvalTransform, EvalView, load_datasets
    from meal_ray.ensemble import TeacherEnsemble
    from meal_ray.evaluation import evaluate

    ensemble = TeacherEnsemble.from_specs([TeacherSpec(t["model"], t["weights"]) for t in teachers])
    cfg = DataConfig(**{k: v for k, v in DATA.items()})
    _, val, classes = load_datasets(cfg, 10)
    loader = DataLoader(EvalView(val, EvalTransform(cfg.image_size, cfg.crop_pct, cfg.interpolation)), batch_size=500)
    result = evaluate(lambda x: ensemble(x)[0], loader, 10)
    return {"top1": result.top1, "top5": result.top5, "per_class": dict(zip(classes, result.per_class))}


def _plots(out: Path, per_class: dict, control: JobConfig, meal: JobConfig) -> None:
    from meal_ray.plots import plot_per_class, plot_training_curves

    classes = list(per_class["control (hard labels)"].keys())
    plot_per_class(classes, {k: list(per_class[k].values()) for k in
                             ("control (hard labels)", "MEAL V2 (ensemble soft labels)", "teacher ensemble")},
                   out / "per_class_accuracy.png", "Fashion-MNIST test accuracy per class")
    for name, cfg in (("control", control), ("meal_v2", meal)):
        history = json.loads((cfg.output_dir / "metrics.json").read_text())["history"]
        plot_training_curves(history, out / f"training_curves_{name}.png", f"{name}: {cfg.student.model}")


def _log_demo_run(out: Path, results: dict, tracking_uri: Optional[str]) -> None:
    from meal_ray.tracking import Tracker

    tracker = Tracker(tracking_uri)
    tracker.start("meal-ray-demo", f"demo-{results['preset']}-seed{results['seed']}", results["ablation"])
    tracker.log_metrics({f"top1/{r['model']}": r["top1"] for r in results["rows"]}, step=0)
    for p in sorted(out.glob("*.png")) + [out / "results.json", out / "results.md"]:
        tracker.log_artifact(p)
    tracker.end()


def format_table(rows, per_class) -> str:
    lines = ["| model | arch | params | top-1 | top-5 | gap to ensemble | similar classes* | dissimilar classes** |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['arch']} | {r['params'] / 1e6:.2f}M | {r['top1']:.2f} | {r['top5']:.2f} | "
                     f"{r['gap_to_ensemble']:+.2f} | {r['similar_classes']:.2f} | {r['dissimilar_classes']:.2f} |")
    lines.append(f"\n*mean accuracy on {', '.join(SIMILAR)}; **on {', '.join(DISSIMILAR)}\n")
    names = list(per_class)
    lines.append("| class | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for c in per_class[names[0]]:
        lines.append(f"| {c} | " + " | ".join(f"{per_class[n][c]:.1f}" for n in names) + " |")
    return "\n".join(lines)
