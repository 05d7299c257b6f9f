"""Chat speed in-process vs through the realm: time to first token and tokens/s.

Same model, same prompts, same ``max_tokens``, temperature 0, same
``n_threads``, in the same run:

* ``inprocess``: a :class:`~nodes.chat.node.ChatNode` in this process,
  ``execute`` with streaming partials (as ``bench.chat_inprocess`` "node");
* ``realm``: a private Mosquitto, a real ``mtor orchestrator`` and a real
  ``mtor node`` process serving the same chat node; the task is submitted from
  this process with :class:`~daemon.client.RealmClient` and its updates read
  with ``async for``: TTFT is submit → first ``partial``, tokens/s runs from
  the first partial to the final update.

Tokens are counted the same way on both sides: ``usage.completion_tokens`` of
the result when the backend reports it (else the number of deltas);
tokens/s = (tokens - 1) / (end - first token).

The two sides cannot run at the same time on a small machine: runs are
interleaved (in-process, realm, realm, in-process, ...) so drift cancels, and
only one model generates at any moment (the other one is loaded but idle, so it
costs memory, not CPU).  Neither side resets its context between runs; both
see the same sequence of prompts, so llama.cpp's prefix cache helps them alike.

    .venv/bin/python -m bench.chat_realm [--runs 6] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final, cast

from bench.chat_inprocess import PROMPTS, _noop, _summary
from bench.common import emit, machine, mtor_command
from bench.realm import ONLINE_TIMEOUT, Realm, orchestrator_config, write_yaml
from daemon.broker import PrivateBroker
from daemon.client import TaskFailed
from daemon.config import build_config
from daemon.node import NodeContext
from daemon.worker import TaskRun
from nodes.chat.backends.llama_cpp import LlamaCppBackend
from nodes.chat.config import ChatConfig
from nodes.chat.node import ChatNode

TARGET_TTFT_OVERHEAD_MS: Final = 5.0
TARGET_TPS_RATIO: Final = 0.95
NODE_ID: Final = "chat1"


def chat_node_config(model: str, threads: int | None) -> dict[str, Any]:
    """The chat node entry used on both sides (no system prompt, temperature 0)."""
    return {
        "type": "chat",
        "backends": [{"type": "llama_cpp", "model": model, "n_threads": threads, "temperature": 0}],
        "system": None,
    }


def _tokens(output: Any, deltas: int) -> int:
    usage = output.get("usage") if isinstance(output, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return deltas


def _record(
    ttft: list[float],
    tps: list[float],
    *,
    start: float,
    first: float | None,
    end: float,
    n: int,
) -> None:
    if first is not None and n > 1 and end > first:
        ttft.append(first - start)
        tps.append((n - 1) / (end - first))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    entry = chat_node_config(args.model, args.threads)
    cfg = ChatConfig.model_validate({k: v for k, v in entry.items() if k != "type"})
    ctx = NodeContext(
        node_id="bench",
        config=build_config({"nodes": {}}),
        bus=cast(Any, None),
        state_dir=Path("state"),
        announce=_noop,
    )
    node = ChatNode("chat", cfg, ctx)
    await node.setup()
    backend = cast(LlamaCppBackend, node.backends[0])
    attrs = backend.attrs()
    assert backend._shared is not None and backend._shared.llm is not None
    llm = backend._shared.llm
    in_ttft: list[float] = []
    in_tps: list[float] = []
    realm_ttft: list[float] = []
    realm_tps: list[float] = []

    def payload(prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}

    async def inprocess_once(prompt: str) -> None:
        stamps: list[float] = []

        async def on_partial(_chunk: Any) -> None:
            stamps.append(time.monotonic())

        run = TaskRun(
            task_id="b", capability="chat", input=payload(prompt), emit_partial=on_partial
        )
        if args.reset:
            llm.reset()
        start = time.monotonic()
        output = await node.execute(run)
        end = time.monotonic()
        first = stamps[0] if stamps else None
        n = _tokens(output, len(stamps))
        _record(in_ttft, in_tps, start=start, first=first, end=end, n=n)

    try:
        with PrivateBroker() as broker, tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
            directory = Path(tmp)
            realm = Realm(broker, directory)
            async with realm.running():
                node_cfg = write_yaml(
                    directory / f"{NODE_ID}.yaml",
                    {
                        "realm": realm.realm,
                        "node_id": NODE_ID,
                        "broker": {"url": broker.url},
                        "logging": {"level": "warning"},
                        "daemon": {"state_dir": str(directory / f"{NODE_ID}-state")},
                        "nodes": {"chat": entry},
                    },
                )
                online = realm.online.setdefault(NODE_ID, asyncio.Event())
                realm.spawn(NODE_ID, [*mtor_command(), "node", "--config", str(node_cfg)])
                async with asyncio.timeout(ONLINE_TIMEOUT * 2):  # model load + warmup
                    await online.wait()
                orch_cfg = orchestrator_config(directory, broker.url, realm.realm)
                realm.spawn(
                    "orchestrator", [*mtor_command(), "orchestrator", "--config", str(orch_cfg)]
                )
                await wait_chat(realm)

                async def realm_once(prompt: str) -> None:
                    start = time.monotonic()
                    handle = await realm.client.submit("chat", payload(prompt), timeout=120)
                    first: float | None = None
                    deltas = 0
                    async for update in handle:
                        if update.status == "partial":
                            deltas += 1
                            first = first or time.monotonic()
                    end = time.monotonic()
                    final = handle.final
                    if final is None or final.status != "done":
                        raise TaskFailed(cast(Any, final))
                    n = _tokens(final.output, deltas)
                    _record(realm_ttft, realm_tps, start=start, first=first, end=end, n=n)

                # untimed warm-up of both paths (lazy imports, first MQTT messages)
                await inprocess_once(PROMPTS[0])
                await realm_once(PROMPTS[0])
                in_ttft.clear(), in_tps.clear(), realm_ttft.clear(), realm_tps.clear()

                for i in range(args.runs):
                    prompt = PROMPTS[i % len(PROMPTS)]
                    order = ("in", "realm") if i % 2 == 0 else ("realm", "in")
                    for side in order:
                        if side == "in":
                            await inprocess_once(prompt)
                        else:
                            await realm_once(prompt)
                    print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    finally:
        await node.close()

    inprocess, via_realm = _summary(in_ttft, in_tps), _summary(realm_ttft, realm_tps)
    inprocess["tokens_per_s_all"] = [round(t, 1) for t in in_tps]
    via_realm["tokens_per_s_all"] = [round(t, 1) for t in realm_tps]
    overhead = round(via_realm["ttft_ms_p50"] - inprocess["ttft_ms_p50"], 2)
    paired = [(r - i) * 1000 for r, i in zip(realm_ttft, in_ttft, strict=False)]
    ratio = round(via_realm["tokens_per_s_p50"] / inprocess["tokens_per_s_p50"], 3)
    return {
        "benchmark": "chat_realm",
        "model": args.model,
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "n_threads": attrs.get("n_threads"),
        "cpus": os.cpu_count(),
        "method": (
            "interleaved in-process / realm runs (order alternates), one model generating at a "
            "time; both models stay loaded (idle one costs RAM only); no context reset on "
            "either side; tokens = usage.completion_tokens"
        ),
        "inprocess_reset_each_run": args.reset,
        "inprocess": inprocess,
        "realm": via_realm,
        "realm_overhead_ttft_ms_p50": overhead,
        "realm_overhead_ttft_ms_paired_p50": round(statistics.median(paired), 2)
        if paired
        else None,
        "realm_tokens_per_s_ratio": ratio,
        "targets": {
            "ttft_overhead_ms_p50": TARGET_TTFT_OVERHEAD_MS,
            "tokens_per_s_ratio": TARGET_TPS_RATIO,
        },
        "pass": {
            "ttft_overhead": overhead <= TARGET_TTFT_OVERHEAD_MS,
            "tokens_per_s_ratio": ratio >= TARGET_TPS_RATIO,
        },
    }


async def wait_chat(realm: Realm) -> None:
    """Until a one-token chat task completes (the orchestrator sees the node)."""
    async with asyncio.timeout(ONLINE_TIMEOUT):
        while True:
            handle = await realm.client.submit(
                "chat", {"prompt": "hi", "max_tokens": 1, "temperature": 0}, timeout=10
            )
            try:
                async with asyncio.timeout(5.0):
                    await handle.result()
            except (TimeoutError, TaskFailed):
                realm.client.pending.pop(handle.task_id, None)
                await asyncio.sleep(0.3)
            else:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--reset",
        action="store_true",
        help="reset the in-process model's context before each run (the node cannot)",
    )
    args = parser.parse_args()
    emit({"machine": machine(), **asyncio.run(measure(args))})


if __name__ == "__main__":
    main()
