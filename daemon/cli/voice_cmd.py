"""``mtor say`` (speak text on a node through the realm's tts) and ``mtor listen``
(run the whole voice pipeline on a WAV file, printing every event)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

from daemon.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Command, client_bus
from daemon.config import Config

SAY_TIMEOUT: Final = 60.0
CHUNK_WAIT: Final = 5.0  # media chunks may trail the task's result (different paths)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    say = sub.add_parser(
        "say", help="speak text on a node (tts)", description="speak text", parents=[common]
    )
    say.add_argument("text", nargs="+", help="what to say")
    say.add_argument("--node", help="the node id that speaks (default: the realm picks)")
    say.add_argument("--out", type=Path, help="write the audio to this WAV instead of playing it")
    say.add_argument("--timeout", type=float, default=SAY_TIMEOUT, help="seconds")
    say.add_argument("--json", action="store_true", help="the tts task's result as JSON")
    listen = sub.add_parser(
        "listen",
        help="run the voice pipeline on a WAV file and print every event",
        description="wake word, VAD, STT, intent and answer on a WAV file",
        parents=[common],
    )
    listen.add_argument("file", type=Path, help="a WAV file (any rate; converted to 16 kHz mono)")
    listen.add_argument("--out", type=Path, help="write the spoken answer(s) to this WAV")
    listen.add_argument("--voice-node", help="use this voice node's config (default: the first)")
    listen.add_argument(
        "--no-wake", action="store_true", help="the file is the command (no wake word needed)"
    )
    listen.add_argument(
        "--offline", action="store_true", help="do not connect to the broker (nothing published)"
    )
    return {"say": cmd_say, "listen": cmd_listen}


def cmd_say(args: argparse.Namespace, config: Config) -> int:
    from daemon import topics
    from daemon.bus import Inbound
    from daemon.client import RealmClient, TaskFailed
    from daemon.protocol.task import Constraints
    from nodes.voice import audio

    async def main() -> int:
        async with client_bus(config, "say") as bus:
            client = RealmClient(bus, config.realm)
            await client.start()
            task_id = uuid.uuid4().hex
            chunks: list[bytes] = []
            arrived = asyncio.Event()
            media = topics.MEDIA.filter(realm=config.realm, stream=f"tts/{task_id}")

            async def on_chunk(msg: Inbound) -> None:
                chunks.append(msg.payload)
                arrived.set()

            await bus.subscribe(media, on_chunk)
            try:
                async with asyncio.timeout(args.timeout):
                    handle = await client.submit(
                        "tts",
                        {"text": " ".join(args.text), "play": args.out is None},
                        timeout=args.timeout,
                        constraints=Constraints(node=args.node),
                        task_id=task_id,
                    )
                    out = await handle.result()
                    async with asyncio.timeout(CHUNK_WAIT):
                        while len(chunks) < int(out.get("chunks", 0)):
                            arrived.clear()
                            await arrived.wait()
            except TaskFailed as exc:
                print(f"mtor say: {exc}", file=sys.stderr)
                return EXIT_FAILURE
            except TimeoutError:
                print("mtor say: no answer in time (is a tts node up?)", file=sys.stderr)
                return EXIT_FAILURE
            pcm = b"".join(chunks)
            if args.out is not None:
                await asyncio.to_thread(audio.write_wav, args.out, pcm)
            if args.json:
                print(json.dumps({**out, "received_chunks": len(chunks)}))
                return EXIT_OK
            rate = int(out.get("sample_rate") or audio.RATE)
            seconds = int(out.get("bytes") or len(pcm)) / (2 * rate)  # 16-bit mono
            if args.out is not None:
                print(f"wrote {args.out} ({seconds:.1f} s of audio)")
            else:
                played = "spoken" if out.get("played") else "made (not played: no speaker)"
                print(f"{played}: {seconds:.1f} s of audio")
            return EXIT_OK

    return asyncio.run(main())


def cmd_listen(args: argparse.Namespace, config: Config) -> int:
    from daemon.bus import Bus
    from daemon.errors import BusNotConnectedError
    from daemon.node import NodeContext
    from nodes.voice import audio
    from nodes.voice.config import SinkConfig, SourceConfig, VoiceConfig, WakeConfig
    from nodes.voice.node import VoiceNode

    chosen: tuple[str, VoiceConfig] | None = None
    for name, node_cfg in config.nodes.items():
        if isinstance(node_cfg, VoiceConfig) and args.voice_node in (None, name):
            chosen = (name, node_cfg)
            break
    if chosen is None and args.voice_node:
        print(f"mtor listen: no voice node {args.voice_node!r} in the config", file=sys.stderr)
        return EXIT_USAGE
    name, vcfg = chosen or ("listen", VoiceConfig(type="voice"))
    if not args.file.is_file():
        print(f"mtor listen: no such file {args.file}", file=sys.stderr)
        return EXIT_USAGE
    update: dict[str, Any] = {
        "source": SourceConfig(type="file", path=args.file),
        "sink": SinkConfig(type="file", path=args.out) if args.out else SinkConfig(),
        "arbitration_s": 0.0,
    }
    if args.no_wake:
        update["wake"] = WakeConfig(engine="none")
    vcfg = vcfg.model_copy(update=update)
    started = time.perf_counter()

    def show(event: str, value: Any, attrs: dict[str, Any]) -> None:
        t = round(time.perf_counter() - started, 3)
        print(json.dumps({"t": t, "event": event, "value": value, **attrs}), flush=True)

    async def main() -> int:
        async with contextlib.AsyncExitStack() as stack:
            bus: Bus | None = None
            if not args.offline:
                try:
                    bus = await stack.enter_async_context(client_bus(config, "listen"))
                except BusNotConnectedError as exc:
                    print(f"mtor listen: {exc}: running offline", file=sys.stderr)
            if bus is None:
                # Never connected: events and intent actions stay in its outbox, the
                # chat fallback says the realm is unreachable.
                bus = Bus(config.broker, "mtor-listen-offline")
            ctx = NodeContext(
                node_id=f"{config.effective_node_id}-listen",
                config=config,
                bus=bus,
                state_dir=Path("."),
                announce=_nothing,
            )
            node = VoiceNode(name, vcfg, ctx)
            await node.setup()
            node.listeners.append(show)
            await node.realm.start()
            if bus.connected and vcfg.intents.discovery.enabled:
                # setup() subscribed to the broker's discovery configs: the retained
                # ones arrive at once, give them a moment before the file is heard.
                await asyncio.sleep(DISCOVERY_SETTLE_S)
            sink = audio.WavSink(args.out) if args.out else audio.NullSink()
            pipeline = node.make_pipeline(sink=_Accumulating(sink) if args.out else sink)
            if pipeline is None:
                print(f"mtor listen: the pipeline cannot run: {node.problems}", file=sys.stderr)
                return EXIT_FAILURE
            await pipeline.run(audio.file_source(args.file), live=False)
            await node.close()
            return EXIT_OK

    return asyncio.run(main())


DISCOVERY_SETTLE_S: Final = 0.5  # for the retained discovery configs to arrive


async def _nothing() -> None:
    return None


class _Accumulating:
    """All answers of one file run into one WAV (a plain WavSink keeps only the last)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started = False

    async def start(self) -> None:
        if not self.started:
            await self.inner.start()
            self.started = True

    async def write(self, pcm: bytes) -> None:
        await self.inner.write(pcm)

    async def finish(self) -> None:
        await self.inner.finish()

    async def abort(self) -> None:
        await self.inner.abort()
