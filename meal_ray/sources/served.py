"""Soft labels from the Ray Serve teacher application (deployment handles, no HTTP), several batches in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from meal_ray.config import JobConfig, teacher_list
from meal_ray.ensemble import average_teacher_outputs, check_compatible, served_differences
from meal_ray.errors import ConfigError, TeacherSetMismatchError, TeachersNotRunningError, TeachersUnavailableError
from meal_ray.models import check_model_name
from meal_ray.serve import retry
from meal_ray.serve.protocol import (
    DEFAULT_APP_NAME,
    HOW_TO_START,
    CropRequest,
    TeacherReply,
    TeacherRequest,
    check_version,
)
from meal_ray.sources.base import PrefetchWindow


@dataclass
class Pending:
    """One request in flight: what was asked (to ask again if its replica dies), the Serve responses (one from the
    ingress, or one per teacher with the direct client) and when it was sent."""

    request: Any
    responses: list
    sent: float
    retries: int = 0  # times a lost response was asked again


class ServedSoftLabels:
    """Soft labels from the Serve teacher application, with ``prefetch`` batches in flight.

    Works on the driver and inside Ray Train workers (the handle is obtained in the process
    that constructs it). On connecting it checks the application's protocol version. With
    ``request="crops"`` it sends crop records (:class:`CropRequest`) instead of pixels.
    """

    name = "served"

    def __init__(self, app_name: str = DEFAULT_APP_NAME, *, prefetch: int = 4, address: Optional[str] = None,
                 timeout_s: Optional[float] = 600.0, request: str = "pixels", client: str = "ingress",
                 retry_s: float = 60.0, reply_top_k: Optional[int] = None, recovery: str = "marginal"):
        from ray import serve
        from ray.serve.exceptions import RayServeException

        from meal_ray.cluster import connect
        from meal_ray.serve.lifecycle import app_status, state_name

        connect(address)
        self.app_name, self.timeout_s, self.request = app_name, timeout_s, request
        status = app_status(app_name)
        state = state_name(getattr(status, "status", "NOT_DEPLOYED"))
        if status is None or state in ("DEPLOY_FAILED", "DELETING", "NOT_STARTED"):
            reason = f"status {state}" + (f": {status.message}" if status is not None and status.message else "")
            raise TeachersNotRunningError(f"the Serve teacher application {app_name!r} is not running ({reason}). "
                                          f"{HOW_TO_START}")
        waits = retry.delays(retry_s)
        while True:  # an application being redeployed (`serve deploy` of a new config) has no handle for a moment
            try:
                self.handle = serve.get_app_handle(app_name)
                break
            except RayServeException as e:
                delay = next(waits, None)
                if delay is None or app_status(app_name) is None:
                    raise TeachersNotRunningError(f"the Serve teacher application {app_name!r} is not running "
                                                  f"({e}). {HOW_TO_START}") from None
                time.sleep(delay)
        self._info: Optional[dict] = None
        self.client, self.retry_s, self.reply_top_k, self.recovery = client, retry_s, reply_top_k, recovery
        check_version(self.info().get("protocol_version"), f"the teacher application {app_name!r}")
        self.teachers = ([serve.get_deployment_handle(name, app_name=app_name) for name in self.info()["teacher_names"]]
                         if client == "direct" else [])
        self.window = PrefetchWindow(self._submit, self._collect, prefetch)

    # ------------------------------------------------------------------ the source protocol
    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        """Names only: the teachers' weights live where the replicas run (teacher nodes, the hub), not here."""
        k = cfg.teachers.reply_top_k
        if k is not None and k > cfg.student.num_classes:
            raise ConfigError(f"teachers.reply_top_k={k} is more than the {cfg.student.num_classes} classes "
                              "(student.num_classes); use a smaller k, or leave it empty for full replies.")
        for spec in teacher_list(cfg.teachers.models):
            check_model_name(spec.model)

    @classmethod
    def preflight(cls, cfg: JobConfig) -> dict:
        """The application runs, speaks our protocol, serves this job's teachers and fits its student (and, for
        crop-box requests, reads the job's training set). Returns what it serves (``teacher_set``: the fingerprint
        and each teacher's architecture, weights digest and preprocessing, as the replicas loaded them)."""
        source = cls(cfg.teachers.app_name)
        source.check_teachers(cfg.teachers)
        source.check_student(cfg.student.num_classes, cfg.data.in_chans)
        if cfg.teachers.request == "crops":
            from meal_ray.data.datasets import dataset_fingerprint, load_datasets

            source.check_data(dataset_fingerprint(load_datasets(cfg.data, cfg.student.num_classes)[0]))
        return {"teacher_set": source.info()["teacher_set"]}

    @classmethod
    def from_config(cls, cfg: JobConfig, device=None) -> "ServedSoftLabels":
        t = cfg.teachers
        source = cls(t.app_name, prefetch=t.prefetch, request=t.request, client=t.client, timeout_s=t.timeout_s,
                     reply_top_k=t.reply_top_k, recovery=t.cache_recovery)
        source.check_student(cfg.student.num_classes, cfg.data.in_chans)
        return source

    def attach(self, batches: Iterable) -> Iterator:
        return self.window.attach(batches)

    def crop_sampler(self) -> None:
        return None  # random crops, drawn by the train loader

    def close(self) -> None:
        self._info = None

    # ------------------------------------------------------------------ requests
    def _submit(self, batch) -> Pending:
        # zero-copy: the array is serialized when the request goes out; the window keeps the batch until collected
        k = self.reply_top_k
        request = (CropRequest.from_batch(batch, k) if self.request == "crops"
                   else TeacherRequest.from_images(batch.images, k))
        targets = self.teachers or [self.handle]  # direct: one hop to every teacher, averaged here
        return Pending(request, [h.remote(request) for h in targets], time.perf_counter())

    def _collect(self, pending: Pending) -> tuple:
        """The soft labels of a request. A reply lost with its replica (killed, its node gone, drained) is asked
        again until Serve has replaced it (``retry_s``): the teachers are deterministic, so nothing changes."""
        try:
            if self.teachers:
                return self._collect_direct(pending)
            reply = TeacherReply.parse(self._result(self.handle, pending, 0), len(pending.request))
        except TimeoutError:
            raise TeachersUnavailableError(
                f"no soft labels from the Serve application {self.app_name!r} for {self.timeout_s:g} s "
                "(teachers.timeout_s): its replicas are gone or overloaded. The job stops; its last epoch's checkpoint "
                f"is kept. Check `meal-ray teachers status`; {HOW_TO_START}") from None
        probs, logits = reply.tensors(self.recovery)
        return probs, logits, float(reply.latency_s), pending.retries

    def _result(self, handle, pending: Pending, i: int):
        """Response ``i`` of ``pending``; a lost one is sent again to ``handle``."""
        def attempt():
            try:
                return pending.responses[i].result(timeout_s=self.timeout_s)
            except retry.replica_gone_errors():
                pending.responses[i] = handle.remote(pending.request)  # the next attempt waits for this one
                pending.retries += 1
                raise

        return retry.call(attempt, self.retry_s)

    def _collect_direct(self, pending: Pending) -> tuple:
        """Average the teachers' logits as the ingress does, through the same fp16 (or top-k) reply, so both clients
        give the same soft labels."""
        import torch

        logits = [torch.tensor(self._result(h, pending, i)) for i, h in enumerate(self.teachers)]  # replies are
        latency = time.perf_counter() - pending.sent                                                # read-only
        probs, mean_logits = average_teacher_outputs(logits)
        reply = TeacherReply.from_tensors(probs, mean_logits, latency, self.reply_top_k)  # the ingress's reply
        probs, mean_logits = reply.tensors(self.recovery)
        return probs, mean_logits, latency, pending.retries

    # ------------------------------------------------------------------ checks
    def info(self) -> dict:
        """The ingress's info(): protocol version, TeacherSet fingerprint, num_classes, in_chans, each teacher."""
        if self._info is None:
            self._info = retry.call(lambda: self.handle.info.remote().result(timeout_s=self.timeout_s), self.retry_s)
        return self._info

    def check_student(self, num_classes: int, in_chans: int) -> None:
        """Raise ClassCountMismatchError when the student cannot be distilled from the served teachers."""
        info = self.info()
        check_compatible(info["num_classes"], {t["in_chans"] for t in info["teachers"]}, num_classes, in_chans)

    def check_data(self, fingerprint: str) -> None:
        """Raise ConfigError unless the application's replicas read the training set with this fingerprint (crop-box
        requests name samples by id, so both sides must mean the same samples)."""
        data = self.info().get("data")
        if data is None:
            raise ConfigError(f"teachers.request=crops, but the Serve application {self.app_name!r} reads no dataset: "
                              "add `data: {dataset: ..., root: ...}` (the job's data.dataset and data.root) to its "
                              "args and redeploy, or set teachers.request=pixels.")
        if data["fingerprint"] != fingerprint:
            raise ConfigError(f"teachers.request=crops, but the Serve application {self.app_name!r} reads another "
                              f"training set ({data['dataset']} at {data['root']}, fingerprint {data['fingerprint']}; "
                              f"the job's: {fingerprint}). Point the app's args.data at the job's data or send pixels.")

    def check_teachers(self, teachers) -> None:
        """Raise TeacherSetMismatchError, naming the differences, unless the application serves the teachers of
        ``teachers`` (a TeachersConfig): compared by what the app reports (architecture, the weights as its config
        names them and the digest its replicas computed, autocast), never by reading weights here."""
        served = self.info()["teacher_set"]
        specs = teacher_list(teachers.models)
        diff = served_differences(specs, self.info()["teachers"], (teachers.autocast, served.get("autocast")))
        if diff:
            raise TeacherSetMismatchError(
                f"the Serve application {self.app_name!r} serves other teachers than the job's teachers.models "
                f"(served fingerprint {served['fingerprint']}): {'; '.join(diff)}. Name the served teachers' weights "
                "in teachers.models as the Serve config names them (or by sha256:<digest>), or deploy this job's "
                "teachers (teachers.app_name names another application).")
