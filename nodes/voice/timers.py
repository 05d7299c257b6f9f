"""Voice timers: a pure state machine fed with requests and a clock.

"Set a timer for 5 minutes", "set a 10 minute timer named pasta", "how much
time is left on the pasta timer", "cancel the timer".  :class:`Timers` holds
the running timers of one satellite and says what to answer; the node
schedules :meth:`Timers.next_due` and calls :meth:`Timers.due` to find the
finished ones (a ``voice/timer_finished`` event and a spoken announcement),
and publishes :meth:`Timers.snapshot` as the retained ``voice/timers`` state.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

from nodes.voice.intent import TimerRequest

MAX_TIMERS: Final = 20
MAX_SECONDS: Final = 24 * 3600.0


@dataclass(frozen=True)
class Timer:
    id: str
    name: str | None
    seconds: float
    started: float
    ends: float

    @property
    def label(self) -> str:
        return f"{self.name} timer" if self.name else f"{spoken(self.seconds)} timer"


def spoken(seconds: float) -> str:
    """3725 → "1 hour 2 minutes 5 seconds"."""
    s = round(seconds)
    parts = []
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        n, s = divmod(s, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return " ".join(parts) or "0 seconds"


class Timers:
    def __init__(self) -> None:
        self.running: dict[str, Timer] = {}

    def handle(self, req: TimerRequest, now: float) -> str:
        """Carry out a request; what to say."""
        if req.op == "start":
            if not 0 < req.seconds <= MAX_SECONDS:
                return "I can set timers of up to 24 hours."
            if len(self.running) >= MAX_TIMERS:
                return f"There are already {MAX_TIMERS} timers."
            timer = Timer(uuid.uuid4().hex[:8], req.name, req.seconds, now, now + req.seconds)
            self.running[timer.id] = timer
            return f"{spoken(req.seconds).capitalize()} timer started" + (
                f" for {req.name}." if req.name else "."
            )
        if req.op == "cancel" and not (req.name or req.seconds) and len(self.running) > 1:
            return "Which timer? There are several."
        chosen = self._select(req)
        if req.op == "cancel_all" or (req.op == "cancel" and chosen):
            gone = list(self.running) if req.op == "cancel_all" else [t.id for t in chosen]
            for tid in gone:
                self.running.pop(tid, None)
            if not gone:
                return "There are no timers."
            return "Timer cancelled." if len(gone) == 1 else f"{len(gone)} timers cancelled."
        if not chosen:
            return "There are no timers." if not self.running else "I found no such timer."
        parts = [f"{spoken(t.ends - now)} left on the {t.label}" for t in chosen]
        return ("; ".join(parts) + ".").capitalize()

    def _select(self, req: TimerRequest) -> list[Timer]:
        timers = sorted(self.running.values(), key=lambda t: t.ends)
        if req.name:
            return [t for t in timers if (t.name or "").lower() == req.name.lower()]
        if req.seconds:
            return [t for t in timers if abs(t.seconds - req.seconds) < 1]
        return timers

    def next_due(self) -> float | None:
        return min((t.ends for t in self.running.values()), default=None)

    def due(self, now: float) -> list[Timer]:
        """Timers that have finished (removed from the running ones)."""
        done = [t for t in self.running.values() if t.ends <= now]
        for t in done:
            del self.running[t.id]
        return sorted(done, key=lambda t: t.ends)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "id": t.id,
                "name": t.name,
                "seconds": t.seconds,
                "left_s": round(max(t.ends - now, 0.0), 1),
                "ends": round(t.ends, 3),
            }
            for t in sorted(self.running.values(), key=lambda t: t.ends)
        ]
