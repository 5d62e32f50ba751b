"""Where `meal-ray plan` takes per-GPU throughputs from when the command line does not give them: a rates file
measured on a GPU (``bench/gpu_check.py`` writes one), else the table shipped with meal-ray (``gpu_rates.yaml``: timm's
published benchmarks on one GPU). Both hold figures keyed by model, image size and precision, each with where it
comes from, so the plan can say which figure it used and why.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from meal_ray.errors import ConfigError
from meal_ray.files import write_text_atomic

RATES_FILE_FORMAT = 1  # the "meal_ray_rates" key of a rates file
SHIPPED_TABLE = Path(__file__).with_name("gpu_rates.yaml")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Rate:
    """One throughput (crops/s of a teacher replica or img/s of a train worker) and where it comes from."""

    value: float
    source: str  # given | emulated | rates file | table | measured
    detail: str = ""  # the device, precision, batch and file behind the figure
    precision: Optional[str] = None  # what the figure was measured at, when known


def architecture(model: str) -> str:
    """timm's architecture of a model name (``senet154.gluon_in1k`` -> ``senet154``): the weights' tag does not
    change the speed."""
    return model.split(".", 1)[0]


@dataclass
class RateTable:
    """Figures from one place (the shipped table or one rates file). ``exact_precision``: a figure counts only at the
    precision asked for (a rates file measures each); the shipped table has one precision and plan says when it
    differs from the job's."""

    source: str  # "table" | "rates file"
    device: str
    where: str  # the file, for messages
    teachers: list = field(default_factory=list)
    students: list = field(default_factory=list)
    served: list = field(default_factory=list)
    exact_precision: bool = True
    about: str = ""  # date, torch version: printed once beside the device

    def teacher(self, model: str, img_size: int, precision: str) -> Optional[Rate]:
        return self._find(self.teachers, model, img_size, precision)

    def student(self, model: str, img_size: int, precision: str) -> Optional[Rate]:
        return self._find(self.students, model, img_size, precision)

    def served_for(self, model: str, img_size: int) -> list:
        """Served runs of this student measured on the file's one device (teachers sharing it)."""
        return [s for s in self.served if s.get("model") == model and s.get("img_size") == img_size]

    def _find(self, entries: list, model: str, img_size: int, precision: str) -> Optional[Rate]:
        for name in (lambda m: m, architecture):  # the exact name first, then any weights of its architecture
            for e in entries:
                if name(e["model"]) == name(model) and e["img_size"] == img_size and (
                        not self.exact_precision or e["precision"] == precision):
                    return Rate(e["samples_per_s"], self.source, self._describe(e), e["precision"])
        return None

    def _describe(self, e: dict) -> str:
        text = (f"{self.device}, {e['model']} at {e['img_size']} px, {e['precision']}"
                f"{' AMP' if self.source == 'table' and e['precision'] != 'fp32' else ''}, batch {e['batch']}, "
                f"{e.get('csv') or self.where}")
        return text + (f"; estimated {e['estimated']}" if e.get("estimated") else "")


def _entries(raw, what: str, where: str) -> list:
    """Checked figures: model, img_size, precision, batch and a positive samples_per_s each."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: {what} must be a list of figures, got {type(raw).__name__}.")
    out = []
    for i, e in enumerate(raw):
        try:
            entry = dict(e, model=str(e["model"]), img_size=int(e["img_size"]), batch=int(e["batch"]),
                         precision=str(e["precision"]), samples_per_s=float(e["samples_per_s"]))
        except (TypeError, KeyError, ValueError) as err:
            raise ConfigError(f"{where}: {what}[{i}] = {e!r} needs model, img_size, batch, precision and "
                              f"samples_per_s ({type(err).__name__}: {err}); write the file with "
                              "bench/gpu_check.py.") from None
        if entry["samples_per_s"] <= 0 or entry["precision"] not in PRECISIONS:
            raise ConfigError(f"{where}: {what}[{i}] needs a positive samples_per_s and a precision in "
                              f"{', '.join(PRECISIONS)}; got {e!r}.")
        out.append(entry)
    return out


def shipped_table() -> RateTable:
    """The table shipped with meal-ray (package data)."""
    raw = yaml.safe_load(SHIPPED_TABLE.read_text())
    where = f"meal_ray/serve/{SHIPPED_TABLE.name}"
    return RateTable("table", raw["gpu"], where, _entries(raw["teachers"], "teachers", where),
                     _entries(raw["students"], "students", where), exact_precision=False,
                     about="timm's published benchmarks")


def read_rates_file(path: str) -> RateTable:
    """A rates file written by ``bench/gpu_check.py`` (a JSON object naming its device)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--rates {path}: no such file; write one on a GPU machine with "
                          "`python bench/gpu_check.py --output rates.json`.") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--rates {path} is not a readable JSON rates file ({e}); write it with "
                          "bench/gpu_check.py.") from None
    if not isinstance(raw, dict) or raw.get("meal_ray_rates") != RATES_FILE_FORMAT or not raw.get("device"):
        raise ConfigError(f"--rates {path} is not a meal-ray rates file (format {RATES_FILE_FORMAT}, naming its "
                          "device); write it with bench/gpu_check.py.")
    return RateTable("rates file", str(raw["device"]), str(path), _entries(raw.get("teachers"), "teachers", path),
                     _entries(raw.get("students"), "students", path), list(raw.get("served") or []),
                     about=f"measured {raw.get('date', '?')}, torch {raw.get('torch', '?')}")


def write_rates_file(path: str | Path, device: str, teachers: list, students: list, served: list,
                     **about) -> Path:
    """The rates file `meal-ray plan --rates` reads: figures as :func:`read_rates_file` checks them, the device they
    were measured on, the torch version and the date."""
    import torch

    doc = {"meal_ray_rates": RATES_FILE_FORMAT, "device": device, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), **about,
           "teachers": teachers, "students": students, "served": served}
    for what, entries in (("teachers", teachers), ("students", students)):
        _entries(entries, what, str(path))  # refuse here what plan would refuse
    return write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
