"""Chat pieces without models or servers: input, config, conversations."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.config import build_config
from daemon.errors import ConfigError, TaskError
from nodes.catalog import node_types
from nodes.chat.config import ChatConfig, LlamaCppBackendConfig, OpenAICompatBackendConfig
from nodes.chat.conversation import Conversations
from nodes.chat.node import parse_input


def test_chat_is_a_node_type() -> None:
    assert "chat" in node_types()
    config = build_config(
        {
            "nodes": {
                "mind": {
                    "type": "chat",
                    "backends": [
                        {"type": "llama_cpp", "n_threads": 4, "idle_unload": 600},
                        {"type": "openai_compat", "base_url": "http://x/v1", "model": "m"},
                    ],
                }
            }
        }
    )
    node = config.nodes["mind"]
    assert isinstance(node, ChatConfig)
    assert isinstance(node.backends[0], LlamaCppBackendConfig)
    assert isinstance(node.backends[1], OpenAICompatBackendConfig)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            {"nodes": {"mind": {"type": "chat", "backends": [{"type": "llama_cpp", "n_ctx": 1}]}}}
        )
    assert "nodes.mind.backends[0].llama_cpp.n_ctx" in str(info.value)
    with pytest.raises(ConfigError, match="does not match any of the expected tags"):
        build_config({"nodes": {"mind": {"type": "chat", "backends": [{"type": "gpt"}]}}})


def test_default_backend_is_local_smollm2() -> None:
    [backend] = ChatConfig().backends
    assert isinstance(backend, LlamaCppBackendConfig)
    assert backend.model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("data", "prompt"),
    [
        ({"prompt": "hi"}, "hi"),
        ("hi", "hi"),
    ],
)
def test_parse_input_prompt(data: Any, prompt: str) -> None:
    assert parse_input(data).prompt == prompt


def test_parse_input_messages_and_options() -> None:
    inp = parse_input(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "max_tokens": 10,
            "temperature": 0.1,
            "json_schema": {"type": "object"},
            "conversation_id": "x",
        }
    )
    assert inp.messages is not None and len(inp.messages) == 4
    assert inp.json_schema == {"type": "object"}


def test_parse_input_errors_are_readable() -> None:
    with pytest.raises(TaskError) as info:
        parse_input({"prompt": "a", "temperature": 9})
    assert info.value.code == "bad_input"
    assert "temperature" in str(info.value)


def test_conversation_trims_to_bounds_starting_with_user() -> None:
    conv = Conversations(max_messages=4, max_chars=1000)
    key = conv.key("u", "c")
    for i in range(3):
        conv.append(
            key, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        )
    history = conv.history(key)
    assert [m["content"] for m in history] == ["q1", "a1", "q2", "a2"]
    conv2 = Conversations(max_messages=10, max_chars=5)
    k2 = conv2.key(None, "c")
    conv2.append(
        k2, [{"role": "user", "content": "long question"}, {"role": "assistant", "content": "ok"}]
    )
    assert conv2.history(k2) == []  # an assistant turn never starts a history
    conv2.append(k2, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert [m["role"] for m in conv2.history(k2)] == ["user", "assistant"]


def test_conversations_are_per_user_lru_and_expire() -> None:
    now = [0.0]
    conv = Conversations(max_conversations=2, ttl=10, clock=lambda: now[0])
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    a, b, c = conv.key("u1", "x"), conv.key("u2", "x"), conv.key("u1", "y")
    conv.append(a, turn)
    conv.append(b, turn)
    assert conv.history(a)  # a is now the most recently used
    conv.append(c, turn)  # evicts b
    assert conv.history(b) == [] and conv.history(a) and conv.history(c)
    now[0] = 100.0
    assert conv.history(a) == [] and len(conv) == 0
