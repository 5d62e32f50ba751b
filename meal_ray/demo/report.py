"""The demo's report: test-set rows per stage, mean ± std over seeds, the verdict, tables, plots, MLflow run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

from meal_ray.config import JobConfig
from meal_ray.files import write_text_atomic

CONTROL = "control (hard labels)"
MEAL = "MEAL V2 (ensemble soft labels)"
CACHED = "MEAL V2 (soft-label cache)"
SIMILAR = ("T-shirt/top", "Shirt", "Pullover", "Coat")
DISSIMILAR = ("Trouser", "Bag", "Sandal", "Ankle boot")
# Teachers' data: 28 px upsampled to 32. Mild crops (scale 0.85-1, near-square) and no eval crop margin:
# Fashion-MNIST items fill the frame, so ImageNet-style 0.35-1 crops starve the compact student (measured:
# its train accuracy stayed below its test accuracy) and crop_pct 0.875 cuts off sleeves and hems.
DATA = dict(dataset="fashion-mnist", image_size=32, crop_scale=[0.85, 1.0], crop_ratio=[0.9, 1.1], crop_pct=1.0,
            mean=[0.2860], std=[0.3530])

write_text = write_text_atomic  # results.json / results.md are whole or absent


EVALUATION = "test-evaluation.json"  # beside a stage's export: its test-set figures, reused while its files are same
EVALUATION_FORMAT = 1  # bump when the figures kept change


def export_key(path: str | Path) -> dict:
    """What an export's test-set figures depend on: its weights' and its config's (preprocessing's) sha256."""
    from meal_ray.ensemble import file_sha256

    return {name: file_sha256(Path(path) / name) for name in ("model.safetensors", "config.json")}


def remembered(where: Path, key: dict, compute):
    """``compute()``, or what it gave for the same ``key`` before, kept in ``where`` (JSON): a finished stage that a
    demo or an ablation reuses is not evaluated on the whole test set again. Returned as JSON gives it back either
    way, so a first and a later run see the same values."""
    try:
        saved = json.loads(where.read_text())
        if saved.get("format") == EVALUATION_FORMAT and saved.get("key") == key:
            return saved["value"]
    except (OSError, ValueError):
        pass
    value = json.loads(json.dumps(compute()))
    write_text(where, json.dumps({"format": EVALUATION_FORMAT, "key": key, "value": value}))
    return value


def evaluate_shared(teachers, out: Path) -> dict:
    """Test-set rows and per-class accuracy of each teacher and of their ensemble (same for every seed); the
    ensemble's figures are kept in the demo directory ``out``."""
    rows, per_class = [], {}
    reliability = {}
    for t in teachers:
        row, pc, reliability[t["model"]] = evaluate_row(t["model"], t["weights"])
        rows.append(row)
        per_class[t["model"]] = pc
    ens = remembered(Path(out) / f"ensemble-{EVALUATION}", [export_key(t["weights"]) for t in teachers],
                     lambda: evaluate_ensemble(teachers))
    per_class["teacher ensemble"] = ens["per_class"]
    reliability["teacher ensemble"] = ens["reliability"]
    rows.append(dict(model="teacher ensemble", arch="+".join(t["model"] for t in teachers), top1=ens["top1"],
                     top5=ens["top5"], nll=ens["nll"], ece=ens["ece"], params=sum(r["params"] for r in rows)))
    return {"rows": rows, "per_class": per_class, "reliability": reliability}


def evaluate_row(label: str, path: str) -> tuple[dict, dict, dict]:
    """An export's table row (top-1/5, NLL, ECE in %, parameters), its per-class accuracy and reliability bins,
    computed once per export content (kept beside the export, in its stage's directory)."""
    from meal_ray.evaluation import evaluate_export
    from meal_ray.models import count_parameters, load_export

    def compute() -> dict:
        result, classes = evaluate_export(path)
        model = load_export(path)
        return {"row": dict(arch=model.pretrained_cfg.get("architecture", ""), top1=result.top1, top5=result.top5,
                            nll=result.nll, ece=100 * result.ece, params=count_parameters(model)),
                "per_class": dict(zip(classes, result.per_class)), "reliability": result.reliability}

    value = remembered(Path(path).parent / EVALUATION, export_key(path), compute)
    return dict(model=label, **value["row"]), value["per_class"], value["reliability"]


def main_arm(meal) -> str:
    """The MEAL V2 row a demo compares with the control: the served arm's, or the cache's when it ran alone."""
    return MEAL if meal is not None else CACHED


