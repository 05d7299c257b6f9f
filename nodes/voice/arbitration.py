"""Several satellites heard the same wake word: only the best one answers.

Every satellite publishes its detections as ``event/<node>/voice/wake``
(score, energy in dBFS, satellite name) and listens to everyone's.  After a
detection a satellite waits ``window`` seconds, then answers only if no
other satellite's detection of the same wake word within the window beats
it: higher score, then louder (nearer), then the smaller id (a stable tie
break every satellite computes the same way).  No coordinator is needed, and
a satellite alone on the broker simply answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

from nodes.voice.wake import Detection

HISTORY: Final = 64  # detections of other satellites remembered


@dataclass(frozen=True)
class Heard:
    satellite: str  # "<node_id>/<node name>"
    wake: str
    score: float
    energy: float
    at: float  # monotonic time it was received


def rank(h: Heard) -> tuple[float, float, str]:
    # Best first when sorted ascending: higher score (to 0.1: detectors jitter in the
    # second digit), then louder, then the smaller id.
    return (-round(h.score, 1), -round(h.energy, 1), h.satellite)


class Arbiter:
    def __init__(self, me: str, window: float) -> None:
        self.me = me
        self.window = window
        self.others: deque[Heard] = deque(maxlen=HISTORY)

    def heard(self, satellite: str, wake: str, score: float, energy: float) -> None:
        if satellite != self.me:
            self.others.append(Heard(satellite, wake, score, energy, time.monotonic()))

    async def decide(self, detection: Detection, energy: float) -> bool:
        """True when this satellite should answer (called right after publishing its wake)."""
        mine = Heard(self.me, detection.name, detection.score, energy, time.monotonic())
        await asyncio.sleep(self.window)
        rivals = [
            h for h in self.others if h.wake == mine.wake and abs(h.at - mine.at) <= self.window
        ]
        return all(rank(mine) < rank(h) for h in rivals)
