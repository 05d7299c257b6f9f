"""Timers by voice, announcements (voice.announce, the broadcast intent) and voice.listen,
on a real broker with an orchestrator, piper speaking the commands and whisper hearing them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.client import RealmClient
from daemon.modelstore import ModelStore
from daemon.protocol.task import Constraints
from nodes.voice import audio
from nodes.voice.config import TtsConfig
from nodes.voice.tts import TtsBackend, make_tts
from tests.conftest import Collector, running_bus
from tests.test_voice_devices import voice_node
from tests.test_voice_realm import QUIET, Harness, events, words

SILENCE = bytes(16000)


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


async def speak(bus: Bus, mic: str, tts: TtsBackend, text: str) -> None:
    pcm = SILENCE + b"".join(tts.synthesize(text)) + SILENCE * 3
    for i in range(0, len(pcm), audio.FRAME_BYTES):
        await bus.publish(mic, pcm[i : i + audio.FRAME_BYTES], qos=0)
        await asyncio.sleep(0.002)


def satellite(mic: str, area: str, **extra: Any) -> dict[str, Any]:
    return {
        "source": {"type": "mqtt", "topic": mic},
        "wake": {"engine": "none"},
        "area": area,
        "stt": {"initial_prompt": "timer, broadcast, dinner", "serve": False},
        "tts": {"serve": False, **QUIET},
        "sink": {"type": "mqtt"},
        "intents": {"chat_fallback": False},
        **extra,
    }


async def ready(client: RealmClient, capability: str, inp: Any, node: str) -> Any:
    """Call once the orchestrator has seen the node's advert."""
    async with asyncio.timeout(20):
        while True:
            with contextlib.suppress(Exception):
                return await client.call(capability, inp, timeout=5,
                                         constraints=Constraints(node=node))  # fmt: skip
            await asyncio.sleep(0.3)


async def test_a_timer_by_voice_rings_and_is_announced(harness: Harness, piper: TtsBackend) -> None:
    realm = harness.realm
    mic = topics.MEDIA.build(realm=realm, node_id="mic-k", stream="audio")
    async with running_bus(harness.config()) as bus:
        seen = Collector()
        await bus.subscribe(topics.EVENT.filter(realm=realm, domain="voice"), seen)
        daemon = await harness.voice_daemon("kitchen", **satellite(mic, "kitchen"))
        await seen.wait_for(lambda m: events(seen, "state"), timeout=30)
        # Home Assistant sees the timers (a sensor on the retained event) and a listen button.
        node = await voice_node(daemon)
        entities = {e.object_id: e for e in node.entities()}
        assert entities["sat_timers"].state_topic == topics.EVENT.build(
            realm=realm, node_id="kitchen", domain="voice", name="timers"
        )
        assert entities["sat_listen"].component == "button"
        assert entities["sat_listen"].on_command is not None
        await speak(bus, mic, piper, "Set a timer for 3 seconds.")
        await seen.wait_for(lambda m: events(seen, "answer"), timeout=30)
        assert [e.value for _, e in events(seen, "answer")] == ["3 seconds timer started."]
        running = [e for _, e in events(seen, "timers")]
        assert running[0].value == 1 and running[0].attrs["timers"][0]["seconds"] == 3
        await seen.wait_for(lambda m: events(seen, "announced"), timeout=15)
        finished = [e for _, e in events(seen, "timer_finished")]
        assert [e.value for e in finished] == ["3 seconds timer"]
        said = events(seen, "announced")[0][1]
        assert said.value == "Your 3 seconds timer is done." and said.attrs["spoken"] is True
        assert [e.value for _, e in events(seen, "timers")][-1] == 0
    # The retained timers state is what a dashboard sees on connect.
    async with running_bus(harness.config()) as bus:
        state = Collector()
        await bus.subscribe(
            topics.EVENT.build(realm=realm, node_id="kitchen", domain="voice", name="timers"), state
        )
        retained = await state.wait_for(lambda m: m.retain, timeout=5)
        assert b'"timers":[]' in retained.payload


async def test_announce_to_an_area_or_all_and_broadcast_and_listen(
    harness: Harness, piper: TtsBackend
) -> None:
    realm = harness.realm
    await harness.orchestrator()
    mic = {n: topics.MEDIA.build(realm=realm, node_id=f"mic-{n}", stream="audio") for n in "kb"}
    async with running_bus(harness.config()) as bus:
        seen = Collector()
        await bus.subscribe(topics.EVENT.filter(realm=realm, domain="voice"), seen)
        await harness.voice_daemon("kitchen", **satellite(mic["k"], "kitchen"))
        await harness.voice_daemon(
            "bedroom", **satellite(mic["b"], "bedroom", wake={"engine": "micro"})
        )
        client = RealmClient(bus, realm)
        await client.start()
        out = await ready(client, "voice.announce", {"text": "The washing is done.",
                                                     "area": "kitchen"}, "kitchen")  # fmt: skip
        assert out["area"] == "kitchen"
        await seen.wait_for(lambda m: events(seen, "announced"), timeout=20)
        await asyncio.sleep(1.0)  # the bedroom stays quiet
        assert [(n, e.value) for n, e in events(seen, "announced")] == [
            ("kitchen", "The washing is done.")
        ]
        # To all: any satellite's node may run the task; both speak.
        await client.call("voice.announce", {"text": "Dinner in five minutes."}, timeout=10)
        await seen.wait_for(lambda m: len(events(seen, "announced")) >= 3, timeout=20)
        assert sorted(n for n, e in events(seen, "announced")[1:]) == ["bedroom", "kitchen"]
        # "Broadcast ..." said in the kitchen: the others hear it, the kitchen does not.
        # (whisper tiny hears piper's "Broadcast dinner is ready." as "Rock s dinner ...")
        await speak(bus, mic["k"], piper, "Please broadcast: dinner is ready.")
        await seen.wait_for(lambda m: len(events(seen, "announced")) >= 4, timeout=30)
        await asyncio.sleep(1.0)
        last = events(seen, "announced")[3:]
        assert [(n, words(str(e.value))) for n, e in last] == [("bedroom", "dinner is ready")]
        # voice.listen: the bedroom (a wake word satellite, idle) listens without it.
        out = await ready(client, "voice.listen", {}, "bedroom")
        assert out == {"satellite": "sat", "listening": True}
        await seen.wait_for(
            lambda m: any(n == "bedroom" and e.value == "listen" for n, e in events(seen, "wake")),
            timeout=10,
        )
        with pytest.raises(Exception, match="bad_input"):
            await client.call("voice.listen", {"satellite": "nobody"}, timeout=10,
                              constraints=Constraints(node="bedroom"))  # fmt: skip
