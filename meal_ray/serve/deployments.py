"""Serve deployments: one per teacher (dynamic batching with ``@serve.batch``) and the ensemble ingress.

The ingress fans every :class:`~meal_ray.serve.protocol.TeacherRequest` out to all teachers
concurrently and averages them (p_e = mean softmax, z_e = mean logits,
:func:`meal_ray.ensemble.average_teacher_outputs`) into a
:class:`~meal_ray.serve.protocol.TeacherReply`. Its ``info()`` reports the protocol version and
the TeacherSet fingerprint, which clients compare with their job's teachers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Optional

import numpy as np
import torch
from ray import serve

from meal_ray.config import BATCH_WAIT_TIMEOUT_S, MAX_BATCH_SIZE, check_batching, teacher_spec
from meal_ray.ensemble import average_teacher_outputs, describe_teacher, fingerprint, load_teacher
from meal_ray.errors import ClassCountMismatchError, ConfigError, ProtocolError
from meal_ray.serve import retry
from meal_ray.serve.protocol import PROTOCOL_VERSION, CropRequest, TeacherReply, parse_request

INGRESS_NAME = "ensemble"  # deployment name of the ingress inside the application


def _num_samples(requests: list) -> int:
    """serve.batch size function: a request is a mini-batch, so a batch's size is its number of crops."""
    return sum(len(r) for r in requests)


