"""Audio plumbing: 16 kHz mono 16-bit frames in, answers out.

Every source yields ``bytes`` of int16 little-endian PCM at :data:`RATE`;
sinks take the same.  Sources: a WAV file, raw PCM on stdin, a live
microphone (sounddevice) and an MQTT media stream.  Sinks: a WAV file, the
speaker (sounddevice or ``aplay``) and MQTT media.  File and device I/O run
off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import sys
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

log = logging.getLogger(__name__)

RATE: Final = 16000
WIDTH: Final = 2  # bytes per sample
FRAME_SAMPLES: Final = 1280  # 80 ms: what openWakeWord wants, a multiple of 10 ms
FRAME_BYTES: Final = FRAME_SAMPLES * WIDTH
CONTENT_TYPE: Final = f"audio/L16;rate={RATE};channels=1"
APLAY_TIMEOUT: Final = 60.0


def resample(samples: np.ndarray, rate_in: int, rate_out: int = RATE) -> np.ndarray:
    """Float samples from ``rate_in`` to ``rate_out`` (windowed-sinc low-pass, then linear)."""
    x = samples.astype(np.float32)
    if rate_in == rate_out or len(x) == 0:
        return x
    if rate_out < rate_in:  # anti-alias before dropping rate
        cutoff = rate_out / 2 / rate_in * 0.95
        n = np.arange(-32, 33)
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(len(n))
        x = np.convolve(x, taps / taps.sum(), mode="same").astype(np.float32)
    out_len = int(len(x) * rate_out / rate_in)
    positions = np.arange(out_len) * (rate_in / rate_out)
    out: np.ndarray = np.interp(positions, np.arange(len(x)), x).astype(np.float32)
    return out


def to_pcm(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to int16 PCM bytes."""
    data: bytes = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return data


