"""The voice node on a real broker: satellites, arbitration, intents over MQTT, the stt
and tts capabilities through the orchestrator, ``mtor say`` and ``mtor listen``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.client import RealmClient
from daemon.config import Config
from daemon.messages import decode
from daemon.modelstore import ModelStore
from daemon.node import NodeContext
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.node import Event
from daemon.runtime import NodeDaemon
from nodes.voice import audio
from nodes.voice.config import SttConfig, TtsConfig, VoiceConfig
from nodes.voice.realm import NO_REALM, RealmVoice
from nodes.voice.stt import SttBackend, make_stt
from nodes.voice.tts import TtsBackend, make_tts
from tests.conftest import (
    ROOT,
    Collector,
    InProcess,
    make_config,
    mtor_env,
    running_bus,
    write_config,
)

SILENCE = bytes(16000)
# Piper without its random noise: the same text gives the same audio, so the
# tests are repeatable (with noise, whisper tiny sometimes hears "current on").
REPEATABLE = TtsConfig(noise_scale=0, noise_w_scale=0)
QUIET = {"noise_scale": 0, "noise_w_scale": 0}  # the same for the nodes' answers
DEVICES = [{"name": "light", "area": "kitchen", "command_topic": "zigbee2mqtt/kitchen_light/set"}]
PROMPT = "okay nabu, kitchen light"


@pytest.fixture(scope="module")
def piper() -> TtsBackend:
    return make_tts(REPEATABLE, ModelStore.default().path("piper-en-us-joe-medium"))


@pytest.fixture(scope="module")
def whisper() -> SttBackend:
    path = ModelStore.default().path("whisper-tiny-en")
    return make_stt(SttConfig(initial_prompt=PROMPT), path, "whisper-tiny-en")


@pytest.fixture(scope="module")
def command(piper: TtsBackend) -> bytes:
    """ "Okay nabu. Turn on the kitchen light." with silence around."""
    wake = b"".join(piper.synthesize("Okay nabu."))
    cmd = b"".join(piper.synthesize("Turn on the kitchen light."))
    return SILENCE + wake + bytes(8000) + cmd + SILENCE * 3


def words(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def scaled(pcm: bytes, gain: float) -> bytes:
    return audio.to_pcm(audio.from_pcm(pcm) * gain)


class Harness(InProcess):
    def __init__(self, broker: PrivateBroker, realm: str, tmp: Path) -> None:
        self.broker, self.realm, self.tmp = broker, realm, tmp
        super().__init__()

    def config(self, **extra: Any) -> Config:
        return make_config(
            self.broker.url, self.realm, orchestrator={"state_dir": str(self.tmp / "o")}, **extra
        )

    async def orchestrator(self) -> Orchestrator:
        orch = Orchestrator(self.config())
        self._run(orch.run)
        await asyncio.wait_for(orch._online.wait(), 10)
        return orch

    async def voice_daemon(self, node_id: str, **voice: Any) -> NodeDaemon:
        cfg = self.config(node_id=node_id, nodes={"sat": {"type": "voice", **voice}})
        daemon = NodeDaemon(cfg)
        self._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 30)
        return daemon


@pytest.fixture
async def harness(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(broker, realm, tmp_path)
    try:
        yield h
    finally:
        await h.close()


def events(col: Collector, name: str) -> list[tuple[str, Event]]:
    out = []
    for m in col.messages:
        fields = topics.EVENT.parse(m.topic)
        if fields and fields["name"] == name and m.payload:
            out.append((fields["node_id"], decode(m.payload, Event)))
    return out


async def test_two_satellites_one_answers_and_the_light_turns_on(
    harness: Harness, command: bytes, whisper: SttBackend
) -> None:
    """Both hear "okay nabu"; the louder (nearer) one answers, over MQTT end to end."""
    realm = harness.realm
    mic = {n: topics.MEDIA.build(realm=realm, node_id=f"mic-{n}", stream="audio") for n in "ab"}
    common = {
        "wake": {"engine": "micro", "model": "okay_nabu"},
        "stt": {"initial_prompt": PROMPT, "serve": False},
        "tts": {"serve": False, **QUIET},
        "intents": {"devices": DEVICES, "chat_fallback": False},
        "arbitration_s": 0.5,
        "sink": {"type": "mqtt"},
    }
    async with running_bus(harness.config()) as bus:
        seen = Collector()
        await bus.subscribe(topics.EVENT.filter(realm=realm, domain="voice"), seen)
        light = Collector()
        await bus.subscribe("zigbee2mqtt/kitchen_light/set", light)
        answer: list[bytes] = []
        answer_done = asyncio.Event()

        async def on_answer(msg: Inbound) -> None:
            if msg.payload:
                answer.append(msg.payload)
            else:
                answer_done.set()

        await bus.subscribe(topics.MEDIA.filter(realm=realm, stream="voice/answer"), on_answer)
        for n in "ab":
            await harness.voice_daemon(
                f"sat-{n}", source={"type": "mqtt", "topic": mic[n]}, **common
            )
        await seen.wait_for(lambda m: len(events(seen, "state")) >= 2, timeout=30)
        loud, quiet = command, scaled(command, 0.25)
        for i in range(0, len(loud), audio.FRAME_BYTES):  # both microphones, side by side
            await bus.publish(mic["a"], loud[i : i + audio.FRAME_BYTES], qos=0)
            await bus.publish(mic["b"], quiet[i : i + audio.FRAME_BYTES], qos=0)
            await asyncio.sleep(0.004)
        await asyncio.wait_for(answer_done.wait(), 30)
        await light.wait_for(lambda m: True, timeout=5)
        await asyncio.sleep(0.5)  # nothing more may come: the other satellite stays quiet
    wakes = events(seen, "wake")
    assert sorted(node for node, _ in wakes) == ["sat-a", "sat-b"]
    energy = {node: e.attrs["energy_dbfs"] for node, e in wakes}
    assert energy["sat-a"] > energy["sat-b"]
    answers = events(seen, "answer")
    assert [node for node, _ in answers] == ["sat-a"]
    assert answers[0][1].value == "Turned on the kitchen light."
    assert [m.payload for m in light.messages] == [b'{"state":"ON"}']
    lost = [e for node, e in events(seen, "state") if node == "sat-b"]
    assert any(e.attrs.get("reason") == "another satellite answers" for e in lost)
    transcripts = [(n, e.value) for n, e in events(seen, "transcript")]
    assert [(n, words(str(t))) for n, t in transcripts] == [("sat-a", "turn on the kitchen light")]
    spoken = await asyncio.to_thread(whisper.transcribe, SILENCE + b"".join(answer) + SILENCE)
    assert words(spoken.text) == "turned on the kitchen light"


async def test_stt_and_tts_capabilities_and_mtor_say(
    harness: Harness, piper: TtsBackend, whisper: SttBackend, tmp_path: Path
) -> None:
    await harness.orchestrator()
    played = tmp_path / "played.wav"
    await harness.voice_daemon(
        "speech",
        stt={"initial_prompt": PROMPT},
        tts=QUIET,
        sink={"type": "file", "path": str(played)},
    )
    cfg = harness.config()
    async with running_bus(cfg) as bus:
        client = RealmClient(bus, harness.realm)
        await client.start()
        async with asyncio.timeout(20):  # the orchestrator has seen the adverts
            while True:
                try:
                    await client.call("tts", {"text": "ready"}, timeout=5)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        # stt: the audio is a retained media message, the task names its topic.
        said = SILENCE + b"".join(piper.synthesize("What time is it?")) + SILENCE
        media = topics.MEDIA.build(realm=harness.realm, node_id="tester", stream="stt/1")
        await bus.publish(media, said, retain=True, content_type=audio.CONTENT_TYPE, wait=True)
        out = await asyncio.wait_for(client.call("stt", {"media_topic": media}, timeout=20), 30)
        assert words(out["text"]) == "what time is it"
        assert out["backend"] == "faster_whisper" and out["audio_s"] > 1
        with pytest.raises(Exception, match="bad_input"):
            await client.call("stt", {"media_topic": "not/a/media/topic"}, timeout=10)
        with pytest.raises(Exception, match="bad_input"):
            await client.call("tts", {"text": ""}, timeout=10)
        # play: the node speaks on its own sink (here a WAV file), as `mtor say` without --out.
        out = await asyncio.wait_for(
            client.call("tts", {"text": "Dinner is ready.", "play": True}, timeout=20), 30
        )
        assert out["played"] is True and played.is_file()
        assert len(audio.read_wav(played)) == out["bytes"]
    # A satellite that sends its commands to the realm's stt (routing: remote).
    mic = topics.MEDIA.build(realm=harness.realm, node_id="mic-r", stream="audio")
    await harness.voice_daemon(
        "remote-sat",
        source={"type": "mqtt", "topic": mic},
        wake={"engine": "none"},
        stt={"routing": "remote", "serve": False},
        tts={"serve": False},
        intents={"devices": DEVICES, "chat_fallback": False},
    )
    async with running_bus(cfg) as bus:
        seen = Collector()
        await bus.subscribe(topics.EVENT.filter(realm=harness.realm, node_id="remote-sat"), seen)
        await seen.wait_for(lambda m: m.topic.endswith("/state"), timeout=30)
        said = SILENCE + b"".join(piper.synthesize("Turn on the kitchen light.")) + SILENCE * 3
        for i in range(0, len(said), audio.FRAME_BYTES):
            await bus.publish(mic, said[i : i + audio.FRAME_BYTES], qos=0)
            await asyncio.sleep(0.004)
        msg = await seen.wait_for(lambda m: m.topic.endswith("/transcript"), timeout=30)
    transcript = decode(msg.payload, Event)
    assert words(str(transcript.value)) == "turn on the kitchen light"
    assert transcript.attrs["route"] == "remote"

    # mtor say --out: the chunks streamed on media/<node>/tts/<task id> become a WAV.
    path = write_config(tmp_path, {"realm": harness.realm, "broker": {"url": harness.broker.url}})
    wav = tmp_path / "said.wav"
    text = "Hello there. The kitchen light is on."
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon.cli.main", "--config", str(path), "say", text,
         "--node", "speech", "--out", str(wav), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=mtor_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chunks"] == 2 and result["received_chunks"] == 2
    pcm = audio.read_wav(wav)
    assert len(pcm) == result["bytes"]
    plain = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon.cli.main", "--config", str(path), "say", text,
         "--node", "speech", "--out", str(tmp_path / "again.wav")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=mtor_env(),
    )  # fmt: skip
    seconds = len(audio.read_wav(tmp_path / "again.wav")) / (2 * audio.RATE)
    assert plain.stdout.strip() == f"wrote {tmp_path / 'again.wav'} ({seconds:.1f} s of audio)"
    heard = await asyncio.to_thread(whisper.transcribe, SILENCE + pcm + SILENCE)
    assert words(heard.text) == words(text)


async def test_mtor_listen_on_a_wav_file(
    broker: PrivateBroker, realm: str, tmp_path: Path, command: bytes, whisper: SttBackend
) -> None:
    wav_in, wav_out = tmp_path / "in.wav", tmp_path / "answer.wav"
    # A 22.05 kHz file: listen converts any WAV to 16 kHz mono.
    audio.write_wav(wav_in, audio.to_pcm(audio.resample(audio.from_pcm(command), 16000, 22050)))
    data = wav_in.read_bytes()
    wav_in.write_bytes(data[:24] + (22050).to_bytes(4, "little") + (44100).to_bytes(4, "little")
                       + data[32:])  # fmt: skip
    path = write_config(
        tmp_path,
        {
            "realm": realm,
            "broker": {"url": broker.url},
            "nodes": {
                "sat": {
                    "type": "voice",
                    "tts": QUIET,
                    "stt": {"initial_prompt": PROMPT},
                    "intents": {"devices": DEVICES},
                }
            },
        },
    )
    async with running_bus(make_config(broker.url, realm)) as bus:
        light = Collector()
        await bus.subscribe("zigbee2mqtt/kitchen_light/set", light)
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "daemon.cli.main", "--config", str(path), "listen",
             str(wav_in), "--out", str(wav_out)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=mtor_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        await light.wait_for(lambda m: m.payload == b'{"state":"ON"}', timeout=5)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    seq = [(e["event"], e["value"]) for e in printed]
    assert [v for e, v in seq if e == "state"] == [
        "idle", "listening", "processing", "responding", "idle"
    ]  # fmt: skip
    assert ("wake", "okay_nabu") in seq and ("intent", "turn_on") in seq
    answer = next(e for e in printed if e["event"] == "answer")
    assert answer["first_audio_ms"] > 0
    heard = await asyncio.to_thread(whisper.transcribe, SILENCE + audio.read_wav(wav_out))
    assert words(heard.text) == "turned on the kitchen light"


async def test_chat_fallback_without_orchestrator_says_so(
    broker: PrivateBroker, realm: str
) -> None:
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:

        async def nothing() -> None:
            return None

        ctx = NodeContext(node_id=f"n{uuid.uuid4().hex[:6]}", config=cfg, bus=bus,
                          state_dir=Path("."), announce=nothing)  # fmt: skip
        voice = RealmVoice(ctx, VoiceConfig(type="voice"))
        await voice.start()
        async with asyncio.timeout(2):  # fast: no orchestrator is online
            reply = await voice.ask("tell me a joke")
    assert reply.text == NO_REALM and not reply.actions


async def test_mtor_listen_offline(tmp_path: Path, piper: TtsBackend) -> None:
    """No broker needed: the whole loop runs; the realm is said to be unreachable."""
    wav = tmp_path / "q.wav"
    pcm = SILENCE + b"".join(piper.synthesize("What time is it?")) + SILENCE * 2
    pcm += b"".join(piper.synthesize("Tell me a joke.")) + SILENCE * 3
    audio.write_wav(wav, pcm)
    path = write_config(tmp_path, {"realm": "offline", "broker": {"url": "mqtt://127.0.0.1:1"}})
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daemon.cli.main", "--config", str(path), "listen", str(wav),
         "--offline", "--no-wake"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=mtor_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    answers = [(e["value"], e["source"]) for e in printed if e["event"] == "answer"]
    assert len(answers) == 2
    assert re.fullmatch(r"It is \d+:\d\d [AP]M\.", answers[0][0]) and answers[0][1] == "local"
    assert answers[1] == (NO_REALM, "chat")
