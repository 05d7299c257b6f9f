"""Configuration of the voice node: audio in/out, wake word, VAD, STT, TTS and intents."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nodes.base import NodeConfigBase


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """Where the node hears: 16 kHz mono 16-bit frames from one of these."""

    type: Literal["none", "mic", "file", "stdin", "mqtt"] = Field(
        default="none", description="none: serve stt/tts only; mic, file, stdin or mqtt."
    )
    device: str | int | None = Field(default=None, description="sounddevice input device.")
    path: Path | None = Field(default=None, description="WAV file (type file).")
    realtime: bool = Field(
        default=False, description="file: pace frames at real time instead of as fast as possible."
    )
    topic: str | None = Field(
        default=None, description="mqtt: the media topic carrying audio/L16 chunks."
    )


class SinkConfig(_Strict):
    """Where the node speaks."""

    type: Literal["none", "speaker", "aplay", "file", "mqtt"] = Field(
        default="none", description="speaker (sounddevice), aplay, a WAV file, or mqtt media."
    )
    device: str | int | None = Field(default=None, description="sounddevice output device.")
    path: Path | None = Field(default=None, description="WAV file the answers are written to.")
    stream: str = Field(default="voice/answer", description="mqtt: media stream name.")


class WakeConfig(_Strict):
    """Wake word detection."""

    engine: Literal["micro", "open", "porcupine", "phrase", "none"] = Field(
        default="micro",
        description="micro: pymicro-wakeword; open: pyopen-wakeword; porcupine: pvporcupine "
        "1.x (offline, built-in keywords such as computer and jarvis); phrase: VAD + STT "
        "verification of a custom phrase; none: always listening (push-to-talk, tests).",
    )
    model: str = Field(
        default="okay_nabu",
        description="Built-in model (micro/open: okay_nabu, hey_jarvis, alexa, ...; "
        "porcupine: computer, jarvis, porcupine, ...).",
    )
    language: str | None = Field(
        default=None,
        description="This wake word's language: the command after it is transcribed "
        "(whisper) and matched (intents) in it. None: the satellite's.",
    )
    pipeline: Literal["auto", "local", "chat"] = Field(
        default="auto",
        description="What answers after this wake word: auto (local intents, else the "
        "realm's chat), local (intents only) or chat (the realm's chat directly).",
    )
    phrase: str | None = Field(
        default=None, description="engine phrase: the phrase to verify (e.g. 'hey hal')."
    )
    threshold: float | None = Field(
        default=None, ge=0, le=1, description="Detection probability (None: the model's own)."
    )
    phrase_match: float = Field(
        default=0.75,
        ge=0.5,
        le=1,
        description="engine phrase: how close the transcript's first words must be to the "
        "phrase (1: exact; lower accepts 'hey help' for 'hey hal' but more false wakes).",
    )
    preroll_s: float = Field(
        default=0.2,
        ge=0,
        le=0.8,
        description="Audio before the detection given to the command (the detector fires "
        "~0.2 s after the wake word ends; a first word said at once is kept).",
    )
    refractory_s: float = Field(
        default=2.0, ge=0, description="Seconds after a detection during which no other counts."
    )


class VadConfig(_Strict):
    """Voice activity: when a command starts and ends."""

    threshold: float = Field(default=0.5, ge=0, le=1, description="Speech probability cutoff.")
    silence_s: float = Field(
        default=0.6, gt=0, description="Silence after speech that ends the command."
    )
    max_command_s: float = Field(
        default=10.0, gt=0, le=30, description="Longest command heard (seconds)."
    )
    no_speech_s: float = Field(
        default=5.0, gt=0, description="Give up listening when nobody speaks for this long."
    )


class SttConfig(_Strict):
    """Speech-to-text."""

    backend: Literal["faster_whisper", "vosk"] = Field(
        default="faster_whisper", description="The local engine."
    )
    model: str | None = Field(
        default=None,
        description="Model name in models/manifest.yaml (default: whisper-tiny-en for "
        "faster_whisper, vosk-model-small-en-us for vosk).",
    )
    model_path: Path | None = Field(default=None, description="A model folder to use instead.")
    language: str | None = Field(default=None, description="Language code (whisper).")
    initial_prompt: str | None = Field(
        default=None, description="Whisper initial prompt: names, the wake phrase, device names."
    )
    grammar: list[str] | None = Field(
        default=None, description="Vosk: restrict recognition to these phrases/words."
    )
    routing: Literal["local", "remote", "auto"] = Field(
        default="local",
        description="local; remote: the realm's best stt peer; auto: whichever was faster.",
    )
    serve: bool = Field(default=True, description="Advertise the stt capability to the realm.")


class TtsConfig(_Strict):
    """Text-to-speech."""

    backend: Literal["piper", "espeak"] = Field(default="piper", description="The engine.")
    model: str = Field(default="piper-en-us-joe-medium", description="Piper voice (manifest).")
    model_path: Path | None = Field(default=None, description="A piper .onnx to use instead.")
    voice: str = Field(default="en-us", description="espeak-ng voice.")
    length_scale: float | None = Field(default=None, gt=0, description="Piper speed (<1 faster).")
    noise_scale: float | None = Field(
        default=None, ge=0, description="Piper generator noise (None: the voice's; 0: repeatable)."
    )
    noise_w_scale: float | None = Field(
        default=None, ge=0, description="Piper phoneme-length noise (None: the voice's)."
    )
    fallback: bool = Field(
        default=True, description="Speak with espeak-ng when the configured backend is missing."
    )
    serve: bool = Field(default=True, description="Advertise the tts capability to the realm.")


class Device(_Strict):
    """A thing voice can switch: an MQTT command topic and its payloads."""

    name: str = Field(description="Spoken name, e.g. 'light' or 'ceiling fan'.")
    area: str | None = Field(default=None, description="Spoken area, e.g. 'kitchen'.")
    component: Literal["light", "switch", "cover", "fan", "climate", "button"] = Field(
        default="light",
        description="What it is (which sentences apply: 'open' a cover, 'set' a light's "
        "brightness or a climate's temperature).",
    )
    command_topic: str = Field(
        description="Where commands go, e.g. zigbee2mqtt/kitchen_light/set or a Home "
        "Assistant MQTT entity's command topic."
    )
    payload_on: str = Field(default='{"state":"ON"}', description="Payload for 'turn on'.")
    payload_off: str = Field(default='{"state":"OFF"}', description="Payload for 'turn off'.")
    payload_set: str = Field(
        default='{"brightness":{value}}',
        description="Payload for 'set <device> to <value>' ({value} is replaced).",
    )
    retain: bool = Field(default=False, description="Retain the command.")


class Scene(_Strict):
    """A named scene: 'activate <name>' / '<name> scene' publishes one payload."""

    name: str = Field(description="Spoken name, e.g. 'movie night'.")
    command_topic: str = Field(description="Where the scene command goes.")
    payload: str = Field(default="ON", description="What is published.")


class DiscoveryConfig(_Strict):
    """Devices learned from Home Assistant MQTT discovery configs on the broker."""

    enabled: bool = Field(default=True, description="Read discovery configs on the broker.")
    prefix: str = Field(
        default="homeassistant", min_length=1, description="The discovery prefix bridges use."
    )


class IntentConfig(_Strict):
    """Local intents (hassil sentences) and the realm fallback."""

    language: str = Field(
        default="en",
        description="Language of the sentences (home-assistant-intents: en, de, fr, ...).",
    )
    devices: list[Device] = Field(default_factory=list, description="Switchable devices.")
    scenes: list[Scene] = Field(default_factory=list, description="Scenes.")
    discovery: DiscoveryConfig = Field(
        default_factory=DiscoveryConfig, description="Devices learned from the broker."
    )
    time: bool = Field(default=True, description="Answer 'what time is it' locally.")
    timers: bool = Field(default=True, description="Timers by voice ('set a timer for 5 min').")
    chat_fallback: bool = Field(
        default=True, description="Ask the realm's chat capability when no template matches."
    )
    chat_timeout_s: float = Field(default=20.0, gt=0, description="Bound on the chat fallback.")
    llm_path: Literal["one_call", "two_calls"] = Field(
        default="one_call",
        description="one_call: one streamed chat call that either names a device command "
        "or answers (spoken from its first sentence); two_calls: a JSON intent "
        "extraction, then an answer (the earlier, slower path).",
    )


class WyomingConfig(_Strict):
    """A Wyoming server (Home Assistant's Wyoming integration) on this node's models."""

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=10300, ge=0, le=65535, description="TCP port (0: any free one).")


class VoiceConfig(NodeConfigBase):
    """A voice satellite and/or an stt/tts server."""

    type: Literal["voice"]
    area: str | None = Field(
        default=None,
        description="Where the satellite is: 'turn off the lights' means this area's, "
        "and voice.announce can address it.",
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="Audio input.")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Audio output.")
    wake: WakeConfig = Field(default_factory=WakeConfig, description="Wake word.")
    wake_words: list[WakeConfig] = Field(
        default_factory=list,
        max_length=8,
        description="More wake words heard besides 'wake' (micro, open or porcupine), "
        "each optionally with its own language and pipeline.",
    )
    vad: VadConfig = Field(default_factory=VadConfig, description="Voice activity.")
    stt: SttConfig = Field(default_factory=SttConfig, description="Speech-to-text.")
    tts: TtsConfig = Field(default_factory=TtsConfig, description="Text-to-speech.")
    intents: IntentConfig = Field(default_factory=IntentConfig, description="Intents.")
    stop_words: list[str] = Field(
        default_factory=lambda: ["stop", "cancel", "never mind"],
        description="A transcript that is only one of these ends the conversation quietly.",
    )
    follow_up_s: float = Field(
        default=0.0, ge=0, description="Listen again without the wake word for N seconds."
    )
    barge_in: bool = Field(
        default=True, description="A wake word while answering stops the answer and listens."
    )
    arbitration_s: float = Field(
        default=0.0,
        ge=0,
        le=2,
        description="Window in which satellites hearing the same wake word elect one to "
        "answer (0: no arbitration).",
    )
    wyoming: WyomingConfig | None = Field(
        default=None, description="Serve stt/tts/wake to Home Assistant over Wyoming."
    )
    models_dir: Path | None = Field(default=None, description="Models directory override.")
