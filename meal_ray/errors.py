"""User-facing errors: each names the problem and the fix, so the CLI can print it without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable

#: What to do when no teacher application answers (every error that finds the teachers missing ends with it).
HOW_TO_START = (
    "Start the teachers with `meal-ray teachers up --config deployments/fashion-mnist.yaml` "
    "(embedded local Ray; keep it running) or, on a running cluster (`ray start --head`), "
    "`serve deploy deployments/fashion-mnist.yaml`; check with `meal-ray teachers status` / `serve status`. "
    "Or train with teachers.source=local (in-process teachers)."
)


class MealRayError(Exception):
    """Base class for errors caused by user input (config, data, models, teachers)."""


class ConfigError(MealRayError, ValueError):
    """A config value or key is wrong."""


class ModelNotFoundError(MealRayError, ValueError):
    """An unknown timm architecture name or an unreadable weights file."""


class ClassCountMismatchError(MealRayError, ValueError):
    """Teachers and student disagree on the number of classes or input channels."""


class DatasetError(MealRayError, FileNotFoundError):
    """A dataset file is missing, truncated or malformed."""


class TeachersNotRunningError(MealRayError, RuntimeError):
    """The Serve teacher application is not deployed or not healthy."""


class TeachersUnavailableError(TeachersNotRunningError):
    """The teachers stopped answering for longer than teachers.timeout_s during a run."""


class ProtocolError(MealRayError, ValueError):
    """A teacher request or reply does not follow the Serve protocol (wrong type, dtype, shape or version)."""


class TeacherSetMismatchError(MealRayError, ValueError):
    """The served (or cached) teachers are not the ones the job names."""


class CacheError(MealRayError, ValueError):
    """A soft-label cache is missing, incomplete or corrupt."""


class CacheMismatchError(CacheError):
    """A soft-label cache was made for other teachers, data, classes, image size or crops than the job's."""


class CheckpointError(MealRayError, RuntimeError):
    """No checkpoint of a run can be read back."""


class PlacementError(MealRayError, RuntimeError):
    """The cluster's nodes cannot hold what a job or a Serve application asks for (labels, resources, node count)."""


class OutputDirError(MealRayError, FileExistsError):
    """The output directory holds a different run."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ' Did you mean: a, b?' for close matches of ``name`` (empty string if none)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""
