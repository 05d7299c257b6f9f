"""Chat speed in-process: time to first token and tokens/s, raw llama.cpp vs the
chat node (``ChatNode.execute`` with streaming partials), same model, same run.

    .venv/bin/python -m bench.chat_inprocess [--model smollm2-135m-instruct] [--runs 5]

This is the in-process baseline of the issue's benchmark; the realm half
(orchestrator + MQTT streaming) compares against :func:`measure`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any, cast

from bench.common import emit, machine
from daemon.config import build_config
from daemon.node import NodeContext
from daemon.worker import TaskRun
from nodes.chat.backends.llama_cpp import LlamaCppBackend, _chunks
from nodes.chat.config import ChatConfig
from nodes.chat.node import ChatNode

PROMPTS = (
    "Write two sentences about the sea.",
    "Name five animals and one fact about each.",
    "Explain what a thermostat does.",
)


async def _noop() -> None:
    return None


def _summary(ttft: list[float], tps: list[float]) -> dict[str, Any]:
    return {
        "ttft_ms_p50": round(statistics.median(ttft) * 1000, 2),
        "ttft_ms_all": [round(t * 1000, 2) for t in ttft],
        "tokens_per_s_p50": round(statistics.median(tps), 1),
    }


async def measure(model: str, runs: int, max_tokens: int, threads: int | None) -> dict[str, Any]:
    cfg = ChatConfig.model_validate(
        {
            "backends": [
                {"type": "llama_cpp", "model": model, "n_threads": threads, "temperature": 0}
            ],
            "system": None,
        }
    )
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
    assert backend._shared is not None
    llm = backend._shared.llm
    assert llm is not None
    raw_ttft: list[float] = []
    raw_tps: list[float] = []
    node_ttft: list[float] = []
    node_tps: list[float] = []

    def raw_once(prompt: str) -> None:
        """The library's own stream, in this thread."""
        start = time.monotonic()
        first = None
        n = 0
        for chunk in _chunks(
            llm,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
        ):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                first = first or time.monotonic()
        end = time.monotonic()
        if first is not None and n > 1:
            raw_ttft.append(first - start)
            raw_tps.append((n - 1) / (end - first))

    async def node_once(prompt: str) -> None:
        """Through the node: input check, queue, worker thread, partial callbacks."""
        stamps: list[float] = []

        async def on_partial(_chunk: Any) -> None:
            stamps.append(time.monotonic())

        run = TaskRun(
            task_id="b",
            capability="chat",
            input={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
            emit_partial=on_partial,
        )
        start = time.monotonic()
        await node.execute(run)
        if len(stamps) > 1:
            node_ttft.append(stamps[0] - start)
            node_tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))

    attrs = backend.attrs()
    try:
        for i in range(runs):
            prompt = PROMPTS[i % len(PROMPTS)]
            # Each run starts from an empty context (reset), so neither side gains
            # from the other's prompt cache; the order alternates against drift.
            for side in ("raw", "node") if i % 2 == 0 else ("node", "raw"):
                llm.reset()
                if side == "raw":
                    raw_once(prompt)
                else:
                    await node_once(prompt)
    finally:
        await node.close()
    raw, via_node = _summary(raw_ttft, raw_tps), _summary(node_ttft, node_tps)
    return {
        "model": model,
        "runs": runs,
        "max_tokens": max_tokens,
        "n_threads": attrs.get("n_threads"),
        "advertised": {k: attrs.get(k) for k in ("tokens_per_s", "time_to_first_token_ms")},
        "raw_llama_cpp": raw,
        "chat_node": via_node,
        "node_overhead_ttft_ms_p50": round(via_node["ttft_ms_p50"] - raw["ttft_ms_p50"], 2),
        "node_tokens_per_s_ratio": round(via_node["tokens_per_s_p50"] / raw["tokens_per_s_p50"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    result = asyncio.run(measure(args.model, args.runs, args.max_tokens, args.threads))
    emit({"machine": machine(), "chat_inprocess": result})


if __name__ == "__main__":
    main()
