from __future__ import annotations

import pytest

from daemon import topics


def test_build_parse_roundtrip() -> None:
    t = topics.EVENT.build(realm="home", node_id="pi1", domain="sensor", name="load")
    assert t == "mtor/home/event/pi1/sensor/load"
    assert topics.EVENT.parse(t) == {
        "realm": "home",
        "node_id": "pi1",
        "domain": "sensor",
        "name": "load",
    }
    assert topics.EVENT.parse("mtor/home/event/pi1/sensor") is None
    assert topics.EVENT.parse("mtor/home/event/pi1/sensor/load/extra") is None
    assert topics.NODE_STATE.parse(t) is None


def test_rest_field_captures_levels() -> None:
    t = topics.MEDIA.build(realm="r", node_id="cam", stream="snapshot/front")
    assert t == "mtor/r/media/cam/snapshot/front"
    assert topics.MEDIA.parse(t) == {"realm": "r", "node_id": "cam", "stream": "snapshot/front"}
    assert topics.MEDIA.filter(realm="r") == "mtor/r/media/+/#"


def test_filter_wildcards() -> None:
    assert topics.NODE_STATE.filter(realm="home") == "mtor/home/node/+/state"
    assert topics.EVENT.filter(realm="home", domain="sensor") == "mtor/home/event/+/sensor/+"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x#", "nul\0"])
def test_segments_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid topic segment"):
        topics.NODE_STATE.build(realm="home", node_id=bad)


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/a/+", "b/b", False),
        ("a/b", "a/c", False),
    ],
)
def test_matches(flt: str, topic: str, ok: bool) -> None:
    assert topics.matches(flt, topic) is ok


def test_shared_and_validate() -> None:
    f = topics.shared("workers", "mtor/home/task/submit")
    assert f == "$share/workers/mtor/home/task/submit"
    assert topics.strip_share(f) == "mtor/home/task/submit"
    for bad in ["a/#/b", "a/b#", "a+/b", ""]:
        with pytest.raises(ValueError):
            topics.validate_filter(bad)
    assert topics.validate_filter("a/+/#") == "a/+/#"
