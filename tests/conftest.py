"""Shared fixtures: one local Ray cluster per test session, tiny exported teachers, Fashion-MNIST configs."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

FMNIST_DATA = dict(dataset="fashion-mnist", image_size=28, crop_scale=[0.5, 1.0], crop_pct=1.0,
                   mean=[0.2860], std=[0.3530])
FMNIST_DATA_CONFIG = dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), interpolation="bilinear",
                          crop_pct=1.0)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with more logical CPUs than cores, so Serve replicas and Train workers fit side by side."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Two exported random-init teachers with *different* input sizes (28 and 36) for Fashion-MNIST crops."""
    from meal_ray.models import create_model, export_model

    root = tmp_path_factory.mktemp("teachers")
    out = []
    for i, (arch, size) in enumerate((("test_resnet", 28), ("resnet10t", 36))):
        torch.manual_seed(100 + i)
        dc = dict(FMNIST_DATA_CONFIG, input_size=(1, size, size))
        model = create_model(arch, num_classes=10, in_chans=1, data_config=dc)
        out.append({"model": arch, "weights": str(export_model(model.eval(), root / f"t{i}", dc))})
    return out
