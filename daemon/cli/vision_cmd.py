"""``mtor snapshot CAMERA`` and ``mtor detect IMAGE``: camera and vision from the shell."""

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
    det.add_argument("image", type=Path)
    det.add_argument("--backend", help="yolo_onnx, hog, ...")
    det.add_argument("--min-score", type=float, dest="min_score")
    det.add_argument("--faces", action="store_true", help="vision.faces instead of detect")
    det.add_argument("--json", action="store_true", help="print the whole result as JSON")
    det.add_argument("--timeout", type=float, default=30.0, help="seconds")
    return {"snapshot": cmd_snapshot, "detect": cmd_detect}


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