def evaluate_seed(seed: int, shared: dict, init_weights, control: JobConfig, meal: Optional[JobConfig],
                  cached: Optional[JobConfig] = None) -> dict:
    rows, per_class = [dict(r) for r in shared["rows"]], dict(shared["per_class"])
    reliability = dict(shared.get("reliability", {}))
    exports = {}
    if init_weights:
        exports["student init"] = init_weights
    exports[CONTROL] = str(control.output_dir / "student")
    if meal is not None:
        exports[MEAL] = str(meal.output_dir / "student")
    if cached is not None:
        exports[CACHED] = str(cached.output_dir / "student")
    for label, path in exports.items():
        row, per_class[label], reliability[label] = evaluate_row(label, path)
        rows.append(row)
    ens_top1 = shared["rows"][-1]["top1"]
    for r in rows:
        r["gap_to_ensemble"] = r["top1"] - ens_top1
        pc = per_class[r["model"]]
        r["similar_classes"] = statistics.mean(pc[c] for c in SIMILAR)
        r["dissimilar_classes"] = statistics.mean(pc[c] for c in DISSIMILAR)
    top1 = {r["model"]: r["top1"] for r in rows}
    return {"seed": seed, "rows": rows, "per_class": per_class, "reliability": reliability, "control": control,
            "meal": meal, "cached": cached, "gain_over_control": top1[main_arm(meal)] - top1[CONTROL]}


def row_of(rows: list, label: str) -> Optional[dict]:
    return next((r for r in rows if r["model"] == label), None)


SUMMARY_FIELDS = ("top1", "top5", "gap_to_ensemble", "similar_classes", "dissimilar_classes", "nll", "ece")


def summarize(runs: list) -> list:
    """Per table row: mean, sample std, min and max over seeds of every numeric column."""
    out = []
    for i, row in enumerate(runs[0]["rows"]):
        entry = {"model": row["model"], "arch": row["arch"], "params": row["params"], "n": len(runs)}
        for f in SUMMARY_FIELDS:
            values = [r["rows"][i][f] for r in runs]
            entry[f] = {"mean": statistics.mean(values), "std": sample_std(values),
                        "min": min(values), "max": max(values), "per_seed": values}
        out.append(entry)
    return out


def evaluate_ensemble(teachers) -> dict:
    from torch.utils.data import DataLoader

    from meal_ray.config import DataConfig, TeacherSpec
    from meal_ray.data import EvalTransform, EvalView, load_datasets
    from meal_ray.ensemble import TeacherEnsemble
    from meal_ray.evaluation import evaluate

    ensemble = TeacherEnsemble.from_specs([TeacherSpec(t["model"], t["weights"]) for t in teachers])
    # at the largest teacher input size: each teacher resizes to its own, as it does with the student's crops
    cfg = DataConfig(**dict(DATA, image_size=max(t.size[0] for t in ensemble.teachers)))
    _, val, classes = load_datasets(cfg, 10)
    loader = DataLoader(EvalView(val, EvalTransform(cfg.image_size, cfg.crop_pct, cfg.interpolation)), batch_size=500)
    result = evaluate(lambda x: ensemble(x)[0], loader, 10, outputs="probs")
    return {"top1": result.top1, "top5": result.top5, "nll": result.nll, "ece": 100 * result.ece,
            "per_class": dict(zip(classes, result.per_class)), "reliability": result.reliability}


#: One colour per table row in every demo plot (per-class bars, the arms' curves and their reference lines).
COLORS = {CONTROL: "#7f7f7f", MEAL: "#d62728", CACHED: "#ff7f0e", "teacher ensemble": "#1f77b4",
          "student init": "#2ca02c"}


def seeds_text(seeds) -> str:
    """``seed 0`` for one seed, ``mean over seeds 0, 1, 2`` for several."""
    seeds = list(seeds)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))}"


