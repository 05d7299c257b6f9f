"""Text-to-speech backends: a Protocol, a registry, lazy imports, and streaming.

``synthesize(text)`` is a blocking generator of 16 kHz mono int16 PCM, one
chunk per sentence, so playback can start before the whole text is spoken.
:func:`stream` runs it in a thread and hands the chunks to async code as they
come.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final, Protocol

from daemon.plugins import load_attr
from nodes.voice.config import TtsConfig

MAX_TEXT: Final = 5000  # characters one synthesis takes
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+")


class TtsUnavailable(Exception):
    """The backend's package, program or model is missing."""


class TtsBackend(Protocol):
    type_name: str
    model: str
    languages: list[str]

    def synthesize(self, text: str) -> Iterator[bytes]: ...


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


_BACKENDS = {
    "piper": "nodes.voice.tts.piper:PiperTts",
    "espeak": "nodes.voice.tts.espeak:EspeakTts",
}


def make_tts(cfg: TtsConfig, model_path: Path | None) -> TtsBackend:
    try:
        cls = load_attr(_BACKENDS[cfg.backend])
    except ImportError as exc:
        raise TtsUnavailable(f"{cfg.backend}: {exc}") from exc
    backend: TtsBackend = cls(cfg, model_path)
    return backend


_DONE: Final = object()


async def stream(
    backend: TtsBackend, text: str, lock: threading.Lock, cancel: threading.Event | None = None
) -> AsyncIterator[bytes]:
    """The backend's chunks, produced in a thread, yielded as each sentence is ready."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancel = cancel or threading.Event()

    def work() -> None:
        try:
            with lock:
                for chunk in backend.synthesize(text):
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = asyncio.create_task(asyncio.to_thread(work))
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item
    finally:
        cancel.set()
        await asyncio.shield(worker)
