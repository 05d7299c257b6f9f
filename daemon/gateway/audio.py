"""WAV in, WAV out: what HTTP clients send and get, and the realm's audio format.

The realm's speech capabilities speak ``audio/L16`` (16 kHz, mono, 16-bit
little-endian PCM, docs/voice.md).  An upload may be any PCM WAV (8/16/24/32
bit, any rate, any channels): it is mixed down and resampled (linear) here,
with the standard library only — the gateway does not need numpy.
"""

from __future__ import annotations

import array
import io
import sys
import wave
from typing import Final

RATE: Final = 16000
CONTENT_TYPE: Final = f"audio/L16;rate={RATE};channels=1"
# The stt capability takes at most this much audio (nodes/voice: 30 s).
MAX_SECONDS: Final = 30.0


class AudioError(ValueError):
    """Not audio the gateway can read."""


def wav_to_pcm16k(data: bytes) -> bytes:
    """A WAV file's audio as 16 kHz mono int16 PCM."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.getnframes()
            if frames / max(rate, 1) > MAX_SECONDS + 1:
                raise AudioError(f"audio longer than {MAX_SECONDS:g} s")
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"not a PCM WAV file: {exc}") from exc
    if width not in (1, 2, 3, 4) or not 1 <= channels <= 16 or not 1000 <= rate <= 384_000:
        raise AudioError(f"unsupported WAV ({width * 8}-bit, {channels} channels, {rate} Hz)")
    samples = _mono16(raw, width, channels)
    if rate != RATE:
        samples = _resample(samples, rate, RATE)
    if sys.byteorder != "little":  # pragma: no cover - the realm's PCM is little-endian
        samples.byteswap()
    return samples.tobytes()


def pcm_to_wav(pcm: bytes, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def _mono16(raw: bytes, width: int, channels: int) -> array.array[int]:
    n = len(raw) // (width * channels)
    if width == 2:
        values = array.array("h")
        values.frombytes(raw[: n * 2 * channels])
        if sys.byteorder != "little":  # pragma: no cover
            values.byteswap()
        ints: list[int] | array.array[int] = values
    elif width == 1:  # unsigned 8-bit
        ints = [(b - 128) << 8 for b in raw[: n * channels]]
    else:  # 24/32-bit: keep the top 16 bits
        ints = [
            int.from_bytes(raw[i : i + width], "little", signed=True) >> (8 * (width - 2))
            for i in range(0, n * width * channels, width)
        ]
    if channels == 1:
        return ints if isinstance(ints, array.array) else array.array("h", ints)
    mixed = [sum(ints[i : i + channels]) // channels for i in range(0, n * channels, channels)]
    return array.array("h", mixed)


def _resample(samples: array.array[int], rate_in: int, rate_out: int) -> array.array[int]:
    n_out = len(samples) * rate_out // rate_in
    if n_out == 0 or not samples:
        return array.array("h")
    step = rate_in / rate_out
    last = len(samples) - 1
    out = array.array("h", bytes(2 * n_out))
    for i in range(n_out):
        pos = i * step
        j = int(pos)
        if j >= last:
            out[i] = samples[last]
            continue
        frac = pos - j
        out[i] = int(samples[j] + (samples[j + 1] - samples[j]) * frac)
    return out
