"""The voice satellite: wake word → voice activity → speech-to-text → intent → answer → speech.

Registers the ``voice`` node type; where faster-whisper, vosk or piper is
installed it is offered as an stt/tts server (no microphone: a satellite is
named in the config).
"""

import importlib.util

from daemon.plugins import Offer, register_node_type
from nodes.voice.config import VoiceConfig

SPEECH_PACKAGES = ("faster_whisper", "vosk", "piper")


def _offer() -> Offer:
    if not any(importlib.util.find_spec(m) is not None for m in SPEECH_PACKAGES):
        return Offer(None, "none of faster-whisper, vosk, piper is installed")
    return Offer(VoiceConfig(type="voice"))


register_node_type("voice", VoiceConfig, "nodes.voice.node:VoiceNode", _offer)
