"""Every MQTT topic of the realm is built and matched here, and only here.

Handlers never split topics themselves: a :class:`TopicPattern` builds a topic
from named fields, turns itself into a subscription filter (unknown fields
become ``+``) and parses a concrete topic back into its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Final, TypeGuard

from daemon.textcheck import valid_topic_name

ROOT: Final = "mtor"
SHARE_PREFIX: Final = "$share/"


def _check_segment(name: str, value: str) -> str:
    if not value or "/" in value or "+" in value or "#" in value or "\0" in value:
        raise ValueError(f"invalid topic segment for {name!r}: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A topic template such as ``mtor/{realm}/node/{node_id}/state``.

    A field written ``{name...}`` as the last segment captures the rest of the
    topic (it may contain ``/``) and becomes ``#`` in a filter.
    """

    template: str

    @property
    def _segments(self) -> tuple[str, ...]:
        return _split_template(self.template)

    def build(self, **fields: str) -> str:
        out: list[str] = []
        for seg in self._segments:
            if seg.startswith("{"):
                name = seg.strip("{}.")
                if name not in fields:
                    raise KeyError(f"topic {self.template!r} needs field {name!r}")
                value = fields[name]
                if seg.endswith("...}"):
                    for part in value.split("/"):
                        _check_segment(name, part)
                    out.append(value)
                else:
                    out.append(_check_segment(name, value))
            else:
                out.append(seg)
        return "/".join(out)

    def filter(self, **fields: str) -> str:
        """A subscription filter: given fields are fixed, the others are wildcards."""
        out: list[str] = []
        for seg in self._segments:
            if seg.startswith("{"):
                name = seg.strip("{}.")
                if name in fields:
                    out.append(fields[name])
                else:
                    out.append("#" if seg.endswith("...}") else "+")
            else:
                out.append(seg)
        return "/".join(out)

    def parse(self, topic: str) -> dict[str, str] | None:
        """The fields of ``topic``, or ``None`` when it does not fit the pattern."""
        segs = self._segments
        parts = topic.split("/")
        fields: dict[str, str] = {}
        for i, seg in enumerate(segs):
            if seg.endswith("...}"):
                if i >= len(parts):
                    return None
                fields[seg.strip("{}.")] = "/".join(parts[i:])
                return fields
            if i >= len(parts):
                return None
            if seg.startswith("{"):
                fields[seg.strip("{}")] = parts[i]
            elif seg != parts[i]:
                return None
        return fields if len(parts) == len(segs) else None


@lru_cache(maxsize=256)
def _split_template(template: str) -> tuple[str, ...]:
    return tuple(template.split("/"))


# The topic space.  docs/protocol.md is the contract that documents these.
NODE_STATE: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/state")
NODE_INFO: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/info")
NODE_HEALTH: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/health")
NODE_ANY: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/{kind}")  # state, info, ...
NODE_CMD: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/cmd/{command}")
NODE_TASK: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/task")
EVENT_ROOT: Final = TopicPattern(ROOT + "/{realm}/event")  # + a filter below it
EVENT: Final = TopicPattern(ROOT + "/{realm}/event/{node_id}/{domain}/{name}")
MEDIA: Final = TopicPattern(ROOT + "/{realm}/media/{node_id}/{stream...}")
# Request topics end in the sender's identity: its MQTT username, which the
# generated broker ACL lets each account write only as itself (docs/security.md).
TASK_SUBMIT: Final = TopicPattern(ROOT + "/{realm}/task/submit/{user}")
TASK_CONTROL: Final = TopicPattern(ROOT + "/{realm}/task/control/{user}")
TASK_WORKER: Final = TopicPattern(ROOT + "/{realm}/task/worker/{node_id}")
ORCH_STATE: Final = TopicPattern(ROOT + "/{realm}/orchestrator/state")
ORCH_STATS: Final = TopicPattern(ROOT + "/{realm}/orchestrator/stats")
ORCH_ADMIN: Final = TopicPattern(ROOT + "/{realm}/orchestrator/admin/{user}")
# High availability (docs/operations.md): who is active, the active's task changes for
# the standbys, and each orchestrator instance's own presence.
ORCH_LEASE: Final = TopicPattern(ROOT + "/{realm}/orchestrator/lease")
ORCH_JOURNAL: Final = TopicPattern(ROOT + "/{realm}/orchestrator/journal")
ORCH_INSTANCE: Final = TopicPattern(ROOT + "/{realm}/orchestrator/instance/{name}/state")
# Replies to an account: only the orchestrator writes other accounts' reply topics,
# and each account reads only its own.
REPLY: Final = TopicPattern(ROOT + "/{realm}/reply/{user}/{rest...}")
CLI_SENTINEL: Final = TopicPattern(ROOT + "/{realm}/reply/{user}/cli/{token}")  # cli.inspect
# Realm state (armed, mode, presence, ...): the retained value, and where to ask to change it.
STATE: Final = TopicPattern(ROOT + "/{realm}/state/{key}")
STATE_SET: Final = TopicPattern(ROOT + "/{realm}/state/{key}/set/{user}")
# Commands to a node's controllable entity (daemon.entities.EntityCommand).
ENTITY_SET: Final = TopicPattern(ROOT + "/{realm}/node/{node_id}/entity/{object_id}/set")
# Workflows: run events of one workflow, and requests (run / list / history) to the engine.
WORKFLOW_EVENT: Final = TopicPattern(ROOT + "/{realm}/workflow/{name}/event")
WORKFLOW_REQUEST: Final = TopicPattern(ROOT + "/{realm}/workflows/request/{user}")
# Swarm (docs/protocol.md, Swarm): every message on swarm/<kind>/<sender>, the sender
# being the account that wrote it (robot state, missions, bids, calls, awards, acks,
# progress); one subscription to SWARM_ANY.filter() hears the whole auction.
SWARM_ANY: Final = TopicPattern(ROOT + "/{realm}/swarm/{kind}/{sender}")
SWARM_ROBOT: Final = TopicPattern(ROOT + "/{realm}/swarm/robot/{sender}")
SWARM_MISSION: Final = TopicPattern(ROOT + "/{realm}/swarm/mission/{sender}")
SWARM_BID: Final = TopicPattern(ROOT + "/{realm}/swarm/bid/{sender}")
SWARM_CALL: Final = TopicPattern(ROOT + "/{realm}/swarm/call/{sender}")
SWARM_AWARD: Final = TopicPattern(ROOT + "/{realm}/swarm/award/{sender}")
SWARM_ACK: Final = TopicPattern(ROOT + "/{realm}/swarm/ack/{sender}")
SWARM_PROGRESS: Final = TopicPattern(ROOT + "/{realm}/swarm/progress/{sender}")


