"""Chat through remote APIs, against local servers that speak the real protocols:
Anthropic's Messages API (its SSE event sequence and error bodies) and the
OpenAI chat-completions stream.  No network."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from daemon.config import build_config
from daemon.errors import MtorError, TaskError
from daemon.node import NodeContext
from daemon.worker import TaskRun
from nodes.chat.config import ChatConfig
from nodes.chat.node import ChatNode

pytest.importorskip("anthropic")
pytest.importorskip("httpx")

KEY = "sk-ant-test-0123456789"


@dataclass
class Scripted:
    """What the fake server answers next: (status, error type, message) or a reply."""

    errors: list[tuple[int, str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _reply_chunks(body: dict[str, Any]) -> list[str]:
    last = body["messages"][-1]["content"]
    if isinstance(last, list):  # content blocks
        last = "".join(b.get("text", "") for b in last)
    if body.get("output_config") or body.get("response_format"):
        return ['{"intent": ', '"lights_on", ', '"room": "kitchen"}']
    n = len(body["messages"])
    return ["You ", "said: ", last, f" ({n} messages)"]


class _Base(http.server.BaseHTTPRequestHandler):
    script: Scripted

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length", "0"))
        body: dict[str, Any] = json.loads(self.rfile.read(n))
        self.script.requests.append(body)
        self.script.headers.append({k.lower(): v for k, v in self.headers.items()})
        return body

    def _sse(self, events: list[tuple[str | None, dict[str, Any] | str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            chunk = (f"event: {name}\n" if name else "") + f"data: {text}\n\n"
            self.wfile.write(chunk.encode())
            self.wfile.flush()
        self.close_connection = True


class AnthropicHandler(_Base):
    def do_POST(self) -> None:
        body = self._body()
        if self.path != "/v1/messages":
            self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "?"}})
            return
        if self.script.errors:
            status, etype, message = self.script.errors.pop(0)
            self._json(
                status,
                {"type": "error", "error": {"type": etype, "message": message}},
                {"request-id": "req_test", "retry-after": "0"},
            )
            return
        chunks = _reply_chunks(body)
        msg = {
            "id": "msg_01Test",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": body["model"],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        }
        events: list[tuple[str | None, dict[str, Any] | str]] = [
            ("message_start", {"type": "message_start", "message": msg}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for c in chunks:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": c},
                    },
                )
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(chunks)},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._sse(events)


class OpenAIHandler(_Base):
    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = self._body()
        if self.script.errors:
            status, etype, message = self.script.errors.pop(0)
            self._json(status, {"error": {"message": message, "type": etype}})
            return
        assert body["stream"] is True
        chunks = _reply_chunks(body)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        events: list[tuple[str | None, dict[str, Any] | str]] = [
            (None, chunk({"role": "assistant", "content": ""}))
        ]
        events += [(None, chunk({"content": c})) for c in chunks]
        events.append((None, chunk({}, "stop")))
        events.append((None, "[DONE]"))
        self._sse(events)


def _serve(handler: type[_Base]) -> Iterator[tuple[str, Scripted]]:
    script = Scripted()
    cls = type("H", (handler,), {"script": script})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def anthropic_server() -> Iterator[tuple[str, Scripted]]:
    yield from _serve(AnthropicHandler)


@pytest.fixture
def openai_server() -> Iterator[tuple[str, Scripted]]:
    yield from _serve(OpenAIHandler)


async def _noop() -> None:
    return None


def make_node(
    tmp_path: Path, backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> ChatNode:
    cfg = ChatConfig.model_validate({"backends": [backend], **extra})
    ctx = NodeContext(
        node_id="test",
        config=build_config({"nodes": {}}),
        bus=cast(Any, None),
        state_dir=tmp_path,
        announce=_noop,
    )
    monkeypatch.setenv("MTOR_MODELS_DIR", str(tmp_path))
    return ChatNode("chat", cfg, ctx)


class Partials:
    def __init__(self) -> None:
        self.chunks: list[Any] = []

    async def __call__(self, chunk: Any) -> None:
        self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return "".join(c["delta"] for c in self.chunks)


def task(data: Any, partials: Partials | None = None, user: str | None = "alice") -> TaskRun:
    return TaskRun(
        task_id="t1",
        capability="chat",
        input=data,
        user=user,
        emit_partial=partials or Partials(),
    )


# ------------------------------------------------------------------ anthropic


def sent_key(headers: dict[str, str]) -> str | None:
    """The API key as sent (SDK 0.x: x-api-key; 2.x: a bearer token)."""
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


def anthropic_backend(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "anthropic", "base_url": url, "model": "claude-test", "max_retries": 0, **extra}


async def test_anthropic_streams_and_carries_history(
    tmp_path: Path, anthropic_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = anthropic_server
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    node = make_node(tmp_path, anthropic_backend(url), monkeypatch)
    await node.setup()
    try:
        caps = node.capabilities()
        assert [(c.name, c.backend, c.model, c.streaming) for c in caps] == [
            ("chat", "anthropic", "claude-test", True)
        ]
        partials = Partials()
        out = await node.execute(
            task({"prompt": "hello", "conversation_id": "c1", "system": "Be brief."}, partials)
        )
        assert out["text"] == partials.text == "You said: hello (1 messages)"
        assert len(partials.chunks) == 4
        assert out["model"] == "claude-test" and out["backend"] == "anthropic"
        assert out["usage"] == {"prompt_tokens": 25, "completion_tokens": 4}
        assert out["finish_reason"] == "end_turn"
        first = script.requests[-1]
        assert first["system"] == "Be brief." and first["stream"] is True
        assert sent_key(script.headers[-1]) == KEY

        out2 = await node.execute(task({"prompt": "and again?", "conversation_id": "c1"}))
        sent = script.requests[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"] == out["text"]
        assert out2["text"].endswith("(3 messages)")
        # Another user with the same conversation id starts from scratch.
        out3 = await node.execute(task({"prompt": "hi", "conversation_id": "c1"}, user="bob"))
        assert out3["text"].endswith("(1 messages)")
    finally:
        await node.close()


async def test_anthropic_json_schema(
    tmp_path: Path, anthropic_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = anthropic_server
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    node = make_node(tmp_path, anthropic_backend(url), monkeypatch)
    await node.setup()
    schema = {"type": "object", "properties": {"intent": {"type": "string"}}}
    try:
        out = await node.execute(task({"prompt": "turn the light on", "json_schema": schema}))
        assert out["json"] == {"intent": "lights_on", "room": "kitchen"}
        assert script.requests[-1]["output_config"]["format"]["schema"] == schema
        assert "JSON schema" in script.requests[-1]["system"]
    finally:
        await node.close()


@pytest.mark.parametrize(
    "case",
    [
        (401, "authentication_error", "invalid x-api-key", "auth"),
        (
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your rate limit",
            "rate_limited",
        ),
        (529, "overloaded_error", "Overloaded", "unavailable"),
        (400, "invalid_request_error", "max_tokens: must be at least 1", "bad_input"),
        (500, "api_error", "Internal server error", "backend_error"),
    ],
)
async def test_anthropic_errors_map_to_task_errors(
    tmp_path: Path,
    anthropic_server: tuple[str, Scripted],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: tuple[int, str, str, str],
) -> None:
    status, etype, message, code = case
    url, script = anthropic_server
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    node = make_node(tmp_path, anthropic_backend(url), monkeypatch)
    await node.setup()
    script.errors.append((status, etype, message))
    try:
        with pytest.raises(TaskError) as info:
            await node.execute(task({"prompt": "hi"}))
        assert info.value.code == code
        assert message in str(info.value)
        assert KEY not in str(info.value)
        assert KEY not in caplog.text
    finally:
        await node.close()


async def test_anthropic_retries_overload_then_succeeds(
    tmp_path: Path, anthropic_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = anthropic_server
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    node = make_node(tmp_path, anthropic_backend(url, max_retries=1), monkeypatch)
    await node.setup()
    script.errors.append((529, "overloaded_error", "Overloaded"))
    try:
        out = await node.execute(task({"prompt": "hi"}))
        assert out["text"].startswith("You said: hi")
        assert len(script.requests) == 2
    finally:
        await node.close()


async def test_anthropic_connection_refused_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    node = make_node(tmp_path, anthropic_backend("http://127.0.0.1:9"), monkeypatch)
    await node.setup()
    try:
        with pytest.raises(TaskError) as info:
            await node.execute(task({"prompt": "hi"}))
        assert info.value.code == "unavailable"
    finally:
        await node.close()


async def test_anthropic_without_key_is_not_advertised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    node = make_node(tmp_path, anthropic_backend("http://127.0.0.1:9"), monkeypatch)
    with pytest.raises(MtorError, match="no API key"):
        await node.setup()
    assert node.capabilities() == []


async def test_anthropic_key_file(
    tmp_path: Path, anthropic_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = anthropic_server
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    node = make_node(tmp_path, anthropic_backend(url, api_key_file=str(key_file)), monkeypatch)
    await node.setup()
    try:
        await node.execute(task({"prompt": "hi"}))
        assert sent_key(script.headers[-1]) == KEY
    finally:
        await node.close()


# ------------------------------------------------------------------ openai_compat


def openai_backend(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "openai_compat", "base_url": url + "/v1", "model": "tiny", **extra}


async def test_openai_compat_streams(
    tmp_path: Path, openai_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = openai_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    node = make_node(tmp_path, openai_backend(url), monkeypatch)
    await node.setup()
    try:
        assert [c.backend for c in node.capabilities()] == ["openai_compat"]
        partials = Partials()
        out = await node.execute(
            task(
                {
                    "messages": [
                        {"role": "system", "content": "S"},
                        {"role": "user", "content": "yo"},
                    ]
                },
                partials,
            )
        )
        assert out["text"] == partials.text == "You said: yo (2 messages)"
        assert out["finish_reason"] == "stop"
        sent = script.requests[-1]
        assert sent["messages"][0] == {"role": "system", "content": "S"}
        assert script.headers[-1]["authorization"] == "Bearer sk-local"
        schema = {"type": "object"}
        out = await node.execute(task({"prompt": "lights", "json_schema": schema}))
        assert out["json"]["intent"] == "lights_on"
        assert script.requests[-1]["response_format"]["json_schema"]["schema"] == schema
    finally:
        await node.close()


async def test_openai_compat_errors(
    tmp_path: Path, openai_server: tuple[str, Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = openai_server
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    node = make_node(tmp_path, openai_backend(url), monkeypatch)
    await node.setup()
    try:
        for status, code in ((401, "auth"), (429, "rate_limited"), (503, "unavailable")):
            script.errors.append((status, "error", f"boom {status}"))
            with pytest.raises(TaskError) as info:
                await node.execute(task({"prompt": "hi"}))
            assert info.value.code == code and f"boom {status}" in str(info.value)
        assert "authorization" not in script.headers[-1]
    finally:
        await node.close()


async def test_openai_compat_unreachable_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(tmp_path, openai_backend("http://127.0.0.1:9"), monkeypatch)
    await node.setup()  # transient: the node runs and retries in run()
    assert node.capabilities() == []
    with pytest.raises(TaskError) as info:
        await node.execute(task({"prompt": "hi"}))
    assert info.value.code == "unavailable"


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": ""},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "a", "max_tokens": 0},
        {"prompt": "a", "colour": "blue"},
        {"prompt": "a", "json_schema": "not a dict"},
        42,
    ],
)
async def test_bad_input(
    tmp_path: Path,
    openai_server: tuple[str, Scripted],
    monkeypatch: pytest.MonkeyPatch,
    bad: Any,
) -> None:
    url, _ = openai_server
    node = make_node(tmp_path, openai_backend(url), monkeypatch)
    await node.setup()
    try:
        with pytest.raises(TaskError) as info:
            await node.execute(task(bad))
        assert info.value.code == "bad_input"
    finally:
        await node.close()
