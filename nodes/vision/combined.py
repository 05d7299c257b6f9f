"""The best available detector for each label, as one detector.

Given detectors in order of preference (the person detector, then COCO),
each wanted label goes to the first detector that knows it; a frame runs
only the detectors that own a wanted label, and each one's boxes are kept
only for the labels it owns (the COCO model's ``person`` is ignored when the
person detector is there).  A wanted label no detector knows is reported in
``missing``, never guessed.
"""

from __future__ import annotations

from typing import Any

from nodes.vision.detect import Detector
from nodes.vision.images import Detection, Image


class DetectorSet:
    type_name = "auto"

    def __init__(self, detectors: list[Detector], wanted: list[str] | None = None) -> None:
        owner: dict[str, Detector] = {}
        for d in detectors:
            for label in d.labels:
                owner.setdefault(label, d)
        labels = list(dict.fromkeys(wanted)) if wanted is not None else list(owner)
        self.missing = [label for label in labels if label not in owner]
        self.labels = [label for label in labels if label in owner]
        self.owner = {label: owner[label] for label in self.labels}
        self.plan: list[tuple[Detector, frozenset[str]]] = []
        for d in detectors:
            mine = frozenset(label for label in self.labels if owner[label] is d)
            if mine:
                self.plan.append((d, mine))
        self.model: str | None = "+".join(f"{d.model or d.type_name}" for d, _ in self.plan) or None

    def load(self) -> None:
        """The members are loaded already."""

    def attrs(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "detectors": {label: f"{d.type_name}:{d.model}" for label, d in self.owner.items()},
        }

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        found: list[Detection] = []
        for detector, labels in self.plan:
            found.extend(f for f in detector.detect(img, min_score) if f.label in labels)
        found.sort(key=lambda d: -d.score)
        return found
