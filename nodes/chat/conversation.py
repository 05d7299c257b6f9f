"""Bounded conversation memory: follow-up questions keep their context.

History is kept per ``(user, conversation_id)`` — two users never see each
other's turns even if they pick the same id.  Each conversation is bounded
in messages and characters (oldest turns dropped first, so it always starts
with a user turn), the number of conversations is LRU-bounded, and an idle
conversation is forgotten after a TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nodes.chat.backends.base import Message

Key = tuple[str, str]


@dataclass
class _Conversation:
    messages: list[Message] = field(default_factory=list)
    used: float = 0.0


class Conversations:
    def __init__(
        self,
        *,
        max_conversations: int = 256,
        max_messages: int = 16,
        max_chars: int = 8000,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.max_chars = max_chars
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[Key, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def key(user: str | None, conversation_id: str) -> Key:
        return (user or "", conversation_id)

    def history(self, key: Key) -> list[Message]:
        """The remembered messages of a conversation (a copy; empty if unknown)."""
        self._expire()
        conv = self._items.get(key)
        if conv is None:
            return []
        conv.used = self._clock()
        self._items.move_to_end(key)
        return [dict(m) for m in conv.messages]

    def append(self, key: Key, messages: list[Message]) -> None:
        """Add the turns of one exchange (the user's messages and the reply)."""
        self._expire()
        conv = self._items.get(key) or _Conversation()
        conv.messages.extend(dict(m) for m in messages)
        conv.used = self._clock()
        _trim(conv.messages, self.max_messages, self.max_chars)
        self._items[key] = conv
        self._items.move_to_end(key)
        while len(self._items) > self.max_conversations:
            self._items.popitem(last=False)

    def forget(self, key: Key) -> None:
        self._items.pop(key, None)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        # Oldest first (LRU order), so stop at the first fresh one.
        while self._items:
            key, conv = next(iter(self._items.items()))
            if conv.used >= cutoff:
                break
            del self._items[key]


def _trim(messages: list[Message], max_messages: int, max_chars: int) -> None:
    while messages and (
        len(messages) > max_messages or sum(len(m["content"]) for m in messages) > max_chars
    ):
        del messages[0]
    # A history must start with a user turn (Anthropic requires alternation).
    while messages and messages[0]["role"] != "user":
        del messages[0]
