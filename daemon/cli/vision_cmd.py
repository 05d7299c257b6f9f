"""``mtor snapshot CAMERA``, ``mtor detect IMAGE`` and ``mtor camera events|clip``:
camera and vision from the shell."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

from daemon.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, client_bus, environ
from daemon.config import Config


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    snap = sub.add_parser(
        "snapshot",
        help="save a camera's latest snapshot (JPEG)",
        description="Save the retained snapshot of CAMERA, or ask its node for a fresh one.",
        parents=[common],
    )
    snap.add_argument("camera", help="camera name (as in the camera node's config)")
    snap.add_argument("-o", "--output", type=Path, help="file to write (default CAMERA.jpg)")
    snap.add_argument(
        "--fresh", action="store_true", help="always ask for the current frame (camera.snapshot)"
    )
    snap.add_argument("--timeout", type=float, default=10.0, help="seconds")
    det = sub.add_parser(
        "detect",
        help="run object detection on an image through the realm",
        description="Send IMAGE (JPEG/PNG) as a vision.detect task and print the boxes.",
        parents=[common],
    )
    det.add_argument("image", type=Path, help="a JPEG or PNG file")
    det.add_argument("--backend", help="yolo_onnx, hog, ...")
    det.add_argument(
        "--min-score", type=float, dest="min_score", help="drop detections below (0..1)"
    )
    det.add_argument("--faces", action="store_true", help="vision.faces instead of detect")
    det.add_argument("--json", action="store_true", help="print the whole result as JSON")
    det.add_argument("--timeout", type=float, default=30.0, help="seconds")
    cam = sub.add_parser(
        "camera",
        help="a camera node's event history and clips",
        description="List tracked objects / review items (camera.events) or fetch a clip.",
        parents=[common],
    )
    cam_sub = cam.add_subparsers(dest="camera_command", metavar="ACTION", required=True)
    ev = cam_sub.add_parser("events", help="objects (or review items) newest first")
    ev.add_argument("--camera", help="only this camera's events")
    ev.add_argument("--label", help="COCO name, e.g. person")
    ev.add_argument("--zone", help="only events in this zone")
    ev.add_argument("--since", help="only newer: seconds, or 30m, 2h, 7d")
    ev.add_argument("--reviews", action="store_true", help="review items instead of objects")
    ev.add_argument("--limit", type=int, default=20, help="at most this many (20)")
    ev.add_argument("--json", action="store_true", help="rows as JSON")
    ev.add_argument("--timeout", type=float, default=10.0, help="seconds")
    clip = cam_sub.add_parser("clip", help="save the MP4 of a review item or alarm")
    clip.add_argument("id", help="the review item's id (or an alarm's clip_id)")
    clip.add_argument("-o", "--output", type=Path, help="file to write (default ID.mp4)")
    clip.add_argument("--timeout", type=float, default=30.0, help="seconds")
    return {"snapshot": cmd_snapshot, "detect": cmd_detect, "camera": cmd_camera}


def parse_since(text: str) -> float:
    """``90``, ``30m``, ``2h`` or ``7d`` as seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    scale = units.get(text[-1:].lower(), 0.0)
    number = text[:-1] if scale else text
    return float(number) * (scale or 1.0)


def image_b64(path: Path) -> str:
    """The file as base64, re-encoded smaller when it would not fit in a task."""
    from nodes.vision.images import MAX_IMAGE_B64, decode_bytes, encode_jpeg_b64

    raw = path.read_bytes()
    text = base64.b64encode(raw).decode("ascii")
    if len(text) <= MAX_IMAGE_B64:
        return text
    return encode_jpeg_b64(decode_bytes(raw))


def _client(bus: Any, config: Config) -> Any:
    from daemon.client import RealmClient

    env = environ()
    return RealmClient(bus, config.realm, user=env.get("MTOR_USER"), token=env.get("MTOR_TOKEN"))


