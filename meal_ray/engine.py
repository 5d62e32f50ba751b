"""The one training loop: hard-label pretraining and MEAL V2 distillation, for every soft-label source.

Plain PyTorch (no Ray): Ray Train calls it from each worker, tests call it in-process. The
caller hands it the job config, the loaders (so it decides which crops are trained on) and the
soft-label source; models are wrapped for DDP by a callable the caller passes in
(``wrap_model``), and checkpoints, metrics and exports are handed to callbacks, so the edges
decide where they go.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from meal_ray.config import JobConfig, OptimConfig
from meal_ray.data.batch import Batch, batches_from_loader, cutmix
from meal_ray.data.crops import CropSampler
from meal_ray.data.loaders import Normalize, build_loaders
from meal_ray.ensemble import AUTOCAST_DTYPES
from meal_ray.evaluation import EvalResult, evaluate_model
from meal_ray.losses import hard_label_cross_entropy, meal_v2_loss
from meal_ray.models import Discriminator, create_model
from meal_ray.sources.base import NoSoftLabels


def student_data_config(cfg: JobConfig) -> dict:
    """The preprocessing the student is trained with, as timm pretrained_cfg fields (for exports)."""
    d = cfg.data
    return dict(input_size=(d.in_chans, d.image_size, d.image_size), mean=tuple(d.mean), std=tuple(d.std),
                interpolation=d.interpolation, crop_pct=d.crop_pct, crop_mode="center")


def build_student(cfg: JobConfig) -> torch.nn.Module:
    s = cfg.student
    return create_model(s.model, num_classes=s.num_classes, in_chans=cfg.data.in_chans, pretrained=s.pretrained,
                        weights=s.weights, data_config=student_data_config(cfg), drop_rate=s.drop_rate)


def build_optimizer(student: torch.nn.Module, discriminator: Optional[torch.nn.Module], optim: OptimConfig):
    """One SGD, two parameter groups: student at the schedule's lr, discriminator at d_lr (constant) or, with
    ``d_lr_schedule: student``, on the student's schedule too (the authors' code)."""
    groups = [{"params": list(student.parameters()), "lr": optim.lr, "name": "student"}]
    if discriminator is not None:
        groups.append({"params": list(discriminator.parameters()), "name": "discriminator",
                       "lr": optim.lr if optim.d_lr_schedule == "student" else optim.d_lr})
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def student_lr(optim: OptimConfig, epoch: int, step_fraction: float = 0.0) -> float:
    """Step: lr * gamma^(number of milestones passed); cosine: per-step cosine from lr to 0 over all epochs."""
    if optim.lr_schedule == "cosine":
        t = (epoch + step_fraction) / optim.epochs
        return 0.5 * optim.lr * (1 + math.cos(math.pi * min(t, 1.0)))
    return optim.lr * optim.lr_gamma ** sum(epoch >= m for m in optim.lr_milestones)


def world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: dict, device) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


class Engine:
    """Builds student, discriminator and optimizer for one worker and runs epochs over the loaders it is handed.

    ``train_loader`` yields (uint8 crops, labels, sample ids, crops) with a per-epoch
    ``sampler.set_epoch``; ``val_loader`` yields (uint8 images, labels) of this rank's shard.
    :meth:`for_job` builds both from the job's data config, as a caller usually wants.
    """

    def __init__(self, cfg: JobConfig, train_loader, val_loader, classes: Sequence[str], *, source=None,
                 device: torch.device | str = "cpu",
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                 log: Callable[[str], None] = print):
        self.cfg, self.device, self.log = cfg, torch.device(device), log
        self.rank, self.world_size = world()
        self.source = source or NoSoftLabels()
        self.distill = cfg.mode == "distill"
        torch.manual_seed(cfg.run.seed)  # identical init on every rank
        self.student_raw = build_student(cfg).to(self.device)
        if cfg.run.channels_last:
            self.student_raw = self.student_raw.to(memory_format=torch.channels_last)
        self.discriminator_raw = (
            Discriminator(cfg.student.num_classes).to(self.device)
            if self.distill and cfg.loss.discriminator != "off" else None
        )
        self.optimizer = build_optimizer(self.student_raw, self.discriminator_raw, cfg.optim)
        self.student = wrap_model(self.student_raw)
        self.discriminator = wrap_model(self.discriminator_raw) if self.discriminator_raw is not None else None
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, cfg.run.channels_last).to(self.device)
        self.train_loader, self.val_loader, self.classes = train_loader, val_loader, tuple(classes)
        # a loader replaying recorded CutMix (a soft-label cache) brings its own mixes: never mix again
        self.replays_mix = train_loader.dataset.replays_mix
        # mixed precision where it pays (CUDA); on CPU the student trains in fp32 whatever run.amp says
        self.amp = cfg.run.amp if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.epoch = 0  # next epoch to run
        self.stopped_early = False  # run.stop_after_steps reached: a rehearsal ends here
        self.progress = None  # a meal_ray.progress.ProgressWriter on the rank that reports progress, if any
        # Two random streams per rank. Augmentation (crops: torch's global RNG as torchvision draws them; CutMix:
        # self._rng, every draw) is swapped in only while batches are drawn, which may run ahead of
        # training into the next epoch (a served source keeps its window full across the boundary). The student's
        # stream (dropout, the val loader's seed draw) is the global RNG the rest of the time. Kept apart, a
        # checkpoint restores each where it was: see rng_state().
        self._rng = torch.Generator().manual_seed(cfg.run.seed * 7919 + self.rank)
        torch.manual_seed(cfg.run.seed * 1000 + self.rank)
        self._augmentation_state = torch.get_rng_state()
        torch.manual_seed(cfg.run.seed * 1000 + self.rank + 500)  # the student's stream
        self._epoch_streams: dict = {}  # epoch -> the augmentation streams when its first batch was drawn
        self._attached: Optional[Iterator[Batch]] = None  # the source's batches, across epochs from _attached_epoch
        self._attached_epoch = -1

    @classmethod
    def for_job(cls, cfg: JobConfig, *, source=None, device: torch.device | str = "cpu",
                wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                log: Callable[[str], None] = print, crop_sampler: Optional[CropSampler] = None) -> "Engine":
        """An engine on this rank's shard of the job's data (random crops unless ``crop_sampler`` says otherwise)."""
        rank, world_size = world()
        train_loader, val_loader, classes = build_loaders(
            cfg.data, cfg.student.num_classes, cfg.optim.batch_size // world_size, rank, world_size, cfg.run.seed,
            crop_sampler)
        return cls(cfg, train_loader, val_loader, classes, source=source, device=device, wrap_model=wrap_model,
                   log=log)

    # ------------------------------------------------------------------ checkpoint state
    def _augmentation_streams(self) -> dict:
        loader_gen = getattr(self.train_loader, "generator", None)
        return {"augmentation": self._augmentation_state.clone(), "cutmix": self._rng.get_state(),
                "loader": loader_gen.get_state() if loader_gen is not None else None}

    def rng_state(self) -> dict:
        """This rank's random streams as tensors and plain values, so a checkpoint loads with
        ``torch.load(weights_only=True)``: the student's (``torch``, python, numpy) as they are now, and the
        augmentation streams (crops, CutMix, the loader's seed draws) as they were when epoch ``self.epoch``'s first
        batch was drawn (already, by a source that requests ahead), so a restarted run draws that epoch again."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        augmentation = self._epoch_streams.get(self.epoch) or self._augmentation_streams()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss), **augmentation}

    def set_rng_state(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        # a checkpoint from before the streams were apart has one stream: augmentation continues from it
        self._augmentation_state = rng.get("augmentation", rng["torch"]).clone()
        random.setstate(rng["python"])
        self._rng.set_state(rng["cutmix"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
        loader_gen = getattr(self.train_loader, "generator", None)
        if rng.get("loader") is not None and loader_gen is not None:
            loader_gen.set_state(rng["loader"])
        self._epoch_streams, self._attached = {}, None  # batches drawn ahead are drawn again from these streams

    def state_dict(self) -> dict:
        """Everything a restarted run needs to continue bit for bit. Every rank must call it (each rank's random
        streams are gathered into ``rng_per_rank``, since ranks draw different crops and mixes)."""
        rng = [self.rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, self.rng_state())
        return {
            "epoch": self.epoch,
            "student": self.student_raw.state_dict(),
            "discriminator": self.discriminator_raw.state_dict() if self.discriminator_raw is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "rng_per_rank": rng,
            "config": self.cfg.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.student_raw.load_state_dict(state["student"])
        if self.discriminator_raw is not None and state.get("discriminator") is not None:
            self.discriminator_raw.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        per_rank = state.get("rng_per_rank") or ([state["rng"]] if state.get("rng") else [])
        if len(per_rank) == self.world_size:
            self.set_rng_state(per_rank[self.rank])
        elif per_rank:  # another worker count: the streams cannot continue as they were; rank 0's seeds everyone
            self.log(f"checkpoint written by {len(per_rank)} worker(s), resumed with {self.world_size}: augmentation "
                     "streams continue from rank 0's, so this run will not repeat an undisturbed one bit for bit")
            self.set_rng_state(per_rank[0])

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def _drawing_augmentation(self):
        """The global torch RNG on the augmentation stream for the block; the student's stream is put back after."""
        student_state = torch.get_rng_state()
        torch.set_rng_state(self._augmentation_state)
        try:
            yield
        finally:
            self._augmentation_state = torch.get_rng_state()
            torch.set_rng_state(student_state)

    def batches(self, epoch: Optional[int] = None) -> Iterator[Batch]:
        """Epoch ``epoch``'s training batches (default: the next to train; epoch set, CutMix applied unless the
        loader replays recorded mixes), drawn from the augmentation stream whenever they are asked for."""
        epoch, o = self.epoch if epoch is None else epoch, self.cfg.optim
        self._epoch_streams = {e: s for e, s in self._epoch_streams.items() if e >= self.epoch}
        self._epoch_streams[epoch] = self._augmentation_streams()
        self.train_loader.sampler.set_epoch(epoch)
        loader = batches_from_loader(self.train_loader)
        while True:
            with self._drawing_augmentation():
                batch = next(loader, None)
                if batch is not None:
                    batch.epoch = epoch
                    if o.cutmix and not self.replays_mix:
                        batch = cutmix(batch, o.cutmix_beta, o.cutmix_prob, self._rng)
            if batch is None:
                return
            yield batch

    def _source_batches(self, epoch: int) -> Iterator[Batch]:
        """The soft-labelled batches from epoch ``epoch`` on: one stream across epochs, so a source that requests
        ahead (the served window) asks for the next epoch's first batches while this one's last steps train."""
        if self._attached is None or self._attached_epoch != epoch:
            last = max(self.cfg.optim.epochs, epoch + 1)
            self._attached = self.source.attach(itertools.chain.from_iterable(
                self.batches(e) for e in range(epoch, last)))
            self._attached_epoch = epoch
        return self._attached

    def train_step(self, batch: Batch) -> dict:
        """One SGD step on one batch; returns this step's loss parts and hit count."""
        images = self.normalize(batch.images.to(self.device, non_blocking=True))
        labels = batch.labels.to(self.device, non_blocking=True)
        labels_b = batch.labels_b.to(self.device, non_blocking=True) if batch.labels_b is not None else None
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.amp), enabled=self.amp is not None):
            logits = self.student(images)
            if batch.teacher_probs is None:
                if self.distill:
                    raise RuntimeError("distillation batch arrived without teacher soft labels")
                total = hard_label_cross_entropy(logits, labels, labels_b, batch.lam)
                parts = {"hard_ce": total}
            else:
                p = meal_v2_loss(logits, batch.teacher_probs.to(self.device, non_blocking=True).float(),
                                 batch.teacher_logits.to(self.device, non_blocking=True).float(),
                                 discriminator=self.discriminator, discriminator_mode=self.cfg.loss.discriminator,
                                 labels=labels, hard_label_weight=self.cfg.loss.hard_label_weight, labels_b=labels_b,
                                 lam=batch.lam)
                total = p.total
                parts = {k: v for k, v in (("soft_ce", p.soft_ce), ("disc_loss", p.disc), ("hard_ce", p.hard_ce))
                         if v is not None}
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scale the loss so small gradients survive, unscale before the step
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["loss"] = float(total.detach())
        out["hits"] = int((logits.detach().argmax(1) == labels).sum())
        return out

    def train_epoch(self) -> dict:
        """Run epoch ``self.epoch``; returns metrics averaged over all ranks."""
        epoch, o = self.epoch, self.cfg.optim
        self.student.train()
        if self.discriminator is not None:
            self.discriminator.train()
        steps_per_epoch = len(self.train_loader)
        stop_after = self.cfg.run.stop_after_steps
        sums = {"loss": 0.0, "soft_ce": 0.0, "disc_loss": 0.0, "hard_ce": 0.0, "hits": 0, "samples": 0,
                "wait_s": 0.0, "latency_s": 0.0, "latency_n": 0, "time_s": 0.0, "steps": 0, "first_loss": 0.0,
                "retries": 0}
        start = last = time.perf_counter()
        scheduled = {"student", "discriminator"} if o.d_lr_schedule == "student" else {"student"}
        source_batches = self._source_batches(epoch)
        for step, batch in enumerate(itertools.islice(source_batches, steps_per_epoch)):
            if batch.epoch != epoch:
                raise RuntimeError(f"epoch {epoch + 1} got a batch of epoch {batch.epoch + 1}: the train loader gave "
                                   f"another number of batches than its length ({steps_per_epoch})")
            for group in self.optimizer.param_groups:
                if group.get("name") in scheduled:
                    group["lr"] = student_lr(o, epoch, step / max(steps_per_epoch, 1))
            out = self.train_step(batch)
            if step == 0:
                sums["first_loss"] = out["loss"]
            n = int(batch.labels.shape[0])
            for k in ("loss", "soft_ce", "disc_loss", "hard_ce"):
                sums[k] += out.get(k, 0.0) * n
            sums["hits"] += out["hits"]
            sums["samples"] += n
            sums["steps"] += 1
            sums["wait_s"] += batch.wait_s
            sums["retries"] += batch.teacher_retries
            if batch.teacher_latency_s is not None:
                sums["latency_s"] += batch.teacher_latency_s
                sums["latency_n"] += 1
            now = time.perf_counter()
            if self.progress is not None:
                self.progress.step(epoch, step + 1, steps_per_epoch, n * self.world_size, batch.wait_s)
            elif self.rank == 0 and self.cfg.run.log_every and (step + 1) % self.cfg.run.log_every == 0:
                self.log(f"epoch {epoch + 1}/{o.epochs} step {step + 1}/{steps_per_epoch} "
                         f"loss {out['loss']:.4f} "
                         f"({n * self.world_size / max(now - last, 1e-9) * self.cfg.run.log_every:.0f} img/s)")
                last = now
            if stop_after is not None and epoch * steps_per_epoch + step + 1 >= stop_after:
                self.stopped_early = True  # a rehearsal: every rank has the same steps per epoch, so all stop here
                break
        if self.stopped_early:
            self._attached = None
        self._attached_epoch = epoch + 1  # the stream goes on with the next epoch
        sums["time_s"] = time.perf_counter() - start
        total = _all_reduce_sum(sums, self.device)
        samples = max(total["samples"], 1)
        wall = total["time_s"] / self.world_size
        metrics = {
            "train_loss": total["loss"] / samples,
            "train_top1": 100.0 * total["hits"] / samples,
            "images_per_s": total["samples"] / max(wall, 1e-9),
            "lr": student_lr(o, epoch),
            "epoch_time_s": wall,
            "first_step_loss": total["first_loss"] / self.world_size,  # mean over ranks; for source equivalence checks
        }
        if self.distill:
            metrics["soft_ce"] = total["soft_ce"] / samples
            if self.discriminator is not None:
                metrics["disc_loss"] = total["disc_loss"] / samples
            metrics["teacher_wait_frac"] = total["wait_s"] / max(total["time_s"], 1e-9)
            metrics["teacher_retries"] = int(total["retries"])  # requests asked again after a replica was lost
            if total["latency_n"]:
                metrics["teacher_latency_ms"] = 1000.0 * total["latency_s"] / total["latency_n"]
        if not self.distill or self.cfg.loss.hard_label_weight > 0:
            metrics["hard_ce"] = total["hard_ce"] / samples
        self.epoch += 1
        return metrics

    def evaluate(self) -> EvalResult:
        return evaluate_model(self.student, self.normalize, self.val_loader, self.cfg.student.num_classes, self.device)

    def fit(self, on_epoch_end: Callable[[int, dict, EvalResult], None] = lambda *a: None) -> Optional[EvalResult]:
        """Train from ``self.epoch`` to ``optim.epochs``, evaluating after each epoch."""
        result = None
        while self.epoch < self.cfg.optim.epochs and not self.stopped_early:
            metrics = self.train_epoch()
            result = self.evaluate()
            metrics.update(val_top1=result.top1, val_top5=result.top5, val_nll=result.nll, val_ece=result.ece)
            if self.rank == 0:
                self.log(format_epoch(self.epoch, self.cfg.optim.epochs, metrics))
            on_epoch_end(self.epoch, metrics, result)
        return result


def format_epoch(epoch: int, epochs: int, m: dict) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"loss {m['train_loss']:.4f}"]
    for key, label in (("soft_ce", "soft_ce"), ("disc_loss", "d_loss"), ("hard_ce", "hard_ce")):
        if key in m:
            parts.append(f"{label} {m[key]:.4f}")
    parts += [f"train@1 {m['train_top1']:.2f}", f"val@1 {m['val_top1']:.2f}", f"val@5 {m['val_top5']:.2f}",
              f"{m['images_per_s']:.0f} img/s"]
    if "teacher_wait_frac" in m:
        parts.append(f"teacher wait {100 * m['teacher_wait_frac']:.1f}%")
    return " | ".join(parts)
