"""Vosk (Kaldi): decodes while the user speaks; optional grammar restricts the words."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from nodes.voice.audio import RATE
from nodes.voice.config import SttConfig
from nodes.voice.stt import SttUnavailable, Transcript


class VoskStt:
    type_name = "vosk"

    def __init__(self, cfg: SttConfig, model_dir: Path, model_name: str) -> None:
        try:
            import vosk  # type: ignore[import-untyped]
        except ImportError as exc:
            raise SttUnavailable(f"vosk is not installed: {exc}") from exc
        if not (model_dir / "am").is_dir() and not (model_dir / "conf").is_dir():
            raise SttUnavailable(f"no vosk model in {model_dir}")
        vosk.SetLogLevel(-1)
        self._vosk = vosk
        self.model = model_name
        self.cfg = cfg
        self.languages = [cfg.language] if cfg.language else []
        self._model: Any = vosk.Model(str(model_dir))
        self._grammar = (
            json.dumps([*cfg.grammar, "[unk]"], ensure_ascii=False) if cfg.grammar else None
        )
        self._lock = threading.Lock()  # the model is shared; recognisers are per session

    def recognizer(self) -> Any:
        with self._lock:
            if self._grammar:
                return self._vosk.KaldiRecognizer(self._model, RATE, self._grammar)
            return self._vosk.KaldiRecognizer(self._model, RATE)

    def session(self) -> _Session:
        return _Session(self)

    def transcribe(self, pcm: bytes) -> Transcript:
        s = self.session()
        s.feed(pcm)
        return s.finish()


class _Session:
    def __init__(self, backend: VoskStt) -> None:
        self.backend = backend
        self.rec = backend.recognizer()
        self.parts: list[str] = []

    def feed(self, pcm: bytes) -> None:
        if self.rec.AcceptWaveform(pcm):
            self._take(self.rec.Result())

    def finish(self) -> Transcript:
        self._take(self.rec.FinalResult())
        text = " ".join(p for p in self.parts if p and p != "[unk]")
        return Transcript(
            text.strip(), self.backend.languages[0] if self.backend.languages else None
        )

    def _take(self, result: str) -> None:
        self.parts.append(str(json.loads(result).get("text", "")).strip())
