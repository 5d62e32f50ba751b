"""What the layout guarantees: batches that render again bit for bit, replayable crops, the source registry,
TeacherSet fingerprints. Real Fashion-MNIST, real timm teachers; no Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FMNIST_DATA

from meal_ray.config import DataConfig, TeacherSpec, load_config
from meal_ray.data import (
    CropParams,
    ReplayedCropSampler,
    batches_from_loader,
    build_train_loader,
    cutmix,
    load_datasets,
    render_batch,
)
from meal_ray.errors import ConfigError, ModelNotFoundError

DATA = DataConfig(**dict(FMNIST_DATA, image_size=32, crop_scale=[0.3, 1.0], train_subset=300))


def _train_set():
    train, _, _ = load_datasets(DATA, 10)
    return train


def _epoch(loader, epoch, mix_generator=None):
    loader.sampler.set_epoch(epoch)
    batches = list(batches_from_loader(loader))
    return [cutmix(b, 1.0, 1.0, mix_generator) for b in batches] if mix_generator is not None else batches


def _recorded_crops(batches_per_pass) -> ReplayedCropSampler:
    """A replay of the crops of already-drawn batches, one list of batches per pass."""
    record = {(p, int(sid)): CropParams.from_tensor(crop) for p, batches in enumerate(batches_per_pass)
              for batch in batches for sid, crop in zip(batch.indices.tolist(), batch.crops)}
    return ReplayedCropSampler(record, len(batches_per_pass))


def test_a_batch_renders_again_bit_for_bit_with_cutmix():
    from meal_ray.data.datasets import FashionMNIST

    train = _train_set()
    torch.manual_seed(11)
    loader = build_train_loader(train, DATA, batch_size=32, seed=11)
    batches = _epoch(loader, 0, torch.Generator().manual_seed(5))
    full = FashionMNIST(train=True)
    mixed = 0
    for batch in batches:
        # sample ids are positions in the full training set, not in the 300-image subset
        assert torch.equal(full.targets[batch.indices], batch.labels)
        again = batch.render(train, DATA.image_size, DATA.interpolation)
        assert again.dtype == torch.uint8 and torch.equal(again, batch.images)
        assert torch.equal(render_batch(full, batch.indices, batch.crops, 32, "bilinear", batch.mix_ids,
                                        batch.mix_crops, batch.mix_boxes), batch.images)  # the full set works too
        assert int(batch.mix_ids[0]) >= 0 and 0 < batch.lam < 1
        assert torch.equal(batch.labels_b, full.targets[batch.mix_ids])
        pasted = int(batch.mix_boxes[0, 2] * batch.mix_boxes[0, 3])
        mixed += int(pasted > 0)
        # without the mix record the pixels differ: the record is what makes them reproducible
        plain = render_batch(train, batch.indices, batch.crops, 32)
        assert not torch.equal(plain, batch.images) or pasted == 0
    assert mixed >= len(batches) - 1
    assert max(int(b.indices.max()) for b in batches) >= 300


def test_replayed_crops_reproduce_recorded_epochs_for_any_batch_size_and_worker_count():
    train = _train_set()
    torch.manual_seed(3)
    recorder = build_train_loader(train, DATA, batch_size=50, seed=3)
    epochs = [_epoch(recorder, e) for e in range(2)]
    record = _recorded_crops(epochs)
    assert record.passes == 2 and len(record.record) == 2 * 300
    recorded = [{int(i): img for b in ep for i, img in zip(b.indices, b.images)} for ep in epochs]
    assert any(not torch.equal(recorded[0][i], recorded[1][i]) for i in recorded[0])  # two passes, two crops

    # the same seed and batch size replay the same batches; two ranks with another batch size see the same crops
    same = build_train_loader(train, DATA, batch_size=50, seed=3, crop_sampler=record)
    for a, b in zip(_epoch(same, 1), epochs[1]):
        assert torch.equal(a.images, b.images) and torch.equal(a.crops, b.crops)
    seen = set()
    for rank in (0, 1):
        loader = build_train_loader(train, DATA, batch_size=30, rank=rank, world_size=2, seed=99, crop_sampler=record)
        for epoch in (0, 1, 2):  # epoch 2 replays pass 0
            for batch in _epoch(loader, epoch):
                for sid, image in zip(batch.indices.tolist(), batch.images):
                    assert torch.equal(image, recorded[epoch % 2][sid])
                    seen.add((epoch, sid))
    assert len(seen) == 3 * 300
    with pytest.raises(KeyError, match="no recorded crop for sample 7 in pass 1"):
        ReplayedCropSampler({(0, 1): record.record[(0, next(iter(recorded[0])))]}, passes=2).sample(None, 7, 3)


def test_the_engine_trains_on_the_loaders_it_is_handed():
    from meal_ray.data import build_val_loader
    from meal_ray.engine import Engine

    cfg = load_config(data=dict(name="t", mode="pretrain", data=dict(FMNIST_DATA, image_size=28, train_subset=200,
                                                                     val_subset=100),
                                student=dict(model="test_efficientnet", num_classes=10), teachers=dict(source="none"),
                                optim=dict(epochs=1, batch_size=50), run=dict(log_every=0)))
    train, val, classes = load_datasets(cfg.data, 10)
    subset = torch.utils.data.Subset(train, range(100))  # the caller decides: here half the subset
    subset.targets = train.targets[:100]
    loader = build_train_loader(subset, cfg.data, 50)
    engine = Engine(cfg, loader, build_val_loader(val, cfg.data, 50), classes, log=lambda s: None)
    metrics = engine.train_epoch()
    # the 100 images of the loader it was handed, not the config's 200
    assert metrics["images_per_s"] == pytest.approx(100 / metrics["epoch_time_s"]) and engine.epoch == 1
    # over 100 images train top-1 is a whole percent; 2 batches of 50
    assert metrics["train_top1"] == round(metrics["train_top1"]) and len(engine.train_loader) == 2


def test_soft_label_sources_come_from_the_registry():
    from meal_ray.cli import main
    from meal_ray.source_registry import SOURCES, source_class

    for name in SOURCES:
        cls = source_class(name)
        assert cls.name == name
        for method in ("check_config", "preflight", "from_config", "attach", "close"):
            assert callable(getattr(cls, method)), (name, method)
    with pytest.raises(ConfigError,
                       match=r"teachers.source='serverd' is not a soft-label source. Did you mean: served"):
        load_config(data=dict(data=FMNIST_DATA, teachers=dict(source="serverd", models=["resnet18"])))
    with pytest.raises(ConfigError,
                       match="mode=distill needs soft labels: set teachers.source to one of local, served"):
        load_config(data=dict(data=FMNIST_DATA, teachers=dict(source="none")))
    help_text = CliRunner().invoke(main, ["distill", "--help"]).output
    listed = [n for n in SOURCES if f"{n}:" in " ".join(help_text.split())]
    assert listed == [n for n in SOURCES if n != "none"] and "cache" in listed  # what exists, nothing else
    assert "cached" not in help_text


def test_teacher_set_fingerprint_follows_weights_and_preprocessing_not_paths(tiny_teachers, tmp_path):
    from timm.data import resolve_data_config

    from meal_ray.ensemble import TeacherSet, load_teacher, teacher_data_config

    specs = tuple(TeacherSpec(**t) for t in tiny_teachers)
    base = TeacherSet(specs)
    copy = tmp_path / "copy"
    shutil.copytree(specs[0].weights, copy)
    moved = TeacherSet((TeacherSpec(specs[0].model, str(copy), name="renamed"), specs[1]))
    assert moved.fingerprint() == base.fingerprint()  # same bytes elsewhere, another deployment name
    swapped = TeacherSet(specs[::-1])
    assert swapped.fingerprint() != base.fingerprint()
    assert TeacherSet(specs, autocast="bf16").fingerprint() != base.fingerprint()
    ours, theirs = base.describe()[0], swapped.describe()[0]  # what the fingerprint covers, teacher by teacher
    assert (ours["model"], theirs["model"]) == ("test_resnet", "resnet10t")
    assert ours["weights"].startswith("sha256:") and ours["weights"] != theirs["weights"]
    assert (list(ours["input_size"]), list(theirs["input_size"])) == ([1, 28, 28], [1, 36, 36])

    # the described preprocessing is what the loaded teacher applies (exports and plain timm names)
    for spec in (*specs, TeacherSpec("test_resnet")):
        teacher = load_teacher(spec)
        resolved = resolve_data_config(model=teacher.model)
        described = teacher_data_config(spec)
        assert tuple(described["input_size"]) == tuple(resolved["input_size"]) == (teacher.in_chans, *teacher.size)
        for key in ("mean", "std"):
            assert tuple(described[key]) == tuple(resolved[key])
        assert described["interpolation"] == resolved["interpolation"]
    with pytest.raises(ModelNotFoundError, match="weights '/nope' not found"):
        TeacherSet((TeacherSpec("resnet18", "/nope"),)).fingerprint()
    with pytest.raises(ModelNotFoundError, match="unknown timm model 'resnet1888'"):
        TeacherSet((TeacherSpec("resnet1888"),)).check_files()


def test_cutmix_draws_everything_from_its_generator_and_lambda_follows_beta():
    """The same generator state gives the same mix whatever the global RNG did in between (lambda included), and
    lambda is Beta(beta, beta): mean 1/2 and variance 1 / (4 (2 beta + 1))."""
    from meal_ray.data.batch import Batch, beta_sample, cutmix

    batch = Batch(torch.arange(8 * 28 * 28, dtype=torch.int64).remainder(251).to(torch.uint8).view(8, 1, 28, 28),
                  torch.arange(8), torch.arange(8), torch.tensor([[0, 0, 28, 28, 0]] * 8))
    mixes = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        mixes.append(cutmix(batch, beta=0.7, generator=torch.Generator().manual_seed(3)))
    first, second = mixes
    assert first.lam == second.lam and torch.equal(first.images, second.images)
    assert torch.equal(first.mix_ids, second.mix_ids) and torch.equal(first.mix_boxes, second.mix_boxes)
    generator = torch.Generator().manual_seed(0)
    draws = np.array([beta_sample(2.0, generator) for _ in range(4000)])
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 20) < 0.005


def test_crop_requests_round_trip_batch_records_in_at_most_64_bytes_per_sample():
    from meal_ray.data.batch import Batch, cutmix
    from meal_ray.data.crops import scale_boxes
    from meal_ray.serve.protocol import CropRequest

    crops = torch.tensor([[1, 2, 20, 21, i % 2] for i in range(8)])
    plain = Batch(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), torch.arange(8),
                  crops)
    mixed = cutmix(plain, generator=torch.Generator().manual_seed(0))
    for batch in (plain, mixed):
        request = CropRequest.parse(CropRequest.from_batch(batch), num_samples=8)
        assert request.records.dtype == np.int32 and request.records.nbytes / len(batch) <= 64
        fields = request.fields()
        assert torch.equal(fields["ids"], batch.indices) and torch.equal(fields["crops"], batch.crops)
    assert all(torch.equal(fields[k], getattr(mixed, k)) for k in ("mix_ids", "mix_crops", "mix_boxes"))
    # a 56 px teacher gets the box at twice the coordinates; the same size leaves it alone
    boxes = torch.tensor([[3, 5, 10, 7]])
    assert scale_boxes(boxes, 28, 56).tolist() == [[6, 10, 20, 14]] and scale_boxes(boxes, 28, 28) is boxes


def test_the_configuration_reference_is_current_and_describes_every_key():
    """docs/configuration.md is what meal_ray.config_reference generates from the config classes (regenerate it with
    `python -m meal_ray.config_reference > docs/configuration.md`), and no key is left without a description."""
    import dataclasses

    from meal_ray.config import JobConfig
    from meal_ray.config_reference import reference_markdown

    text = reference_markdown()
    assert (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text() == text, \
        "docs/configuration.md is stale: python -m meal_ray.config_reference > docs/configuration.md"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.endswith("|  |") for line in rows), [r for r in rows if r.endswith("|  |")]
    for section in ("data", "teachers", "optim", "loss", "run"):
        for f in dataclasses.fields(type(getattr(JobConfig(), section))):
            assert f"| `{section}.{f.name}` |" in text, f"{section}.{f.name}"
    assert "| `optim.lr` | `0.01` |" in text and "| `run.stop_after_steps` | `null` |" in text


def test_docs_links_resolve_and_nothing_points_outside_the_repository():
    """Every relative link in the README and docs/ names a file that exists, and no tracked file refers to a path
    outside the repository (a user's clone has nothing beside it)."""
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".sh", "Makefile"))
               and re.search(r"\.\./shared|DESIGN\.md", (root / f).read_text(errors="ignore"))]
    assert outside == [] or outside == ["tests/test_layout.py"], outside
