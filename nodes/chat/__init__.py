"""The ``chat`` capability: local llama.cpp, Anthropic Claude, OpenAI-compatible servers.

Registers the ``chat`` node type; it is offered where the llama.cpp package
and the default backends' models are installed (remote backends need a key,
so only a config names them).
"""

import importlib.util
import logging

from daemon.plugins import Offer, register_node_type
from nodes.chat.config import ChatConfig

log = logging.getLogger(__name__)


def _offer() -> Offer:
    if importlib.util.find_spec("llama_cpp") is None:
        return Offer(None, "the llama-cpp-python package is not installed")
    from daemon.modelstore import ModelStore

    chat = ChatConfig()
    try:
        store = ModelStore.default()
        models = sorted({str(m) for b in chat.backends if (m := getattr(b, "model", None))})
        missing = [m for m in models if not store.status(m).present]
    except Exception as exc:  # a broken manifest must not stop the daemon
        log.warning("chat: cannot read the model store: %s", exc)
        return Offer(None, f"cannot read the model store: {exc}")
    if missing:
        return Offer(None, f"model {', '.join(missing)} is missing (mtor models pull)")
    return Offer(chat)


register_node_type("chat", ChatConfig, "nodes.chat.node:ChatNode", _offer)
