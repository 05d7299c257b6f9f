"""Devices learned from the broker: zigbee2mqtt/Tasmota discovery configs on a real Mosquitto.

Nothing is configured in M-TOR: the satellite reads the retained discovery
configs, hears "turn off the bedroom lamp" (piper → whisper) and publishes the
lamp's JSON command on its command topic.  Hostile configs beside them cost a
log line each; a removed (empty retained) config is forgotten; a configured
device with the same name wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.modelstore import ModelStore
from nodes.voice import audio
from nodes.voice.config import TtsConfig
from nodes.voice.node import VoiceNode
from nodes.voice.tts import TtsBackend, make_tts
from tests.conftest import Collector, running_bus
from tests.test_voice_intents import TASMOTA_PLUG, Z2M_LAMP
from tests.test_voice_realm import QUIET, Harness, events

SILENCE = bytes(16000)
LAMP_SET = "zigbee2mqtt/Bedroom Lamp/set"


@pytest.fixture(scope="module")
def piper() -> TtsBackend:
    return make_tts(TtsConfig(noise_scale=0, noise_w_scale=0),
                    ModelStore.default().path("piper-en-us-joe-medium"))  # fmt: skip


@pytest.fixture
async def harness(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(broker, realm, tmp_path)
    try:
        yield h
    finally:
        await h.close()


def said(piper: TtsBackend, text: str) -> bytes:
    return SILENCE + b"".join(piper.synthesize(text)) + SILENCE * 3


async def speak(bus: Bus, mic: str, pcm: bytes) -> None:
    for i in range(0, len(pcm), audio.FRAME_BYTES):
        await bus.publish(mic, pcm[i : i + audio.FRAME_BYTES], qos=0)
        await asyncio.sleep(0.002)


async def voice_node(daemon: Any, name: str = "sat", timeout: float = 30.0) -> VoiceNode:
    """The daemon's voice node, once made (the daemon is online before its nodes are
    probed and made)."""
    await until(lambda: daemon.hosted[name].node is not None, timeout)
    return cast(VoiceNode, daemon.hosted[name].node)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_lamp_zigbee2mqtt_announced_is_switched_by_voice(
    harness: Harness, piper: TtsBackend, caplog: pytest.LogCaptureFixture
) -> None:
    realm = harness.realm
    prefix = f"ha{realm}"  # the session broker is shared: a prefix of this test's own
    lamp_topic = f"{prefix}/light/0x0017880104e45517/light/config"
    plug_topic = f"{prefix}/switch/ABC123/relay/config"
    hostile = {
        f"{prefix}/light/evil/huge/config": b"{" + b" " * 20_000 + b"}",
        f"{prefix}/light/evil/deep/config": b"[" * 5000,
        f"{prefix}/light/evil/binary/config": bytes(range(256)),
        f"{prefix}/switch/evil/wild/config": b'{"name": "x", "cmd_t": "a/#"}',
        f"{prefix}/sensor/z2m/temperature/config": b'{"name": "t", "stat_t": "t"}',
    }
    mic = topics.MEDIA.build(realm=realm, node_id="mic", stream="audio")
    async with running_bus(harness.config()) as bus:
        configs = {lamp_topic: json.dumps(Z2M_LAMP).encode(),
                   plug_topic: json.dumps(TASMOTA_PLUG).encode(), **hostile}  # fmt: skip
        for topic, payload in configs.items():
            await bus.publish(topic, payload, retain=True, wait=True)
        try:
            seen = Collector()
            await bus.subscribe(topics.EVENT.filter(realm=realm, domain="voice"), seen)
            lamp = Collector()
            await bus.subscribe(LAMP_SET, lamp)
            with caplog.at_level(logging.WARNING, logger="nodes.voice.learn"):
                daemon = await harness.voice_daemon(
                    "sat",
                    source={"type": "mqtt", "topic": mic},
                    wake={"engine": "none"},
                    stt={"initial_prompt": "bedroom lamp, coffee machine", "serve": False},
                    tts={"serve": False, **QUIET},
                    intents={"discovery": {"prefix": prefix}, "chat_fallback": False},
                )
                node = await voice_node(daemon)
                await until(lambda: len(node.registry.discovered) == 2)
                await until(lambda: node.devices.refused >= 4)
            refusals = [r for r in caplog.records if "refused" in r.getMessage()]
            assert len(refusals) == 4  # one line each; the sensor is simply not ours
            names = sorted((e.name, e.area) for e in node.registry)
            assert names == [("Bedroom Lamp", "Bedroom"), ("Coffee Machine", "Kitchen")]
            await speak(bus, mic, said(piper, "Turn off the bedroom lamp."))
            await lamp.wait_for(lambda m: True, timeout=30)
            assert [m.payload for m in lamp.messages] == [b'{"state":"OFF"}']
            await seen.wait_for(lambda m: events(seen, "answer"), timeout=20)
            assert events(seen, "answer")[0][1].value == "Turned off the Bedroom Lamp."
            # zigbee2mqtt reports the state: "is the bedroom lamp on" is answered from it.
            await bus.publish("zigbee2mqtt/Bedroom Lamp", b'{"state":"OFF","brightness":80}')
            await until(lambda: node.registry.states.get("light/0x0017880104e45517/light") == "off")
            # The bridge goes offline: the lamp is not commanded, the satellite says why.
            await bus.publish("zigbee2mqtt/bridge/state", b'{"state":"offline"}')
            await until(lambda: bool(node.registry.unavailable))
            rec = node.recognizer()
            assert rec is not None
            down = rec.recognize("turn on the bedroom lamp")
            assert down is not None and down.actions == [] and "unavailable" in down.speech
            # The config is removed (empty retained): the lamp is forgotten.
            await bus.publish(lamp_topic, b"", retain=True, wait=True)
            await until(lambda: len(node.registry.discovered) == 1)
            assert rec.recognize("turn off the bedroom lamp") is None
        finally:
            for topic in configs:
                await bus.publish(topic, b"", retain=True, wait=True)


async def test_a_configured_device_overrides_a_learned_one(harness: Harness) -> None:
    prefix = f"ha{harness.realm}"
    lamp_topic = f"{prefix}/light/0x0017880104e45517/light/config"
    async with running_bus(harness.config()) as bus:
        await bus.publish(lamp_topic, json.dumps(Z2M_LAMP).encode(), retain=True, wait=True)
        try:
            daemon = await harness.voice_daemon(
                "sat",
                source={"type": "mqtt", "topic": "mic/none"},
                wake={"engine": "none"},
                stt={"serve": False},
                tts={"serve": False},
                intents={
                    "discovery": {"prefix": prefix},
                    "chat_fallback": False,
                    "devices": [
                        {
                            "name": "Bedroom Lamp",
                            "area": "Bedroom",
                            "command_topic": "mine/lamp/set",
                        }
                    ],
                },
            )
            node = await voice_node(daemon)
            await until(lambda: len(node.registry.discovered) == 1)
            rec = node.recognizer()
            assert rec is not None
            intent = rec.recognize("turn on the bedroom lamp")
            assert intent is not None
            assert [a.topic for a in intent.actions] == ["mine/lamp/set"]
        finally:
            await bus.publish(lamp_topic, b"", retain=True, wait=True)
