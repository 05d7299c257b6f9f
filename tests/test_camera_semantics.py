"""Tracking semantics (unit, pure): stationary objects, object filters and the median
score, loitering in zones, rechecks where the detector did not look, review items,
verdicts on objects."""

from __future__ import annotations

from pathlib import Path

from daemon.broker import PrivateBroker
from nodes.camera.config import ObjectFilter, ReviewConfig, SeverityConfig, TrackingConfig
from nodes.camera.review import ReviewTracker
from nodes.camera.tracker import IoUTracker, Track
from tests.conftest import make_config, running_bus
from tests.test_camera import Watch, camera_daemon, camera_node, write_video

CAR = (0.5, 0.5, 0.8, 0.7)
LEFT = (0.1, 0.4, 0.3, 0.9)


def tracker(**over: float) -> IoUTracker:
    cfg = TrackingConfig(
        min_hits=2,
        max_disappeared=2.0,
        update_interval=0.5,
        stationary_after=3.0,
        stationary_interval=10.0,
        **over,
    )
    return IoUTracker(cfg, lambda b: {"drive"} if b[0] >= 0.5 else {"path"})


def test_a_parked_car_stays_one_stationary_object() -> None:
    tr = tracker()
    kinds = []
    for i in range(12):  # 6 s of the same box, half a second apart
        kinds += [(k, t.stationary) for k, t in tr.update([("car", 0.8, CAR)], i * 0.5)]
    assert kinds[0] == ("new", False)
    assert ("update", True) in kinds  # it became stationary: said once
    assert [k for k, _ in kinds].count("new") == 1
    (car,) = tr.tracks
    assert car.stationary
    # no motion for 14 s: nobody looked, so it is not gone; it is due for a look
    assert tr.expire(20.0) == []
    assert tr.due_checks(20.0) == [car] and tr.due_checks(20.5) == []  # offered once
    assert tr.update([("car", 0.8, CAR)], 20.6) == []  # still there, nothing to say
    assert tr.due_checks(25.0) == []  # stationary: looked at every 10 s
    assert tr.due_checks(30.6) == [car]
    # it drives off: one missed look is not enough, it is looked at again soon
    tr.update([], 30.7)
    assert tr.expire(30.7) == [] and tr.due_checks(31.8) == [car]
    tr.update([], 31.8)
    assert tr.expire(31.8) == []
    tr.update([], 32.7)  # missed on looks spanning max_disappeared: gone
    assert tr.expire(32.7) == [car] and car.end == 32.7
    # never looked at again (detection off): ended all the same, after 3 intervals
    lone = tracker()
    lone.update([("car", 0.8, CAR)], 0.0)
    lone.update([("car", 0.8, CAR)], 0.1)
    assert lone.expire(30.0) == [] and len(lone.expire(32.2)) == 1


def test_a_moving_object_is_not_stationary_and_unseen_ones_are_rechecked() -> None:
    tr = tracker()
    for i in range(12):
        box = (0.05 * i, 0.4, 0.05 * i + 0.2, 0.9)
        tr.update([("person", 0.9, box)], i * 0.5)
    (walker,) = tr.tracks
    assert not walker.stationary
    assert tr.due_checks(5.6) == [] and tr.due_checks(6.6) == [walker]  # unseen 1 s
    tr.update([], 6.7, region=(0.0, 0.0, 0.3, 1.0))  # looked elsewhere: not evidence
    assert walker.last_checked == 5.5
    tr.update([], 7.6, region=(0.5, 0.0, 1.0, 1.0))  # looked where it was
    assert tr.expire(7.6) == [walker]


