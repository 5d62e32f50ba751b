"""Bytes per sample on the wire between a training worker and the Serve teacher application.

Measures the actual request and reply objects (what `ServedSoftLabels` sends and what
`EnsembleIngress` returns), serialized with cloudpickle protocol 5 as Ray does, against a
float32 baseline (normalized float32 crops in, float32 probabilities + logits out):

    .venv/bin/python bench/bench_wire.py              # wire sizes only (no Ray cluster)
    .venv/bin/python bench/bench_wire.py --latency    # + served vs in-process latency on a tiny model

Numbers are printed as measured in this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from ray import cloudpickle

from meal_ray.serve.protocol import CROP_FIELDS, MIX_FIELDS, CropRequest, TeacherReply, TeacherRequest

CASES = (("Fashion-MNIST", 1, 28, 10), ("ImageNet", 3, 224, 1000))


def wire_bytes(obj) -> int:
    return len(cloudpickle.dumps(obj, protocol=5))


def measure(chans: int, size: int, classes: int, batch: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (batch, chans, size, size), dtype=np.uint8)
    logits = rng.normal(0, 3, (batch, classes)).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # the objects meal-ray puts on the wire (ServedSoftLabels._submit / EnsembleIngress.__call__)
    request = TeacherRequest(crops)
    # teachers.request=crops: sample id + box + flip (+ the CutMix record); ImageNet-sized ids and boxes
    records = rng.integers(0, 1_281_167, (batch, MIX_FIELDS)).astype(np.int32)
    boxes = {"request_crops": CropRequest(records[:, :CROP_FIELDS].copy(), size),
             "request_crops_mix": CropRequest(records, size)}
    reply = TeacherReply(probs.astype(np.float16), logits.astype(np.float16), 0.0123)
    # teachers.reply_top_k: 5 (the cache's default k at 1000 classes is 10; here both)
    top_k = {f"reply_top{k}": TeacherReply.from_tensors(torch.from_numpy(probs), torch.from_numpy(logits), 0.0123, k)
             for k in (5, 10) if k < classes}
    # float32 baseline: normalized float crops in, float32 probs + logits out
    request32 = ((crops.astype(np.float32) / 255 - 0.45) / 0.225).astype(np.float32)
    reply32 = {"probs": probs, "logits": logits, "latency_s": 0.0123, "num_classes": classes}
    out = {k: wire_bytes(v) / batch for k, v in
           (("request", request), ("reply", reply), ("request_f32", request32), ("reply_f32", reply32),
            *boxes.items(), *top_k.items())}
    out["total"] = out["request"] + out["reply"]
    out["total_f32"] = out["request_f32"] + out["reply_f32"]
    return out


def latency(batch: int = 64, requests: int = 30) -> dict:
    """Median time for one batch of soft labels: served (handle round trip) vs in-process, tiny teachers."""
    import ray
    import torch
    from ray import serve

    from meal_ray.cluster import start_serve_without_http
    from meal_ray.config import TeacherSpec
    from meal_ray.data import Batch
    from meal_ray.ensemble import TeacherEnsemble
    from meal_ray.models import create_model, export_model
    from meal_ray.serve.app import build_app
    from meal_ray.sources.served import ServedSoftLabels

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-wire-")
    dc = dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), interpolation="bilinear", crop_pct=1.0)
    teachers = []
    for i, arch in enumerate(("test_resnet", "test_efficientnet")):
        torch.manual_seed(i)
        model = create_model(arch, num_classes=10, in_chans=1, data_config=dc)
        teachers.append({"model": arch, "weights": str(export_model(model.eval(), f"{tmp}/t{i}", dc))})
    crops = [torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8) for _ in range(requests)]

    ensemble = TeacherEnsemble.from_specs([TeacherSpec(**t) for t in teachers])
    ensemble(crops[0])
    local = []
    for c in crops:
        t0 = time.perf_counter()
        ensemble(c)
        local.append(time.perf_counter() - t0)

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        start_serve_without_http()
        serve.run(build_app({"teachers": teachers, "max_batch_size": batch, "batch_wait_timeout_s": 0.0}),
                  name="bench-wire", route_prefix=None)
        source = ServedSoftLabels("bench-wire", prefetch=1)
        batches = [Batch(images=c, labels=torch.zeros(batch, dtype=torch.long)) for c in crops]
        list(source.attach(batches[:3]))  # warm up
        served, inside = [], []
        for b in batches:  # one request at a time: the full round trip, nothing overlapped
            t0 = time.perf_counter()
            out = next(iter(source.attach([b])))
            served.append(time.perf_counter() - t0)
            inside.append(out.teacher_latency_s)
        t0 = time.perf_counter()
        list(ServedSoftLabels("bench-wire", prefetch=4).attach(batches))
        pipelined = (time.perf_counter() - t0) / len(batches)
        serve.delete("bench-wire")
    finally:
        ray.shutdown()
    return {"local_ms": 1e3 * statistics.median(local), "served_ms": 1e3 * statistics.median(served),
            "teacher_ms": 1e3 * statistics.median(inside), "pipelined_ms": 1e3 * pipelined}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--latency", action="store_true", help="also time served vs in-process teachers (starts Ray)")
    args = parser.parse_args(argv)

    print(f"bytes per sample on the wire (cloudpickle protocol 5, batch of {args.batch})")
    print(f"{'dataset':<14} {'request u8':>11} {'reply f16':>10} {'total':>10} | {'request f32':>11} "
          f"{'reply f32':>10} {'total f32':>10} | {'f32/ours':>8}")
    for name, c, s, k in CASES:
        m = measure(c, s, k, args.batch)
        print(f"{name + f' {s}x{s}x{c}':<14} {m['request']:>11.1f} {m['reply']:>10.1f} {m['total']:>10.1f} | "
              f"{m['request_f32']:>11.1f} {m['reply_f32']:>10.1f} {m['total_f32']:>10.1f} | "
              f"{m['total_f32'] / m['total']:>7.2f}x")
        print(f"{'':<14} ({k} classes; request {m['request_f32'] / m['request']:.2f}x smaller, "
              f"reply {m['reply_f32'] / m['reply']:.2f}x smaller than float32)")
        print(f"{'':<14} crop-box request (teachers.request=crops): {m['request_crops']:.1f} B "
              f"({m['request_crops_mix']:.1f} B with CutMix records), {m['request'] / m['request_crops_mix']:.0f}x "
              f"smaller than the pixels")
        if "reply_top10" in m:
            print(f"{'':<14} top-k reply (teachers.reply_top_k): k=5 {m['reply_top5']:.1f} B, k=10 "
                  f"{m['reply_top10']:.1f} B ({m['reply'] / m['reply_top10']:.0f}x smaller than the full reply)")
    if args.latency:
        r = latency(args.batch)
        print(f"\nlatency per batch of {args.batch} Fashion-MNIST crops, two tiny teachers (test_resnet + "
              f"test_efficientnet), CPU:")
        print(f"  in-process ensemble        {r['local_ms']:8.2f} ms")
        print(f"  served, one at a time      {r['served_ms']:8.2f} ms  "
              f"({r['served_ms'] / r['local_ms']:.2f}x in-process; "
              f"teacher time inside: {r['teacher_ms']:.2f} ms)")
        print(f"  served, 4 in flight        {r['pipelined_ms']:8.2f} ms per batch "
              f"({r['pipelined_ms'] / r['local_ms']:.2f}x in-process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
