"""Shared fixtures: one local Ray cluster per test session, tiny exported teachers, Fashion-MNIST configs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from meal_ray.config import load_config

torch.set_num_threads(2)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

FMNIST_DATA = dict(dataset="fashion-mnist", image_size=28, crop_scale=[0.5, 1.0], crop_pct=1.0,
                   mean=[0.2860], std=[0.3530])
FMNIST_DATA_CONFIG = dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), interpolation="bilinear",
                          crop_pct=1.0)


def make_config(mode, model, epochs, lr, subset, teachers=None, **extra):
    return load_config(data=dict(
        name="t", mode=mode, data=dict(FMNIST_DATA, train_subset=subset, val_subset=2000),
        student=dict(model=model, num_classes=10, **extra.pop("student", {})),
        teachers=dict(source="local" if teachers else "none", models=teachers or []),
        optim=dict(epochs=epochs, batch_size=64, lr=lr, lr_milestones=[1000], **extra.pop("optim", {})),
        run=dict(log_every=0, seed=extra.pop("seed", 0)), **extra))


@pytest.fixture(scope="session")
def trained_teachers(tmp_path_factory):
    """Two real teachers trained here with hard labels (in-process engine, a few epochs)."""
    from meal_ray.engine import Engine, student_data_config
    from meal_ray.models import export_model

    root = tmp_path_factory.mktemp("trained_teachers")
    out = []
    for i, arch in enumerate(("resnet10t", "test_resnet")):
        cfg = make_config("pretrain", arch, epochs=3, lr=0.05, subset=6000, seed=i)
        engine = Engine.for_job(cfg, log=lambda s: None)
        result = engine.fit()
        out.append({"model": arch,
                    "weights": str(export_model(engine.student_raw, root / arch, student_data_config(cfg))),
                    "top1": result.top1})
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with more logical CPUs than cores, so Serve replicas and Train workers fit side by
    side."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    from meal_ray.cluster import start_serve_without_http

    start_serve_without_http()  # as meal-ray does: the tests' serve.run() calls then open no HTTP port either
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


def write_fashion_mnist_folder(root, folders, per_class_train, per_class_val):
    """An ImageNet-layout folder (train/<class>/, val/<class>/) of real Fashion-MNIST items named by ``folders``
    (one per label): PNG and JPEG alternate, every third item is stored as RGB."""
    from PIL import Image

    from meal_ray.data import FashionMNIST

    for split, data, per_class in (("train", FashionMNIST(train=True), per_class_train),
                                   ("val", FashionMNIST(train=False), per_class_val)):
        taken = {c: 0 for c in range(10)}
        for i, (image, label) in enumerate(zip(data.images[:3000], data.targets[:3000].tolist())):
            if taken[label] == per_class:
                continue
            taken[label] += 1
            folder = root / split / folders[label]
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(image[0].numpy(), mode="L")
            if i % 3 == 0:
                im = im.convert("RGB")
            if i % 2:
                im.save(folder / f"{i}.jpg", quality=95)
            else:
                im.save(folder / f"{i}.png")
        assert all(n == per_class for n in taken.values())
    return root


def json_line(output: str) -> dict:
    """The last JSON object printed by a `--json` command. Run in this process with CliRunner, its output also holds
    the lines Ray's log monitor forwards from the cluster's actors (this process is a Ray driver)."""
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
