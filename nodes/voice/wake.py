"""Wake word detectors: microWakeWord, openWakeWord and Porcupine 1.x models from their wheels.

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
    score: float  # the probability that crossed the threshold (Porcupine: 1.0)
    language: str | None = None  # the wake word's bound language (None: the satellite's)
    pipeline: str = "auto"  # auto | local | chat (WakeConfig.pipeline)


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


class PorcupineWake:
    """pvporcupine 1.9 (Apache-2.0, offline, no access key): built-in keywords such as
    computer, jarvis, porcupine, bumblebee.  It eats 512-sample frames; the
    pipeline's 80 ms frames are cut into them (the remainder waits for the next).
    Porcupine says which keyword, not how sure: the score is 1.0, and
    ``threshold`` is its sensitivity (default 0.5; higher wakes more easily).
    """

    DEFAULT_SENSITIVITY = 0.5

    def __init__(self, cfg: WakeConfig) -> None:
        try:
            import pvporcupine  # type: ignore[import-untyped]
        except ImportError as exc:
            raise WakeUnavailable(f"pvporcupine is not installed: {exc}") from exc
        keyword = cfg.model.replace("_", " ")
        if keyword not in pvporcupine.KEYWORDS:
            known = ", ".join(sorted(pvporcupine.KEYWORDS))
            raise WakeUnavailable(f"no Porcupine keyword {cfg.model!r} ({known})")
        self.threshold = cfg.threshold if cfg.threshold is not None else self.DEFAULT_SENSITIVITY
        try:
            self._handle: Any = pvporcupine.create(
                keywords=[keyword], sensitivities=[self.threshold]
            )
        except Exception as exc:  # its own error types, or OSError from the library
            raise WakeUnavailable(f"Porcupine could not start: {exc}") from exc
        self.name = cfg.model
        self._frame = int(self._handle.frame_length) * WIDTH
        self._pending = b""
        self._refractory = _Refractory(cfg.refractory_s)

    def process(self, pcm: bytes) -> Detection | None:
        import numpy as np

        self._refractory.advance(len(pcm))
        data = self._pending + pcm
        hit = False
        end = len(data) - len(data) % self._frame
        samples = np.frombuffer(data[:end], dtype=np.int16)
        step = self._frame // WIDTH
        for i in range(0, len(samples), step):
            if self._handle.process(samples[i : i + step].tolist()) >= 0:
                hit = True
        self._pending = data[end:]
        if hit and self._refractory.allow():
            return Detection(self.name, 1.0)
        return None

    def skip(self, nbytes: int) -> None:
        self._refractory.advance(nbytes)

    def reset(self) -> None:
        self._pending = b""  # Porcupine keeps no state a caller can reset

    def close(self) -> None:
        self._handle.delete()


class MultiWake:
    """Several wake words on one stream: each frame goes to every detector; the
    first detection wins, tagged with its word's language and pipeline."""

    def __init__(self, detectors: list[tuple[WakeDetector, WakeConfig]]) -> None:
        self.detectors = detectors
        self.name = "+".join(d.name for d, _ in detectors)
        self.threshold = min(d.threshold for d, _ in detectors)

    def process(self, pcm: bytes) -> Detection | None:
        found: Detection | None = None
        for detector, cfg in self.detectors:
            hit = detector.process(pcm)
            if hit is not None and found is None:
                found = Detection(hit.name, hit.score, cfg.language, cfg.pipeline)
        return found

    def skip(self, nbytes: int) -> None:
        for detector, _ in self.detectors:
            detector.skip(nbytes)

    def reset(self) -> None:
        for detector, _ in self.detectors:
            detector.reset()


def _one(cfg: WakeConfig) -> WakeDetector | None:
    if cfg.engine == "micro":
        return MicroWake(cfg)
    if cfg.engine == "open":
        return OpenWake(cfg)
    if cfg.engine == "porcupine":
        return PorcupineWake(cfg)
    return None


def make_wake(cfg: WakeConfig, more: list[WakeConfig] | None = None) -> WakeDetector | None:
    """The configured detector (None for the ``phrase`` and ``none`` engines); with
    ``more`` wake words, one :class:`MultiWake` over all of them."""
    first = _one(cfg)
    if not more:
        if first is not None and (cfg.language or cfg.pipeline != "auto"):
            return MultiWake([(first, cfg)])
        return first
    detectors = [(first, cfg)] if first is not None else []
    for extra in more:
        if extra.engine in ("phrase", "none"):
            raise WakeUnavailable("wake_words take micro, open or porcupine engines")
        detector = _one(extra)
        if detector is not None:
            detectors.append((detector, extra))
    return MultiWake(detectors)
