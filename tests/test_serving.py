"""The teachers as a Ray Serve application, on the session's real local Ray cluster.

One application (two tiny exported teachers with input sizes 28 and 36, plus the ensemble
ingress) is deployed for the whole module through `teachers_up` from a Serve config file,
exactly as `meal-ray teachers up` does, and deleted at the end.
"""

from __future__ import annotations

import glob
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import recorded_batch

from meal_ray.config import TeachersConfig, TeacherSpec
from meal_ray.data import Batch
from meal_ray.ensemble import TeacherEnsemble
from meal_ray.errors import (
    ClassCountMismatchError,
    ConfigError,
    ModelNotFoundError,
    ProtocolError,
    TeachersNotRunningError,
)
from meal_ray.serve.protocol import MAX_SAMPLES, MAX_SIDE, PROTOCOL_VERSION, TeacherRequest

APP = "meal-ray-test-teachers"
ROOT = Path(__file__).resolve().parent.parent


def _config(teachers, app=APP, max_batch_size=64, wait=0.05):
    return {
        "proxy_location": "Disabled",
        "applications": [{
            "name": app, "import_path": "meal_ray.serve.app:build_app", "route_prefix": None,
            "args": {"teachers": [dict(t, name=n) for t, n in zip(teachers, ("small", "tiny10t"))],
                     "max_batch_size": max_batch_size, "batch_wait_timeout_s": wait,
                     "data": {"dataset": "fashion-mnist"}},  # crop-box requests: replicas render from it
            "deployments": [
                {"name": "small", "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.25}},
                {"name": "tiny10t", "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.25}},
                {"name": "ensemble", "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_teachers, tmp_path_factory):
    from meal_ray.serve.lifecycle import teachers_down, teachers_up

    path = tmp_path_factory.mktemp("serve") / "teachers.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_teachers)))
    status = teachers_up(path, log=lambda s: None)
    assert status[APP]["status"] == "RUNNING"
    yield APP
    teachers_down(APP)


@pytest.fixture(scope="module")
def ensemble(tiny_teachers):
    return TeacherEnsemble.from_specs([TeacherSpec(**t) for t in tiny_teachers])


def _crops(n, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


def _batches(sizes, image_size=28):
    for i, n in enumerate(sizes):
        yield Batch(images=_crops(n, image_size, seed=i), labels=torch.zeros(n, dtype=torch.long))


def _teacher_handle(name):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


def _batching(teacher) -> dict:
    """The replica's forward-pass counters (passes, crops, largest), as `meal-ray teachers status` reads them."""
    return teacher.info.remote().result(timeout_s=60)["batching"]


def _replica_actors(deployment, app=APP) -> list:
    """The Ray actor names of a deployment's live replicas, from Ray's State API (namespace ``serve``)."""
    from ray.util.state import list_actors

    return sorted(a.name for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"),
                                                       ("state", "=", "ALIVE")], limit=1000))


# ----------------------------------------------------------------------------- without a deployed app


def test_build_app_rejects_bad_args_with_clear_messages(tiny_teachers, tmp_path):
    from meal_ray.serve.app import build_app

    with pytest.raises(ConfigError, match="max_batch_sizes.*Did you mean: max_batch_size"):
        build_app({"teachers": tiny_teachers, "max_batch_sizes": 8})
    with pytest.raises(ConfigError, match="non-empty list"):
        build_app({"teachers": []})
    with pytest.raises(ConfigError, match="unique"):
        build_app({"teachers": [dict(t, name="same") for t in tiny_teachers]})
    with pytest.raises(ModelNotFoundError, match=r"meal-ray pretrain --config jobs/fmnist-teacher-resnet18.yaml"):
        build_app({"teachers": [{"model": "resnet18", "weights": "runs/fmnist-teacher-resnet18/student"}],
                   "base_dir": str(tmp_path)})
    with pytest.raises(ModelNotFoundError, match="resnet1888"):
        build_app({"teachers": [{"model": "resnet1888"}]})
    with pytest.raises(ConfigError, match=r"args.data.root is required for args.data.dataset=imagefolder"):
        build_app({"teachers": tiny_teachers, "data": {"dataset": "imagefolder"}})
    with pytest.raises(ConfigError, match=r"unknown config key 'args.data.path'"):
        build_app({"teachers": tiny_teachers, "data": {"path": "x"}})
    app = build_app({"teachers": tiny_teachers})  # default names teacher0, teacher1 + ingress "ensemble"
    assert type(app).__name__ == "Application"


def test_protocol_validates_requests_and_replies_in_one_place():
    from meal_ray.errors import ProtocolError
    from meal_ray.serve.protocol import TeacherReply, validate_crops

    ok = np.zeros((2, 1, 28, 28), np.uint8)
    assert validate_crops(ok, 1) is ok
    with pytest.raises(ValueError, match=r"uint8 numpy array of shape \[B, 1, H, W\].*got dtype float32"):
        validate_crops(ok.astype(np.float32), 1)
    with pytest.raises(ValueError, match=r"got 3 dims"):
        validate_crops(ok[0], 1)
    with pytest.raises(ValueError, match=r"got 3 channels"):
        validate_crops(np.zeros((2, 3, 28, 28), np.uint8), 1)
    with pytest.raises(ProtocolError, match="non-empty"):
        validate_crops(np.zeros((0, 1, 28, 28), np.uint8), 1)
    # oversized requests are refused on their shape: this 10 GB "batch" is a broadcast view, never allocated
    with pytest.raises(ProtocolError, match=r"too large: shape \(1, 1, 100000, 100000\).*at most 4096 px"):
        validate_crops(np.broadcast_to(np.zeros((1, 1, 1, 1), np.uint8), (1, 1, 100000, 100000)), 1)
    request = TeacherRequest.from_images(torch.from_numpy(ok))
    assert TeacherRequest.parse(request, 1) is request and request.version == PROTOCOL_VERSION
    reply = TeacherReply.from_tensors(torch.full((2, 10), 0.1), torch.zeros(2, 10), 0.5)
    assert TeacherReply.parse(reply, 2) is reply and reply.probs.dtype == np.float16 and reply.num_classes == 10
    with pytest.raises(ProtocolError, match="returned probs \\(2, 10\\).*request of 3 crops"):
        TeacherReply.parse(reply, 3)
    old_server = TeacherReply(reply.probs, reply.logits, 0.5, version=PROTOCOL_VERSION - 1)
    with pytest.raises(ProtocolError, match=rf"the teacher application speaks meal-ray teacher protocol "
                                            rf"v{PROTOCOL_VERSION - 1}.*redeploy"):
        TeacherReply.parse(old_server, 2)
    with pytest.raises(ProtocolError, match="replied with a dict, not a TeacherReply"):
        TeacherReply.parse({"probs": reply.probs}, 2)


def test_top_k_replies_hold_what_a_top_k_cache_row_holds():
    """teachers.reply_top_k: a reply of the k largest probabilities expands to exactly the soft labels a cache
    relabelled with that k gives (one encoder, one expansion); k = C is the full fp16 reply."""
    from meal_ray.cache import CachedPass, encode
    from meal_ray.serve.protocol import TeacherReply, TeacherRequest, parse_request

    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(6, 10, generator=g)
    probs = logits.softmax(1)
    full = TeacherReply.from_tensors(probs, logits, 0.1)
    all_classes = TeacherReply.from_tensors(probs, logits, 0.1, top_k=10)
    assert all_classes.ids is None and np.array_equal(all_classes.probs, full.probs)
    for recovery in ("marginal", "renormalize"):
        reply = TeacherReply.parse(TeacherReply.from_tensors(probs, logits, 0.1, top_k=3), 6)
        assert reply.ids.shape == (6, 3) and reply.num_classes == 10 and reply.probs.dtype == np.float16
        cached = CachedPass.from_table(encode(range(6), np.zeros((6, 5)), None, None, None, probs, logits, 3))
        for a, b in zip(reply.tensors(recovery), cached.soft_labels(np.arange(6), 10, recovery)):
            assert torch.equal(a, b)
    with pytest.raises(ProtocolError, match="top_k=0 must be a whole number >= 1"):
        parse_request(TeacherRequest(np.zeros((2, 1, 8, 8), np.uint8), top_k=0))
    with pytest.raises(ProtocolError, match="top_k=11 is more than the teachers' 10 classes"):
        parse_request(TeacherRequest(np.zeros((2, 1, 8, 8), np.uint8), top_k=11), num_classes=10)


def test_repo_serve_configs_follow_the_serve_schema_and_name_every_deployment():
    from ray.serve.schema import ServeDeploySchema

    from meal_ray.config import load_app_config
    from meal_ray.serve.app import resolve_teachers
    from meal_ray.serve.deployments import INGRESS_NAME

    files = sorted(glob.glob(str(ROOT / "deployments" / "*.yaml")))
    assert {Path(f).name for f in files} >= {"fashion-mnist.yaml", "imagenet-224.yaml", "imagenet-380.yaml"}
    for f in files:
        config = ServeDeploySchema.model_validate(yaml.safe_load(Path(f).read_text()))
        for app in config.applications:
            assert app.import_path == "meal_ray.serve.app:build_app" and app.route_prefix is None
            names = [t["name"] for t in resolve_teachers(load_app_config(app.args), check_files=False)]
            assert {d.name for d in app.deployments} == set(names) | {INGRESS_NAME}, f
    models = yaml.safe_load((ROOT / "deployments/imagenet-224.yaml").read_text())["applications"][0]["args"]["teachers"]
    assert [m["model"] for m in models] == ["senet154.gluon_in1k", "resnet152s.gluon_in1k"]
    for f in ("imagenet-224.yaml", "imagenet-380.yaml"):
        for d in yaml.safe_load((ROOT / "deployments" / f).read_text())["applications"][0]["deployments"][:2]:
            assert d["ray_actor_options"]["num_gpus"] == 1


def test_shipped_served_jobs_name_the_teachers_their_serve_configs_serve():
    from meal_ray.config import load_app_config, load_config
    from meal_ray.ensemble import TeacherSet

    serve_configs = {"fashion-mnist": "fashion-mnist.yaml", "224": "imagenet-224.yaml", "380": "imagenet-380.yaml"}
    jobs = [p for p in sorted(glob.glob(str(ROOT / "jobs" / "*.yaml"))) if load_config(p).teachers.source == "served"]
    assert len(jobs) >= 8
    for path in jobs:
        job = load_config(path)
        key = "fashion-mnist" if job.data.dataset == "fashion-mnist" else "380" if "380" in path else "224"
        raw = yaml.safe_load((ROOT / "deployments" / serve_configs[key]).read_text())["applications"][0]
        app = load_app_config(raw["args"])
        assert raw["name"] == job.teachers.app_name, path
        assert [(t.model, t.weights, t.pretrained) for t in job.teachers.models] == \
            [(t.model, t.weights, t.pretrained) for t in app.teachers], path
        assert job.teachers.autocast == app.autocast, path
        if key != "fashion-mnist":  # hub weights: the fingerprints themselves match (no files needed)
            served = TeacherSet(tuple(app.teachers), app.autocast)
            assert TeacherSet.from_config(job.teachers).fingerprint() == served.fingerprint(), path


def test_served_source_raises_when_the_app_is_not_deployed(ray_cluster):
    from meal_ray.sources.served import ServedSoftLabels

    with pytest.raises(TeachersNotRunningError) as e:
        ServedSoftLabels("no-such-teachers")
    msg = str(e.value)
    assert "'no-such-teachers' is not running" in msg
    assert "meal-ray teachers up --config deployments/fashion-mnist.yaml" in msg and "serve deploy" in msg


# ----------------------------------------------------------------------------- the deployed app


@pytest.mark.slow
def test_served_averages_equal_the_in_process_ensemble(app, ensemble, tiny_teachers):
    from meal_ray.serve.lifecycle import teachers_status
    from meal_ray.sources.served import ServedSoftLabels

    status = teachers_status()[app]
    assert status["status"] == "RUNNING"
    assert set(status["deployments"]) == {"small", "tiny10t", "ensemble"}
    source = ServedSoftLabels(app, prefetch=2)
    info = source.info()
    assert info["num_classes"] == 10 and info["in_chans"] == 1
    assert [(t["name"], t["model"], t["input_size"]) for t in info["teachers"]] == [
        ("small", "test_resnet", [1, 28, 28]), ("tiny10t", "resnet10t", [1, 36, 36])]
    source.check_student(10, 1)
    # the ingress reports the protocol version and the TeacherSet it serves (weights content, not paths or names)
    from meal_ray.ensemble import TeacherSet
    from meal_ray.errors import TeacherSetMismatchError

    assert info["protocol_version"] == PROTOCOL_VERSION
    served_set = TeacherSet(tuple(TeacherSpec(**t) for t in tiny_teachers))
    assert info["teacher_set"]["fingerprint"] == served_set.fingerprint()
    assert info["teacher_set"]["teachers"] == served_set.describe()
    # the job's teachers are checked by what the app reports, without reading their weights here
    source.check_teachers(TeachersConfig(models=tiny_teachers))
    digests = [dict(t, weights=d["weights"][:19]) for t, d in zip(tiny_teachers, served_set.describe())]
    source.check_teachers(TeachersConfig(models=digests))  # named by the sha256 the replicas computed
    with pytest.raises(TeacherSetMismatchError, match="autocast: job bf16, served None"):
        source.check_teachers(TeachersConfig(models=tiny_teachers, autocast="bf16"))
    moved = [dict(tiny_teachers[0], weights="/elsewhere/student"), tiny_teachers[1]]
    with pytest.raises(TeacherSetMismatchError, match=r"teacher 0 weights: job '/elsewhere/student', served "
                                                      r"'/\S+' \(sha256:[0-9a-f]{12}\)"):
        source.check_teachers(TeachersConfig(models=moved))
    with pytest.raises(ClassCountMismatchError, match="10 classes but the student has 100"):
        source.check_student(100, 1)
    with pytest.raises(ClassCountMismatchError, match="input channels"):
        source.check_student(10, 3)

    # 28 px crops (teacher 1 resizes to 36) and 32 px crops (both resize); batch sizes vary.
    for image_size, sizes in ((28, [16, 5, 16]), (32, [7, 9])):
        out = list(source.attach(_batches(sizes, image_size)))
        assert [len(b.images) for b in out] == sizes
        for b in out:
            probs, logits = ensemble(b.images)
            assert b.teacher_probs.dtype == torch.float32 and b.teacher_probs.shape == (len(b.images), 10)
            torch.testing.assert_close(b.teacher_probs, probs, atol=2e-3, rtol=0)
            torch.testing.assert_close(b.teacher_logits, logits, atol=2e-3, rtol=1e-3)
            assert b.teacher_latency_s > 0 and b.wait_s >= 0
    reply = source.handle.remote(TeacherRequest.from_images(_crops(3))).result()
    assert reply.probs.dtype == np.float16 and reply.logits.dtype == np.float16
    assert reply.num_classes == 10 and reply.latency_s > 0 and reply.version == PROTOCOL_VERSION
    np.testing.assert_allclose(reply.probs.astype(np.float32).sum(1), 1.0, atol=3e-3)
    source.close()


@pytest.mark.slow
def test_two_concurrent_clients_are_merged_into_larger_teacher_batches(app):
    from ray import serve

    teacher = _teacher_handle("small")
    before = _batching(teacher)
    errors, replies = [], []

    def client(seed):
        try:
            handle = serve.get_app_handle(app)
            for round_ in range(3):  # a prefetch window of 4 requests of 8 crops, three times
                pending = [handle.remote(TeacherRequest.from_images(_crops(8, seed=seed * 100 + round_ * 10 + k)))
                           for k in range(4)]
                replies.extend(r.result(timeout_s=60).probs.shape for r in pending)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert replies == [(8, 10)] * 24
    after = _batching(teacher)
    assert after["crops"] - before["crops"] == 2 * 3 * 4 * 8  # every crop went through exactly once
    passes = after["forward_passes"] - before["forward_passes"]
    assert passes < 24, f"no merged batch: {passes} forward passes for 24 requests of 8 crops"
    assert after["largest"] <= 64  # max_batch_size counts crops


@pytest.mark.slow
def test_oversized_request_is_split_at_max_batch_size(app, ensemble):
    from ray import serve

    teacher = _teacher_handle("small")
    before = _batching(teacher)
    crops = _crops(150, seed=7)
    reply = serve.get_app_handle(app).remote(TeacherRequest.from_images(crops)).result(timeout_s=60)
    probs, _ = ensemble(crops)
    torch.testing.assert_close(reply.tensors()[0], probs, atol=2e-3, rtol=0)
    after = _batching(teacher)
    assert after["crops"] - before["crops"] == 150 and after["largest"] == 64
    assert after["forward_passes"] - before["forward_passes"] == 3  # 64 + 64 + 22: split at max_batch_size


@pytest.mark.slow
def test_malformed_requests_get_clear_errors_and_the_replicas_keep_serving(app):
    from ray import serve

    from meal_ray.errors import ProtocolError

    ingress, teacher = serve.get_app_handle(app), _teacher_handle("small")
    replicas = _replica_actors("small")
    assert len(replicas) == 1
    good = _crops(4).numpy()
    bad = [(TeacherRequest(good.astype(np.float32)), r"uint8 numpy array of shape \[B, 1, H, W\].*got dtype float32"),
           (TeacherRequest(np.zeros((4, 3, 28, 28), np.uint8)), r"got 3 channels.*teachers take 1-channel"),
           (TeacherRequest(good[0]), r"got 3 dims, shape \(1, 28, 28\)"),
           (good, r"bare array \(an older meal-ray client"),  # a client without the protocol
           (TeacherRequest(good, version=PROTOCOL_VERSION + 1),
            rf"the client speaks meal-ray teacher protocol v{PROTOCOL_VERSION + 1}, "
            rf"this side speaks v{PROTOCOL_VERSION}"),
           ({"images": good}, r"must be a meal_ray.serve.protocol.TeacherRequest \(or CropRequest\), got dict"),
           (TeacherRequest(np.zeros((MAX_SAMPLES + 1, 1, 1, 1), np.uint8)), r"too large.*at most 65536 crops"),
           (TeacherRequest(np.zeros((1, 1, 1, MAX_SIDE + 1), np.uint8)), r"too large.*at most 4096 px a side")]
    for handle in (ingress, teacher):  # validated by the ingress and, called directly, by each teacher
        for request, message in bad:
            with pytest.raises(ProtocolError, match=message):
                handle.remote(request).result(timeout_s=60)
    # a bad request sent concurrently with good ones fails alone
    ok = TeacherRequest(good)
    responses = [ingress.remote(ok), teacher.remote(TeacherRequest(good.astype(np.int64))), ingress.remote(ok)]
    assert responses[0].result(timeout_s=60).probs.shape == (4, 10)
    with pytest.raises(ProtocolError, match="got dtype int64"):
        responses[1].result(timeout_s=60)
    assert responses[2].result(timeout_s=60).probs.shape == (4, 10)
    assert _replica_actors("small") == replicas  # the replica was not restarted


@pytest.mark.slow
def test_crop_box_requests_give_the_pixel_paths_soft_labels(app, tiny_teachers):
    """teachers.request=crops: a replica renders the student's boxes from the dataset itself. Where the teacher's
    resolution equals the student's (28 px) it sees the pixels the student saw; a 36 px teacher sees a 36 px render
    of the same box (not the 28 px crop upsampled)."""
    from meal_ray.data.batch import render_batch
    from meal_ray.data.crops import scale_boxes
    from meal_ray.data.datasets import dataset_fingerprint, load_train_set
    from meal_ray.ensemble import load_teacher
    from meal_ray.errors import ProtocolError
    from meal_ray.serve.protocol import CropRequest
    from meal_ray.sources.served import ServedSoftLabels

    dataset = load_train_set("fashion-mnist", None, 1)
    small, tiny10t = _teacher_handle("small"), _teacher_handle("tiny10t")
    local36 = load_teacher(TeacherSpec(**tiny_teachers[1]))
    for seed, mixed in ((0, False), (1, True)):
        batch = recorded_batch(dataset, 12, seed=seed, mixed=mixed)
        request = CropRequest.from_batch(batch)
        assert request.records.nbytes / len(batch) <= 64 and request.records.shape[1] == (15 if mixed else 6)
        # the 28 px teacher: same logits from boxes as from the student's pixels
        np.testing.assert_allclose(small.remote(request).result(timeout_s=60),
                                   small.remote(TeacherRequest.from_images(batch.images)).result(timeout_s=60),
                                   atol=1e-5, rtol=0)
        # the 36 px teacher renders the box (and the scaled CutMix box) at 36 px
        boxes = scale_boxes(batch.mix_boxes, 28, (36, 36)) if mixed else None
        at36 = render_batch(dataset, batch.indices, batch.crops, (36, 36), "bilinear", batch.mix_ids,
                            batch.mix_crops, boxes)
        from_boxes = tiny10t.remote(request).result(timeout_s=60)
        np.testing.assert_allclose(from_boxes, local36(at36).numpy(), atol=1e-4, rtol=0)
        upsampled = tiny10t.remote(TeacherRequest.from_images(batch.images)).result(timeout_s=60)
        assert np.abs(from_boxes - upsampled).max() > 1e-3  # a different (sharper) input than the upsampled crop

    # the served source sends boxes when asked; the ingress reports the dataset its replicas read
    source = ServedSoftLabels(app, prefetch=2, request="crops")
    assert source.info()["data"]["samples"] == len(dataset) == 60000
    source.check_data(dataset_fingerprint(dataset))
    with pytest.raises(ConfigError, match="reads another training set"):
        source.check_data("0" * 16)
    batch = recorded_batch(dataset, 8, seed=2, mixed=True)
    out = next(source.attach([batch]))
    assert out.teacher_probs.shape == (8, 10) and out.teacher_latency_s > 0
    source.close()
    # bad crop requests are refused by name, at the ingress and at each teacher
    ingress = serve_handle(app)
    good = CropRequest.from_batch(batch)
    bad = [(CropRequest(good.records.astype(np.int64), 28), r"int32 array \[B, 6\] or \[B, 15\]"),
           (CropRequest(good.records[:, :5].copy(), 28), r"got int32 \(8, 5\)"),
           (CropRequest(np.where(np.arange(15) == 0, 60000, good.records).astype(np.int32), 28),
            r"sample ids must be in \[0, 60000\)"),
           (CropRequest(good.records, 0), "size=0 must be the student's crop side"),
           (CropRequest(good.records, MAX_SIDE + 1), r"too large: shape \(8, 4097\)"),
           (CropRequest(np.where(np.arange(15) == 3, 10**9, good.records).astype(np.int32), 28), "too large")]
    for handle in (ingress, small):
        for request, message in bad:
            with pytest.raises(ProtocolError, match=message):
                handle.remote(request).result(timeout_s=60)


@pytest.mark.slow
def test_direct_client_gives_the_ingress_soft_labels(app):
    """teachers.client=direct: the worker calls each teacher deployment and averages (one hop, not two), through
    the same fp16 reply, so the soft labels are the ingress's bit for bit."""
    from meal_ray.sources.served import ServedSoftLabels

    ingress, direct = (ServedSoftLabels(app, prefetch=1, client=c) for c in ("ingress", "direct"))
    assert len(direct.teachers) == 2 and not ingress.teachers
    for a, b in zip(ingress.attach(_batches([16, 5])), direct.attach(_batches([16, 5]))):
        assert torch.equal(a.teacher_probs, b.teacher_probs) and torch.equal(a.teacher_logits, b.teacher_logits)
        assert b.teacher_latency_s > 0


@pytest.mark.slow
def test_top_k_replies_from_the_app_expand_the_full_replies_top_k(app):
    """A served job with teachers.reply_top_k gets, from the ingress and from the direct client alike (bit for bit),
    the full reply's top-k expanded (what a top-k cache gives: the same probabilities; the other classes' mean logit
    taken before the fp16 rounding, so equal within fp16); a k above the class count is refused by the app."""
    from meal_ray.serve.protocol import TeacherReply, TeacherRequest
    from meal_ray.sources.served import ServedSoftLabels

    full = ServedSoftLabels(app, prefetch=1)
    clients = [ServedSoftLabels(app, prefetch=1, client=c, reply_top_k=3) for c in ("ingress", "direct")]
    for a, b, c in zip(full.attach(_batches([16, 5])), *(s.attach(_batches([16, 5])) for s in clients)):
        assert torch.equal(b.teacher_probs, c.teacher_probs) and torch.equal(b.teacher_logits, c.teacher_logits)
        expected = TeacherReply.from_tensors(a.teacher_probs, a.teacher_logits, 0.0, top_k=3).tensors()
        assert torch.equal(b.teacher_probs, expected[0])
        torch.testing.assert_close(b.teacher_logits, expected[1], atol=2e-3, rtol=1e-3)
        assert not torch.equal(b.teacher_probs, a.teacher_probs)  # 7 of 10 classes share the left-over mass
    with pytest.raises(ProtocolError, match="top_k=11 is more than the teachers' 10 classes"):
        serve_handle(app).remote(TeacherRequest(np.zeros((2, 1, 28, 28), np.uint8), top_k=11)).result(timeout_s=60)


def serve_handle(app_name):
    from ray import serve

    return serve.get_app_handle(app_name)


@pytest.mark.slow
def test_prefetch_window_keeps_several_requests_in_flight(app, ensemble):
    from meal_ray.sources.served import ServedSoftLabels

    source = ServedSoftLabels(app, prefetch=3)
    in_flight, peak, pulled = 0, 0, []
    submit, collect = source.window.submit, source.window.collect

    def counting_submit(batch):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        return submit(batch)

    def counting_collect(handle):
        nonlocal in_flight
        result = collect(handle)
        in_flight -= 1
        return result

    source.window.submit, source.window.collect = counting_submit, counting_collect

    def batches():
        for b in _batches([6] * 7):
            pulled.append(len(pulled))
            yield b

    it = source.attach(batches())
    first = next(it)
    assert len(pulled) == 3 and in_flight == 2  # three submitted before the first was collected
    rest = list(it)
    assert peak == 3 and in_flight == 0 and len(rest) == 6
    for i, b in enumerate([first, *rest]):  # order is preserved
        assert torch.equal(b.images, _crops(6, seed=i))
        torch.testing.assert_close(b.teacher_probs, ensemble(b.images)[0], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_cli_teachers_status(app):
    from click.testing import CliRunner

    from meal_ray.cli import main

    result = CliRunner().invoke(main, ["teachers", "status"])
    assert result.exit_code == 0, result.output
    assert f"{app}: RUNNING" in result.output and "small: HEALTHY" in result.output
    small = next(line for line in result.output.splitlines() if "small: HEALTHY" in line)
    assert re.search(r"\| batches: (none yet|mean [0-9.]+ crops, largest \d+ of max_batch_size 64, \d+ forward "
                     r"passes \(one replica\))", small), small
    ensemble = next(line for line in result.output.splitlines() if "ensemble: HEALTHY" in line)
    assert "batches" not in ensemble, ensemble  # the ingress runs no forward pass


@pytest.mark.slow
def test_teachers_up_keeps_other_apps_and_reports_failed_deploys(app, tiny_teachers, tmp_path):
    from meal_ray.serve.lifecycle import teachers_down, teachers_status, teachers_up

    other = _config(tiny_teachers[:1], app="meal-ray-test-other")
    other["applications"][0]["deployments"] = other["applications"][0]["deployments"][::2]  # small + ensemble
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    status = teachers_up(tmp_path / "other.yaml", log=lambda s: None)
    assert status["meal-ray-test-other"]["status"] == "RUNNING" and status[app]["status"] == "RUNNING"
    assert teachers_down(tmp_path / "other.yaml") == ["meal-ray-test-other"]
    assert teachers_status()[app]["status"] == "RUNNING"

    bad = _config(tiny_teachers, app="meal-ray-test-bad")
    bad["applications"][0]["deployments"][0]["name"] = "no-such-teacher"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(TeachersNotRunningError,
                       match=r"DEPLOY_FAILED: ValueError: Deployment 'no-such-teacher' does not exist"):
        teachers_up(tmp_path / "bad.yaml", timeout_s=120, log=lambda s: None)
    assert teachers_down("meal-ray-test-bad") == ["meal-ray-test-bad"]
    assert teachers_status()[app]["status"] == "RUNNING"


@pytest.mark.slow
def test_killed_teacher_replica_is_replaced_and_requests_succeed_again(app, ray_cluster):
    import ray
    from ray import serve

    [old] = _replica_actors("tiny10t")
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)

    ingress = serve.get_app_handle(app)
    deadline, reply, failures = time.monotonic() + 120, None, []
    while reply is None:
        try:
            reply = ingress.remote(TeacherRequest.from_images(_crops(5))).result(timeout_s=60)
        except Exception as e:
            failures.append(type(e).__name__)
            assert time.monotonic() < deadline, f"no successful request within 120 s after the kill: {failures}"
            time.sleep(1)
    assert reply.probs.shape == (5, 10)
    [new] = _replica_actors("tiny10t")
    assert new != old


@pytest.mark.slow
def test_teachers_down_deletes_the_app(app):
    from meal_ray.serve.lifecycle import teachers_down, teachers_status
    from meal_ray.sources.served import ServedSoftLabels

    assert teachers_down(APP) == [APP]
    assert APP not in teachers_status()
    with pytest.raises(TeachersNotRunningError, match="meal-ray teachers up"):
        ServedSoftLabels(APP)
    assert teachers_down(APP) == []


@pytest.mark.slow
def test_embedded_teachers_up_serves_until_teachers_down(ray_cluster, tiny_teachers, tmp_path):
    """`meal-ray teachers up` with no cluster to join starts a local Ray of its own, says the address to train
    against, keeps the teachers up until `meal-ray teachers down` deletes them, then stops its Ray and exits 0."""
    import json
    import os
    import re
    import subprocess

    from conftest import BIN

    name = "meal-ray-test-embedded"
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_teachers, app=name)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    up = subprocess.Popen([f"{BIN}/meal-ray", "teachers", "up", "--config", str(path), "--num-cpus", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("Teachers are up" in line for line in lines):
            assert up.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        address = re.search(r"--address (\S+)", "".join(lines)).group(1)
        cli = [f"{BIN}/meal-ray", "teachers"]
        status = subprocess.run(cli + ["status", "--address", address, "--json"], capture_output=True, text=True,
                                env=env, timeout=120)
        assert status.returncode == 0, status.stderr[-3000:]
        app = json.loads(status.stdout)[name]
        assert app["status"] == "RUNNING", app
        down = subprocess.run(cli + ["down", "--config", str(path), "--address", address], capture_output=True,
                              text=True, env=env, timeout=120)
        assert down.returncode == 0 and f"Deleted {name}." in down.stdout, down.stdout + down.stderr
        assert up.wait(timeout=120) == 0
        reader.join(timeout=10)
        assert "The teacher applications were deleted; shutting down." in "".join(lines), "".join(lines)[-3000:]
        assert "Traceback" not in "".join(lines)
    finally:
        if up.poll() is None:
            up.kill()
