"""The shell around :mod:`daemon.swarm.auction`: one subscription to ``swarm/#`` and
``node/+/state``, messages decoded and handed to each mission's :class:`Auction`,
the actions it returns performed on the bus, one loop timer for its deadlines.

:class:`AuctionHost` is the part every participant shares; the robot agent
(:mod:`daemon.swarm.agent`), the auctioneer (:mod:`daemon.swarm.auctioneer`) and
the watcher (:mod:`daemon.swarm.watch`) say which role they take in a mission and
what a ``Start`` or a ``Note`` means to them.

Identity: the sender of every message is the last level of its topic (the
account the broker let write it), never a field of the payload.  A payload
that does not decode is one log line, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Final

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError
from daemon.messages import Message, decode
from daemon.protocol.node import NodeState
from daemon.protocol.swarm import (
    Award,
    Bid,
    MissionAck,
    MissionAnnounce,
    MissionCall,
    MissionProgress,
    RobotState,
)
from daemon.swarm.auction import (
    Abandon,
    Action,
    Auction,
    Bidder,
    Finished,
    Fleet,
    Note,
    Reject,
    Role,
    SendAck,
    SendAward,
    SendBid,
    SendCall,
    Start,
    Timing,
)

log = logging.getLogger(__name__)

# Missions remembered at once (oldest finished ones go first): a bound on memory
# whatever announcements arrive.
MAX_AUCTIONS: Final = 1000
# While some robot holds a sector, heartbeats are checked this often (s).
HEARTBEAT_CHECK_S: Final = 0.2

Key = tuple[str, str]  # (issuer, mission)


class AuctionHost:
    """Hosts the auctions one participant takes part in."""

    def __init__(self, bus: Bus, realm: str, me: str, timing: Timing | None = None) -> None:
        self.bus = bus
        self.realm = realm
        self.me = me
        self.timing = timing or Timing()
        self.fleet = Fleet()
        self.robots: dict[str, RobotState] = {}
        self.auctions: OrderedDict[Key, Auction] = OrderedDict()
        self.rejected = 0
        self._warned: set[tuple[str, str, str]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------- to override

    def role_for(self, issuer: str, announce: MissionAnnounce) -> Role | None:
        return "watcher"

    def bidder(self, issuer: str) -> Bidder | None:
        """The callable that prices a mission for this participant (robots)."""
        return None

    async def on_start(self, auction: Auction, round_: int, sector: int) -> None:
        """This participant takes a sector on (robots)."""

    async def on_abandon(self, auction: Auction, sector: int, reason: str) -> None:
        """This participant must drop a sector it took on (robots)."""

    async def on_note(self, auction: Auction, note: Note) -> None:
        log.debug("mission %s/%s: %s", auction.issuer, auction.mission, note.text)

    async def on_finished(self, auction: Auction) -> None:
        log.info("mission %s/%s %s", auction.issuer, auction.mission, auction.finished)

    async def on_robot(self, sender: str, state: RobotState) -> None:
        """A robot's state arrived."""

    # ---------------------------------------------------------- running

    async def start(self) -> None:
        await self.bus.subscribe(topics.SWARM_ANY.filter(realm=self.realm), self._on_swarm)
        await self.bus.subscribe(topics.NODE_STATE.filter(realm=self.realm), self._on_state)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _on_state(self, msg: Inbound) -> None:
        fields = topics.NODE_STATE.parse(msg.topic)
        if fields is None or not msg.payload:
            return
        try:
            state = decode(msg.payload, NodeState)
        except MessageError as exc:
            log.debug("bad node state on %s: %s", msg.topic, exc)
            return
        node = fields["node_id"]
        if node == self.me:
            return  # our own will (a stale one of an earlier run): we are here
        if state.state == "online":
            self.fleet.offline.discard(node)  # back (its heartbeats count again)
        elif state.state == "offline":
            async with self._lock:
                now = self.now()
                for auction in list(self.auctions.values()):
                    await self._perform(auction, auction.on_lost(node, now))
                self._reschedule()

    async def _on_swarm(self, msg: Inbound) -> None:
        fields = topics.SWARM_ANY.parse(msg.topic)
        if fields is None or not msg.payload:
            return
        kind, sender = fields["kind"], fields["sender"]
        try:
            async with self._lock:
                await self._dispatch(kind, sender, msg.payload)
                self._reschedule()
        except MessageError as exc:
            self.rejected += 1
            log.warning(
                "swarm: ignored %s from %s: %s (payload %s)", kind, sender, exc, msg.preview()
            )

    async def _dispatch(self, kind: str, sender: str, payload: bytes) -> None:
        now = self.now()
        if kind == "robot":
            state = decode(payload, RobotState)
            self.robots[sender] = state
            self.fleet.heard(sender, state.heartbeat_s, now)
            await self.on_robot(sender, state)
            return
        if kind == "mission":
            announce = decode(payload, MissionAnnounce)
            await self._announced(sender, announce, now)
            return
        handlers: dict[str, type[Message]] = {
            "bid": Bid,
            "call": MissionCall,
            "award": Award,
            "ack": MissionAck,
            "progress": MissionProgress,
        }
        cls = handlers.get(kind)
        if cls is None:
            raise MessageError(f"unknown swarm kind {kind!r}")
        message = decode(payload, cls)
        issuer = getattr(message, "issuer", "")
        mission = getattr(message, "mission", "")
        auction = self.auctions.get((issuer, mission))
        if auction is None:
            return  # not a mission we take part in (or one we never heard announced)
        if isinstance(message, Bid):
            actions = auction.on_bid(sender, message, now)
        elif isinstance(message, MissionCall):
            actions = auction.on_call(sender, message, now)
        elif isinstance(message, Award):
            actions = auction.on_award(sender, message, now)
        elif isinstance(message, MissionAck):
            actions = auction.on_ack(sender, message, now)
        else:
            assert isinstance(message, MissionProgress)
            actions = auction.on_progress(sender, message, now)
        await self._perform(auction, actions)

    async def _announced(self, issuer: str, announce: MissionAnnounce, now: float) -> None:
        key = (issuer, announce.mission)
        if key in self.auctions:
            return  # a duplicate delivery, or a reused id: the first one stands
        role = self.role_for(issuer, announce)
        if role is None:
            return
        auction = Auction(
            issuer,
            announce,
            role=role,
            me=self.me,
            bidder=self.bidder(issuer),
            fleet=self.fleet,
            timing=self.timing,
        )
        self.auctions[key] = auction
        self._evict()
        await self._perform(auction, auction.start(now))

    def _evict(self) -> None:
        while len(self.auctions) > MAX_AUCTIONS:
            victim = next((k for k, a in self.auctions.items() if a.finished), None)
            self.auctions.pop(victim if victim is not None else next(iter(self.auctions)))

    async def _perform(self, auction: Auction, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendBid):
                bid = Bid(
                    issuer=auction.issuer,
                    mission=auction.mission,
                    round=action.round,
                    costs=action.costs,
                )
                await self._send(topics.SWARM_BID, bid)
            elif isinstance(action, SendAward):
                await self._send(topics.SWARM_AWARD, action.award)
            elif isinstance(action, SendCall):
                call = MissionCall(
                    issuer=auction.issuer,
                    mission=auction.mission,
                    round=action.round,
                    reason=action.reason,
                )
                await self._send(topics.SWARM_CALL, call)
            elif isinstance(action, SendAck):
                ack = MissionAck(
                    issuer=auction.issuer,
                    mission=auction.mission,
                    round=action.round,
                    sector=action.sector,
                )
                await self._send(topics.SWARM_ACK, ack)
            elif isinstance(action, Reject):
                self.rejected += action.hostile
                # One warning per mission and kind of refusal: a robot that keeps
                # reporting on a sector it lost must not fill the journal.
                # (Keyed by kind where the reason names a sender: 500 robots reporting
                # on sectors a stale view says they lost were 250,000 warnings.)
                kind = action.kind or action.reason.split(",")[0][:60]
                seen = (auction.issuer, auction.mission, kind)
                first = action.hostile and seen not in self._warned
                if first:
                    self._warned.add(seen)
                    if len(self._warned) > MAX_AUCTIONS:
                        self._warned.clear()
                level = logging.WARNING if first else logging.DEBUG
                log.log(level, "mission %s/%s: %s", auction.issuer, auction.mission, action.reason)
            elif isinstance(action, Note):
                await self.on_note(auction, action)
            elif isinstance(action, Finished):
                await self.on_finished(auction)
            elif isinstance(action, Start):
                await self.on_start(auction, action.round, action.sector)
            elif isinstance(action, Abandon):
                await self.on_abandon(auction, action.sector, action.reason)

    async def _send(self, pattern: topics.TopicPattern, message: Message) -> None:
        topic = pattern.build(realm=self.realm, sender=self.me)
        await self.bus.publish(topic, message, qos=1, wait=False)

    # ---------------------------------------------------------- timers

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.now()
        times = [t for a in self.auctions.values() if (t := a.next_deadline()) is not None]
        if any(a.holders() for a in self.auctions.values() if not a.finished):
            times.append(now + HEARTBEAT_CHECK_S)
        if times:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(max(min(times), now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._tick())
        _background.add(task)
        task.add_done_callback(_done)

    async def _tick(self) -> None:
        async with self._lock:
            now = self.now()
            for auction in list(self.auctions.values()):
                with contextlib.suppress(MessageError):
                    await self._perform(auction, auction.tick(now))
            self._reschedule()


_background: set[asyncio.Task[None]] = set()


def _done(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("swarm timer failed", exc_info=task.exception())
