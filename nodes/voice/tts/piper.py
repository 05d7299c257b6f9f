"""Piper (ONNX VITS voices), one chunk per sentence, resampled to 16 kHz."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodes.voice.audio import resample, to_pcm
from nodes.voice.config import TtsConfig
from nodes.voice.tts import MAX_TEXT, TtsUnavailable


class PiperTts:
    type_name = "piper"

    def __init__(self, cfg: TtsConfig, model_path: Path | None) -> None:
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError as exc:
            raise TtsUnavailable(f"piper-tts is not installed: {exc}") from exc
        if model_path is None or not model_path.is_file():
            raise TtsUnavailable(f"piper voice {cfg.model!r} is not installed")
        if not Path(f"{model_path}.json").is_file():
            raise TtsUnavailable(f"piper voice config {model_path}.json is missing")
        self.model = cfg.model
        self._voice: Any = PiperVoice.load(model_path)
        self.languages = [str(self._voice.config.espeak_voice)]
        self._syn = SynthesisConfig(
            length_scale=cfg.length_scale,
            noise_scale=cfg.noise_scale,
            noise_w_scale=cfg.noise_w_scale,
        )

    def synthesize(self, text: str) -> Iterator[bytes]:
        for chunk in self._voice.synthesize(text[:MAX_TEXT], syn_config=self._syn):
            yield to_pcm(resample(chunk.audio_float_array, chunk.sample_rate))