def plot_demo(out: Path, runs: list) -> None:
    from meal_ray.plots import plot_arms, plot_per_class, plot_reliability, plot_training_curves

    def mean_per_class(label):
        return {c: statistics.mean(r["per_class"][label][c] for r in runs) for c in classes}

    classes = list(runs[0]["per_class"][CONTROL].keys())  # the dataset's class order, in every plot
    seeds = [r["seed"] for r in runs]
    arms = [(arm, key) for arm, key in ((CONTROL, "control"), (MEAL, "meal"), (CACHED, "cached"))
            if runs[0].get(key) is not None]
    plot_per_class(classes, {k: mean_per_class(k) for k in [a for a, _ in arms] + ["teacher ensemble"]},
                   out / "per_class_accuracy.png", f"Fashion-MNIST test accuracy per class ({seeds_text(seeds)})",
                   colors=COLORS)
    curves = {arm: {} for arm, _ in arms}
    for r in runs:
        for arm, key in arms:
            curves[arm][r["seed"]] = json.loads((r[key].output_dir / "metrics.json").read_text())["history"]
    rows = {row["model"]: row["top1"] for row in runs[0]["rows"]}
    reference = {"teacher ensemble": rows["teacher ensemble"]}
    if "student init" in rows:
        reference["student init"] = rows["student init"]
    plot_reliability({label: pooled_reliability([r["reliability"][label] for r in runs])
                      for label in ["teacher ensemble", "student init"] + [a for a, _ in arms]
                      if label in runs[0]["reliability"]},
                     out / "reliability.png", f"Fashion-MNIST test set: reliability ({seeds_text(seeds)}, bins pooled)",
                     colors=COLORS)
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}: one line per seed"
    plot_arms(curves, out / "arms_test_top1.png", f"control vs MEAL V2 from the same init ({which})", reference,
              colors=COLORS)
    for name, cfg in (("control", runs[0]["control"]), ("meal_v2", runs[0]["meal"] or runs[0]["cached"])):
        history = json.loads((cfg.output_dir / "metrics.json").read_text())["history"]
        plot_training_curves(history, out / f"training_curves_{name}.png",
                             f"{name}: {cfg.student.model} (seed {runs[0]['seed']})")


def pooled_reliability(per_seed: list) -> dict:
    """Reliability bins of several seeds' evaluations pooled (counts summed, confidence and accuracy count-weighted),
    with the pooled ECE."""
    bins = len(per_seed[0]["count"])
    count = [sum(r["count"][i] for r in per_seed) for i in range(bins)]
    pooled = {"count": count}
    for key in ("confidence", "accuracy"):
        pooled[key] = [sum(r[key][i] * r["count"][i] for r in per_seed) / max(count[i], 1) for i in range(bins)]
    ece = sum(abs(a - c) * n for a, c, n in zip(pooled["accuracy"], pooled["confidence"], count)) / max(sum(count), 1)
    return {"reliability": pooled, "ece": ece}


#: Short metric names of the table's rows (a teacher's row is its architecture).
METRIC_NAMES = {CONTROL: "control", MEAL: "meal_v2", CACHED: "meal_v2_cache", "teacher ensemble": "teacher_ensemble",
                "student init": "student_init"}


def metric_name(model: str) -> str:
    from meal_ray.tracking import metric_key

    return METRIC_NAMES.get(model) or metric_key(model)


def demo_metrics(results: dict) -> dict:
    """The demo run's metrics: ``top1/<row>`` and ``top5/<row>`` (the mean over seeds; ``top1_std/<row>`` with
    several seeds), ``gain_over_control_mean``/``_std``, ``test_acc/<row>/<class>`` (mean over seeds)."""
    several = len(results["seeds"]) > 1
    out = {}
    for r in results["summary"]:
        name = metric_name(r["model"])
        out[f"top1/{name}"] = r["top1"]["mean"]
        out[f"top5/{name}"] = r["top5"]["mean"]
        out[f"nll/{name}"] = r["nll"]["mean"]
        out[f"ece/{name}"] = r["ece"]["mean"]
        if several:
            out[f"top1_std/{name}"] = r["top1"]["std"]
    out["gain_over_control_mean"] = results["gain_over_control"]["mean"]
    out["gain_over_control_std"] = results["gain_over_control"]["std"]
    for model in (CONTROL, MEAL, CACHED):
        per_seed = [run["per_class"][model] for run in results["runs"] if model in run["per_class"]]
        for c in (per_seed[0] if per_seed else {}):
            out[f"test_acc/{metric_name(model)}/{c.replace('/', '-')}"] = statistics.mean(p[c] for p in per_seed)
    return out


def log_demo_run(out: Path, results: dict, tracker) -> None:
    """Results, plots and tables on the demo's parent run (its stages are the nested runs), which then ends."""
    tracker.log_metrics(demo_metrics(results), step=0)
    for p in sorted(out.glob("*.png")) + [out / "results.json", out / "results.md"]:
        tracker.log_artifact(p)
    tracker.end()


def sample_std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(row: Sequence[float], reference: Sequence[float]) -> dict:
    """``row`` - ``reference`` seed by seed (same seed order), with the demo's bar for a difference that counts: the
    seed spread, the larger sample std of the two rows' top-1."""
    diffs = [r - ref for r, ref in zip(row, reference)]
    return {"per_seed": diffs, "mean": statistics.mean(diffs), "std": sample_std(diffs),
            "seed_spread": max(sample_std(row), sample_std(reference))}


