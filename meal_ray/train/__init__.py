"""Ray Train launchers: the worker loop (:mod:`~meal_ray.train.worker`) and the driver
(:mod:`~meal_ray.train.driver`)."""

from meal_ray.train.driver import RUN_FILE, check_job, run_job
from meal_ray.train.worker import STATE_FILE

__all__ = ["RUN_FILE", "STATE_FILE", "check_job", "run_job"]
