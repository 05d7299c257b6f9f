"""Checks at the edge for hostile input: text, MQTT topic names, JSON nesting.

Pure functions, no I/O.  The bus refuses to publish on a topic that
:func:`valid_topic_name` rejects (Mosquitto closes the connection of a
client that sends one, and an unacknowledged publish would be sent again on
every reconnect); :mod:`daemon.messages` refuses payloads that
:func:`json_too_deep` or :func:`lone_surrogate_escape` flag before it parses
or validates them.
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache
from typing import Final

# MQTT 5 (1.5.4): a UTF-8 string, topic names included, is at most 65,535 bytes.
MAX_TOPIC_BYTES: Final = 65_535
# JSON deeper than this is refused before anything recurses into it.  Our own
# messages nest a handful of levels; pydantic's parser gives up at ~200 and
# Python's json (and everything that walks the result) at ~1,000 frames.
MAX_NESTING: Final = 32
# Topics repeat (reply topics per client, task topics per node): the verdict is kept.
TOPIC_CACHE: Final = 4096

# A \uD800-\uDFFF escape: half of a surrogate pair, or a lone one (not a character).
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_BRACKETS: Final = b"[]{}"
# bytes.translate table: an opening bracket becomes +1, a closing one -1 (as signed bytes).
_DEPTH_TABLE: Final = bytes(1 if b in b"[{" else 0xFF if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in _BRACKETS)


def has_surrogate(text: str) -> bool:
    """A lone UTF-16 surrogate (U+D800-U+DFFF) in ``text``: not encodable as UTF-8."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def text_problem(text: str) -> str | None:
    """Why ``text`` may not go into an MQTT string (1.5.4), or None if it may."""
    if "\0" in text:
        return "contains U+0000"
    if has_surrogate(text):
        return "contains a lone surrogate (not UTF-8)"
    return None


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT topic name to publish on (4.7), or None."""
    if not topic:
        return "empty"
    if "+" in topic or "#" in topic:
        return "contains a wildcard (+ or #)"
    problem = text_problem(topic)
    if problem is not None:
        return problem
    size = len(topic) if topic.isascii() else len(topic.encode())
    if size > MAX_TOPIC_BYTES:
        return f"{size} bytes long (at most {MAX_TOPIC_BYTES})"
    return None


@lru_cache(maxsize=TOPIC_CACHE)
def valid_topic_name(topic: str) -> bool:
    """May a PUBLISH carry ``topic`` (set, no wildcard, no U+0000, UTF-8, bounded)?"""
    return topic_name_problem(topic) is None


def json_too_deep(data: bytes | bytearray, limit: int = MAX_NESTING) -> bool:
    """Does the JSON text ``data`` nest arrays/objects deeper than ``limit``?

    Cheap for what the realm sends: when the document has no more brackets
    than ``limit`` it cannot nest deeper, and only then is it scanned (brackets
    inside strings do not count).  The scan is C-speed byte operations, no
    recursion, so it is safe on any input, valid JSON or not.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Inside strings, '\\' and '\"' are the only escapes that could hide a quote: drop
    # them (left to right, as a JSON reader pairs them), then every other piece between
    # quotes is outside a string.
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(text.split(b'"')[::2])
    if b"[" * (limit + 1) in outside or b"{" * (limit + 1) in outside:
        return True  # the usual hostile shape, found without walking every bracket
    steps = memoryview(outside.translate(_DEPTH_TABLE, _NOT_BRACKETS)).cast("b")
    return max(itertools.accumulate(steps), default=0) > limit


def lone_surrogate_escape(data: bytes | bytearray) -> bool:
    """Could ``data`` hold a ``\\uD800``-``\\uDFFF`` escape (a screen: pairs match too)?"""
    return _SURROGATE_ESCAPE.search(data) is not None