class _DropMaxOngoingWarning(logging.Filter):
    """Serve compares max_batch_size with max_ongoing_requests assuming one sample per request; ours count crops."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_ongoing_requests" not in record.getMessage() or "max_batch_size" not in record.getMessage()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  logging_config={"enable_access_log": False})  # one line per request would flood the logs
class TeacherModel:
    """One frozen teacher. Requests are merged by ``@serve.batch`` into one forward pass.

    ``max_batch_size`` counts *crops* (not requests): a merged batch never holds more crops
    than that; a larger request is split into chunks. Runs on CUDA when the replica has a GPU
    (``ray_actor_options: {num_gpus: 1}``), on CPU otherwise.
    """

    def __init__(self, spec: dict, autocast: Optional[str], max_batch_size: int, batch_wait_timeout_s: float,
                 data: Optional[dict] = None, emulate: Optional[dict] = None):
        logging.getLogger("ray.serve").addFilter(_DropMaxOngoingWarning())
        self.spec = teacher_spec(spec)
        self.weights_given = spec.get("weights_given", self.spec.weights)  # as the Serve config names them
        self.name = self.spec.name or self.spec.model
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = load_teacher(self.spec, autocast).to(self.device)
        self.description = describe_teacher(self.spec)
        self.emulate = dict(emulate) if emulate else None
        if self.emulate:  # benchmark mode: a fixed random readout of the crops' mean colour stands in for the model
            self.description = dict(self.description, emulated=self.emulate)
            g = torch.Generator().manual_seed(0)
            self._readout = torch.randn(self.teacher.in_chans, self.teacher.num_classes, generator=g)
        self.autocast = autocast
        # how full this replica's forward passes are: `meal-ray teachers status` shows it, to tune max_batch_size
        self.batching = {"forward_passes": 0, "crops": 0, "largest": 0}
        self.dataset, self.data_info = None, None
        if data:  # crop-box requests: this replica reads the training set and renders the boxes itself
            from meal_ray.data.datasets import dataset_fingerprint, load_train_set

            self.dataset = load_train_set(data["dataset"], data.get("root"), self.teacher.in_chans)
            self.data_info = {"dataset": data["dataset"], "root": data.get("root"), "samples": len(self.dataset),
                              "fingerprint": dataset_fingerprint(self.dataset)}
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict) -> None:
        """``user_config: {max_batch_size, batch_wait_timeout_s}`` in a Serve config tunes batching per teacher."""
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ConfigError(f"unknown teacher user_config keys {sorted(unknown)}; use max_batch_size, "
                              "batch_wait_timeout_s.")
        max_batch_size = config.get("max_batch_size", getattr(self, "max_batch_size", 64))
        wait = config.get("batch_wait_timeout_s", getattr(self, "batch_wait_timeout_s", 0.01))
        check_batching("user_config.", max_batch_size, wait)
        self.max_batch_size, self.batch_wait_timeout_s = int(max_batch_size), float(wait)
        self.infer_batch.set_max_batch_size(self.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def __call__(self, request) -> np.ndarray:
        """TeacherRequest (pixels) or CropRequest (boxes, rendered here at this teacher's resolution) -> float32
        logits [b, num_classes]. Validated here, before it joins a batch."""
        request = parse_request(request, self.teacher.in_chans, len(self.dataset) if self.dataset else None,
                                self.teacher.num_classes)
        if isinstance(request, CropRequest):
            images = await asyncio.to_thread(self._render, request)
        else:
            images = request.images
        step = self.max_batch_size
        chunks = [images[i:i + step] for i in range(0, len(images), step)]
        outs = await asyncio.gather(*(self.infer_batch(c) for c in chunks))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S,
                 batch_size_fn=_num_samples)  # set per app in __init__ (args.max_batch_size, batch_wait_timeout_s)
    async def infer_batch(self, requests: list) -> list:
        crops = _num_samples(requests)
        self.batching = {"forward_passes": self.batching["forward_passes"] + 1,
                         "crops": self.batching["crops"] + crops, "largest": max(self.batching["largest"], crops)}
        # Requests of different crop sizes (two jobs sharing the pool) run as separate forward passes.
        groups: dict = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.shape[1:]].append(i)
        results: list = [None] * len(requests)
        for idx in groups.values():
            merged = np.concatenate([requests[i] for i in idx])
            logits = await asyncio.to_thread(self._forward, merged)  # keeps the replica's event loop free
            offsets = np.cumsum([0] + [len(requests[i]) for i in idx])
            for j, i in enumerate(idx):
                results[i] = logits[offsets[j]:offsets[j + 1]]
        return results

    def _render(self, request: CropRequest) -> np.ndarray:
        """The request's crops rendered from the training set at this teacher's input size and interpolation (a
        380 px teacher sees a 380 px render of the student's box, not an upsampled student crop)."""
        from meal_ray.data.batch import render_batch
        from meal_ray.data.crops import scale_boxes

        if self.dataset is None:
            raise ProtocolError(f"teacher {self.name!r} got a crop-box request but reads no dataset: deploy the "
                                "application with args.data (the jobs' dataset and root) or send pixels "
                                "(teachers.request=pixels).")
        f = request.fields()
        boxes = f.get("mix_boxes")
        if boxes is not None:
            boxes = scale_boxes(boxes, request.size, self.teacher.size)
        return render_batch(self.dataset, f["ids"], f["crops"], self.teacher.size, self.teacher.interpolation,
                            f.get("mix_ids"), f.get("mix_crops"), boxes).numpy()

    def _forward(self, merged: np.ndarray) -> np.ndarray:
        if self.emulate:
            time.sleep(self.emulate["overhead_ms"] / 1e3 + len(merged) / self.emulate["crops_per_s"])
            means = torch.from_numpy(merged).float().mean(dim=(2, 3)) / 255
            return (means @ self._readout * 4).numpy()
        return self.teacher(torch.from_numpy(merged)).cpu().numpy().astype(np.float32, copy=False)

    def info(self) -> dict:
        """What this teacher is (architecture, weights, preprocessing, device, batching settings) and how full its
        forward passes have been on this replica (``batching``: passes, crops, the largest)."""
        t = self.teacher
        return {"name": self.name, "model": self.spec.model, "weights": self.spec.weights,
                "weights_given": self.weights_given, "pretrained": self.spec.pretrained,
                "num_classes": t.num_classes, "in_chans": t.in_chans,
                "input_size": [t.in_chans, *t.size], "interpolation": t.interpolation,
                "mean": [round(float(v) / 255, 6) for v in t.mean.flatten()],
                "std": [round(float(v) / 255, 6) for v in t.std.flatten()],
                "device": str(self.device), "autocast": self.autocast, "description": self.description,
                "max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "data": self.data_info, "emulate": self.emulate, "batching": dict(self.batching)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  logging_config={"enable_access_log": False})
class EnsembleIngress:
    """Fans each request out to every teacher deployment concurrently and averages their outputs."""

    def __init__(self, teachers: list, names: list, retry_s: float = 60.0, autocast: Optional[str] = None):
        self.teachers = list(teachers)  # DeploymentHandles (Serve replaces the bound deployments)
        self.names = list(names)
        self.retry_s = float(retry_s)
        self.autocast = autocast
        self._info: Optional[dict] = None

    async def _teacher_info(self) -> dict:
        if self._info is None:
            infos = await asyncio.gather(*(self._call(h.info) for h in self.teachers))
            infos = [{k: v for k, v in i.items() if k != "batching"} for i in infos]  # live counters: not cached
            classes = {i["num_classes"] for i in infos}
            chans = {i["in_chans"] for i in infos}
            if len(classes) != 1:
                raise ClassCountMismatchError(
                    "the served teachers disagree on the number of classes: "
                    + ", ".join(f"{i['name']}={i['num_classes']}" for i in infos) + "; serve teachers of one dataset.")
            if len(chans) != 1:
                raise ClassCountMismatchError(
                    "the served teachers disagree on input channels: "
                    + ", ".join(f"{i['name']}={i['in_chans']}" for i in infos) + ".")
            descriptions = [i["description"] for i in infos]
            data = [i.get("data") for i in infos]
            self._info = {"num_classes": classes.pop(), "in_chans": chans.pop(), "teachers": infos,
                          "data": data[0] if all(d is not None for d in data) else None,
                          "protocol_version": PROTOCOL_VERSION,
                          "teacher_set": {"fingerprint": fingerprint(descriptions, self.autocast),
                                          "autocast": self.autocast, "teachers": descriptions}}
        return self._info

    async def _call(self, method, *args):
        """Call a teacher; if its replica died, ask again once Serve has replaced it (up to ``retry_s``)."""
        return await retry.acall(lambda: method.remote(*args), self.retry_s)

    async def __call__(self, request) -> TeacherReply:
        info = await self._teacher_info()
        samples = info["data"]["samples"] if info["data"] else None
        request = parse_request(request, info["in_chans"], samples, info["num_classes"])
        start = time.perf_counter()
        logits = await asyncio.gather(*(self._call(h, request) for h in self.teachers))
        latency = time.perf_counter() - start
        probs, mean_logits = average_teacher_outputs([torch.tensor(z) for z in logits])  # replies are read-only
        return TeacherReply.from_tensors(probs, mean_logits, latency, request.top_k)

    async def info(self) -> dict:
        """Protocol version, TeacherSet fingerprint, num_classes, in_chans and each teacher's name, architecture,
        input size, preprocessing and device."""
        info = await self._teacher_info()
        return {**info, "teacher_names": list(self.names)}
