"""Speech-to-text backends: a Protocol, a registry, lazy imports.

A backend opens a :class:`SttSession` per utterance: ``feed`` takes PCM as
it is heard (vosk decodes while the user speaks; whisper only collects) and
``finish`` returns the transcript.  All calls are blocking: callers run them
off the event loop, one lock per loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon.plugins import load_attr
from nodes.voice.config import SttConfig

DEFAULT_MODELS = {"faster_whisper": "whisper-tiny-en", "vosk": "vosk-model-small-en-us"}


class SttUnavailable(Exception):
    """The backend's package or model is missing."""


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str | None = None
    route: str = "local"  # local, or remote (transcribed by another node of the realm)


class SttSession(Protocol):
    def feed(self, pcm: bytes) -> None: ...

    def finish(self) -> Transcript: ...


class SttBackend(Protocol):
    type_name: str
    model: str
    languages: list[str]

    def session(self) -> SttSession: ...

    def transcribe(self, pcm: bytes) -> Transcript: ...


_BACKENDS = {
    "faster_whisper": "nodes.voice.stt.whisper:WhisperStt",
    "vosk": "nodes.voice.stt.vosk:VoskStt",
}


def make_stt(cfg: SttConfig, model_dir: Path, model_name: str) -> SttBackend:
    try:
        cls = load_attr(_BACKENDS[cfg.backend])
    except ImportError as exc:
        raise SttUnavailable(f"{cfg.backend}: {exc}") from exc
    backend: SttBackend = cls(cfg, model_dir, model_name)
    return backend