def test_filters_and_the_median_score_before_an_object_counts() -> None:
    cfg = TrackingConfig(min_hits=1, max_disappeared=2.0)
    filters = {
        "person": ObjectFilter(min_area=0.01, max_ratio=1.0, threshold=0.7, median_frames=3),
        "car": ObjectFilter(min_score=0.6),
    }
    tr = IoUTracker(cfg, lambda b: set(), filters=filters)
    tiny = (0.1, 0.1, 0.15, 0.15)  # 0.0025 of the frame
    wide = (0.1, 0.1, 0.6, 0.3)  # wider than tall: not a standing person
    assert tr.update([("person", 0.9, tiny), ("person", 0.9, wide)], 0.0) == []
    assert tr.filtered == 2 and tr.tracks == []
    assert tr.update([("car", 0.5, CAR)], 0.0) == [] and tr.filtered == 3
    # a person whose first scores are weak is held back until the median is there
    assert tr.update([("person", 0.9, LEFT)], 1.0) == []  # one score: wait for three
    assert tr.update([("person", 0.5, LEFT)], 1.1) == []
    assert tr.update([("person", 0.6, LEFT)], 1.2) == []  # median 0.6 < 0.7: never counts
    assert tr.update([("person", 0.99, LEFT)], 1.3) == []  # only the first three count
    strong = IoUTracker(cfg, lambda b: set(), filters=filters)
    for t in (1.0, 1.1):
        assert strong.update([("person", 0.8, LEFT)], t) == []
    ((kind, _),) = strong.update([("person", 0.6, LEFT)], 1.2)  # median 0.8
    assert kind == "new"


def test_object_masks_drop_detections_standing_in_them(tmp_path: Path) -> None:
    from typing import Any, cast

    from daemon.config import build_config
    from daemon.node import NodeContext
    from nodes.camera.config import CameraConfig
    from nodes.camera.node import CameraNode

    async def announce() -> None:
        return None

    statue = {"points": [[0, 0.5], [0.4, 0.5], [0.4, 1], [0, 1]]}
    cfg = CameraConfig.model_validate(
        {"cameras": {"door": {"source": "0", "objects": {"person": {"masks": [statue]}}}}}
    )
    ctx = NodeContext("cam1", build_config({"nodes": {}}), cast(Any, None), tmp_path, announce)
    cam = CameraNode("c", cfg, ctx).cameras["door"]
    tr = cam.tracker
    tr.config = TrackingConfig(min_hits=1)
    assert tr.update([("person", 0.9, LEFT)], 0.0) == []  # stands in the statue's mask
    assert tr.filtered == 1
    assert [k for k, _ in tr.update([("cat", 0.9, LEFT)], 0.1)] == ["new"]  # persons only
    assert [k for k, _ in tr.update([("person", 0.9, CAR)], 0.2)] == ["new"]  # elsewhere


def test_loitering_time_delays_a_zone() -> None:
    cfg = TrackingConfig(min_hits=1, max_disappeared=5.0, update_interval=0.0)
    tr = IoUTracker(cfg, lambda b: {"porch"}, loitering={"porch": 2.0})
    ((kind, t),) = tr.update([("person", 0.9, LEFT)], 0.0)
    assert kind == "new" and t.zones == set()  # in the porch, not loitering yet
    tr.update([("person", 0.9, LEFT)], 1.0)
    assert t.zones == set()
    ((kind, _),) = tr.update([("person", 0.9, LEFT)], 2.1)
    assert kind == "update" and t.zones == {"porch"} and t.entered_zones == ["porch"]


def test_a_verdict_is_reported_on_the_object() -> None:
    tr = tracker()
    tr.update([("person", 0.9, LEFT)], 0.0)
    ((_, t),) = tr.update([("person", 0.9, LEFT)], 0.1)
    assert t.verified is None
    assert tr.verdict(t, True, 0.2) == "update" and t.verified is True
    assert tr.verdict(t, True, 0.3) is None  # said already


def obj(oid: str, label: str, zones: set[str] | None = None, snap: float = 0.0) -> Track:
    return Track(oid, label, LEFT, 0.9, 0.0, 0.0, zones=zones or set(), snapshot_score=snap)