def from_pcm(pcm: bytes) -> np.ndarray:
    """int16 PCM bytes to float samples in [-1, 1]."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def rms_dbfs(pcm: bytes) -> float:
    """Loudness of a chunk (dBFS); arbitration uses it to pick the nearest satellite."""
    x = from_pcm(pcm)
    if len(x) == 0:
        return -120.0
    return float(20 * np.log10(max(float(np.sqrt(np.mean(x * x))), 1e-6)))


def read_wav(path: Path) -> bytes:
    """A WAV file as 16 kHz mono int16 PCM (converted when it is not)."""
    with wave.open(str(path), "rb") as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        raw = w.readframes(w.getnframes())
    return convert(raw, rate, width, channels)


def convert(raw: bytes, rate: int, width: int, channels: int) -> bytes:
    if (rate, width, channels) == (RATE, WIDTH, 1):
        return raw
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported sample width {width}")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return to_pcm(resample(x, rate))


def wav_bytes(pcm: bytes, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(WIDTH)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def write_wav(path: Path, pcm: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(pcm))


def frames(pcm: bytes, size: int = FRAME_BYTES) -> list[bytes]:
    """Split PCM into frames (the last one zero-padded)."""
    out = [pcm[i : i + size] for i in range(0, len(pcm), size)]
    if out and len(out[-1]) < size:
        out[-1] = out[-1] + bytes(size - len(out[-1]))
    return out


# ---------------------------------------------------------------- sources


async def file_source(path: Path, *, realtime: bool = False) -> AsyncIterator[bytes]:
    pcm = await asyncio.to_thread(read_wav, path)
    for frame in frames(pcm):
        yield frame
        await asyncio.sleep(FRAME_SAMPLES / RATE if realtime else 0)


async def stdin_source() -> AsyncIterator[bytes]:
    """Raw 16 kHz mono int16 PCM on stdin (e.g. ``arecord -r16000 -fS16_LE -c1 -t raw``)."""
    stream = sys.stdin.buffer
    while True:
        chunk = await asyncio.to_thread(stream.read, FRAME_BYTES)
        if not chunk:
            return
        if len(chunk) < FRAME_BYTES:
            chunk += bytes(FRAME_BYTES - len(chunk))
        yield chunk


async def mic_source(device: str | int | None = None) -> AsyncIterator[bytes]:
    """A live microphone through sounddevice (needs libportaudio2)."""
    import sounddevice as sd  # type: ignore[import-untyped]  # lazily: needs PortAudio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)

    def callback(indata: Any, _frames: int, _time: Any, status: Any) -> None:
        if status:
            log.debug("microphone status: %s", status)
        data = bytes(indata)
        loop.call_soon_threadsafe(_put_drop_oldest, queue, data)

    stream = sd.RawInputStream(
        samplerate=RATE,
        blocksize=FRAME_SAMPLES,
        channels=1,
        dtype="int16",
        device=device,
        callback=callback,
    )
    with stream:
        while True:
            yield await queue.get()


def _put_drop_oldest(queue: asyncio.Queue[bytes], data: bytes) -> None:
    if queue.full():  # a stalled consumer loses the oldest audio, never blocks the device
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(data)


class QueueSource:
    """Frames pushed from elsewhere (an MQTT media subscription); ``None`` ends it."""

    def __init__(self, maxsize: int = 200) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=maxsize)
        self._rest = b""

    def push(self, pcm: bytes | None) -> None:
        if pcm is None:
            self.queue.put_nowait(None)
            return
        data = self._rest + pcm
        cut = len(data) - len(data) % FRAME_BYTES
        self._rest = data[cut:]
        for i in range(0, cut, FRAME_BYTES):
            if self.queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.queue.get_nowait()
            self.queue.put_nowait(data[i : i + FRAME_BYTES])

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (frame := await self.queue.get()) is not None:
            yield frame


# ---------------------------------------------------------------- sinks


class Sink(Protocol):
    """Plays (or stores) one answer, chunk by chunk as synthesis produces it."""

    async def start(self) -> None: ...

    async def write(self, pcm: bytes) -> None: ...

    async def finish(self) -> None: ...

    async def abort(self) -> None: ...


class NullSink:
    async def start(self) -> None:
        return None

    async def write(self, pcm: bytes) -> None:
        return None

    async def finish(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class WavSink:
    """Each answer is written to ``path`` (overwritten by the next one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buf = bytearray()

    async def start(self) -> None:
        self._buf.clear()

    async def write(self, pcm: bytes) -> None:
        self._buf += pcm

    async def finish(self) -> None:
        await asyncio.to_thread(write_wav, self.path, bytes(self._buf))

    async def abort(self) -> None:
        await self.finish()


class AplaySink:
    """Pipes each answer into ``aplay`` (ALSA) as it is synthesised."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = shutil.which("aplay")
        if exe is None:
            raise OSError("aplay is not installed (apt install alsa-utils)")
        self.proc = await asyncio.create_subprocess_exec(
            exe, "-q", "-r", str(RATE), "-f", "S16_LE", "-c", "1", "-t", "raw",
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def write(self, pcm: bytes) -> None:
        if self.proc and self.proc.stdin:
            self.proc.stdin.write(pcm)
            await self.proc.stdin.drain()

    async def finish(self) -> None:
        if self.proc and self.proc.stdin:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), APLAY_TIMEOUT)
        self.proc = None

    async def abort(self) -> None:
        if self.proc:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.proc = None


class SpeakerSink:
    """The default output device through sounddevice (blocking writes off the loop)."""

    def __init__(self, device: str | int | None = None) -> None:
        self.device = device
        self.stream: Any = None

    async def start(self) -> None:
        import sounddevice as sd

        self.stream = sd.RawOutputStream(
            samplerate=RATE, channels=1, dtype="int16", device=self.device
        )
        self.stream.start()

    async def write(self, pcm: bytes) -> None:
        if self.stream is not None:
            await asyncio.to_thread(self.stream.write, pcm)

    async def finish(self) -> None:
        if self.stream is not None:
            await asyncio.to_thread(self.stream.close)
        self.stream = None

    async def abort(self) -> None:
        if self.stream is not None:
            await asyncio.to_thread(self.stream.abort)
            await asyncio.to_thread(self.stream.close)
        self.stream = None


class MqttSink:
    """Publishes the answer as audio/L16 chunks on a media stream (empty chunk = end)."""

    def __init__(self, publish: Callable[[bytes], Awaitable[None]]) -> None:
        self.publish = publish

    async def start(self) -> None:
        return None

    async def write(self, pcm: bytes) -> None:
        await self.publish(pcm)

    async def finish(self) -> None:
        await self.publish(b"")

    async def abort(self) -> None:
        await self.publish(b"")
