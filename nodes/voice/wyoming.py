"""A Wyoming server on a voice node's models: Home Assistant's Wyoming integration can use
the realm's speech-to-text, text-to-speech and wake word detection in an Assist pipeline.

The protocol is the ``wyoming`` package's (one JSON header per event, binary
audio beside it): ``describe`` → ``info`` (asr, tts and wake programs);
``transcribe`` + ``audio-start/chunk/stop`` → ``transcript``; ``synthesize``
→ ``audio-start/chunk/stop``; ``detect`` + audio → ``detection`` or
``not-detected``.  Audio of any rate/width/channels is converted to 16 kHz
mono 16-bit.  Transcription and synthesis run off the event loop, on the
node's own backends (and their locks); a node without a local STT
transcribes through the realm's ``stt`` capability.

Wyoming has no authentication: the server listens on 127.0.0.1 unless told
otherwise; expose it only on a trusted network.  Each connection's audio is
bounded (30 s), as the ``stt`` task's is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from nodes.voice import audio
from nodes.voice.config import WakeConfig, WyomingConfig
from nodes.voice.stt import SttBackend, Transcript
from nodes.voice.tts import MAX_TEXT, TtsBackend, stream
from nodes.voice.wake import WakeDetector, WakeUnavailable, make_wake

log = logging.getLogger(__name__)

MAX_AUDIO_BYTES: Final = 30 * audio.RATE * audio.WIDTH
ATTRIBUTION: Final = ("M-TOR", "")  # the project has no public URL of its own yet


@dataclass
class Models:
    """What the bridge serves (the node's, read at each request: a restart swaps them)."""

    stt: Callable[[], SttBackend | None]
    tts: Callable[[], TtsBackend | None]
    tts_lock: threading.Lock
    wake: list[WakeConfig]
    remote_stt: Callable[[bytes], Awaitable[Transcript]] | None = None


def _info(models: Models) -> Any:
    from wyoming.info import (
        AsrModel,
        AsrProgram,
        Attribution,
        Info,
        TtsProgram,
        TtsVoice,
        WakeModel,
        WakeProgram,
    )

    by = Attribution(*ATTRIBUTION)
    info = Info()
    stt = models.stt()
    if stt is not None or models.remote_stt is not None:
        name = stt.model if stt is not None else "realm"
        langs = stt.languages if stt is not None else []
        model = AsrModel(name=name, attribution=by, installed=True, description=name,
                         version=None, languages=langs)  # fmt: skip
        info.asr = [AsrProgram(name="mtor-stt", attribution=by, installed=True,
                               description="M-TOR speech-to-text", version=None,
                               models=[model])]  # fmt: skip
    tts = models.tts()
    if tts is not None:
        voice = TtsVoice(name=tts.model, attribution=by, installed=True, description=tts.model,
                         version=None, languages=tts.languages or ["en"])  # fmt: skip
        info.tts = [TtsProgram(name="mtor-tts", attribution=by, installed=True,
                               description="M-TOR text-to-speech", version=None,
                               voices=[voice])]  # fmt: skip
    if models.wake:
        wakes = [WakeModel(name=w.model, attribution=by, installed=True, description=w.engine,
                           version=None, languages=[w.language or "en"],
                           phrase=w.model.replace("_", " "))
                 for w in models.wake]  # fmt: skip
        info.wake = [WakeProgram(name="mtor-wake", attribution=by, installed=True,
                                 description="M-TOR wake words", version=None,
                                 models=wakes)]  # fmt: skip
    return info


class _Handler:
    """One client connection (the ``wyoming`` package's event framing)."""

    def __init__(
        self, models: Models, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.models = models
        self.reader = reader
        self.writer = writer
        self.mode: str | None = None  # transcribe | detect
        self.language: str | None = None
        self.pcm = bytearray()
        self.detector: WakeDetector | None = None
        self.detected = False
        self.converter: Any = None

    async def run(self) -> None:
        from wyoming.event import async_read_event

        try:
            while (event := await async_read_event(self.reader)) is not None:
                if not await self.handle(event):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.info("wyoming client dropped: %s", exc)
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()

    async def write(self, eventable: Any) -> None:
        from wyoming.event import async_write_event

        await async_write_event(eventable.event(), self.writer)

    async def handle(self, event: Any) -> bool:
        from wyoming.asr import Transcribe
        from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
        from wyoming.info import Describe
        from wyoming.tts import Synthesize
        from wyoming.wake import Detect

        if Describe.is_type(event.type):
            await self.write(_info(self.models))
        elif Transcribe.is_type(event.type):
            self.mode, self.language = "transcribe", Transcribe.from_event(event).language
            self.pcm.clear()
        elif Detect.is_type(event.type):
            self._start_detect(Detect.from_event(event).names)
        elif AudioStart.is_type(event.type):
            self.pcm.clear()
            self.converter = AudioChunkConverter(rate=audio.RATE, width=audio.WIDTH, channels=1)
        elif AudioChunk.is_type(event.type):
            if self.converter is None:
                self.converter = AudioChunkConverter(rate=audio.RATE, width=audio.WIDTH,
                                                     channels=1)  # fmt: skip
            chunk = self.converter.convert(AudioChunk.from_event(event)).audio
            await self._audio(chunk)
        elif AudioStop.is_type(event.type):
            await self._audio_done()
        elif Synthesize.is_type(event.type):
            await self._synthesize(Synthesize.from_event(event).text)
        return True

    def _start_detect(self, names: list[str] | None) -> None:
        self.mode, self.detected = "detect", False
        wanted = [w for w in self.models.wake if not names or w.model in names]
        try:
            self.detector = make_wake(wanted[0], wanted[1:]) if wanted else None
        except (WakeUnavailable, OSError, ValueError) as exc:
            log.warning("wyoming wake detection unavailable: %s", exc)
            self.detector = None

    async def _audio(self, chunk: bytes) -> None:
        if self.mode == "detect" and self.detector is not None and not self.detected:
            from wyoming.wake import Detection

            found = await asyncio.to_thread(self._detect, chunk)
            if found is not None:
                self.detected = True
                await self.write(Detection(name=found))
        elif len(self.pcm) + len(chunk) <= MAX_AUDIO_BYTES:
            self.pcm += chunk

    def _detect(self, chunk: bytes) -> str | None:
        assert self.detector is not None
        for frame in audio.frames(chunk):
            if (hit := self.detector.process(frame)) is not None:
                return hit.name
        return None

    async def _audio_done(self) -> None:
        from wyoming.asr import Transcript as WyTranscript
        from wyoming.wake import NotDetected

        mode, self.mode = self.mode, None
        if mode == "detect":
            if not self.detected:
                await self.write(NotDetected())
            return
        if mode != "transcribe":
            return
        pcm, stt = bytes(self.pcm), self.models.stt()
        if stt is not None:
            result = await asyncio.to_thread(stt.transcribe, pcm)
        elif self.models.remote_stt is not None:
            result = await self.models.remote_stt(pcm)
        else:
            result = Transcript("")
        await self.write(WyTranscript(text=result.text, language=result.language))

    async def _synthesize(self, text: str) -> None:
        from wyoming.audio import AudioChunk, AudioStart, AudioStop

        fmt = {"rate": audio.RATE, "width": audio.WIDTH, "channels": 1}
        await self.write(AudioStart(**fmt))
        tts = self.models.tts()
        if tts is not None and text.strip():
            async for pcm in stream(tts, text[:MAX_TEXT], self.models.tts_lock, threading.Event()):
                for i in range(0, len(pcm), audio.RATE):  # ~0.5 s chunks
                    await self.write(AudioChunk(audio=pcm[i : i + audio.RATE], **fmt))
        await self.write(AudioStop())


def load_wyoming() -> None:
    """Import the wyoming modules once, quietly: ``wyoming.audio`` imports ``audioop``,
    deprecated in Python 3.11-3.12 (wyoming ships its own fallback for 3.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import wyoming.asr
        import wyoming.audio
        import wyoming.event
        import wyoming.info
        import wyoming.tts
        import wyoming.wake  # noqa: F401


class WyomingBridge:
    def __init__(self, cfg: WyomingConfig, models: Models) -> None:
        self.cfg = cfg
        self.models = models
        self.port: int | None = None  # the bound port (cfg.port 0: a free one)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        try:
            load_wyoming()
        except ImportError as exc:
            log.warning("wyoming bridge unavailable: the wyoming package is missing (%s)", exc)
            return

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._clients.add(task)
            try:
                await _Handler(self.models, reader, writer).run()
            finally:
                if task is not None:
                    self._clients.discard(task)

        self._server = await asyncio.start_server(on_client, self.cfg.host, self.cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("wyoming server on %s:%d", self.cfg.host, self.port)

    async def close(self) -> None:
        """Stop listening and end the connections (a synthesis in flight is cancelled)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        clients, self._clients = set(self._clients), set()
        for task in clients:
            task.cancel()
        # Our own cancellations: collected here, not raised (this caller is not cancelled).
        await asyncio.gather(*clients, return_exceptions=True)
