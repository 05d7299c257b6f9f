# ruff: noqa: E402  (the wyoming imports follow load_wyoming)
"""The Wyoming bridge, spoken to by the ``wyoming`` package's own client: describe → info,
transcribe a WAV (piper's speech, sent at 22.05 kHz to exercise the conversion),
synthesize text (transcribed back by whisper), detect "computer" (Porcupine)."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from nodes.voice.wyoming import load_wyoming

load_wyoming()  # wyoming.audio imports the deprecated audioop: quietly, once

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize
from wyoming.wake import Detect, Detection, NotDetected

from daemon.broker import PrivateBroker
from daemon.modelstore import ModelStore
from nodes.voice import audio
from nodes.voice.config import SttConfig, TtsConfig, WakeConfig, WyomingConfig
from nodes.voice.stt import SttBackend, make_stt
from nodes.voice.tts import TtsBackend, make_tts
from nodes.voice.wyoming import Models, WyomingBridge
from tests.test_voice_devices import voice_node
from tests.test_voice_realm import Harness

SILENCE = bytes(16000)


@pytest.fixture(scope="module")
def piper() -> TtsBackend:
    return make_tts(TtsConfig(noise_scale=0, noise_w_scale=0),
                    ModelStore.default().path("piper-en-us-joe-medium"))  # fmt: skip


@pytest.fixture(scope="module")
def whisper() -> SttBackend:
    cfg = SttConfig(initial_prompt="kitchen light")
    return make_stt(cfg, ModelStore.default().path("whisper-tiny-en"), "whisper-tiny-en")


@pytest.fixture
async def bridge(piper: TtsBackend, whisper: SttBackend) -> AsyncIterator[WyomingBridge]:
    models = Models(
        stt=lambda: whisper,
        tts=lambda: piper,
        tts_lock=threading.Lock(),
        wake=[WakeConfig(engine="porcupine", model="computer")],
    )
    server = WyomingBridge(WyomingConfig(port=0), models)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def words(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def resample(pcm: bytes, rate: int) -> bytes:
    samples = audio.from_pcm(pcm)
    t = np.arange(0, len(samples) * rate // audio.RATE) * audio.RATE / rate
    return audio.to_pcm(np.interp(t, np.arange(len(samples)), samples).astype(np.float32))


async def send_audio(client: AsyncTcpClient, pcm: bytes, rate: int) -> None:
    await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
    for i in range(0, len(pcm), 2048):
        await client.write_event(AudioChunk(rate=rate, width=2, channels=1,
                                            audio=pcm[i : i + 2048]).event())  # fmt: skip
    await client.write_event(AudioStop().event())


async def read(client: AsyncTcpClient, *kinds: Any) -> Any:
    async with asyncio.timeout(30):
        while True:
            event = await client.read_event()
            assert event is not None, "the server hung up"
            for kind in kinds:
                if kind.is_type(event.type):
                    return kind.from_event(event)


async def test_describe_transcribe_synthesize_detect(
    bridge: WyomingBridge, piper: TtsBackend, whisper: SttBackend
) -> None:
    assert bridge.port
    async with AsyncTcpClient("127.0.0.1", bridge.port) as client:
        await client.write_event(Describe().event())
        info = cast(Info, await read(client, Info))
        assert [m.name for p in info.asr for m in p.models] == ["whisper-tiny-en"]
        assert [v.name for p in info.tts for v in p.voices] == ["piper-en-us-joe-medium"]
        assert [m.name for p in info.wake for m in p.models] == ["computer"]
        # Transcribe: piper's 22.05 kHz output as it comes, converted by the bridge.
        spoken = b"".join(piper.synthesize("Turn on the kitchen light."))
        await client.write_event(Transcribe(language="en").event())
        await send_audio(client, resample(SILENCE + spoken + SILENCE, 22050), 22050)
        text = cast(Transcript, await read(client, Transcript))
        assert words(text.text) == "turn on the kitchen light"
        # Synthesize: the audio comes back as chunks; whisper hears the words.
        await client.write_event(Synthesize(text="Dinner is ready.").event())
        start = cast(AudioStart, await read(client, AudioStart))
        assert (start.rate, start.width, start.channels) == (16000, 2, 1)
        pcm = b""
        while True:
            event = await read(client, AudioChunk, AudioStop)
            if isinstance(event, AudioStop):
                break
            pcm += event.audio
        heard = await asyncio.to_thread(whisper.transcribe, SILENCE + pcm + SILENCE)
        assert words(heard.text) == "dinner is ready"
        # Wake word detection on a stream.
        await client.write_event(Detect(names=["computer"]).event())
        await send_audio(client, SILENCE + b"".join(piper.synthesize("Computer.")) + SILENCE, 16000)
        found = await read(client, Detection, NotDetected)
        assert isinstance(found, Detection) and found.name == "computer"
        await client.write_event(Detect().event())
        await send_audio(client, SILENCE + spoken + SILENCE, 16000)
        assert isinstance(await read(client, Detection, NotDetected), NotDetected)


async def test_a_voice_node_serves_wyoming(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    h = Harness(broker, realm, tmp_path)
    try:
        daemon = await h.voice_daemon("speech", wyoming={"port": 0}, stt={"serve": False})
        node = await voice_node(daemon)
        async with asyncio.timeout(10):
            while node.wyoming is None or node.wyoming.port is None:
                await asyncio.sleep(0.05)
        async with AsyncTcpClient("127.0.0.1", node.wyoming.port) as client:
            await client.write_event(Describe().event())
            info = cast(Info, await read(client, Info))
            assert info.asr and info.tts
            # No microphone here, but the configured wake word is served to Wyoming clients.
            assert [m.name for p in info.wake for m in p.models] == ["okay_nabu"]
    finally:
        await h.close()
