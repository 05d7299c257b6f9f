"""espeak-ng as a tiny fallback voice: the program, one call per sentence."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from nodes.voice.audio import convert
from nodes.voice.config import TtsConfig
from nodes.voice.tts import MAX_TEXT, TtsUnavailable, sentences

ESPEAK_TIMEOUT: Final = 30.0
ESPEAK_RATE: Final = 22050  # espeak-ng's output rate


class EspeakTts:
    type_name = "espeak"

    def __init__(self, cfg: TtsConfig, model_path: Path | None) -> None:
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise TtsUnavailable("espeak-ng is not installed (apt install espeak-ng)")
        self.exe = exe
        self.voice = cfg.voice
        self.model = f"espeak-ng:{cfg.voice}"
        self.languages = [cfg.voice]

    def synthesize(self, text: str) -> Iterator[bytes]:
        for sentence in sentences(text[:MAX_TEXT]):
            # Raw PCM on stdout (no WAV header: espeak cannot seek a pipe to fix its sizes).
            proc = subprocess.run(
                [self.exe, "-v", self.voice, "--stdout", "--", sentence],
                capture_output=True,
                timeout=ESPEAK_TIMEOUT,
                check=False,
            )
            if proc.returncode != 0:
                raise TtsUnavailable(f"espeak-ng failed: {proc.stderr.decode(errors='replace')}")
            yield convert(_strip_wav_header(proc.stdout), ESPEAK_RATE, 2, 1)


def _strip_wav_header(data: bytes) -> bytes:
    """espeak-ng --stdout writes a WAV header with unknown sizes; find the data chunk."""
    idx = data.find(b"data")
    return data[idx + 8 :] if data[:4] == b"RIFF" and idx >= 0 else data
