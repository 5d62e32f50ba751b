"""The soft-label source registry: ``teachers.source`` name -> implementing class (imported on use).

Adding a source: write a module with a class following
:class:`meal_ray.sources.base.SoftLabelSource` and add one entry here. This module imports
nothing, so the config layer can validate names without pulling in torch, Ray or Serve.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple


class SourceEntry(NamedTuple):
    target: str  # "module:Class"
    help: str  # one line for the CLI and error messages


SOURCES: dict = {
    "none": SourceEntry("meal_ray.sources.base:NoSoftLabels", "hard labels only (pretraining)"),
    "local": SourceEntry("meal_ray.sources.local:LocalSoftLabels",
                         "in-process teacher ensemble on each train worker (the authors' way)"),
    "served": SourceEntry("meal_ray.sources.served:ServedSoftLabels",
                          "the Ray Serve teacher application teachers.app_name, teachers.prefetch batches in flight"),
    "cache": SourceEntry("meal_ray.sources.cache:CachedSoftLabels",
                         "the soft-label cache teachers.cache written by `meal-ray relabel`, no teachers running"),
}


def source_class(name: str):
    """The class registered as ``name`` (imported now)."""
    module, _, attr = SOURCES[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)


def describe_sources(with_soft_labels_only: bool = False) -> str:
    """``name (help); ...`` for CLI help texts: only sources that exist."""
    return "; ".join(f"{n}: {e.help}" for n, e in SOURCES.items() if not (with_soft_labels_only and n == "none"))
