"""A security rule as a workflow, end to end: camera → tracked object event →
(armed?) → spoken announcement on the kitchen speaker + alarm publish.

Real parts only: a private Mosquitto, the orchestrator with its workflow
engine and realm state store, a camera node daemon reading a generated video
(the astronaut walking through the porch zone) with the YOLO model, and a
voice node daemon whose ``tts`` (piper) writes what it says to a WAV file —
which is transcribed back with whisper to check what was said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.config import Config
from daemon.messages import decode
from daemon.modelstore import ModelStore
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.node import Event
from daemon.protocol.state import StateSet
from daemon.protocol.workflow import WorkflowEvent
from daemon.runtime import NodeDaemon
from nodes.voice import audio
from nodes.voice.config import SttConfig
from nodes.voice.stt import make_stt
from tests.conftest import Collector, make_config, running_bus
from tests.test_camera import camera_node, crossing, write_video

RULE: dict[str, Any] = {
    "description": "a person on the porch while armed: say so in the kitchen, raise the alarm",
    "triggers": [
        {
            "type": "event",
            "topic": "+/vision/object",
            "match": {"attrs.event": "new", "attrs.label": "person"},
        }
    ],
    "conditions": [
        {"field": "trigger.attrs.zones", "op": "contains", "value": "porch"},
        {"state": "armed", "op": "in", "value": ["armed_away", "armed_night"]},
    ],
    "cooldown": 3600,
    "steps": [
        {
            "parallel": [
                [
                    {
                        "id": "say",
                        "task": "tts",
                        "node": "kitchen",
                        "timeout": 60,
                        "input": {
                            "text": "Attention. Someone is at the {{ trigger.attrs.camera }}.",
                            "play": True,
                        },
                    }
                ],
                [
                    {
                        "publish": "~/alarm/{{ trigger.attrs.camera }}",
                        "payload": {
                            "camera": "{{ trigger.attrs.camera }}",
                            "track": "{{ trigger.attrs.id }}",
                            "snapshot": "{{ trigger.attrs.snapshot_id }}",
                        },
                    }
                ],
            ]
        },
    ],
}


@contextlib.asynccontextmanager
async def running(*runners: Any) -> AsyncIterator[None]:
    stops = [asyncio.Event() for _ in runners]
    tasks = [asyncio.create_task(r.run(s)) for r, s in zip(runners, stops, strict=True)]
    try:
        yield
    finally:
        for stop in stops:
            stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)


def configs(broker: PrivateBroker, realm: str, tmp: Path, video: Path) -> list[Config]:
    orch = make_config(
        broker.url,
        realm,
        orchestrator={"state_dir": str(tmp / "orch")},
        workflows={"porch_person": RULE},
    )
    cam = make_config(
        broker.url,
        realm,
        node_id="cam1",
        nodes={"c": camera_node(video, tmp, alarm=None)},  # the workflow decides
    )
    kitchen = make_config(
        broker.url,
        realm,
        node_id="kitchen",
        nodes={
            "v": {
                "type": "voice",
                "stt": {"serve": False},
                "tts": {"noise_scale": 0, "noise_w_scale": 0},
                "sink": {"type": "file", "path": str(tmp / "kitchen.wav")},
            }
        },
    )
    return [orch, cam, kitchen]


async def test_armed_porch_person_is_announced_in_the_kitchen_once(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    gap: list[int | None] = [None] * 60
    # crossing 1 while disarmed, crossing 2 armed, crossing 3 armed (cooldown)
    video = write_video(
        tmp_path / "porch.avi",
        gap[:40] + crossing() + gap + gap + crossing() + gap + crossing() + gap,
    )
    orch_cfg, cam_cfg, kitchen_cfg = configs(broker, realm, tmp_path, video)
    async with running_bus(orch_cfg) as bus:
        runs, alarms, objects = Collector(), Collector(), Collector()
        await bus.subscribe(topics.WORKFLOW_EVENT.build(realm=realm, name="porch_person"), runs)
        await bus.subscribe(topics.ROOT + f"/{realm}/alarm/#", alarms)
        await bus.subscribe(
            topics.EVENT.build(realm=realm, node_id="cam1", domain="vision", name="object"), objects
        )
        orch = Orchestrator(orch_cfg)
        kitchen = NodeDaemon(kitchen_cfg)
        async with running(orch, kitchen):
            await asyncio.wait_for(orch._online.wait(), 15)
            await asyncio.wait_for(kitchen._online.wait(), 60)
            await set_armed(bus, realm, "disarmed")
            async with running(NodeDaemon(cam_cfg)):
                # crossing 1: the person is seen, the rule's condition is false
                first = await objects.wait_for(is_new, timeout=90)
                await armed_after_first_crossing(bus, realm, objects, first)
                # crossings 2 and 3: one run (cooldown), one announcement
                started = await runs.wait_for(run_event("finished"), timeout=120)
                await objects.wait_for(nth_new(3), timeout=120)
                await asyncio.sleep(1.0)
    finished = decode(started.payload, WorkflowEvent)
    assert finished.status == "done", finished
    assert [decode(m.payload, WorkflowEvent).kind for m in runs.messages].count("started") == 1
    assert len(alarms.messages) == 1
    assert alarms.messages[0].topic.endswith("/alarm/door")
    # the person of the second crossing, the first one after arming (not the first, nor the third)
    new_ids = [decode(m.payload, Event).attrs["id"] for m in objects.messages if is_new(m)]
    assert len(new_ids) == 3, new_ids
    assert json.loads(alarms.messages[0].payload)["track"] == new_ids[1]
    said = audio.read_wav(tmp_path / "kitchen.wav")
    assert len(said) > audio.RATE  # more than half a second of speech
    stt = make_stt(SttConfig(), ModelStore.default().path("whisper-tiny-en"), "whisper-tiny-en")
    text = (await asyncio.to_thread(stt.transcribe, said)).text.lower()
    assert "someone" in text and "door" in text, text


async def set_armed(bus: Any, realm: str, value: str) -> None:
    topic = topics.STATE_SET.build(realm=realm, key="armed", user="test")
    await bus.publish(topic, StateSet(value=value))


def is_new(m: Any) -> bool:
    return bool(decode(m.payload, Event).attrs.get("event") == "new")


def nth_new(n: int) -> Any:
    seen: set[int] = set()

    def pred(m: Any) -> bool:
        ev = decode(m.payload, Event)
        if ev.attrs.get("event") == "new":
            seen.add(ev.attrs["id"])
        return len(seen) >= n

    return pred


def run_event(kind: str) -> Any:
    def pred(m: Any) -> bool:
        return decode(m.payload, WorkflowEvent).kind == kind

    return pred


async def armed_after_first_crossing(bus: Any, realm: str, objects: Collector, first: Any) -> None:
    """Arm once the first person has left (its track ended)."""
    track = decode(first.payload, Event).attrs["id"]

    def ended(m: Any) -> bool:
        ev = decode(m.payload, Event)
        return bool(ev.attrs.get("id") == track and ev.attrs.get("event") == "end")

    await objects.wait_for(ended, timeout=60)
    await set_armed(bus, realm, "armed_away")