def gain_over_control(summary: list, arm: str = MEAL) -> dict:
    """An arm's (default: MEAL V2 served) minus the control's top-1 per seed, and whether the mean gain exceeds the
    seed spread (the issue's bar for "beats the control")."""
    gain = paired_difference(row_of(summary, arm)["top1"]["per_seed"], row_of(summary, CONTROL)["top1"]["per_seed"])
    return dict(gain, beats_seed_spread=len(gain["per_seed"]) > 1 and gain["mean"] > gain["seed_spread"])


def cache_vs_served(summary: list) -> Optional[dict]:
    """MEAL V2 from the cache minus MEAL V2 served, per seed (None without a cache arm): "within seed noise" when
    |mean difference| <= the seed spread."""
    cached, served = row_of(summary, CACHED), row_of(summary, MEAL)
    if cached is None or served is None:
        return None
    diff = paired_difference(cached["top1"]["per_seed"], served["top1"]["per_seed"])
    return dict(diff, within_seed_spread=len(diff["per_seed"]) > 1 and abs(diff["mean"]) <= diff["seed_spread"],
                beats_control=gain_over_control(summary, CACHED))


def _pm(stat: dict, fmt: str = "{:.2f}", signed: bool = False) -> str:
    f = fmt.replace("{:", "{:+") if signed else fmt
    return f.format(stat["mean"]) + (" ± " + fmt.format(stat["std"]) if stat.get("std") else "")


def format_summary(summary: list, gain: dict, seeds: list, arm: str = MEAL) -> str:
    """The paper-style table over seeds: mean ± sample std of each row; ``gain``: ``arm``'s over the control."""
    over = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {', '.join(map(str, seeds))}"
    lines = [f"Fashion-MNIST test set (10000 images), {over}",
             "",
             "| model | arch | params | top-1 | top-5 | gap to ensemble | similar classes* | dissimilar classes** "
             "| NLL | ECE % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['model']} | {r['arch']} | {r['params'] / 1e6:.2f}M | {_pm(r['top1'])} | {_pm(r['top5'])} | "
                     f"{_pm(r['gap_to_ensemble'], signed=True)} | {_pm(r['similar_classes'])} | "
                     f"{_pm(r['dissimilar_classes'])} | {_pm(r['nll'], '{:.3f}')} | {_pm(r['ece'])} |")
    per_seed = ", ".join(f"{g:+.2f}" for g in gain["per_seed"])
    name = "MEAL V2" if arm == MEAL else "MEAL V2 from the cache"
    lines.append(f"\n{name} - control (top-1): {_pm(gain, signed=True)} points (per seed: {per_seed})")
    if len(gain["per_seed"]) > 1:
        verdict = "beats" if gain["beats_seed_spread"] else "does NOT beat"
        lines.append(f"{name} {verdict} the control by more than the seed spread "
                     f"(larger arm top-1 std: {gain['seed_spread']:.2f} points)")
    vs = cache_vs_served(summary)
    if vs is not None:
        per_seed = ", ".join(f"{g:+.2f}" for g in vs["per_seed"])
        lines.append(f"MEAL V2 from the cache - MEAL V2 served (top-1): {_pm(vs, signed=True)} points (per seed: "
                     f"{per_seed}); cache - control: {_pm(vs['beats_control'], signed=True)}")
        if len(vs["per_seed"]) > 1:
            lines.append(f"The cache arm is {'within' if vs['within_seed_spread'] else 'NOT within'} the seed spread "
                         f"of the served arm ({vs['seed_spread']:.2f} points)")
    lines.append(f"\n*mean accuracy on {', '.join(SIMILAR)}; **on {', '.join(DISSIMILAR)}")
    return "\n".join(lines)


def format_table(rows, per_class, title: str = "") -> str:
    lines = ([title, ""] if title else []) + [
        "| model | arch | params | top-1 | top-5 | gap to ensemble | similar classes* | dissimilar classes** | NLL "
        "| ECE % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['arch']} | {r['params'] / 1e6:.2f}M | {r['top1']:.2f} | {r['top5']:.2f} | "
                     f"{r['gap_to_ensemble']:+.2f} | {r['similar_classes']:.2f} | {r['dissimilar_classes']:.2f} | "
                     f"{r['nll']:.3f} | {r['ece']:.2f} |")
    lines.append(f"\n*mean accuracy on {', '.join(SIMILAR)}; **on {', '.join(DISSIMILAR)}\n")
    names = list(per_class)
    lines.append("| class | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    for c in per_class[names[0]]:
        lines.append(f"| {c} | " + " | ".join(f"{per_class[n][c]:.1f}" for n in names) + " |")
    return "\n".join(lines)