def cmd_detect(args: argparse.Namespace, config: Config) -> int:
    from daemon.client import TaskFailed
    from daemon.errors import TaskError
    from daemon.protocol.task import Constraints

    try:
        image = image_b64(args.image)
    except (OSError, TaskError) as exc:
        print(f"mtor detect: {args.image}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        async with client_bus(config, "detect") as bus:
            client = _client(bus, config)
            await client.start()
            inp: dict[str, Any] = {"image": image}
            capability = "vision.faces" if args.faces else "vision.detect"
            if not args.faces and args.min_score is not None:
                inp["min_score"] = args.min_score
            handle = await client.submit(
                capability,
                inp,
                timeout=args.timeout,
                stream=False,
                constraints=Constraints(backend=args.backend) if args.backend else None,
            )
            try:
                async with asyncio.timeout(args.timeout + 5):
                    out = await handle.result()
            except TaskFailed as exc:
                print(f"mtor detect: {exc}", file=sys.stderr)
                return EXIT_FAILURE
            if args.json:
                print(json.dumps(out, indent=2))
                return EXIT_OK
            boxes = out.get("faces" if args.faces else "detections", [])
            where = f"{out.get('backend', 'haar')} {out.get('model') or ''}".strip()
            print(f"{args.image}: {out['width']}x{out['height']}, {len(boxes)} found ({where})")
            for d in boxes:
                x1, y1, x2, y2 = d["box"]
                box = f"[{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]"
                print(f"  {d['label']:<12} {d['score']:7.3f}  {box}")
            return EXIT_OK

    from daemon.cli.main import run_async

    return run_async(main())


def cmd_snapshot(args: argparse.Namespace, config: Config) -> int:
    from daemon import topics
    from daemon.bus import Inbound
    from daemon.client import TaskFailed

    output: Path = args.output or Path(f"{args.camera}.jpg")

    async def main() -> int:
        got: asyncio.Queue[Inbound] = asyncio.Queue()

        async def on_media(msg: Inbound) -> None:
            if msg.payload:
                await got.put(msg)

        async with client_bus(config, "snapshot") as bus:
            flt = topics.MEDIA.filter(realm=config.realm, stream=f"{args.camera}/snapshot")
            await bus.subscribe(flt, on_media)
            msg: Inbound | None = None
            if not args.fresh:
                try:
                    async with asyncio.timeout(min(2.0, args.timeout)):
                        msg = await got.get()
                except TimeoutError:
                    msg = None
            if msg is None:
                client = _client(bus, config)
                await client.start()
                while not got.empty():
                    got.get_nowait()
                try:
                    async with asyncio.timeout(args.timeout):
                        result = await client.call(
                            "camera.snapshot", {"camera": args.camera}, timeout=args.timeout
                        )
                        while msg is None or msg.topic != result["media_topic"]:
                            msg = await got.get()
                except TaskFailed as exc:
                    print(f"mtor snapshot: {exc}", file=sys.stderr)
                    return EXIT_FAILURE
                except TimeoutError:
                    print(f"mtor snapshot: no snapshot of {args.camera!r}", file=sys.stderr)
                    return EXIT_FAILURE
            await asyncio.to_thread(output.write_bytes, msg.payload)
            kind = msg.content_type or "?"
            print(f"{output}: {len(msg.payload)} bytes ({kind}) from {msg.topic}")
            return EXIT_OK

    from daemon.cli.main import run_async

    return run_async(main())


def cmd_camera(args: argparse.Namespace, config: Config) -> int:
    import time

    from daemon import topics
    from daemon.bus import Inbound
    from daemon.client import TaskFailed

    async def events(client: Any) -> int:
        inp: dict[str, Any] = {"kind": "reviews" if args.reviews else "objects"}
        for key in ("camera", "label", "zone"):
            if getattr(args, key):
                inp[key] = getattr(args, key)
        if args.since:
            inp["after"] = time.time() - parse_since(args.since)
        inp["limit"] = max(1, min(1000, args.limit))
        out = await client.call("camera.events", inp, timeout=args.timeout)
        if args.json:
            print(json.dumps(out, indent=2))
            return EXIT_OK
        for e in out.get("events", []):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["start_time"]))
            what = e.get("label") or ",".join(e.get("labels", []))
            zones = ",".join(e.get("entered_zones") or e.get("zones") or []) or "-"
            extra = e.get("severity") or f"{e.get('top_score', 0):.2f}"
            clip = e.get("clip_id") or "-"
            print(f"{when}  {e['camera']:<10} {what:<12} {extra:<9} {zones:<14} {e['id']} {clip}")
        return EXIT_OK

    async def fetch(bus: Any, client: Any) -> int:
        output: Path = args.output or Path(f"{args.id}.mp4")
        got: asyncio.Queue[Inbound] = asyncio.Queue()

        async def on_media(msg: Inbound) -> None:
            if msg.payload:
                await got.put(msg)

        flt = topics.MEDIA.filter(realm=config.realm, stream=f"+/clips/{args.id}")
        await bus.subscribe(flt, on_media)
        result = await client.call("camera.clip", {"id": args.id}, timeout=args.timeout)
        async with asyncio.timeout(args.timeout):
            msg = await got.get()
            while msg.topic != result["media_topic"]:
                msg = await got.get()
        await asyncio.to_thread(output.write_bytes, msg.payload)
        print(f"{output}: {len(msg.payload)} bytes ({msg.content_type}) from {msg.topic}")
        return EXIT_OK

    async def main() -> int:
        async with client_bus(config, "camera") as bus:
            client = _client(bus, config)
            await client.start()
            try:
                if args.camera_command == "events":
                    return await events(client)
                return await fetch(bus, client)
            except TaskFailed as exc:
                print(f"mtor camera: {exc}", file=sys.stderr)
                return EXIT_FAILURE
            except TimeoutError:
                print("mtor camera: no answer", file=sys.stderr)
                return EXIT_FAILURE

    from daemon.cli.main import run_async

    return run_async(main())
