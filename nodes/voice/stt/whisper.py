"""faster-whisper (CTranslate2, int8 on the CPU) on a model folder from the model manager."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from nodes.voice.audio import from_pcm
from nodes.voice.config import SttConfig
from nodes.voice.stt import SttUnavailable, Transcript


class WhisperStt:
    type_name = "faster_whisper"

    def __init__(self, cfg: SttConfig, model_dir: Path, model_name: str) -> None:
        # The model is a local folder: never let huggingface_hub reach the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from faster_whisper import WhisperModel  # type: ignore[import-untyped]
        except ImportError as exc:
            raise SttUnavailable(f"faster-whisper is not installed: {exc}") from exc
        if not (model_dir / "model.bin").is_file():
            raise SttUnavailable(f"no CTranslate2 whisper model in {model_dir}")
        self.model = model_name
        self.cfg = cfg
        self.languages = [cfg.language] if cfg.language else ["en"]
        self._whisper: Any = WhisperModel(
            str(model_dir), device="cpu", compute_type="int8", cpu_threads=2
        )
        self._lock = threading.Lock()

    def session(self) -> _Session:
        return _Session(self)

    def transcribe(self, pcm: bytes) -> Transcript:
        audio = from_pcm(pcm)
        if len(audio) < 1600:  # whisper hallucinates on near-empty input
            return Transcript("", self.languages[0])
        with self._lock:
            segments, info = self._whisper.transcribe(
                np.ascontiguousarray(audio),
                language=self.cfg.language,
                initial_prompt=self.cfg.initial_prompt,
                beam_size=1,
                # No temperature fallback: re-decoding with sampling costs latency
                # and makes the same audio give different transcripts.
                temperature=0.0,
                without_timestamps=True,
                condition_on_previous_text=False,
            )
            text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text, info.language)


class _Session:
    def __init__(self, backend: WhisperStt) -> None:
        self.backend = backend
        self._chunks: list[bytes] = []

    def feed(self, pcm: bytes) -> None:
        self._chunks.append(pcm)

    def finish(self) -> Transcript:
        return self.backend.transcribe(b"".join(self._chunks))
