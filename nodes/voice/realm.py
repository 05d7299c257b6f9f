"""What a voice satellite asks of the realm: the ``chat`` capability and remote ``stt``.

The chat fallback (``intents.llm_path``):

* ``one_call`` (default): one streamed chat call.  The prompt lists the
  satellite's devices and scenes with a few examples (they help small models
  most): a command is answered with one line ``DO <intent> <device> [value]``
  (mapped to the same MQTT action a local sentence would publish), anything
  else with a short spoken answer whose first sentence is spoken while the
  rest is still being generated.
* ``two_calls`` (the earlier path, kept for comparison): a JSON-schema
  intent extraction, then, when it found nothing, a streamed answer.

With no orchestrator online, or no answer in time, the satellite says so
instead of hanging.
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
NO_ANSWER_DEVICE: Final = "Sorry, I don't know which device you mean."
ANSWER_SYSTEM: Final = (
    "You are a voice assistant. Answer in one or two short spoken sentences, no markdown."
)
ANSWER_TOKENS: Final = 96
_SENTENCE_END: Final = re.compile(r"(?<=[.!?])\s+")
ONE_CALL_TOKENS: Final = 64
SPOKEN_CLAUSE: Final = 60  # characters: a long first sentence is spoken from its first comma
_DO: Final = re.compile(r"^\s*DO\s+(turn_on|turn_off|set|scene)\s+(.+?)\s*$", re.IGNORECASE)
_CLAUSE_END: Final = re.compile(r"(?<=[,;:])\s+")
FEW_SHOT: Final = (
    ("it is too dark in the {room}", "DO turn_on {device}"),
    ("what is the capital of france", "Paris is the capital of France."),
    ("shut off the {device} please", "DO turn_off {device}"),
    ("dim the {device} to thirty", "DO set {device} 30"),
    ("how are you", "I'm fine, thank you. How can I help?"),
)
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
        """What to do and say for a transcript no local intent matched."""
        rec = self.recognizer()
        if self.cfg.intents.llm_path == "one_call" and rec is not None and len(rec.registry):
            return await self._one_call(text, rec)
        timeout = self.cfg.intents.chat_timeout_s
        try:
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

    def _messages(self, text: str, rec: IntentRecognizer) -> list[dict[str, str]]:
        entities = list(rec.registry)
        devices = [e.label for e in entities if e.component != "scene"][:40]
        scenes = [e.name for e in entities if e.component == "scene"][:20]
        example = next((e for e in entities if e.component == "light"), None) or entities[0]
        room = example.area or "kitchen"
        system = (
            "You are a voice assistant in a home. "
            f"Devices: {', '.join(devices) or 'none'}. Scenes: {', '.join(scenes) or 'none'}. "
            "To control a device or a scene, reply with exactly one line: "
            "DO turn_on <device>, DO turn_off <device>, DO set <device> <number> or "
            "DO scene <scene>. Otherwise answer in one or two short spoken sentences, "
            "no markdown."
        )
        messages = [{"role": "system", "content": system}]
        for user, assistant in FEW_SHOT:
            fill = {"room": room, "device": example.label.lower()}
            messages += [
                {"role": "user", "content": user.format(**fill)},
                {"role": "assistant", "content": assistant.format(**fill)},
            ]
        return [*messages, {"role": "user", "content": text}]

    async def _one_call(self, text: str, rec: IntentRecognizer) -> Reply:
        """One streamed call: a DO line becomes an action, anything else is spoken."""
        timeout = self.cfg.intents.chat_timeout_s
        try:
            if not self.orchestrator_online:
                raise MtorError("no orchestrator online")
            handle = await self.client.submit(
                "chat",
                {"messages": self._messages(text, rec), "max_tokens": ONE_CALL_TOKENS},
                timeout=timeout,
                stream=True,
            )
            updates = handle.__aiter__()
            head, finished = "", False
            async with asyncio.timeout(timeout):
                # Enough of the reply to tell a command from an answer (a few tokens).
                while len(head.strip()) < 3 or (_could_be_do(head) and "\n" not in head):
                    update = await anext(updates)
                    out = update.output if isinstance(update.output, dict) else {}
                    if update.status == "partial" and isinstance(out.get("delta"), str):
                        head += out["delta"]
                    elif update.status == "done":
                        head = head or str(out.get("text", ""))
                        finished = True
                        break
                    elif update.status in ("failed", "cancelled"):
                        raise TaskFailed(update)
        except StopAsyncIteration:
            finished = True
        except TaskFailed as exc:
            log.warning("chat fallback failed: %s", exc)
            return Reply(text=NO_CHAT)
        except (MtorError, TimeoutError) as exc:
            log.warning("chat fallback unavailable: %s", exc or "timeout")
            return Reply(text=NO_REALM)
        line = head.strip().splitlines()[0] if head.strip() else ""
        if (m := _DO.match(line)) is not None:
            acted = await self._do(rec, m.group(1).lower(), m.group(2))
            if acted is not None:
                return Reply(text=acted[0], actions=acted[1])
            return Reply(text=NO_ANSWER_DEVICE)
        rest = None if finished else updates
        return Reply(sentences=self._sentences(handle, timeout, head=head, updates=rest))

    async def _do(
        self, rec: IntentRecognizer, intent: str, target: str
    ) -> tuple[str, list[Action]] | None:
        words = target.strip(" .").split()
        value = ""
        if intent == "set" and words and words[-1].rstrip("%").isdigit():
            value = words.pop().rstrip("%")
        sentence = {
            "turn_on": "turn on the {device}",
            "turn_off": "turn off the {device}",
            "set": "set the {device} to {value} percent",
            "scene": "activate {device}",
        }[intent].format(device=" ".join(words), value=value)
        rec.prepare()
        found = await asyncio.to_thread(rec.recognize, sentence)
        return (found.speech, found.actions) if found is not None and found.actions else None

    async def _sentences(
        self,
        handle: TaskHandle,
        timeout: float,
        *,
        head: str = "",
        updates: AsyncIterator[Any] | None = None,
    ) -> AsyncIterator[str]:
        """The streamed answer, cut into sentences as the deltas arrive (the first one
        also at a comma once it is long, so speech starts sooner)."""
        buffer = head
        said = False
        source: AsyncIterator[Any] = updates if updates is not None else handle.__aiter__()
        if head and updates is None:
            source = _empty()  # the reply was complete in ``head``
        try:
            async with asyncio.timeout(timeout):
                async for update in source:
                    out = update.output if isinstance(update.output, dict) else {}
                    if update.status == "partial" and isinstance(out.get("delta"), str):
                        buffer += out["delta"]
                        *done, buffer = _SENTENCE_END.split(buffer)
                        if not said and not done and len(buffer) >= SPOKEN_CLAUSE:
                            *done, buffer = _CLAUSE_END.split(buffer, maxsplit=1)
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


def _could_be_do(head: str) -> bool:
    """Might this reply still become a ``DO ...`` line (read it whole before acting)?"""
    start = head.lstrip()[:3].upper()
    return "DO "[: len(start)] == start


async def _empty() -> AsyncIterator[Any]:
    return
    yield
