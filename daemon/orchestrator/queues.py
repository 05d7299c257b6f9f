"""Per-capability task queues: priority classes, fair across users, bounded.

Within a priority class users take turns (round robin), so one user with a
thousand tasks cannot starve another with one.  A user at their concurrency
limit is skipped, not blocking the others.  Removal (cancel, expiry) is lazy:
each entry carries a ticket, and an item whose current ticket differs is
skipped when reached, so an item can be re-queued safely after a removal.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    user: str
    ticket: int | None  # set while queued; None otherwise

    @property
    def rank(self) -> int: ...


T = TypeVar("T", bound=Queued)


class FairQueue(Generic[T]):
    def __init__(self, maxsize: int, ranks: int = 3) -> None:
        self.maxsize = maxsize
        self._classes: list[OrderedDict[str, deque[tuple[int, T]]]] = [
            OrderedDict() for _ in range(ranks)
        ]
        self._size = 0
        self._tickets = itertools.count(1)

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.maxsize

    def push(self, item: T, *, front: bool = False) -> int:
        """Queue ``item``; returns how many items are ahead of it (approximately)."""
        if item.ticket is not None:
            raise ValueError("item is already queued")
        ticket = next(self._tickets)
        item.ticket = ticket
        cls = self._classes[item.rank]
        q = cls.get(item.user)
        if q is None:
            q = cls[item.user] = deque()
        ahead = 0
        for r in range(item.rank):
            if self._classes[r]:
                ahead += self._rank_size(r)
        if front:
            q.appendleft((ticket, item))
        else:
            ahead += len(q) + len(cls) - 1
            q.append((ticket, item))
        self._size += 1
        return max(0, ahead)

    def _rank_size(self, rank: int) -> int:
        return sum(len(q) for q in self._classes[rank].values())

    def discard(self, item: T) -> None:
        """Remove ``item`` if it is queued (lazily)."""
        if item.ticket is not None:
            item.ticket = None
            self._size -= 1

    def pop(self, user_ok: Callable[[str], bool] = lambda _u: True) -> T | None:
        """The next item whose user may run another task, or None."""
        for cls in self._classes:
            for user in list(cls):
                q = cls[user]
                while q and q[0][1].ticket != q[0][0]:
                    q.popleft()  # removed earlier
                if not q:
                    del cls[user]
                    continue
                if not user_ok(user):
                    continue
                _, item = q.popleft()
                if q:
                    cls.move_to_end(user)  # this user's turn is over
                else:
                    del cls[user]
                item.ticket = None
                self._size -= 1
                return item
        return None

    def __iter__(self) -> Iterator[T]:
        for cls in self._classes:
            for q in cls.values():
                yield from (i for t, i in q if i.ticket == t)
