"""The paper's claims side by side: every finished demo ablation under a demo directory, each paired seed by seed
with the default MEAL V2 row of the same kind (served, or from the cache), in one table: ``ablations.md``,
``ablations.json``, ``ablations.png`` and an MLflow run. Rows that were not run are listed with their command, so
the table says what is still to measure."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meal_ray.demo.report import CACHED, CONTROL, MEAL, paired_difference, row_of, sample_std, write_text
from meal_ray.errors import ConfigError

TABLE, RECORD, PLOT = "ablations.md", "ablations.json", "ablations.png"


@dataclass(frozen=True)
class Claim:
    """One row of the table: the demo flag that makes it, what the paper expects of (row - MEAL V2), and that
    expectation's sign (-1 lower, +1 higher, 0 none stated). ``own_control``: the flag changes the control too, so
    the row's own MEAL V2 - control gain is what the claim is about (no CutMix: "the gain holds without tricks")."""

    key: str
    label: str
    flag: str
    expects: str
    sign: int
    own_control: bool = False


CLAIMS = (
    Claim("no_discriminator", "no discriminator", "--no-discriminator", "slightly lower (paper §6.3)", -1),
    Claim("weight_decay", "weight decay 1e-4", "--weight-decay 1e-4", "lower (the paper trains without it)", -1),
    Claim("hard_label_weight", "hard-label weight 0.5", "--hard-label-weight 0.5", "lower (no one-hot labels)", -1),
    Claim("student_init", "random student init", "--student-init random", "much lower (paper Fig. 6)", -1),
    Claim("cutmix", "no CutMix (\"no tricks\")", "--no-cutmix", "the gain over its control holds", +1,
          own_control=True),
    Claim("authors_d_lr", "the authors' discriminator lr", "--authors-d-lr",
          "unknown (their code's schedule, MEAL-V2 issue #9)", 0),
    Claim("cache_top_k", "cache: top-k probabilities", "--cache-top-k K",
          "about equal (FKD stores the top k only)", 0),
    Claim("teachers", "other teachers", "--teachers A,B,C",
          "higher when the ensemble is stronger (why MEAL V2 uses big teachers; the paper has no such row)", +1),
    Claim("teacher_epochs", "teachers trained longer", "--teacher-epochs N",
          "higher: a stronger ensemble (the paper has no such row)", +1),
)
CONTROL_CLAIM = Claim("control", "control (hard labels)", "", "lower than MEAL V2", -1)
DEFAULTS = dict(no_discriminator=False, weight_decay=0.0, hard_label_weight=0.0, student_init="pretrained",
                cutmix=None, authors_d_lr=False, teachers=None, teacher_epochs=None)


def _changed(results: dict) -> list:
    """The claims a results.json's flags differ from the defaults on (cache top-k counts as one)."""
    flags = dict(DEFAULTS, **results.get("ablation", {}))
    changed = [c for c in CLAIMS if c.key in DEFAULTS and flags[c.key] != DEFAULTS[c.key]]
    if results.get("settings", {}).get("cache_top_k"):
        changed.append(next(c for c in CLAIMS if c.key == "cache_top_k"))
    return changed


def _arms(results: dict) -> list:
    """The MEAL V2 rows a report has (served, from the cache); a top-k ablation changes only the cache arm."""
    if results.get("settings", {}).get("cache_top_k"):
        return [CACHED]
    return [arm for arm in (MEAL, CACHED) if _per_seed(results, arm)]


def _per_seed(results: dict, model: str) -> dict:
    """seed -> top-1 of a table row (absent rows: {})."""
    row = row_of(results["summary"], model)
    return dict(zip(results["seeds"], row["top1"]["per_seed"])) if row else {}


def _paired(row: dict, reference: dict) -> Optional[dict]:
    """row - reference on the seeds both have (seed -> top-1 maps), with the demo's seed-spread bar."""
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    return dict(paired_difference([row[s] for s in seeds], [reference[s] for s in seeds]), seeds=seeds)


def verdict(diff: dict, sign: int) -> str:
    """holds / opposite (|mean| beyond the seed spread, with / against the expected sign), higher / lower where no
    sign is expected, within noise otherwise; one seed decides nothing."""
    if len(diff["seeds"]) < 2:
        return "one seed: no verdict"
    if abs(diff["mean"]) <= diff["seed_spread"]:
        return "within noise"
    if sign == 0:
        return "higher" if diff["mean"] > 0 else "lower"
    return "holds" if diff["mean"] * sign > 0 else "opposite"


