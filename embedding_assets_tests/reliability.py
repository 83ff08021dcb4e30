"""Shared pieces of the reliability suite: the backends it runs on and the figures it reports."""

from __future__ import annotations

BACKENDS = ("sqlite", "postgres")
FIGURES: list[tuple[str, str]] = []


def record_figure(name: str, text: str) -> None:
    """A measured figure, printed in the test session's summary (see docs/reliability.md)."""
    FIGURES.append((name, text))


def take_figures() -> list[tuple[str, str]]:
    """The figures recorded since the last call (the running test's), removed from FIGURES."""
    taken = list(FIGURES)
    FIGURES.clear()
    return taken
