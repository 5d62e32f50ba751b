"""PNG plots for runs and the demo: training curves and per-class accuracy bars.

Epoch axes have whole-number ticks; a series (a model, an arm) has one colour in every plot (``colors``, else one
picked from its name), and per-class plots keep the dataset's class order (up to ``MAX_CLASS_BARS`` classes).
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PALETTE = plt.rcParams["axes.prop_cycle"].by_key()["color"]
MAX_CLASS_BARS = 40  # per-class plots of more classes show the weakest and strongest half of this each


def color_of(name: str, colors: Optional[Mapping[str, str]] = None) -> str:
    """``colors[name]``, else a palette colour chosen from the name itself (the same in every plot and run)."""
    if colors and name in colors:
        return colors[name]
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def _whole_epochs(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_training_curves(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Loss terms (left) and train/val top-1 (right) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "soft_ce", "disc_loss", "hard_ce"):
        if any(key in h for h in history):
            ax_l.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax_l.set_xlabel("epoch"), ax_l.set_ylabel("loss"), ax_l.legend(), ax_l.grid(alpha=0.3)
    _whole_epochs(ax_l)
    for key in ("train_top1", "val_top1"):
        ax_a.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax_a.set_xlabel("epoch"), ax_a.set_ylabel("top-1 (%)"), ax_a.legend(), ax_a.grid(alpha=0.3)
    _whole_epochs(ax_a)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_per_class(classes: Sequence[str], series: dict, path: str | Path, title: str = "Per-class accuracy",
                   colors: Optional[Mapping[str, str]] = None) -> Path:
    """Grouped bars: one group per class in ``classes``' order, one bar per named series (e.g. control vs MEAL V2).
    A series is a list in ``classes``' order or a ``{class: accuracy}`` mapping (put in that order here). Beyond
    ``MAX_CLASS_BARS`` classes (ImageNet's 1000 would make a figure ~100 000 px wide, unreadable and seconds to draw)
    the plot shows the first series' weakest and strongest classes, ranked, and says so in its title."""
    import numpy as np

    series = {name: [v[c] for c in classes] if isinstance(v, Mapping) else list(v) for name, v in series.items()}
    if len(classes) > MAX_CLASS_BARS:
        first_name, first = next(iter(series.items()))
        ranked = sorted(range(len(classes)), key=lambda i: (first[i], i))
        half = MAX_CLASS_BARS // 2
        shown = ranked[:half] + ranked[-half:]
        title = (f"{title}: the {half} lowest and {half} highest of {len(classes)} classes by {first_name}'s "
                 "accuracy")
        classes = [classes[i] for i in shown]
        series = {name: [values[i] for i in shown] for name, values in series.items()}
    x = np.arange(len(classes))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(8, len(classes) * 0.9), 4.5))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=color_of(name, colors))
    ax.set_xticks(x, classes, rotation=30, ha="right")
    lo = min(min(v) for v in series.values())
    ax.set_ylim(max(0, lo - 10), 100)
    ax.set_ylabel("accuracy (%)"), ax.set_title(title), ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(len(series), 4), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_arms(curves: dict, path: str | Path, title: str = "", reference: dict | None = None,
              colors: Optional[Mapping[str, str]] = None) -> Path:
    """Test top-1 (left, with horizontal references) and training loss (right) per epoch of several arms, one line
    per seed (same colour per arm): the paper's hard- vs soft-label curves (its Fig. 3)."""
    fig, (top1, loss) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm, per_seed in curves.items():
        for j, (seed, history) in enumerate(per_seed.items()):
            epochs = [h["epoch"] for h in history]
            for ax, key in ((top1, "val_top1"), (loss, "train_loss")):
                ax.plot(epochs, [h[key] for h in history], marker="o", ms=3, color=color_of(arm, colors), alpha=0.85,
                        label=arm if j == 0 else None)
    for name, value in (reference or {}).items():
        top1.axhline(value, ls="--", lw=1, color=color_of(name, colors), label=name)
    top1.set_ylabel("test top-1 (%)")
    loss.set_ylabel("training loss (hard-label CE for the control; soft CE + discriminator for MEAL V2)")
    loss.yaxis.label.set_size(8)
    for ax in (top1, loss):
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
        _whole_epochs(ax)
    top1.legend(loc="lower right")
    loss.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_reliability(series: Mapping[str, dict], path: str | Path, title: str = "Reliability",
                     colors: Optional[Mapping[str, str]] = None) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin (``EvalResult.reliability``), one
    line per model, the diagonal for perfect calibration; each model's ECE in its legend entry if given
    (``{"reliability": ..., "ece": ...}`` or a bare reliability dict)."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", label="perfectly calibrated")
    for name, entry in series.items():
        rel = entry.get("reliability", entry)
        filled = [i for i, n in enumerate(rel["count"]) if n]
        label = f"{name} (ECE {100 * entry['ece']:.2f}%)" if "ece" in entry else name
        ax.plot([rel["confidence"][i] for i in filled], [rel["accuracy"][i] for i in filled], marker="o",
                label=label, color=color_of(name, colors))
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)"), ax.set_ylabel("accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 55)), fontsize=10)  # a square plot: long titles wrap
    ax.grid(alpha=0.3), ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


VERDICT_COLORS = {"holds": "#2ca02c", "opposite": "#d62728", "within noise": "#7f7f7f"}


def plot_ablations(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """One line per ablation row: each seed's (row - reference) as a dot, the mean with its std as a bar, coloured by
    the row's verdict; the reference is the vertical line at 0."""
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.6))
    for y, row in enumerate(reversed(list(rows))):
        diff, color = row["vs_meal_v2"], VERDICT_COLORS.get(row["verdict"], "#1f77b4")
        ax.errorbar(diff["mean"], y, xerr=diff["std"], fmt="D", color=color, capsize=4)
        ax.scatter(diff["per_seed"], [y] * len(diff["per_seed"]), color=color, alpha=0.5, s=18)
        own = row.get("own_gain")  # a claim about the row's own gain over its control (no CutMix): say it
        text = row["verdict"] + (f" (gain over its own control {own['mean']:+.2f})" if own else "")
        ax.annotate(text, (diff["mean"], y), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8, color=color)
    ax.set_yticks(range(len(rows)), [f"{r['row']} ({r['kind']})" for r in reversed(list(rows))])
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("test top-1 difference to MEAL V2 (points)")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 70)))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
