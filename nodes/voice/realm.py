"""What a voice satellite asks of the realm: the ``chat`` capability and remote ``stt``.

The chat fallback is two steps: a JSON-schema intent extraction (the reply
names a configured device or scene → the same MQTT action a template would
publish), then, when it found none, a free-form answer.  With no orchestrator
online, or no answer in time, the satellite says so instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from daemon import topics
from daemon.bus import Inbound
from daemon.client import TaskFailed, TaskHandle
from daemon.errors import MessageError, MtorError
from daemon.messages import decode
from daemon.node import NodeContext
from daemon.protocol.admin import OrchestratorState
from nodes.voice.config import VoiceConfig
from nodes.voice.intent import Action, IntentRecognizer
from nodes.voice.pipeline import Reply

log = logging.getLogger(__name__)

NO_REALM: Final = "I can't reach the realm's assistant right now."
NO_CHAT: Final = "Sorry, no assistant in the realm could answer that."
ANSWER_SYSTEM: Final = (
    "You are a voice assistant. Answer in one or two short spoken sentences, no markdown."
)
ANSWER_TOKENS: Final = 96
_SENTENCE_END: Final = re.compile(r"(?<=[.!?])\s+")
INTENT_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["turn_on", "turn_off", "set", "scene", "none"]},
        "device": {"type": "string"},
        "area": {"type": "string"},
        "value": {"type": "string"},
    },
    "required": ["intent"],
}


class RealmVoice:
    def __init__(
        self,
        ctx: NodeContext,
        cfg: VoiceConfig,
        recognizer: Callable[[], IntentRecognizer | None] = lambda: None,
    ) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.recognizer = recognizer  # the satellite's: configured and learned devices
        self.client = ctx.realm_client()
        self.orchestrator_online = False
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self.client.start()
        await self.ctx.bus.subscribe(topics.ORCH_STATE.build(realm=self.ctx.realm), self._on_orch)

    async def _on_orch(self, msg: Inbound) -> None:
        try:
            state = decode(msg.payload, OrchestratorState)
        except MessageError:
            self.orchestrator_online = False
            return
        self.orchestrator_online = state.state == "online"

    async def call(self, capability: str, inp: Any, timeout: float) -> Any:
        if not self.orchestrator_online:
            raise MtorError("no orchestrator online")
        async with asyncio.timeout(timeout):
            return await self.client.call(capability, inp, timeout=timeout)

    async def ask(self, text: str) -> Reply:
        """What to do and say for a transcript no template matched."""
        timeout = self.cfg.intents.chat_timeout_s
        try:
            rec = self.recognizer()
            if rec is not None and len(rec.registry):
                extracted = await self._extract(text, timeout)
                if extracted is not None:
                    return Reply(text=extracted[0], actions=extracted[1])
            if not self.orchestrator_online:
                raise MtorError("no orchestrator online")
            handle = await self.client.submit(
                "chat",
                {"prompt": text, "system": ANSWER_SYSTEM, "max_tokens": ANSWER_TOKENS},
                timeout=timeout,
                stream=True,
            )
        except TaskFailed as exc:
            log.warning("chat fallback failed: %s", exc)
            return Reply(text=NO_CHAT)
        except (MtorError, TimeoutError) as exc:
            log.warning("chat fallback unavailable: %s", exc or "timeout")
            return Reply(text=NO_REALM)
        return Reply(sentences=self._sentences(handle, timeout))

    async def _sentences(self, handle: TaskHandle, timeout: float) -> AsyncIterator[str]:
        """The streamed answer, cut into sentences as the deltas arrive."""
        buffer = ""
        said = False
        try:
            async with asyncio.timeout(timeout):
                async for update in handle:
                    out = update.output if isinstance(update.output, dict) else {}
                    if update.status == "partial" and isinstance(out.get("delta"), str):
                        buffer += out["delta"]
                        *done, buffer = _SENTENCE_END.split(buffer)
                        for sentence in filter(None, (s.strip() for s in done)):
                            said = True
                            yield sentence
                    elif update.status == "done" and not said and not buffer.strip():
                        buffer = str(out.get("text", ""))  # the backend did not stream
                    elif update.status in ("failed", "cancelled"):
                        log.warning("chat fallback %s: %s", update.status, update.error)
        except TimeoutError:
            log.warning("chat fallback timed out after %.0f s", timeout)
        if buffer.strip():
            yield buffer.strip()
        elif not said:
            yield NO_CHAT

    async def _extract(self, text: str, timeout: float) -> tuple[str, list[Action]] | None:
        rec = self.recognizer()
        if rec is None:
            return None
        entities = list(rec.registry)
        devices = ", ".join(e.label for e in entities if e.component != "scene")
        scenes = ", ".join(e.name for e in entities if e.component == "scene")
        system = (
            "Extract the home automation intent of the user's request. "
            f"Devices: {devices or 'none'}. Scenes: {scenes or 'none'}. "
            "Use intent none when the request is not about them."
        )
        try:
            out = await self.call(
                "chat",
                {"prompt": text, "system": system, "json_schema": INTENT_SCHEMA, "max_tokens": 64},
                timeout,
            )
        except TaskFailed as exc:  # e.g. the model's reply was not JSON: answer free-form
            log.info("intent extraction failed: %s", exc)
            return None
        data = out.get("json") if isinstance(out, dict) else None
        if not isinstance(data, dict) or data.get("intent") in (None, "none"):
            return None
        # Re-use the template recogniser on a canonical sentence: same validation, same actions.
        sentence = {
            "turn_on": "turn on the {area} {device}",
            "turn_off": "turn off the {area} {device}",
            "set": "set the {area} {device} to {value}",
            "scene": "activate {device}",
        }.get(str(data["intent"]), "")
        fields = {k: str(data.get(k) or "") for k in ("area", "device", "value")}
        canonical = " ".join(sentence.format(**fields).split())
        rec.prepare()
        intent = await asyncio.to_thread(rec.recognize, canonical)
        if intent is None:
            return None
        return intent.speech, intent.actions