def test_review_items_group_overlapping_objects_and_notify_once() -> None:
    rv = ReviewTracker(ReviewConfig(end_seconds=2.0), "door")
    dog, person = obj("d", "dog"), obj("p", "person", {"porch"}, snap=0.9)
    ((kind, item),) = rv.on_object("new", dog, 0.0)
    assert kind == "start" and item.severity == "detection" and item.labels == ["dog"]
    ((kind, same),) = rv.on_object("new", person, 0.5)  # joins: one item, now an alert
    assert kind == "update" and same is item and item.severity == "alert"
    assert item.objects == {"d": "dog", "p": "person"} and item.zones == ["porch"]
    assert item.snapshot_id == "p"
    assert rv.on_object("update", person, 1.0) == []  # nothing new to a reviewer
    assert rv.on_object("end", dog, 3.0) == [] and rv.expire(9.0) == []  # the person stays
    assert rv.on_object("end", person, 4.0) == []
    assert rv.expire(5.0) == []  # within end_seconds
    ((kind, done),) = rv.expire(6.1)
    assert kind == "end" and done is item and item.end == 6.1
    ((kind, nxt),) = rv.on_object("new", obj("c", "cat"), 7.0)
    assert kind == "start" and nxt.id != item.id


def test_review_severity_follows_labels_and_required_zones() -> None:
    cfg = ReviewConfig(
        alerts=SeverityConfig(labels=["person"], required_zones=["porch"]),
        detections=SeverityConfig(labels=["person", "car"]),
    )
    rv = ReviewTracker(cfg, "door")
    assert rv.severity(obj("a", "person", {"porch"})) == "alert"
    assert rv.severity(obj("b", "person", {"street"})) == "detection"
    assert rv.severity(obj("c", "bird")) is None
    assert rv.on_object("new", obj("c", "bird"), 0.0) == []  # not reviewed at all
    assert rv.close(1.0) == []


# -------------------------------------------------------------- component


async def test_a_person_who_stops_stays_one_object_and_one_review(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    """Walks in, stands still for 7 s (no motion: the background learns them), leaves."""
    xs: list[int | None] = [None] * 5 + list(range(40, 120, 4)) + [120] * 140 + [None] * 80
    video = write_video(tmp_path / "stop.avi", xs)
    node = camera_node(
        video,
        tmp_path,
        tracking={
            "min_hits": 2,
            "max_disappeared": 1.0,
            "update_interval": 0.3,
            "stationary_after": 2.0,
            "stationary_interval": 1.0,
        },
        review={"end_seconds": 0.5},
    )
    config = make_config(broker.url, realm, node_id="cam1", nodes={"c": node})
    async with running_bus(config) as bus:
        watch = Watch(bus, realm)
        await watch.start()
        async with camera_daemon(config):
            await watch.events.wait_for(watch.is_event("vision", "review", type="end"), 60)
    objects = watch.of("vision", "object")
    assert len({e.attrs["id"] for e in objects}) == 1, [e.attrs for e in objects]
    kinds = [e.attrs["event"] for e in objects]
    assert kinds[0] == "new" and kinds[-1] == "end" and kinds.count("new") == 1
    assert any(e.attrs["stationary"] for e in objects), "it never became stationary"
    assert objects[0].value == "person" and objects[0].attrs["verified"] is None
    end = objects[-1]
    assert end.attrs["end_time"] - end.attrs["start_time"] > 6  # through the still part
    reviews = watch.of("vision", "review")
    types = [r.attrs["type"] for r in reviews]
    assert types[0] == "start" and types.count("start") == 1
    assert reviews[-1].attrs["type"] == "end" and reviews[0].value == "alert"
    assert reviews[0].attrs["objects"] == [objects[0].attrs["id"]]
    assert reviews[0].attrs["labels"] == ["person"] and reviews[0].attrs["camera"] == "door"
