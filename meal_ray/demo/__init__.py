"""`meal-ray demo`: MEAL V2's claims end to end on Fashion-MNIST (stages in :mod:`~meal_ray.demo.stages`,
tables, plots and the verdict in :mod:`~meal_ray.demo.report`)."""

from meal_ray.demo.report import DISSIMILAR, SIMILAR, format_summary, format_table, gain_over_control, summarize
from meal_ray.demo.stages import DEMO_APP, PRESETS, _arm_tags, run_demo

__all__ = ["DEMO_APP", "DISSIMILAR", "PRESETS", "SIMILAR", "_arm_tags", "format_summary", "format_table",
           "gain_over_control", "run_demo", "summarize"]
