"""The conversation loop: idle → listening → processing → responding, one per audio stream.

* **idle**: every frame goes to the wake word detector (or, for a custom
  phrase, to VAD + STT verification).  A detection is a ``voice/wake`` event.
* **listening**: frames go to VAD and the STT session until the command ends
  (silence after speech, the maximum length, or nobody spoke).  When several
  satellites heard the same wake word, an arbiter (see :mod:`nodes.voice.node`)
  says whether this one answers; the command is buffered meanwhile.
* **processing**: transcript (``voice/transcript``), stop words, then a local
  intent (an MQTT action) or the realm's chat capability.
* **responding**: the answer is synthesised sentence by sentence into the sink
  while frames keep coming: the wake word again (barge-in) cuts the answer
  and listens.  Afterwards, ``follow_up_s`` of listening without the wake word.

Times (follow-up window, VAD) are in audio seconds so a WAV file run faster
than real time behaves like the live microphone.  Blocking work (detectors,
VAD, STT, TTS) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any, Literal, Protocol

from nodes.voice.audio import FRAME_SAMPLES, RATE, Sink, rms_dbfs
from nodes.voice.config import VoiceConfig
from nodes.voice.intent import Action, IntentRecognizer, TimerRequest, normalise
from nodes.voice.stt import Transcript
from nodes.voice.tts import TtsBackend, stream
from nodes.voice.vad import Endpointer
from nodes.voice.wake import Detection, WakeDetector

log = logging.getLogger(__name__)

State = Literal["idle", "listening", "processing", "responding"]
ENERGY_WINDOW_FRAMES = 12  # ~1 s of audio before a detection measures how near the speaker is
NO_ANSWER = "Sorry, I can't help with that."
QUESTION_FOLLOW_UP_S = 5.0  # an answer that asks a question listens again this long


def chime() -> bytes:
    """Two short tones (0.3 s) before an announcement."""
    import numpy as np

    t = np.arange(int(0.15 * RATE)) / RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) * 40)
    tones = [np.sin(2 * np.pi * f * t) * fade * 0.3 for f in (880.0, 660.0)]
    return (np.concatenate(tones) * 32767).astype("<i2").tobytes()


def match_phrase(phrase: str, text: str) -> tuple[float, str]:
    """How well the start of ``text`` matches ``phrase`` (0-1), and the words after it."""
    words = text.split()
    n = len(phrase.split())
    best, rest = 0.0, ""
    for k in (n - 1, n, n + 1):  # whisper may merge or split a word of the phrase
        if k < 1 or k > len(words):
            continue
        score = SequenceMatcher(None, phrase, " ".join(words[:k])).ratio()
        if score > best:
            best, rest = score, " ".join(words[k:])
    return best, rest


class SttStream(Protocol):
    """One utterance: ``feed`` is blocking (called off the loop), ``finish`` async."""

    def feed(self, pcm: bytes) -> None: ...

    async def finish(self) -> Transcript: ...


Emit = Callable[[str, Any, dict[str, Any]], Awaitable[None]]


@dataclass
class Reply:
    """An answer from elsewhere: actions, and text that may still be arriving.

    ``sentences`` (when given) yields the answer sentence by sentence as a
    language model streams it, so speech starts after the first sentence.
    """

    text: str = ""
    actions: list[Action] = field(default_factory=list)
    sentences: AsyncIterator[str] | None = None


@dataclass
class Hooks:
    """What the pipeline needs from its node (and tests give it directly)."""

    emit: Emit  # (event name, value, attrs) -> event/<node>/voice/<name>
    act: Callable[[Action], Awaitable[None]]  # publish an intent's MQTT command
    stt: Callable[[], SttStream]
    ask: Callable[[str], Awaitable[Reply]] | None = None  # the realm's chat
    arbitrate: Callable[[Detection, float], Coroutine[Any, Any, bool]] | None = None
    timer: Callable[[TimerRequest], Awaitable[str]] | None = None  # start/cancel/status
    broadcast: Callable[[str], Awaitable[None]] | None = None  # "broadcast dinner is ready"
    # The recogniser for a wake word's bound language (None: the satellite's own).
    recognizer: Callable[[str], IntentRecognizer | None] | None = None


@dataclass
class TurnTimes:
    """perf_counter stamps of one turn (benchmarks read them)."""

    end_of_speech: float = 0.0
    transcript: float = 0.0
    first_audio: float = 0.0
    done: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        cfg: VoiceConfig,
        hooks: Hooks,
        *,
        wake: WakeDetector | None,
        endpointer: Endpointer,
        tts: TtsBackend | None,
        tts_lock: threading.Lock,
        sink: Sink,
        recognizer: IntentRecognizer | None,
    ) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.wake = wake
        self.endpointer = endpointer
        self.tts = tts
        self.tts_lock = tts_lock
        self.sink = sink
        self.recognizer = recognizer
        self.state: State = "idle"
        self.audio_s = 0.0  # audio time consumed
        self.turns: list[TurnTimes] = []
        self._recent: deque[bytes] = deque(maxlen=ENERGY_WINDOW_FRAMES)
        self._stt: SttStream | None = None
        self._follow_up = False
        self._arbitration: asyncio.Task[bool] | None = None
        self._turn: asyncio.Task[None] | None = None
        self._cancel_tts = threading.Event()
        self._phrase = normalise(cfg.wake.phrase or "") if cfg.wake.engine == "phrase" else ""
        self._bound = Detection("", 0.0)  # the last wake word: its language and pipeline
        self._speaking = asyncio.Lock()  # one voice at a time: answers, then announcements
        self._question = False

    # ------------------------------------------------------------ states

    async def _set_state(self, state: State, **attrs: Any) -> None:
        self.state = state
        await self.hooks.emit("state", state, attrs)

    async def _start_listening(self, *, follow_up: bool = False, question: bool = False) -> None:
        self.endpointer.reset()
        if follow_up:
            wait = max(self.cfg.follow_up_s, QUESTION_FOLLOW_UP_S if question else 0.1)
            self.endpointer.cfg = self.cfg.vad.model_copy(update={"no_speech_s": wait})
        else:
            self.endpointer.cfg = self.cfg.vad
        self._stt = self.hooks.stt()
        self._follow_up = follow_up
        await self._set_state("listening", follow_up=follow_up)

    # ------------------------------------------------------------ the loop

    async def run(self, source: AsyncIterable[bytes], *, live: bool = True) -> None:
        """Consume a stream to its end (a live one never ends), then finish the last turn.

        ``live=False`` (a file): each turn is finished before more audio is read,
        as if the speaker waited for the answer — so runs are deterministic.
        """
        if self.cfg.wake.engine == "none":
            await self._start_listening()
        else:
            await self._set_state("idle")
        try:
            async for frame in source:
                await self.feed(frame)
                if not live and self._turn is not None and not self._turn.done():
                    await asyncio.shield(self._turn)
            if self.state == "listening" and self.endpointer.started:
                await self._end_command("end")
            if self._turn is not None:
                await self._turn
        finally:
            if self._turn is not None and not self._turn.done():
                self._turn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._turn

    async def feed(self, frame: bytes) -> None:
        self.audio_s += FRAME_SAMPLES / RATE
        self._recent.append(frame)
        detecting = self.wake is not None and (
            self.state == "idle" or (self.state == "responding" and self.cfg.barge_in)
        )
        if self.wake is not None and not detecting:
            self.wake.skip(len(frame))  # its refractory clock runs on all the audio
        if self.state == "listening":
            verdict = await asyncio.to_thread(self._listen_frame, frame)
            if verdict in ("end", "too_long"):
                await self._end_command(verdict)
            elif verdict == "timeout":
                await self._give_up()
            return
        if self.state == "idle" and self._phrase:
            await self._phrase_frame(frame)
            return
        if not detecting or self.wake is None:
            return
        detection = await asyncio.to_thread(self.wake.process, frame)
        if detection is not None:
            await self._on_wake(detection)

    def _listen_frame(self, frame: bytes) -> str:
        assert self._stt is not None
        self._stt.feed(frame)
        return self.endpointer.feed(frame)

    async def _on_wake(self, detection: Detection) -> None:
        self._bound = detection
        energy = round(rms_dbfs(b"".join(self._recent)), 2)
        if self.wake is not None:  # its window still holds the wake word: start afresh
            await asyncio.to_thread(self.wake.reset)
        if self.state == "responding":  # barge-in: cut the answer short
            await self._stop_turn()
        await self.hooks.emit(
            "wake", detection.name, {"score": detection.score, "energy_dbfs": energy}
        )
        if self.hooks.arbitrate is not None and self.cfg.arbitration_s > 0:
            self._arbitration = asyncio.create_task(self.hooks.arbitrate(detection, energy))
        await self._start_listening()
        # The detector fires ~0.2 s after the wake word ends: the STT also gets the
        # audio just before the detection, so a first word said at once is not cut.
        # Not the VAD: the wake word's tail must not start (and end) a command.
        keep = int(self.cfg.wake.preroll_s * RATE) * 2  # bytes of int16 audio
        if keep and self._stt is not None:
            await asyncio.to_thread(self._stt.feed, b"".join(self._recent)[-keep:])

    async def _phrase_frame(self, frame: bytes) -> None:
        """Custom wake phrase: every utterance is transcribed and checked for the phrase."""
        if self._stt is None:
            self.endpointer.reset()
            self.endpointer.cfg = self.cfg.vad
            self._stt = self.hooks.stt()
        verdict = await asyncio.to_thread(self._listen_frame, frame)
        if verdict in ("waiting", "speech"):
            return
        stt, self._stt = self._stt, None
        if verdict == "timeout":
            return
        transcript = await stt.finish()
        score, rest = match_phrase(self._phrase, normalise(transcript.text))
        log.debug("wake phrase check: %r (%.2f)", transcript.text, score)
        if score < self.cfg.wake.phrase_match:
            return
        detection = Detection(self.cfg.wake.phrase or "", round(score, 3))
        if rest:  # "hey hal turn on the light" in one breath: the command is already heard
            energy = round(rms_dbfs(b"".join(self._recent)), 2)
            await self.hooks.emit(
                "wake", detection.name, {"score": detection.score, "energy_dbfs": energy}
            )
            times = TurnTimes(end_of_speech=time.perf_counter())
            self.turns.append(times)
            await self._set_state("processing")
            self._turn = asyncio.create_task(
                self._process(Transcript(rest, transcript.language), times)
            )
        else:
            await self._on_wake(detection)

    async def _give_up(self) -> None:
        self._stt = None
        if self.cfg.wake.engine == "none":
            await self._start_listening()
        else:
            await self._set_state("idle", reason="follow_up_over" if self._follow_up else "silence")

    async def _end_command(self, verdict: str) -> None:
        times = TurnTimes(end_of_speech=time.perf_counter())
        self.turns.append(times)
        stt, self._stt = self._stt, None
        assert stt is not None
        await self._set_state("processing", reason=verdict)
        self._turn = asyncio.create_task(self._turn_body(stt, times))

    async def _stop_turn(self) -> None:
        self._cancel_tts.set()
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._turn
        await self.sink.abort()

    # ------------------------------------------------------------ one turn

    async def _turn_body(self, stt: SttStream, times: TurnTimes) -> None:
        arbitration, self._arbitration = self._arbitration, None
        if arbitration is not None and not await arbitration:
            await self._set_state("idle", reason="another satellite answers")
            return
        transcript = await stt.finish()
        await self._process(transcript, times)

    async def _process(self, transcript: Transcript, times: TurnTimes) -> None:
        times.transcript = time.perf_counter()
        text = transcript.text.strip()
        await self.hooks.emit(
            "transcript",
            text,
            {
                "stt_ms": round((times.transcript - times.end_of_speech) * 1000, 1),
                "route": transcript.route,
            },
        )
        if not text:
            await self._after_turn(spoke=False)
            return
        if normalise(text) in {normalise(w) for w in self.cfg.stop_words}:
            await self.hooks.emit("stop", text, {})
            await self._set_state("idle", reason="stop word")
            return
        route = self._bound.pipeline
        recognizer = self.recognizer
        if self._bound.language and self.hooks.recognizer is not None:
            recognizer = self.hooks.recognizer(self._bound.language) or recognizer
        intent = None
        if recognizer is not None and route != "chat":
            # hassil takes a few ms: off the loop (the slot lists are built on it).
            recognizer.prepare()
            intent = await asyncio.to_thread(recognizer.recognize, text)
        times.extra["intent"] = time.perf_counter()
        source = "local"
        actions: list[Action] = []
        speech: str | AsyncIterator[str]
        if intent is not None and intent.name == "nevermind":
            await self.hooks.emit("stop", text, {"intent": "nevermind"})
            await self._set_state("idle", reason="never mind")
            return
        if intent is not None:
            speech, actions = intent.speech, intent.actions
            await self.hooks.emit("intent", intent.name, {"slots": intent.slots})
            if intent.timer is not None and self.hooks.timer is not None:
                speech = await self.hooks.timer(intent.timer)
            elif intent.timer is not None:
                speech = "Timers are off here."
            if intent.broadcast is not None and self.hooks.broadcast is not None:
                await self.hooks.broadcast(intent.broadcast)
        elif self.hooks.ask is not None and self.cfg.intents.chat_fallback and route != "local":
            source = "chat"
            reply = await self.hooks.ask(text)
            speech, actions = reply.sentences or reply.text, reply.actions
        else:
            source = "none"
            speech = NO_ANSWER
        for action in actions:
            await self.hooks.act(action)
        async with self._speaking:
            said = await self._respond(speech, times, source)
        # Continued conversation: an answer that asks something listens for the reply.
        self._question = said.rstrip().endswith("?")
        await self._after_turn(spoke=True)

    async def _respond(
        self, speech: str | AsyncIterator[str], times: TurnTimes, source: str
    ) -> str:
        await self._set_state("responding")
        self._cancel_tts = threading.Event()
        spoken = False
        said: list[str] = []
        pieces = _one(speech) if isinstance(speech, str) else speech
        if self.tts is not None:
            await self.sink.start()
        async for piece in pieces:
            said.append(piece)
            if self.tts is None:
                continue
            async for chunk in stream(self.tts, piece, self.tts_lock, self._cancel_tts):
                if not spoken:
                    times.first_audio = time.perf_counter()
                    spoken = True
                await self.sink.write(chunk)
        if self.tts is not None:
            await self.sink.finish()
        times.done = time.perf_counter()
        latency = (times.first_audio - times.end_of_speech) * 1000 if spoken else None
        await self.hooks.emit(
            "answer",
            " ".join(said),
            {"source": source, "first_audio_ms": round(latency, 1) if latency else None},
        )
        return " ".join(said)

    async def _after_turn(self, *, spoke: bool) -> None:
        question, self._question = self._question, False
        if spoke and (self.cfg.follow_up_s > 0 or question):
            await self._start_listening(follow_up=True, question=question)
        elif self.cfg.wake.engine == "none":
            await self._start_listening()
        else:
            await self._set_state("idle")


async def _one(text: str) -> AsyncIterator[str]:
    yield text


class Announcer:
    """Announcements and ``voice.listen`` on a running pipeline (the node's port to it)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def announce(self, text: str, *, chime_first: bool = True) -> float | None:
        """A chime, then the text, after any answer being spoken; ms to first audio."""
        p = self.pipeline
        started = time.perf_counter()
        first: float | None = None
        async with p._speaking:
            if p.tts is None:
                await p.hooks.emit("announced", text, {"spoken": False})
                return None
            cancel = threading.Event()
            await p.sink.start()
            if chime_first:
                await p.sink.write(chime())
                first = time.perf_counter()
            async for chunk in stream(p.tts, text, p.tts_lock, cancel):
                first = first or time.perf_counter()
                await p.sink.write(chunk)
            await p.sink.finish()
        ms = round((first - started) * 1000, 1) if first else None
        await p.hooks.emit("announced", text, {"spoken": True, "first_audio_ms": ms})
        return ms

    async def listen(self) -> bool:
        """Start listening as if the wake word was heard (False when busy)."""
        p = self.pipeline
        if p.state != "idle":
            return False
        p._bound = Detection("listen", 1.0)
        await p.hooks.emit("wake", "listen", {"score": 1.0, "energy_dbfs": None})
        await p._start_listening()
        return True
