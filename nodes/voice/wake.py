"""Wake word detectors: microWakeWord and openWakeWord models from their wheels.

A detector eats 16 kHz frames and returns a :class:`Detection` when the wake
word ends in them.  Both engines keep streaming state, so one detector serves
one audio stream; calls are blocking (tflite) and run off the loop by the
pipeline.  A custom phrase without a model ("hey hal") is handled by the
pipeline itself (VAD + STT verification, see :mod:`nodes.voice.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from nodes.voice.audio import RATE, WIDTH
from nodes.voice.config import WakeConfig


class WakeUnavailable(Exception):
    """The engine's package or model is missing."""


@dataclass(frozen=True)
class Detection:
    name: str  # model id, e.g. okay_nabu
    score: float  # the probability that crossed the threshold


class WakeDetector(Protocol):
    name: str
    threshold: float

    def process(self, pcm: bytes) -> Detection | None: ...

    def skip(self, nbytes: int) -> None:
        """Audio that went elsewhere (a command): only the refractory clock moves."""

    def reset(self) -> None: ...


class _Refractory:
    """No second detection within ``refractory_s`` of the last one.

    Time is audio time (samples seen), so a file run faster than real time
    behaves like a live microphone.
    """

    def __init__(self, refractory_s: float) -> None:
        self.refractory_s = refractory_s
        self.audio_s = 0.0
        self._last = -1e9

    def advance(self, nbytes: int) -> None:
        self.audio_s += nbytes / (RATE * WIDTH)

    def allow(self) -> bool:
        if self.audio_s - self._last < self.refractory_s:
            return False
        self._last = self.audio_s
        return True


class MicroWake:
    """pymicro-wakeword (okay_nabu, hey_jarvis, hey_mycroft, alexa)."""

    def __init__(self, cfg: WakeConfig) -> None:
        try:
            from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures, Model
        except ImportError as exc:
            raise WakeUnavailable(f"pymicro-wakeword is not installed: {exc}") from exc
        try:
            model = Model(cfg.model)
        except ValueError as exc:
            known = ", ".join(m.value for m in Model)
            raise WakeUnavailable(f"no microWakeWord model {cfg.model!r} ({known})") from exc
        self._model: Any = MicroWakeWord.from_builtin(model)
        self._features: Any = MicroWakeWordFeatures()
        self.name = cfg.model
        self.threshold = (
            cfg.threshold if cfg.threshold is not None else self._model.probability_cutoff
        )
        self._refractory = _Refractory(cfg.refractory_s)

    def process(self, pcm: bytes) -> Detection | None:
        self._refractory.advance(len(pcm))
        best: float | None = None
        for features in self._features.process_streaming(pcm):
            prob = self._model.process_streaming_prob(features)
            if prob is not None and prob > self.threshold:
                best = max(best or 0.0, prob)
        if best is not None and self._refractory.allow():
            return Detection(self.name, round(best, 4))
        return None

    def skip(self, nbytes: int) -> None:
        self._refractory.advance(nbytes)

    def reset(self) -> None:
        """Forget the stream so far (after a detection: the next one needs new audio)."""
        self._model.reset()
        self._features.reset()


class OpenWake:
    """pyopen-wakeword (okay_nabu, hey_jarvis, hey_mycroft, alexa, hey_rhasspy)."""

    DEFAULT_THRESHOLD = 0.5

    def __init__(self, cfg: WakeConfig) -> None:
        try:
            from pyopen_wakeword import Model, OpenWakeWord, OpenWakeWordFeatures
        except ImportError as exc:
            raise WakeUnavailable(f"pyopen-wakeword is not installed: {exc}") from exc
        try:
            model = Model(cfg.model)
        except ValueError as exc:
            known = ", ".join(m.value for m in Model)
            raise WakeUnavailable(f"no openWakeWord model {cfg.model!r} ({known})") from exc
        self._model: Any = OpenWakeWord.from_builtin(model)
        self._features: Any = OpenWakeWordFeatures.from_builtin()
        self.name = cfg.model
        self.threshold = cfg.threshold if cfg.threshold is not None else self.DEFAULT_THRESHOLD
        self._refractory = _Refractory(cfg.refractory_s)

    def process(self, pcm: bytes) -> Detection | None:
        self._refractory.advance(len(pcm))
        best: float | None = None
        for embeddings in self._features.process_streaming(pcm):
            for prob in self._model.process_streaming(embeddings):
                if prob > self.threshold:
                    best = max(best or 0.0, prob)
        if best is not None and self._refractory.allow():
            return Detection(self.name, round(float(best), 4))
        return None

    def skip(self, nbytes: int) -> None:
        self._refractory.advance(nbytes)

    def reset(self) -> None:
        """Forget the stream so far (after a detection: the next one needs new audio)."""
        self._model.reset()
        self._features.reset()


def make_wake(cfg: WakeConfig) -> WakeDetector | None:
    """The configured detector (None for the ``phrase`` and ``none`` engines)."""
    if cfg.engine == "micro":
        return MicroWake(cfg)
    if cfg.engine == "open":
        return OpenWake(cfg)
    return None
