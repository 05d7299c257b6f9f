"""``mtor mission``: announce a swarm mission and watch its auction; list the robots.

    mtor mission announce --at 120,40                 # the nearest capable robot goes
    mtor mission announce --area 0,0,200,100 --sectors 4 --sensor camera
    mtor mission announce --at 5,5 --auctioneer self  # this process runs the auction
    mtor mission announce --at 0,50 --at 80,20        # two places, one robot each
    mtor sim swarm --robots 50 --missions 40 --kill 5 --json
    mtor mission robots                               # every robot's retained state
    mtor mission watch                                # every mission's auction, live

The mission is announced as the command's account (its MQTT username); the
robots run the auction among themselves unless ``--auctioneer`` names an account
(``orchestrator``, or ``self``: this process allocates).  Exit 0 when the
mission is done (or awarded, with ``--until awarded``), 1 when it failed or the
timeout passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from daemon.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, client_bus, environ
from daemon.config import Config


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    mission = sub.add_parser(
        "mission",
        help="announce a swarm mission and watch it; list robots",
        description="Swarm missions, allocated by auction among robots (docs/swarm.md).",
        parents=[common],
    )
    act = mission.add_subparsers(dest="mission_command", metavar="ACTION", required=True)
    ann = act.add_parser(
        "announce", help="announce a mission and follow its auction", parents=[common]
    )
    where = ann.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--at",
        metavar="X,Y[,Z]",
        action="append",
        help="a point (local metres); repeated: one sector per point, allocated together",
    )
    where.add_argument("--area", metavar="X0,Y0,X1,Y1", help="an area to cover")
    ann.add_argument("--sectors", type=int, default=1, help="area: strips, one per robot")
    ann.add_argument("--id", dest="mission_id", help="mission id (default: random)")
    ann.add_argument("--task", default="inspect", help="what to do there (a name)")
    ann.add_argument("--sensor", action="append", default=[], help="required sensor (repeat)")
    ann.add_argument("--payload", type=float, default=0.0, help="required payload, kg")
    ann.add_argument(
        "--platform",
        action="append",
        default=[],
        choices=["ground", "air", "water"],
        help="robots of this kind only (repeat for several)",
    )
    ann.add_argument("--work", type=float, default=0.0, help="seconds spent on site")
    ann.add_argument("--deadline", type=float, help="seconds from now to be done by")
    ann.add_argument("--window", type=float, default=0.5, help="bid window, seconds")
    ann.add_argument("--auctioneer", default="peers", help="peers (default), an account, or self")
    ann.add_argument(
        "--until",
        choices=["done", "awarded"],
        default="done",
        help="wait until the mission is done (default) or only awarded",
    )
    ann.add_argument("--timeout", type=float, default=120.0, help="seconds")
    ann.add_argument("--json", action="store_true", help="one JSON summary at the end")
    rob = act.add_parser("robots", help="every robot's retained state", parents=[common])
    rob.add_argument("--json", action="store_true", help="the robots' states as JSON")
    rob.add_argument("--wait", type=float, default=1.0, help="seconds to collect states")
    wat = act.add_parser(
        "watch", help="print every mission's auction as it happens", parents=[common]
    )
    wat.add_argument("--timeout", type=float, help="exit after this many seconds")
    sim = sub.add_parser(
        "sim",
        help="simulations on a real broker (swarm)",
        description="Simulated realm members on a real broker.",
        parents=[common],
    )
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="WHAT", required=True)
    sw = sim_sub.add_parser(
        "swarm",
        help="N simulated robots, M missions announced at once, K winners killed",
        parents=[common],
    )
    sw.add_argument("--robots", type=int, default=10, help="simulated robots (10)")
    sw.add_argument("--missions", type=int, default=5, help="missions announced (5)")
    sw.add_argument("--seed", type=int, default=1, help="random positions from this seed")
    sw.add_argument(
        "--uniform", action="store_true", help="identical, fully charged robots: cost = travel"
    )
    sw.add_argument("--kill", type=int, default=0, metavar="K", help="kill K winners after")
    sw.add_argument(
        "--separate",
        action="store_true",
        help="announce each mission on its own (independent auctions); default: together",
    )
    sw.add_argument(
        "--peers",
        action="store_true",
        help="the robots run the auction among themselves; default: this process does",
    )
    sw.add_argument("--window", type=float, default=0.5, help="bid window, seconds")
    sw.add_argument("--timeout", type=float, default=60.0, help="seconds per phase")
    sw.add_argument("--json", action="store_true", help="the whole report as JSON")
    sw.add_argument("--plot", metavar="FILE", help="draw robots, missions, assignments (PNG)")
    return {"mission": cmd_mission, "sim": cmd_sim}


def cmd_sim(args: argparse.Namespace, config: Config) -> int:
    """``mtor sim swarm``: on a private broker unless ``--broker`` names one."""
    from daemon.cli.main import run_async

    if args.robots < 1 or args.missions < 0 or args.kill < 0:
        print("mtor sim swarm: --robots >= 1, --missions and --kill >= 0", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        try:
            import importlib

            importlib.import_module("matplotlib")
        except ImportError:
            print(
                "mtor sim swarm: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr
            )
            return EXIT_USAGE
    return run_async(_sim(args, config))


async def _sim(args: argparse.Namespace, config: Config) -> int:
    from daemon.broker import PrivateBroker
    from daemon.swarm.simfleet import plot, simulate

    async def run(broker: Any, password: str | None, realm: str) -> dict[str, Any]:
        return await simulate(
            broker,
            realm,
            robots=args.robots,
            missions=args.missions,
            seed=args.seed,
            uniform=args.uniform,
            kill=args.kill,
            window=args.window,
            timeout=args.timeout,
            separate=args.separate,
            peers=args.peers,
            password=password,
        )

    try:
        if getattr(args, "broker", None):
            realm = f"{config.realm}-sim-{uuid.uuid4().hex[:6]}"
            report = await run(config.broker, config.broker_password(), realm)
        else:
            from daemon.config import build_config

            with PrivateBroker() as broker:
                cfg = build_config({"broker": {"url": broker.url}, "realm": "sim"})
                report = await run(cfg.broker, None, "sim")
    except TimeoutError:
        print(f"mtor sim swarm: not allocated within {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILURE
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    print(
        f"{args.robots} robots, {args.missions} missions: allocated in {report['allocation_s']} s"
    )
    for m in report["missions"]:
        again = f"  (re-auctioned: {' -> '.join(m['winners'])})" if m["reauctioned"] else ""
        print(f"  {m['id']} at {m['location']}: {m['winner']} ({m['cost']}){again}")
    if report["killed"]:
        print(f"killed {', '.join(report['killed'])}: re-allocated in {report['reallocation_s']} s")
    return EXIT_OK


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in n:
        raise ValueError(f"{what} wants {' or '.join(map(str, n))} numbers, got {text!r}")
    return values


def cmd_mission(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.main import run_async

    if args.mission_command == "robots":
        return run_async(_robots(args, config))
    if args.mission_command == "watch":
        return run_async(_watch_all(args, config))
    try:
        announce = _announce_of(args)
    except ValueError as exc:
        print(f"mtor mission: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_async(_announce(args, config, announce))


def _announce_of(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from daemon.protocol.swarm import Area, MissionAnnounce, Point, Points, Requirements

    fields: dict[str, Any] = {
        "mission": args.mission_id or f"m-{uuid.uuid4().hex[:10]}",
        "task": args.task,
        "work_s": args.work,
        "bid_window_s": args.window,
        "requirements": Requirements(
            sensors=args.sensor, payload_kg=args.payload, platform=args.platform
        ),
    }
    if args.deadline is not None:
        fields["deadline"] = time.time() + args.deadline
    if args.at:
        points = []
        for at in args.at:
            xyz = _floats(at, (2, 3), "--at")
            points.append(Point(x=xyz[0], y=xyz[1], z=xyz[2] if len(xyz) == 3 else 0.0))
        fields["target"] = points[0] if len(points) == 1 else Points(points=points)
    else:
        x0, y0, x1, y1 = _floats(args.area, (4,), "--area")
        fields["target"] = Area(x0=x0, y0=y0, x1=x1, y1=y1)
        fields["sectors"] = args.sectors
    try:
        return MissionAnnounce(**fields)
    except ValidationError as exc:
        raise ValueError(str(exc).splitlines()[-1].strip()) from exc


def _account(bus: Any) -> str:
    from daemon.accounts import ANONYMOUS, account_name

    return account_name(bus.config.username, environ().get("MTOR_USER") or ANONYMOUS)


async def _announce(args: argparse.Namespace, config: Config, announce: Any) -> int:
    from daemon.swarm.auctioneer import Auctioneer
    from daemon.swarm.watch import Watcher
    from daemon.swarm.watch import announce as publish

    async with client_bus(config, "mission") as bus:
        issuer = _account(bus)
        if announce.auctioneer == "self":
            announce.auctioneer = issuer
        watcher = Watcher(bus, config.realm)
        await watcher.start()
        auctioneer = None
        if announce.auctioneer == issuer:
            auctioneer = Auctioneer(bus, config.realm, issuer)
            await auctioneer.start()
        w = watcher.get(issuer, announce.mission)
        started = time.monotonic()
        await publish(bus, config.realm, issuer, announce)
        shown = 0
        ok = False
        try:
            async with asyncio.timeout(args.timeout):
                while True:
                    await w.changed.wait()
                    w.changed.clear()
                    if not args.json:
                        for t, text in w.timeline[shown:]:
                            base = w.announced_at or t
                            print(f"{t - base:7.2f}s  {text}", flush=True)
                    shown = len(w.timeline)
                    auction = watcher.auction(issuer, announce.mission)
                    if w.finished.is_set():
                        ok = auction is not None and auction.finished == "done"
                        break
                    if (
                        args.until == "awarded"
                        and auction is not None
                        and all(s.phase in ("held", "done") for s in auction.sectors)
                    ):
                        ok = True
                        break
        except TimeoutError:
            print(f"mtor mission: no end within {args.timeout:g}s", file=sys.stderr)
        finally:
            watcher.close()
            if auctioneer is not None:
                auctioneer.close()
        if args.json:
            print(json.dumps(_summary(watcher, issuer, announce, time.monotonic() - started)))
        return EXIT_OK if ok else EXIT_FAILURE


def _summary(watcher: Any, issuer: str, announce: Any, elapsed: float) -> dict[str, Any]:
    auction = watcher.auction(issuer, announce.mission)
    w = watcher.get(issuer, announce.mission)
    sectors = []
    for i, s in enumerate(auction.sectors if auction else []):
        acks = w.acked_at.get(i, [])
        sectors.append(
            {
                "sector": i,
                "phase": s.phase,
                "winner": s.holder,
                "winners": s.winners,
                "cost": s.cost,
                "awarded_s": round(acks[0] - w.announced_at, 3)
                if acks and w.announced_at
                else None,
            }
        )
    return {
        "issuer": issuer,
        "mission": announce.mission,
        "status": auction.finished if auction else None,
        "rounds": auction.round if auction else 0,
        "sectors": sectors,
        "timeline": [[round(t - (w.announced_at or t), 3), text] for t, text in w.timeline],
        "elapsed_s": round(elapsed, 3),
    }


def _since(start: float | None, t: float | None) -> float | None:
    return round(t - start, 3) if start is not None and t is not None else None


async def _robots(args: argparse.Namespace, config: Config) -> int:
    from daemon.swarm.watch import Watcher

    async with client_bus(config, "robots") as bus:
        watcher = Watcher(bus, config.realm)
        await watcher.start()
        await asyncio.sleep(args.wait)  # retained states arrive right after SUBSCRIBE
        watcher.close()
        robots = dict(sorted(watcher.robots.items()))
        offline = set(watcher.fleet.offline)
    if args.json:
        print(
            json.dumps(
                {
                    k: {**v.model_dump(exclude_none=True), "online": k not in offline}
                    for k, v in robots.items()
                }
            )
        )
        return EXIT_OK
    if not robots:
        print("no robots")
        return EXIT_OK
    print(f"{'ROBOT':16} {'STATUS':9} {'BATTERY':>7} {'X':>9} {'Y':>9}  MISSION")
    for node, s in robots.items():
        mission = f"{s.mission.issuer}/{s.mission.mission}#{s.mission.sector}" if s.mission else "-"
        print(
            f"{node:16} {'offline' if node in offline else s.status:9} {s.battery_percent:6.1f}% "
            f"{s.pose.x:9.1f} {s.pose.y:9.1f}  {mission}"
        )
    return EXIT_OK


async def _watch_all(args: argparse.Namespace, config: Config) -> int:
    from daemon.swarm.auction import Auction, Note
    from daemon.swarm.watch import Watcher

    class Printer(Watcher):
        async def on_note(self, auction: Auction, note: Note) -> None:
            print(f"{auction.issuer}/{auction.mission}: {note.text}", flush=True)

        async def on_finished(self, auction: Auction) -> None:
            print(f"{auction.issuer}/{auction.mission}: {auction.finished}", flush=True)

    async with client_bus(config, "watch") as bus:
        printer = Printer(bus, config.realm)
        await printer.start()
        try:
            async with asyncio.timeout(args.timeout):
                await asyncio.Event().wait()
        except TimeoutError:
            pass
        finally:
            printer.close()
    return EXIT_OK
