"""Asking again when the replica that held a request died: one policy for every caller of a teacher deployment.

A teacher replica (or the ensemble ingress) can die with a request in flight: its process is killed, its node is
lost, Serve drains it past its graceful-shutdown time. Serve starts a replacement; the request itself is gone, so the
caller asks again. Teachers are deterministic, so the answer is the one the lost request would have given, and the
job's result does not change. The ingress (for its calls to each teacher), the direct client (for each teacher) and
the ingress client (for the ingress) all use :func:`call` or :func:`acall`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")
FIRST_DELAY_S, MAX_DELAY_S = 0.2, 2.0


def replica_gone_errors() -> tuple:
    """What a call raises when the replica holding it is gone: its actor died or is unreachable, its node died, or
    Serve has no replica to give it to while one is being replaced."""
    from ray.exceptions import NodeDiedError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return RayActorError, NodeDiedError, ReplicaUnavailableError, DeploymentUnavailableError


def delays(retry_s: float) -> Iterator[float]:
    """Seconds to wait before each new try: 0.2 doubling to 2, until ``retry_s`` would be passed."""
    deadline, delay = time.monotonic() + retry_s, FIRST_DELAY_S
    while time.monotonic() + delay <= deadline:
        yield delay
        delay = min(2 * delay, MAX_DELAY_S)


def call(attempt: Callable[[], T], retry_s: float) -> T:
    """``attempt()`` (which sends the request and waits for its answer), again after each replica loss, for at most
    ``retry_s``; then the last error is raised."""
    waits, gone = delays(retry_s), replica_gone_errors()
    while True:
        try:
            return attempt()
        except gone:
            delay = next(waits, None)
            if delay is None:
                raise
            time.sleep(delay)


async def acall(attempt: Callable[[], Awaitable[T]], retry_s: float) -> T:
    """:func:`call` for an event loop (the ingress replica)."""
    waits, gone = delays(retry_s), replica_gone_errors()
    while True:
        try:
            return await attempt()
        except gone:
            delay = next(waits, None)
            if delay is None:
                raise
            await asyncio.sleep(delay)