def collect(demo_dir: str | Path) -> dict:
    """Every demo report under ``demo_dir`` (its results.json and each ablation*/results.json) as table rows."""
    root = Path(demo_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; pass the demo's --output (e.g. runs/demo).")
    reports = []
    for path in [root / "results.json"] + sorted(root.glob("ablation*/results.json")):
        if path.is_file():
            try:
                results = json.loads(path.read_text())
                problem = None if isinstance(results, dict) and {"summary", "seeds"} <= set(results) else \
                    "no 'summary' and 'seeds'"
            except ValueError as e:
                problem = f"not JSON: {e}"
            if problem:
                raise ConfigError(f"{path} is not a demo report this meal-ray reads ({problem}); run that demo "
                                  "command again (its finished stages are reused) or move the folder away.")
            reports.append((path.parent.name if path.parent != root else ".", results))
    if not reports:
        raise ConfigError(f"{root} holds no demo results (results.json); run `meal-ray demo --output {root}` first.")
    # one training length per table: the default report's (or the most common); a patient run (--arm-epochs) is
    # listed beside it with its own gain over its own control, never paired with rows of another length
    lengths = [_length(r) for _, r in reports]
    length = _length(reports[0][1]) if reports[0][0] == "." else max(lengths, key=lengths.count)
    other_lengths = [{"report": name, "arm_epochs": _length(r), "seeds": r["seeds"],
                      "gain_over_control": r.get("gain_over_control")} for name, r in reports if _length(r) != length]
    reports = [(name, r) for name, r in reports if _length(r) == length]
    defaults = [(name, r) for name, r in reports if not _changed(r)]
    rows, references = [], {}
    for arm in (MEAL, CACHED):  # the reference of each kind: the default row with that arm
        found = [(name, r) for name, r in defaults if _per_seed(r, arm)]
        if found:
            name, results = found[0]
            references[arm] = {"report": name, "results": results, "top1": _per_seed(results, arm)}
    for arm, ref in references.items():
        meal = ref["top1"]
        kind = "served" if arm == MEAL else "cache"
        rows.append(_row(f"MEAL V2 ({kind})", "", "the reference", 0, ref["report"], meal, None, kind))
        control = _per_seed(ref["results"], CONTROL)
        if control:
            rows.append(_row(CONTROL_CLAIM.label, "", CONTROL_CLAIM.expects, CONTROL_CLAIM.sign, ref["report"],
                             control, _paired(control, meal), kind))
    done, measured = set(), []
    for name, results in reports:
        changed = _changed(results)
        if not changed:
            continue
        claim = changed[0] if len(changed) == 1 else None
        for arm in _arms(results):
            if arm not in references:
                continue
            top1 = _per_seed(results, arm)
            own = _paired(top1, _per_seed(results, CONTROL)) if claim and claim.own_control else None
            row = _row(" + ".join(c.label for c in changed), " ".join(c.flag for c in changed),
                       claim.expects if claim else "(several flags at once)", claim.sign if claim else 0, name, top1,
                       _paired(top1, references[arm]["top1"]), "served" if arm == MEAL else "cache", own_gain=own)
            if own is not None:
                row["verdict"] = verdict(own, claim.sign)
            measured.append((CLAIMS.index(claim) if claim else len(CLAIMS), row))
            done.update(c.key for c in changed)
    rows += [row for _, row in sorted(measured, key=lambda m: m[0])]
    missing = [{"label": c.label, "flag": c.flag, "expects": c.expects} for c in CLAIMS if c.key not in done]
    return {"demo_dir": str(root), "arm_epochs": length, "rows": rows, "not_run": missing,
            "other_lengths": other_lengths}


def _length(results: dict) -> Optional[int]:
    """The arms' epochs a report trained (its preset's, or --arm-epochs)."""
    return results.get("settings", {}).get("arm_epochs")


def _row(label, flag, expects, sign, report, top1: dict, diff: Optional[dict], kind: str,
         own_gain: Optional[dict] = None) -> dict:
    values = list(top1.values())
    row = {"row": label, "flag": flag, "kind": kind, "report": report, "seeds": sorted(top1),
           "top1": {"mean": statistics.mean(values), "std": sample_std(values)}, "top1_per_seed": top1,
           "expects": expects, "sign": sign,
           "vs_meal_v2": diff, "own_gain": own_gain}
    row["verdict"] = verdict(diff, sign) if diff else "reference"
    return row


def _pm(stat: Optional[dict], signed: bool = False) -> str:
    if not stat:
        return ""
    mean = f"{stat['mean']:+.2f}" if signed else f"{stat['mean']:.2f}"
    return mean + (f" ± {stat['std']:.2f}" if stat.get("std") else "")


def format_ablations(table: dict) -> str:
    """The markdown table: per row top-1 (mean ± std), row - MEAL V2 per seed, the paper's expectation, a verdict."""
    lines = ["| row | arm | command flag | top-1 | row - MEAL V2 | per seed | paper expects | verdict |",
             "|---|---|---|---:|---:|---|---|---|"]
    for r in table["rows"]:
        diff = r["vs_meal_v2"]
        per_seed = ", ".join(f"{d:+.2f}" for d in diff["per_seed"]) if diff else ""
        gain = f" (its own gain over its control: {_pm(r['own_gain'], signed=True)})" if r.get("own_gain") else ""
        flag = f"`{r['flag']}`" if r["flag"] else ""
        lines.append(f"| {r['row']} | {r['kind']} | {flag} | {_pm(r['top1'])} | {_pm(diff, signed=True)} "
                     f"| {per_seed} | {r['expects']}{gain} | {r['verdict']} |")
    seeds = sorted({s for r in table["rows"] for s in r["seeds"]})
    lines.append(f"\nFashion-MNIST test top-1 %, seeds {', '.join(map(str, seeds))}; each row paired seed by seed with "
                 "the default MEAL V2 row of the same arm. Verdict: the mean difference beyond the seed spread (the "
                 "larger top-1 std of the two rows), with (holds) or against (opposite) the paper's direction.")
    if table["not_run"]:
        lines.append("Not run yet: " + "; ".join(f"{m['label']} (`meal-ray demo {m['flag']}`)"
                                                 for m in table["not_run"]) + ".")
    for other in table.get("other_lengths", []):
        gain = other["gain_over_control"]
        lines.append(f"Not in this table ({table['arm_epochs']} epochs per arm): {other['report']}, "
                     f"{other['arm_epochs']} epochs per arm, seeds {', '.join(map(str, other['seeds']))}"
                     + (f": MEAL V2 - control {_pm(gain, signed=True)}" if gain else "") + " (its results.md).")
    return "\n".join(lines)


def metric_name(row: dict) -> str:
    """``vs_meal_v2/<arm>/<row>``, e.g. ``vs_meal_v2/cache/no_discriminator``: the row's mean difference in MLflow."""
    return f"vs_meal_v2/{row['kind']}/{re.sub(r'[^a-z0-9]+', '_', row['row'].lower()).strip('_')}"


def write_ablations(demo_dir: str | Path, tracking_uri: Optional[str] = None, log=print) -> dict:
    """Collect the table, write ablations.md / .json / .png into the demo directory (atomically) and log them, with
    each row's difference to MEAL V2 as a metric, to an MLflow run ``demo-ablations`` (reopened on later calls)."""
    from meal_ray.plots import plot_ablations
    from meal_ray.tracking import Tracker

    table = collect(demo_dir)
    root = Path(table["demo_dir"])
    text = format_ablations(table)
    plot_ablations([r for r in table["rows"] if r["vs_meal_v2"]], root / PLOT,
                   "Each claim against MEAL V2: test top-1 difference, paired by seed")
    previous = root / RECORD
    run_id = json.loads(previous.read_text()).get("mlflow_run_id") if previous.is_file() else None
    tracker = Tracker(tracking_uri, run_id, log=log, spool_dir=root)
    table["mlflow_run_id"] = tracker.start("meal-ray-demo", "demo-ablations", {"demo_dir": str(root)},
                                           tags={"meal_ray.mode": "demo-ablations"})
    write_text(root / RECORD, json.dumps(table, indent=2))
    write_text(root / TABLE, text + "\n")
    tracker.log_metrics({metric_name(r): r["vs_meal_v2"]["mean"] for r in table["rows"] if r["vs_meal_v2"]}, step=0)
    for path in (root / TABLE, root / RECORD, root / PLOT):
        tracker.log_artifact(path)
    tracker.end()
    log(text)
    return table
