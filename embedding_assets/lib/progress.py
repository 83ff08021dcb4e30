"""Progress of embedding a run's texts: one event per batch, for the run's log and any listener in the process."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingProgress:
    """Texts embedded so far out of those a run has to embed for one model version."""

    model_version: str
    done: int
    total: int
    batches: int
    batch_size: int
    seconds: float

    @property
    def batches_total(self) -> int:
        """Batches the texts fill at the version's batch size (a provider may split one further)."""
        return max(self.batches, math.ceil(self.total / self.batch_size))

    @property
    def rate(self) -> float:
        """Texts per second so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def line(self) -> str:
        eta = "?" if self.eta_seconds is None else f"{self.eta_seconds:.0f} s"
        return (
            f"{self.model_version}: embedded {self.done} of {self.total} text(s), batch {self.batches} of "
            f"{self.batches_total}, {self.rate:.1f} texts/s, ETA {eta}"
        )


ProgressListener = Callable[[EmbeddingProgress], None]
_listeners: list[ProgressListener] = []


@contextmanager
def listening(listener: ProgressListener) -> Iterator[None]:
    """Call listener with every progress event announced in this process while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def announce(progress: EmbeddingProgress) -> None:
    for listener in list(_listeners):
        listener(progress)


def logged(log) -> ProgressListener:
    """A callback that writes each event to a (Dagster) log and announces it to the process's listeners."""

    def report(progress: EmbeddingProgress) -> None:
        log.info(progress.line())
        announce(progress)

    return report
