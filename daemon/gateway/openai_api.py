"""The OpenAI-compatible API (``/v1``): models, chat, transcription, speech, images.

Each call is one realm task (``chat``, ``stt``, ``tts``, ``imagine``) for the
token's user, so the orchestrator picks the best peer.  Shapes follow OpenAI's
API reference closely enough for the official ``openai`` package; what the
realm cannot do (tools, several choices, mp3) is a clear 400, never faked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from daemon.gateway import audio
from daemon.gateway.errors import ApiError, error_body
from daemon.gateway.ports import PortsDep, User
from daemon.gateway.realm import output_of
from daemon.protocol.task import FINAL_STATUSES, Constraints, TaskUpdate

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_TEXT = 100_000
# Model names that mean "whichever peer the realm picks".
ANY_MODEL = frozenset({"", "chat", "realm", "default", "auto"})
TTS_MODELS = frozenset({"", "tts", "tts-1", "tts-1-hd", "gpt-4o-mini-tts", "default", "auto"})


class _Open(BaseModel):
    # OpenAI clients send many optional fields (top_p, seed, ...): ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Open):
    type: str = Field(max_length=32)
    text: str | None = Field(default=None, max_length=MAX_TEXT)


class ChatMessageIn(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(default=None)


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    model: str = Field(default="chat", max_length=128)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int = Field(default=1, ge=1, le=8)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)


class SpeechRequest(_Open):
    model: str = Field(default="tts", max_length=128)
    input: str = Field(min_length=1, max_length=5000)
    voice: str | None = Field(default=None, max_length=64)
    response_format: Literal["wav", "pcm", "mp3", "opus", "aac", "flac"] = "wav"
    speed: float | None = Field(default=None, ge=0.25, le=4.0)


class ImageRequest(_Open):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str = Field(default="imagine", max_length=128)
    n: int = Field(default=1, ge=1, le=4)
    size: str | None = Field(default=None, pattern=r"^\d{2,4}x\d{2,4}$")
    response_format: Literal["b64_json", "url"] = "b64_json"


# ------------------------------------------------------------------ models


@router.get("/models", summary="The realm's capabilities and models (online peers)")
async def list_models(ports: PortsDep, who: User) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cap, offers in sorted(ports.hub.capabilities().items()):
        nodes = sorted({o["node_id"] for o in offers})
        entries = [(cap, cap)] + [(o["model"], cap) for o in offers if o.get("model")]
        for model_id, capability in entries:
            if model_id in seen:
                continue
            seen.add(model_id)
            data.append(
                {
                    "id": model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "realm",
                    "capability": capability,
                    "nodes": nodes,
                }
            )
    return {"object": "list", "data": data}


def _constraints_for(
    ports: PortsDep, capability: str, model: str, generic: frozenset[str]
) -> Constraints | None:
    """A model name: any peer (a generic name), one advertising that model or backend,
    or 404.  Only names taken from adverts go into the constraints."""
    if model in generic:
        return None
    offers = ports.hub.capabilities().get(capability, [])
    for o in offers:
        if o.get("model") == model:
            return Constraints(model=o["model"])
        if o.get("backend") == model:
            return Constraints(backend=o["backend"])
    raise ApiError(
        404,
        "model_not_found",
        f"no online peer offers {capability} with model {model[:128]!r}",
        param="model",
    )


def _chat_input(req: ChatRequest) -> dict[str, Any]:
    if req.tools:
        raise ApiError(
            400, "unsupported", "tools are not supported by the realm's chat", param="tools"
        )
    if req.n != 1:
        raise ApiError(400, "unsupported", "the realm answers with one choice (n=1)", param="n")
    messages = []
    for m in req.messages:
        if m.role == "tool":
            raise ApiError(400, "unsupported", "tool messages are not supported", param="messages")
        content = m.content
        if isinstance(content, list):
            texts = [p.text or "" for p in content if p.type == "text"]
            if len(texts) != len(content):
                raise ApiError(
                    400, "unsupported", "only text content parts are supported", param="messages"
                )
            content = "".join(texts)
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": content or ""})
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "bad_input", "messages must end with a user message", param="messages")
    inp: dict[str, Any] = {"messages": messages}
    tokens = req.max_completion_tokens or req.max_tokens
    if tokens is not None:
        inp["max_tokens"] = tokens
    if req.temperature is not None:
        inp["temperature"] = req.temperature
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        inp["json_schema"] = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(
                400, "bad_input", "json_schema.schema must be an object", param="response_format"
            )
        inp["json_schema"] = schema
    return inp


def _usage(output: Any) -> dict[str, int] | None:
    usage = output.get("usage") if isinstance(output, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _finish(output: Any) -> str:
    reason = output.get("finish_reason") if isinstance(output, dict) else None
    return reason if reason in ("stop", "length", "content_filter") else "stop"


@router.post(
    "/chat/completions",
    summary="Chat (the realm's chat capability); stream=true streams server-sent events",
    response_model=None,
)
async def chat_completions(
    req: ChatRequest, ports: PortsDep, who: User
) -> dict[str, Any] | StreamingResponse:
    constraints = _constraints_for(ports, "chat", req.model, ANY_MODEL)
    inp = _chat_input(req)
    tracked = await ports.realm.submit(who, "chat", inp, constraints=constraints)
    created = int(time.time())
    cid = f"chatcmpl-{tracked.handle.task_id}"
    if not req.stream:
        output = await ports.realm.result(tracked)
        text = output.get("text", "") if isinstance(output, dict) else str(output)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": _model_of(output, req.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish(output),
                }
            ],
            "usage": _usage(output),
        }
    # The first update decides the status: a refusal is an HTTP error, not a stream.
    updates = tracked.follow(ports.cfg.task_timeout + 5)
    try:
        first = await anext(updates)
    except (TimeoutError, StopAsyncIteration) as exc:
        raise ApiError(504, "timeout", "no answer from the realm in time") from exc
    if first.status in ("failed", "cancelled"):
        await updates.aclose()
        output_of(first)  # raises the task's error as an HTTP one
    usage = bool(req.stream_options and req.stream_options.include_usage)
    body = _cancelling(
        _sse_chat(first, updates, cid, created, req.model, usage),
        lambda: ports.realm.cancel_soon(who, tracked, "the HTTP client went away"),
    )
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _cancelling(
    body: AsyncIterator[bytes], cancel: Callable[[], None]
) -> AsyncIterator[bytes]:
    """The stream, and the realm task cancelled when the client leaves before its end
    (the server then stops iterating: GeneratorExit or CancelledError here)."""
    finished = False
    try:
        async for part in body:
            yield part
        finished = True
    finally:
        if not finished:
            cancel()


def _model_of(output: Any, asked: str) -> str:
    model = output.get("model") if isinstance(output, dict) else None
    return model if isinstance(model, str) and model else asked


async def _sse_chat(  # noqa: PLR0917
    first: TaskUpdate,
    rest: AsyncIterator[TaskUpdate],
    cid: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        doc = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            if delta or finish
            else [],
            **extra,
        }
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)

    async def all_updates() -> AsyncIterator[TaskUpdate]:
        yield first
        async for u in rest:
            yield u

    try:
        async for update in all_updates():
            if update.status == "partial":
                delta = update.output.get("delta") if isinstance(update.output, dict) else None
                if isinstance(delta, str) and delta:
                    yield chunk({"content": delta}, None)
            elif update.status == "done":
                yield chunk({}, _finish(update.output))
                if include_usage:
                    yield chunk({}, None, usage=_usage(update.output))
                break
            elif update.status in FINAL_STATUSES:
                err = update.error
                code = err.code if err else update.status
                msg = err.message if err else update.status
                yield b"data: " + json.dumps(error_body(502, code, msg)).encode() + b"\n\n"
                break
    except TimeoutError:
        yield b"data: " + json.dumps(error_body(504, "timeout", "no answer in time")).encode()
        yield b"\n\n"
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------- audio


@router.post("/audio/transcriptions", summary="Speech to text (the realm's stt) of a WAV upload")
async def transcriptions(  # noqa: PLR0917 - FastAPI takes form fields as parameters
    ports: PortsDep,
    who: User,
    file: Annotated[UploadFile, File(description="A PCM WAV file, at most 30 s")],
    model: Annotated[str, Form(max_length=128)] = "stt",
    language: Annotated[str | None, Form(max_length=16)] = None,
    prompt: Annotated[str | None, Form(max_length=4000)] = None,
    response_format: Annotated[Literal["json", "text", "verbose_json"], Form()] = "json",
    temperature: Annotated[float | None, Form(ge=0, le=1)] = None,
) -> Response:
    data = await file.read()
    try:
        pcm = await asyncio.to_thread(audio.wav_to_pcm16k, data)
    except audio.AudioError as exc:
        raise ApiError(400, "bad_input", str(exc), param="file") from exc
    if not pcm:
        raise ApiError(400, "bad_input", "the WAV file holds no audio", param="file")
    out = await ports.realm.transcribe(who, pcm, language)
    text = out.get("text", "") if isinstance(out, dict) else ""
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": out.get("language") if isinstance(out, dict) else None,
                "duration": out.get("audio_s") if isinstance(out, dict) else None,
                "text": text,
            }
        )
    return JSONResponse({"text": text})


@router.post(
    "/audio/speech",
    summary="Text to speech (the realm's tts): WAV (default) or raw 16 kHz PCM",
    response_class=Response,
    responses={200: {"content": {"audio/wav": {}, "audio/L16": {}}}},
)
async def speech(req: SpeechRequest, ports: PortsDep, who: User) -> Response:
    if req.response_format not in ("wav", "pcm"):
        raise ApiError(
            400,
            "unsupported",
            f"{req.response_format} is not offered: use response_format wav or pcm",
            param="response_format",
        )
    constraints = _constraints_for(ports, "tts", req.model, TTS_MODELS)
    pcm = await ports.realm.speak(who, req.input, constraints)
    if req.response_format == "pcm":
        return Response(pcm, media_type=audio.CONTENT_TYPE)
    return Response(await asyncio.to_thread(audio.pcm_to_wav, pcm), media_type="audio/wav")


# ------------------------------------------------------------------ images


@router.post("/images/generations", summary="Text to image (the realm's imagine capability)")
async def images(req: ImageRequest, ports: PortsDep, who: User) -> dict[str, Any]:
    if req.response_format != "b64_json":
        raise ApiError(
            400, "unsupported", "only response_format b64_json is offered", param="response_format"
        )
    inp: dict[str, Any] = {"prompt": req.prompt}
    if req.size:
        w, _, h = req.size.partition("x")
        inp["width"], inp["height"] = int(w), int(h)
    created = int(time.time())
    results: list[dict[str, Any]] = []
    for _ in range(req.n):
        out = await ports.realm.call(who, "imagine", inp)
        topic = out.get("media_topic") if isinstance(out, dict) else None
        png, _ctype = await ports.realm.media(str(topic))
        results.append({"b64_json": base64.b64encode(png).decode(), "revised_prompt": None})
    return {"created": created, "data": results}
