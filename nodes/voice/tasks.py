"""The ``stt`` and ``tts`` tasks of a voice node (shapes in docs/voice.md).

* ``stt``: input ``{"media_topic": "<realm media topic>", "language": null}``.  The
  audio (``audio/L16;rate=16000;channels=1``, at most ``MAX_STT_S`` seconds) is
  a *retained* message on that media topic, published by the requester before
  it submits (the task protocol carries JSON only; binary stays on media
  topics) and cleared by it afterwards.  Output ``{"text", "language",
  "backend", "model", "audio_s", "run_ms"}``.
* ``tts``: input ``{"text": "...", "play": false}``.  The audio streams,
  sentence by sentence, as ``audio/L16`` chunks on ``media/<node>/tts/<task_id>``
  (subscribe to ``media/+/tts/<task_id>`` before submitting with your own task
  id); ``play`` also plays it on this node's sink.  Output ``{"media_topic",
  "content_type", "sample_rate", "chunks", "bytes", "first_audio_ms", "played"}``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field

from daemon import topics
from daemon.bus import Inbound
from daemon.errors import TaskError
from daemon.worker import TaskRun, task_input
from nodes.voice import audio
from nodes.voice.tts import MAX_TEXT, stream

if TYPE_CHECKING:
    from nodes.voice.node import VoiceNode

MAX_STT_S: Final = 30.0
MAX_STT_BYTES: Final = int(MAX_STT_S * audio.RATE * audio.WIDTH)
MEDIA_WAIT: Final = 5.0  # seconds an stt task waits for its retained audio


class SttInput(BaseModel):
    """The input of an ``stt`` task."""

    model_config = ConfigDict(extra="forbid")

    media_topic: str = Field(min_length=1, max_length=512)
    language: str | None = Field(default=None, max_length=16)


class TtsInput(BaseModel):
    """The input of a ``tts`` task."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT)
    play: bool = False


async def execute_stt(node: VoiceNode, task: TaskRun) -> Any:
    """Transcribe the retained audio the task's ``media_topic`` names."""
    stt = node.stt  # this one, even if a restart of the node drops it meanwhile
    if stt is None:
        raise TaskError("unavailable", "no speech-to-text backend here")
    inp = task_input(SttInput, task.input, "stt input")
    fields = topics.MEDIA.parse(inp.media_topic)
    if fields is None or fields["realm"] != node.ctx.realm:
        raise TaskError("bad_input", "media_topic must be a media topic of this realm")
    got: asyncio.Future[Inbound] = asyncio.get_running_loop().create_future()

    async def on_media(msg: Inbound) -> None:
        if msg.payload and not got.done():
            got.set_result(msg)

    await node.ctx.bus.subscribe(inp.media_topic, on_media)
    try:
        async with asyncio.timeout(MEDIA_WAIT):
            msg = await got
    except TimeoutError as exc:
        raise TaskError("bad_input", f"no audio on {inp.media_topic}") from exc
    finally:
        await node.ctx.bus.unsubscribe(inp.media_topic)
    if msg.content_type and not msg.content_type.startswith("audio/L16"):
        raise TaskError("bad_input", f"expected audio/L16, got {msg.content_type}")
    if len(msg.payload) > MAX_STT_BYTES:
        raise TaskError("bad_input", f"audio longer than {MAX_STT_S:g} s")
    started = time.perf_counter()
    result = await asyncio.to_thread(stt.transcribe, msg.payload)
    return {
        "text": result.text,
        "language": result.language,
        "backend": stt.type_name,
        "model": stt.model,
        "audio_s": round(len(msg.payload) / (audio.RATE * audio.WIDTH), 3),
        "run_ms": round((time.perf_counter() - started) * 1000, 1),
    }


async def execute_tts(node: VoiceNode, task: TaskRun) -> Any:
    """Speak the text as audio chunks on ``media/<node>/tts/<task_id>`` (and the sink)."""
    tts = node.tts  # this one, even if a restart of the node drops it meanwhile
    if tts is None:
        raise TaskError("unavailable", "no text-to-speech backend here")
    inp = task_input(TtsInput, task.input, "tts input")
    stream_name = f"tts/{task.task_id}"
    media = topics.MEDIA.build(realm=node.ctx.realm, node_id=node.ctx.node_id, stream=stream_name)
    sink = node.sink() if inp.play else audio.NullSink()
    started = time.perf_counter()
    first: float | None = None
    chunks = total = 0
    await sink.start()
    async for pcm in stream(tts, inp.text, node.tts_lock, task.cancel_flag):
        if first is None:
            first = time.perf_counter()
        await node.ctx.publish_media(stream_name, pcm, audio.CONTENT_TYPE)
        await sink.write(pcm)
        chunks += 1
        total += len(pcm)
        await task.partial({"chunk": chunks, "bytes": len(pcm)})
    await sink.finish()
    return {
        "media_topic": media,
        "content_type": audio.CONTENT_TYPE,
        "sample_rate": audio.RATE,
        "chunks": chunks,
        "bytes": total,
        "first_audio_ms": round((first - started) * 1000, 1) if first else None,
        "played": inp.play and node.config.sink.type != "none",
    }
