"""The event history (SQLite, bounded) and clips (MP4 with the pre-capture): unit tests,
then the camera end to end through a real realm with `mtor camera events` / `clip`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from daemon.broker import PrivateBroker
from daemon.orchestrator.service import Orchestrator
from nodes.camera.clips import ClipStore, Recorder
from nodes.camera.config import ClipConfig, HistoryConfig
from nodes.camera.history import EventStore
from tests.conftest import ROOT, make_config, mtor_env, running_bus
from tests.test_camera import (
    H,
    W,
    Watch,
    background,
    camera_daemon,
    camera_node,
    crossing,
    set_armed,
    write_video,
)


def decode(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def obj(oid: str, camera: str, label: str, start: float, **kw: object) -> dict[str, object]:
    return {"id": oid, "camera": camera, "label": label, "start_time": start, **kw}


# ------------------------------------------------------------------- unit


def test_history_is_bounded_per_label_and_camera_and_filters(tmp_path: Path) -> None:
    cfg = HistoryConfig(db=tmp_path / "h.sqlite", max_per_label=3, max_per_camera=5, days=1)
    store = EventStore(cfg)
    now = time.time()
    for i in range(5):
        store.object(obj(f"p{i}", "door", "person", now + i, entered_zones=["porch"]), now + i)
    assert [r["id"] for r in store.query(camera="door")] == ["p4", "p3", "p2"]  # 3 per label
    for i in range(4):
        store.object(obj(f"c{i}", "door", "cat", now + 10 + i), now + 10 + i)
    rows = [r["id"] for r in store.query(camera="door", limit=100)]
    assert rows == ["c3", "c2", "c1", "p4", "p3"]  # 3 cats at most, 5 per camera
    store.object(obj("g1", "garage", "car", now), now)
    assert [r["id"] for r in store.query(label="car")] == ["g1"]
    store.object(obj("c3", "door", "cat", now + 13, end_time=now + 20, verified=True), now + 20)
    (c3,) = store.query(camera="door", label="cat", limit=1)
    assert c3["end_time"] == now + 20 and c3["verified"] is True and c3["stationary"] is False
    assert [r["id"] for r in store.query(zone="porch")] == ["p4", "p3"]  # p2 was pruned
    assert store.query(after=now + 12.5, camera="door")[0]["id"] == "c3"
    store.object(obj("old", "door", "dog", now - 2 * 86400), now)  # older than `days`
    assert store.query(label="dog") == []
    store.review(
        {"id": "r1", "camera": "door", "severity": "alert", "start_time": now, "labels": ["cat"]},
        "r1",
    )
    (rev,) = store.query(kind="reviews", label="cat")
    assert rev["severity"] == "alert" and rev["clip_id"] == "r1"
    store.close()
    again = EventStore(cfg)  # it is a file: the history survives a restart
    assert len(again.query(camera="door", limit=100)) == 5
    again.close()


def frame_of(value: int) -> np.ndarray:
    return np.full((120, 160, 3), value, np.uint8)


def test_a_clip_holds_the_seconds_before_the_event(tmp_path: Path) -> None:
    store = ClipStore(tmp_path / "clips", 10_000_000, 7)
    cfg = ClipConfig(dir=tmp_path / "clips", pre_capture=0.5, post_capture=0.3)
    rec = Recorder("door", cfg, store, fps=10)
    t = 1000.0
    for i in range(20):  # 2 s of frames before anything happens
        rec.feed(frame_of(i * 10), t + i / 10)
    assert rec.start("1000.000000-abcdef", t + 2.0)
    for i in range(20, 25):
        rec.feed(frame_of(i * 10), t + i / 10)
    rec.stop("1000.000000-abcdef", t + 2.45)
    for i in range(25, 30):
        rec.feed(frame_of(i * 10 % 256), t + i / 10)
    assert rec.drain() == ["1000.000000-abcdef"] and rec.recording == []
    path = store.find("1000.000000-abcdef")
    assert path is not None and path.name == "1000.000000-abcdef.mp4"
    frames = decode(path)
    levels = [round(float(f.mean()) / 10) for f in frames]
    # 5 frames of pre-capture (0.5 s at 10 fps: 150..190), the event, 0.3 s after its end
    assert levels[:5] == [15, 16, 17, 18, 19], levels
    assert levels[5] == 20 and 5 + 5 + 3 <= len(frames) <= 5 + 5 + 4, levels
    assert store.find("../etc") is None and store.find("nope") is None
    assert store.usage() == path.stat().st_size


def test_clip_retention_by_size_and_age(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, max_bytes=250, days=1)
    (tmp_path / "door").mkdir()
    now = time.time()
    for i, age in enumerate((3 * 86400, 300, 200, 100)):
        p = tmp_path / "door" / f"{i}.mp4"
        p.write_bytes(b"x" * 100)
        os.utime(p, (now - age, now - age))
    (tmp_path / "door" / "9.part.mp4").write_bytes(b"x" * 1000)  # being written: left alone
    assert store.prune(now) == 2  # the 3-day-old one, then the oldest over 250 bytes
    assert sorted(p.name for p in store.files()) == ["2.mp4", "3.mp4"]
    assert store.usage() == 200


# -------------------------------------------------------------- component


async def test_review_clip_and_history_through_the_realm(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    """A person crosses after 2 s of an empty porch: one review item, its clip (with the
    empty porch before it), the history; `mtor camera events` and `clip` as processes."""
    video = write_video(tmp_path / "walk.avi", [None] * 40 + crossing() + [None] * 60)
    base = {"orchestrator": {"state_dir": str(tmp_path / "orch")}}
    node = camera_node(
        video,
        tmp_path,
        clips={"dir": str(tmp_path / "clips"), "pre_capture": 1.0, "post_capture": 0.5},
        review={"end_seconds": 0.3},
    )
    node["history"] = {"db": str(tmp_path / "events.sqlite")}
    orch = Orchestrator(make_config(broker.url, realm, **base))
    stop = asyncio.Event()
    task = asyncio.create_task(orch.run(stop))
    try:
        config = make_config(broker.url, realm, node_id="cam1", nodes={"c": node}, **base)
        async with running_bus(config) as bus:
            await set_armed(bus, realm, "armed_away")
            watch = Watch(bus, realm)
            await watch.start()
            async with camera_daemon(config):
                clip_ev = await watch.events.wait_for(watch.is_event("vision", "clip"), 60)
                await watch.events.wait_for(watch.is_event("door", "clips_bytes"), 10)
                async with asyncio.timeout(30):
                    while "camera.events" not in orch.registry.free:
                        await asyncio.sleep(0.05)
                env = mtor_env(MTOR_BROKER=broker.url, MTOR_REALM=realm)

                def mtor(*argv: str) -> subprocess.CompletedProcess[str]:
                    return subprocess.run(
                        [sys.executable, "-m", "daemon.cli.main", *argv],
                        capture_output=True,
                        text=True,
                        env=env,
                        cwd=ROOT,
                        timeout=60,
                    )

                listed = await asyncio.to_thread(
                    mtor, "camera", "events", "--label", "person", "--json"
                )
                reviews = await asyncio.to_thread(mtor, "camera", "events", "--reviews")
                out = tmp_path / "got.mp4"
                review = next(e for e in watch.of("vision", "review") if e.attrs["type"] == "end")
                got = await asyncio.to_thread(
                    mtor, "camera", "clip", review.attrs["id"], "-o", str(out)
                )
                missing = await asyncio.to_thread(mtor, "camera", "clip", "1.0-abc")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)

    from daemon.messages import decode as decode_msg
    from daemon.protocol.node import Event

    clip = decode_msg(clip_ev.payload, Event)
    review_events = watch.of("vision", "review")
    (start,) = [e for e in review_events if e.attrs["type"] == "start"]
    assert start.attrs["clip_id"] == start.attrs["id"] == clip.attrs["id"]
    (alarm,) = watch.of("vision", "alarm")
    assert alarm.attrs["clip_id"] == start.attrs["id"]  # the alarm is in the review's clip

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["events"]
    (row,) = rows
    assert row["label"] == "person" and row["review_id"] == start.attrs["id"]
    assert row["end_time"] is not None and row["entered_zones"] == ["porch"]
    assert reviews.returncode == 0 and start.attrs["id"] in reviews.stdout, reviews.stderr

    assert got.returncode == 0, got.stderr
    assert "video/mp4" in got.stdout
    frames = decode(out)
    assert len(frames) >= 20 + 10, len(frames)
    assert frames[0].shape == (H, W, 3)
    # the first second is the empty porch: the pre-capture, before the person came
    empty = float(np.abs(frames[0].astype(int) - background().astype(int)).mean())
    busy = max(float(np.abs(f.astype(int) - background().astype(int)).mean()) for f in frames)
    assert empty < 4 and busy > 10, (empty, busy)
    assert missing.returncode != 0 and "not_found" in missing.stderr + missing.stdout
