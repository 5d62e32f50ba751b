"""The offline soft-label cache: Parquet shards written by a Ray Data relabel job, read by teachers.source=cache.

Fast tests check the format (exact for k = C, FKD's marginal smoothing below), deterministic crop records, checksums,
refusals, and the same shard bytes whether crops are rendered in the actor or by its render processes; the slow ones
relabel on a real Ray cluster through the served teachers, compare with them, and train from the cache on Ray Train;
a fault run (`make test-faults`) resumes a killed relabel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FMNIST_DATA

from meal_ray.cache import CacheSpec, SoftLabelCache, draw_crop_records, encode, shard_name, write_shard_file
from meal_ray.config import load_config
from meal_ray.data import FashionMNIST, render_sample
from meal_ray.errors import CacheError, CacheMismatchError

APP = "meal-ray-cache-test-teachers"
BIN = os.path.dirname(sys.executable)


def _soft(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    return logits.softmax(1), logits


def _rows(probs, logits, k):
    n = len(probs)
    table = encode(np.arange(n) * 3, np.tile([0, 0, 28, 28, 0], (n, 1)), None, None, None, probs, logits, k)
    from meal_ray.cache import CachedPass

    data = CachedPass.from_table(table)
    return data, data.rows(np.arange(n) * 3)


def test_rows_are_exact_for_k_equal_c_and_smoothed_below():
    probs, logits = _soft(6, 10)
    data, rows = _rows(probs, logits, 10)
    p, z = data.soft_labels(rows, 10)
    torch.testing.assert_close(p, probs.half().float(), atol=0, rtol=0)  # fp16, nothing else lost
    torch.testing.assert_close(z, logits.half().float(), atol=0, rtol=0)

    data, rows = _rows(probs, logits, 3)
    top = probs.topk(3, dim=1)
    p, z = data.soft_labels(rows, 10)  # marginal smoothing (FKD)
    torch.testing.assert_close(p.gather(1, top.indices), top.values.half().float())
    rest = (1 - top.values.half().float().sum(1, keepdim=True)) / 7
    others = torch.ones(6, 10, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(p[others].view(6, 7), rest.expand(6, 7))
    torch.testing.assert_close(p.sum(1), torch.ones(6), atol=2e-3, rtol=0)
    mean_rest = (logits.sum(1) - logits.gather(1, top.indices).sum(1)) / 7
    torch.testing.assert_close(z[others].view(6, 7), mean_rest.half().float().view(6, 1).expand(6, 7))
    p, _ = data.soft_labels(rows, 10, "renormalize")
    assert torch.all(p[others] == 0) and torch.allclose(p.sum(1), torch.ones(6))

    # teachers.cache_top_k: a k = C cache read as top-3 gives what a top-3 relabel holds (fp16 sums aside)
    full, full_rows = _rows(probs, logits, 10)
    p3, z3 = full.soft_labels(full_rows, 10, top_k=3)
    p_relabel, z_relabel = data.soft_labels(rows, 10)
    torch.testing.assert_close(p3, p_relabel, atol=0, rtol=0)
    torch.testing.assert_close(z3, z_relabel, atol=2e-2, rtol=2e-3)


def test_crop_records_depend_only_on_seed_pass_and_sample():
    """A chunk's crop records come from a counter-based stream of (seed, pass, sample id): the same whichever other
    samples share the chunk and in whatever order, another pass gives other crops, and a record renders with the
    partner image it names."""
    full = FashionMNIST(train=False)
    ids = np.arange(200)
    mix = {"enabled": True, "beta": 1.0, "prob": 1.0}

    def records(sids, p=0, cutmix=mix):
        sids = np.asarray(list(sids))
        return draw_crop_records(sids, [full.images[s] for s in sids], p, seed=7, scale=(0.3, 1.0),
                                 ratio=(3 / 4, 4 / 3), image_size=32, cutmix=cutmix, partner_ids=ids,
                                 image_of=lambda i: full.images[i])

    forward, backward, alone = records(range(20)), records(reversed(range(20))), [records([s]) for s in range(20)]
    for field in ("crops", "mix_ids", "mix_crops", "mix_boxes"):
        assert np.array_equal(getattr(forward, field), getattr(backward, field)[::-1])
        assert np.array_equal(getattr(forward, field), np.concatenate([getattr(r, field) for r in alone]))
    assert (forward.mix_ids >= 0).all()
    top, left, h, w = forward.mix_boxes.T
    assert (top >= 0).all() and (top + h <= 32).all() and (left >= 0).all() and (left + w <= 32).all()
    assert not np.array_equal(forward.crops, records(range(20), p=1).crops)  # another pass, other crops
    crop, m, partner = forward.params(3)
    pixels = render_sample(full.images[3], crop, 32, "bilinear", m, partner)
    assert torch.equal(pixels, render_sample(full.images[3], crop, 32, "bilinear", m, full.images[m.partner_id]))
    assert torch.equal(pixels, forward.render(3, full.images[3], 32, "bilinear"))
    assert (records(range(20), cutmix={"enabled": False}).mix_ids == -1).all()
    some = records(range(200), cutmix={"enabled": True, "beta": 2.0, "prob": 0.5})
    assert 70 < (some.mix_ids >= 0).sum() < 130  # prob 0.5 mixes about half


def test_crops_are_drawn_by_torchvisions_random_resized_crop_rule():
    """The vectorised draw against torchvision's own RandomResizedCrop.get_params on the same image sizes: the same
    box sizes, positions and flips in distribution (20,000 each), and torchvision's centre-crop fallback when no try
    fits (a 10 x 100 image, ratio 3/4..4/3)."""
    from torchvision.transforms import RandomResizedCrop

    from meal_ray.data.crops import CROP_UNIFORMS, random_resized_crops, stream_uniforms

    n, scale, ratio = 20000, (0.08, 1.0), (3 / 4, 4 / 3)
    u = stream_uniforms((1, 2), np.arange(n), CROP_UNIFORMS)
    ours = random_resized_crops(u, np.full(n, 28), np.full(n, 36), scale, ratio)
    torch.manual_seed(0)
    image = torch.zeros(1, 28, 36)
    theirs = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)])
    for col in range(4):  # top, left, height, width: means within 2% of the range
        assert abs(ours[:, col].mean() - theirs[:, col].mean()) < 0.02 * 36, col
        assert abs(ours[:, col].std() - theirs[:, col].std()) < 0.02 * 36, col
    assert abs(ours[:, 4].mean() - 0.5) < 0.02
    assert (ours[:, 0] + ours[:, 2] <= 28).all() and (ours[:, 1] + ours[:, 3] <= 36).all() and (ours[:, 2:4] > 0).all()
    wide = random_resized_crops(u[:3], np.full(3, 10), np.full(3, 100), (0.9, 1.0), ratio)
    assert wide[:, :4].tolist() == [[0, 43, 10, 13]] * 3  # RandomResizedCrop's fallback for this image


def _spec(**over):
    base = dict(teacher_set={"fingerprint": "t" * 16, "autocast": None, "teachers": [{"model": "m"}]},
                dataset={"fingerprint": "d" * 16, "name": "fashion-mnist", "train_subset": 4}, num_classes=10,
                image_size=28, crop={"scale": [0.5, 1.0], "ratio": [0.75, 1.333333], "interpolation": "bilinear"},
                cutmix={"enabled": False}, k=10, passes=1, seed=0, shards_per_pass={"0": 1})
    base.update(over)
    return CacheSpec(**base)


def test_cache_directory_checksums_partial_shards_and_refusals(tmp_path):
    cache = SoftLabelCache.create(tmp_path / "c", _spec())
    probs, logits = _soft(4, 10)
    table = encode(np.arange(4), np.tile([0, 0, 28, 28, 0], (4, 1)), None, None, None, probs, logits, 10)
    (tmp_path / "c" / "pass-000").mkdir()
    (tmp_path / "c" / "pass-000" / ".shard-00000.parquet.tmp").write_bytes(b"half a shard")  # killed mid-write
    with pytest.raises(CacheError, match=r"incomplete \(0 of 1 shards\)"):
        SoftLabelCache(tmp_path / "c").check_job(_spec(), [0, 1])
    assert not cache.is_complete(shard_name(0, 0))
    write_shard_file(cache.root, shard_name(0, 0), table)  # as a relabel actor writes it, then lists it
    entry = cache.add_shard(shard_name(0, 0), table.num_rows)
    reopened = SoftLabelCache(tmp_path / "c")
    assert reopened.is_complete(shard_name(0, 0)) and reopened.is_finished()
    reopened.check_job(_spec(), [0, 1, 3])
    assert reopened.load_pass(0).rows([3]).tolist() == [3]

    with pytest.raises(CacheMismatchError, match=r"crop: cache \{'scale': \[0.5, 1.0\].*job \{'scale': \[0.08, 1.0\]"):
        reopened.check_job(_spec(crop={"scale": [0.08, 1.0], "ratio": [0.75, 1.333333], "interpolation": "bilinear"}),
                           [0])
    with pytest.raises(CacheMismatchError, match=r"teacher set: cache tttt.*job xxxx"):
        reopened.check_job(_spec(teacher_set={"fingerprint": "x" * 16, "autocast": None, "teachers": [{"model": "n"}]}),
                           [0])
    with pytest.raises(CacheMismatchError, match="covers 4 training samples but 1 of the job's 5 are not among them"):
        reopened.check_job(_spec(), [0, 1, 2, 3, 9])
    with pytest.raises(CacheMismatchError, match="image_size: cache 28, now 32"):
        SoftLabelCache.create(tmp_path / "c", _spec(image_size=32))  # resuming with other settings

    path = tmp_path / "c" / shard_name(0, 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"shard pass-000/shard-00000.parquet of .* is corrupt: sha256 \w+, "
                                         rf"manifest {entry['sha256']}"):
        SoftLabelCache(tmp_path / "c").load_pass(0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a cache")
    with pytest.raises(CacheError, match="exists and is not a soft-label cache"):
        SoftLabelCache.create(tmp_path / "other", _spec())
    with pytest.raises(CacheError, match="is not a soft-label cache"):
        SoftLabelCache(tmp_path / "other")


# ----------------------------------------------------------------------------- on a real Ray cluster


def _job(tmp_path, teachers, source, name="cached", **over):
    data = dict(FMNIST_DATA, train_subset=512, val_subset=500)
    data.update(over.pop("data", {}))
    return load_config(data=dict(
        name=name, mode="distill", data=data,
        student=dict(model="test_efficientnet", num_classes=10),
        teachers=dict(source=source, app_name=APP, cache=str(tmp_path / "cache"),
                      models=[{"model": t["model"], "weights": t["weights"]} for t in teachers]),
        optim=dict(epochs=3, batch_size=64, lr=0.05, cutmix=True),
        run=dict(num_workers=2, cpus_per_worker=1, seed=3, output=str(tmp_path / name),
                 tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_every=0), **over))


@pytest.fixture(scope="module")
def relabelled(ray_cluster, tiny_teachers, tmp_path_factory):
    """The served tiny teachers, and a 2-pass cache (CutMix, k = C) relabelled through them by Ray Data."""
    from ray import serve

    from meal_ray.serve.app import build_app
    from meal_ray.train.relabel import relabel

    serve.run(build_app({"teachers": tiny_teachers, "max_batch_size": 256, "batch_wait_timeout_s": 0.005}),
              name=APP, route_prefix=None)
    tmp = tmp_path_factory.mktemp("cache")
    lines: list = []
    summary = relabel(_job(tmp, tiny_teachers, "served"), tmp / "cache", passes=2, shard_size=200, actors=2,
                      log=lines.append)
    yield tmp, summary, lines
    serve.delete(APP)


@pytest.mark.slow
def test_cache_holds_the_served_soft_labels_and_trains_like_them(relabelled, tiny_teachers):
    from meal_ray.data import build_train_loader, load_datasets
    from meal_ray.engine import Engine
    from meal_ray.sources.cache import CachedSoftLabels, CacheReplaySampler
    from meal_ray.sources.served import ServedSoftLabels

    tmp, summary, lines = relabelled
    assert summary["crops"] == summary["labelled"] == 2 * 512 and summary["shards"] == 2 * 3 and summary["k"] == 10
    assert any("ETA" in line for line in lines) and "bytes per crop" in lines[-1]
    cache = SoftLabelCache(tmp / "cache")
    cache.verify()
    served_cfg, cache_cfg = _job(tmp, tiny_teachers, "served"), _job(tmp, tiny_teachers, "cache")
    CachedSoftLabels.check_config(cache_cfg)  # fits: same teachers, data, crops, CutMix

    # the same replayed crops, soft labels from the served teachers and from the cache
    train, _, _ = load_datasets(cache_cfg.data, 10)
    loader = build_train_loader(train, cache_cfg.data, 64, seed=3, crop_sampler=CacheReplaySampler(cache))
    served, cached = ServedSoftLabels.from_config(served_cfg), CachedSoftLabels.from_config(cache_cfg)
    from meal_ray.data import batches_from_loader

    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = []
        for b in batches_from_loader(loader):
            b.epoch = epoch
            batches.append(b)
        mixed = sum(int((b.mix_ids >= 0).sum()) for b in batches)
        assert mixed == 512 and all(isinstance(b.lam, torch.Tensor) for b in batches)  # CutMix prob 1, replayed
        for s, c in zip(served.attach(batches[:3]), cached.attach(batches[:3])):
            torch.testing.assert_close(c.teacher_probs, s.teacher_probs, atol=1e-3, rtol=0)
            torch.testing.assert_close(c.teacher_logits, s.teacher_logits, atol=1e-3, rtol=1e-3)
            assert torch.equal(s.images, s.render(train, 28))  # the pixels the teachers saw are the records'

    # training from the cache starts where training from the served teachers on the same crops starts
    first = {}
    for name, cfg, source in (("served", served_cfg, served), ("cache", cache_cfg, cached)):
        cfg.run.num_workers = 1
        engine = Engine.for_job(cfg, source=source, log=lambda s: None, crop_sampler=CacheReplaySampler(cache))
        first[name] = engine.train_epoch()["first_step_loss"]
    assert first["cache"] == pytest.approx(first["served"], rel=2e-3)


@pytest.mark.slow
def test_distill_from_the_cache_on_ray_train_with_no_teachers_running(relabelled, tiny_teachers):
    from meal_ray.train import run_job

    tmp, _, _ = relabelled
    cfg = _job(tmp, tiny_teachers, "cache", name="from-cache")
    cfg.teachers.app_name = "no-such-application"  # nothing served is asked
    result = run_job(cfg)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # 3 epochs from 2 passes: epoch 3 replays pass 0
    assert history[-1]["soft_ce"] < history[0]["soft_ce"] and "disc_loss" in history[0]
    assert all(h["teacher_wait_frac"] < 0.5 for h in history)
    assert (tmp / "from-cache" / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_cache_that_does_not_fit_is_refused_before_training(relabelled, tiny_teachers):
    from meal_ray.train import run_job

    tmp, _, _ = relabelled
    cases = [
        (_job(tmp, tiny_teachers[::-1], "cache", name="r1"), r"teacher set: cache \w+ \(test_resnet, resnet10t"),
        (_job(tmp, tiny_teachers, "cache", name="r2", data={"crop_scale": [0.9, 1.0]}), r"crop: cache \{'scale'"),
        (_job(tmp, tiny_teachers, "cache", name="r3", data={"train_subset": 1000}), r"not among them"),
        (_job(tmp, tiny_teachers, "cache", name="r4", data={"image_size": 32}), r"image_size: cache 28, job 32"),
    ]
    for cfg, message in cases:
        with pytest.raises(CacheMismatchError, match=message):
            run_job(cfg)
        assert not Path(cfg.run.output).exists()
    no_mix = _job(tmp, tiny_teachers, "cache", name="r5")
    no_mix.optim.cutmix = False
    with pytest.raises(CacheMismatchError, match=r"cutmix: cache \{'enabled': True"):
        run_job(no_mix)


def test_render_processes_write_the_same_shard_bytes(tiny_teachers, tmp_path):
    """A relabel actor's crops rendered in its own process (data.loader_workers 0) or by 5 DataLoader worker processes
    in pieces of 32, joined into the teachers' chunks of 256: the same shard file, byte for byte."""
    from meal_ray.train.relabel import ShardLabeler

    cfg = _job(tmp_path, tiny_teachers, "local").to_dict()
    shard = {"pass": [1], "shard": [0], "ids": [list(range(300))]}  # a whole chunk and a part of one
    files = {}
    for workers in (0, 5):
        root = tmp_path / f"workers-{workers}"
        root.mkdir()
        labeler = ShardLabeler(dict(cfg, data=dict(cfg["data"], loader_workers=workers)), str(root), 10)
        assert labeler.piece == (256 if workers == 0 else 32)
        name = str(labeler(shard)["name"][0])
        files[workers] = (root / name).read_bytes()
    assert files[0] == files[5]


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_relabel_resumes_to_the_same_cache(ray_cluster, tiny_teachers, tmp_path):
    from meal_ray.train.relabel import relabel

    cfg = _job(tmp_path, tiny_teachers, "local")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([f"{BIN}/meal-ray", "relabel", "--config", str(job), "--passes", "2", "--output",
                             str(tmp_path / "killed"), "--shard-size", "64", "--actors", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    manifest, deadline, done = tmp_path / "killed" / "manifest.json", time.monotonic() + 300, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file():
            try:
                done = len(json.loads(manifest.read_text())["shards"])
            except ValueError:
                done = 0
            if done >= 3:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray it started
    proc.wait(60)
    output = proc.stdout.read().decode(errors="replace")
    assert 3 <= done < 16, (done, output[-3000:])
    # the user sees meal-ray's progress, not Ray Data's own lines (they stay in its ray-data.log)
    assert "[relabel] shard" in output and "streaming_executor" not in output, output[-3000:]
    before = json.loads(manifest.read_text())["shards"]

    lines: list = []
    summary = relabel(cfg, tmp_path / "killed", passes=2, shard_size=64, actors=1, log=lines.append)
    assert f"({len(before)} already done)" in lines[0]
    resumed = SoftLabelCache(tmp_path / "killed")
    assert all(resumed.shards[n] == e for n, e in before.items())  # finished shards were not redone
    assert summary["labelled"] == summary["crops"] - sum(e["rows"] for e in before.values())  # what this call did
    # the uninterrupted reference, its crops rendered ahead of the teachers by 5 DataLoader worker processes in pieces
    # of 32 (data.loader_workers, the GPU setting): the same bytes as the killed-and-resumed run without them (one
    # shard of each: test_render_processes_write_the_same_shard_bytes, in `make test`)
    rendered_ahead = load_config(data=dict(cfg.to_dict(), data=dict(cfg.to_dict()["data"], loader_workers=5)))
    relabel(rendered_ahead, tmp_path / "whole", passes=2, shard_size=64, actors=1, log=lambda s: None)
    whole = SoftLabelCache(tmp_path / "whole")
    assert resumed.is_finished() and len(resumed.shards) == 16
    assert {n: e["sha256"] for n, e in resumed.shards.items()} == {n: e["sha256"] for n, e in whole.shards.items()}
