"""Every private Ray API meal-ray relies on (meal_ray.cluster.PRIVATE_RAY_APIS) still exists where meal-ray looks for
it, with the keyword arguments meal-ray passes: a Ray upgrade that moves one fails here, loudly, instead of the
wrapper in cluster.py quietly falling back to Ray's default behaviour."""

from __future__ import annotations

import importlib
import inspect

import pytest

from meal_ray.cluster import PRIVATE_RAY_APIS


@pytest.mark.parametrize("target", sorted(PRIVATE_RAY_APIS))
def test_private_ray_api_is_where_meal_ray_calls_it(target):
    module, _, path = target.partition(":")
    obj = importlib.import_module(module)
    for name in path.split("."):
        assert hasattr(obj, name), f"{target}: Ray {__import__('ray').__version__} has no {name!r} here"
        obj = getattr(obj, name)
    if PRIVATE_RAY_APIS[target]:
        params = inspect.signature(obj).parameters
        missing = [p for p in PRIVATE_RAY_APIS[target] if p not in params]
        assert not missing, f"{target} no longer takes {missing} (it takes {list(params)})"


def test_every_private_ray_import_in_meal_ray_is_listed():
    """Only cluster.py reaches into Ray's private modules, and only for the names listed."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "meal_ray"
    used = set()
    for path in root.rglob("*.py"):
        for module in re.findall(r"(?:from|import)\s+(ray\.[\w.]*(?:_private|_internal)[\w.]*)", path.read_text()):
            used.add((path.name, module))
    assert {name for name, _ in used} <= {"cluster.py"}, used
    listed = {t.partition(":")[0] for t in PRIVATE_RAY_APIS}  # `from ray._private import state` names a prefix
    unlisted = {m for _, m in used if not any(t == m or t.startswith(m + ".") for t in listed)}
    assert not unlisted, f"private Ray modules used but not in cluster.PRIVATE_RAY_APIS: {unlisted}"
