"""Wall-clock seconds per phase of one operation (add-task's profile, stored with the task)."""

from __future__ import annotations

import time

__all__ = ["Phases"]


class Phases:
    """``mark(phase)`` closes ``phase`` at now: it gets the seconds since the previous mark (or since
    creation), added to what it had; ``seconds`` keeps the phases in the order first marked."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def carve(self, phase: str, part: str, seconds: float) -> None:
        """Move ``seconds`` of ``phase`` (measured inside it) into phase ``part``, listed just before it."""
        seconds = min(seconds, self.seconds[phase])
        self.seconds = {**{k: v for k, v in self.seconds.items() if k != phase}, part: seconds,
                        phase: self.seconds[phase] - seconds}

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}