def shared(group: str, topic_filter: str) -> str:
    """A shared-subscription filter (MQTT 5 ``$share/<group>/<filter>``)."""
    return f"{SHARE_PREFIX}{_check_segment('group', group)}/{topic_filter}"


def strip_share(topic_filter: str) -> str:
    """The plain filter inside a ``$share/<group>/...`` filter (unchanged otherwise)."""
    if topic_filter.startswith(SHARE_PREFIX):
        _, _, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
        return rest
    return topic_filter


MAX_REPLY_TOPIC: Final = 512


def valid_reply_topic(topic: str | None) -> TypeGuard[str]:
    """A topic a requester may be answered on: a valid MQTT topic name (no wildcards,
    no U+0000, no surrogates), shorter than MAX_REPLY_TOPIC."""
    if not topic or len(topic) >= MAX_REPLY_TOPIC:
        return False
    return valid_topic_name(topic)


def validate_filter(topic_filter: str) -> str:
    """Check MQTT filter syntax: ``#`` only last and alone, ``+`` alone in a level."""
    plain = strip_share(topic_filter)
    if not plain:
        raise ValueError(f"empty topic filter: {topic_filter!r}")
    levels = plain.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


@lru_cache(maxsize=1024)
def _filter_levels(topic_filter: str) -> tuple[str, ...]:
    return tuple(strip_share(topic_filter).split("/"))


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching, including ``+``, ``#`` and ``$share`` filters.

    Topics starting with ``$`` are not matched by a leading wildcard (MQTT 5 §4.7.2).
    """
    flevels = _filter_levels(topic_filter)
    tlevels = topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False
    for i, f in enumerate(flevels):
        if f == "#":
            return True
        if i >= len(tlevels):
            return False
        if f not in ("+", tlevels[i]):
            return False
    return len(flevels) == len(tlevels)


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters (``$share/<group>/`` ignored)."""
    la, lb = _filter_levels(a), _filter_levels(b)
    for x, y in zip(la, lb, strict=False):
        if x == "#" or y == "#":
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(la) == len(lb):
        return True
    longer = la if len(la) > len(lb) else lb
    return longer[min(len(la), len(lb))] == "#"  # "a/b" and "a/b/#" share "a/b"


def realm_filter(realm: str) -> str:
    """Everything of one realm."""
    return f"{ROOT}/{_check_segment('realm', realm)}/#"


# Home Assistant MQTT discovery lives under its own prefix, outside the realm's root.


def ha_discovery(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """``<prefix>/<component>/<node_id>/<object_id>/config`` (Home Assistant's layout)."""
    for name, value in (("component", component), ("node_id", node_id), ("object_id", object_id)):
        _check_segment(name, value)
    return f"{prefix}/{component}/{node_id}/{object_id}/config"


def ha_discovery_filter(prefix: str, node_id: str) -> str:
    """Every discovery config of one HA node id: ``<prefix>/+/<node_id>/+/config``."""
    return f"{prefix}/+/{_check_segment('node_id', node_id)}/+/config"


def ha_discovery_parse(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """``(component, node_id, object_id)`` of a discovery topic under ``prefix``, or None."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/config"):
        return None
    parts = topic[len(head) : -len("/config")].split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def ha_discovery_any_filters(prefix: str) -> tuple[str, str]:
    """Every discovery config under ``prefix``, with and without a node id level:
    ``<prefix>/+/+/config`` and ``<prefix>/+/+/+/config`` (what bridges publish)."""
    return f"{prefix}/+/+/config", f"{prefix}/+/+/+/config"


def ha_discovery_parse_any(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """``(component, node_id, object_id)`` of a discovery topic with or without its
    node id level (node_id ``""`` when it has none); None for any other topic."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/config"):
        return None
    parts = topic[len(head) : -len("/config")].split("/")
    if len(parts) == 2 and all(parts):
        return parts[0], "", parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    return None
