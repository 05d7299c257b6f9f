"""The voice node: a satellite (wake word → … → answer) and the ``stt`` / ``tts`` capabilities.

The conversation loop is :mod:`nodes.voice.pipeline`; the task shapes of the
capabilities are in :mod:`nodes.voice.tasks` (and docs/voice.md).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from daemon import topics
from daemon.bus import Inbound
from daemon.entities import EntitySpec
from daemon.errors import MessageError, MtorError, TaskError
from daemon.messages import decode
from daemon.modelstore import ModelError, ModelStore
from daemon.node import Node, NodeContext
from daemon.protocol.node import Capability, Event
from daemon.worker import TaskRun
from nodes.voice import audio
from nodes.voice.announce import SatelliteExtras, execute_announce, execute_listen
from nodes.voice.arbitration import Arbiter
from nodes.voice.config import VoiceConfig
from nodes.voice.devices import Registry, from_config, from_scene
from nodes.voice.intent import Action, IntentRecognizer, IntentsUnavailable
from nodes.voice.learn import BrokerDevices
from nodes.voice.pipeline import Announcer, Hooks, Pipeline, SttStream
from nodes.voice.realm import RealmVoice
from nodes.voice.stt import DEFAULT_MODELS, SttBackend, SttUnavailable, Transcript, make_stt
from nodes.voice.tasks import MAX_STT_BYTES, MAX_STT_S, MEDIA_WAIT, execute_stt, execute_tts
from nodes.voice.tts import TtsBackend, TtsUnavailable, make_tts
from nodes.voice.vad import Endpointer, VadUnavailable, load_silero
from nodes.voice.wake import WakeDetector, WakeUnavailable, make_wake
from nodes.voice.wyoming import Models, WyomingBridge

STATES: Final = ("idle", "listening", "processing", "responding")


class _LocalStt:
    """A pipeline STT stream on the local backend."""

    def __init__(self, backend: SttBackend) -> None:
        self.session = backend.session()

    def feed(self, pcm: bytes) -> None:
        self.session.feed(pcm)

    async def finish(self) -> Transcript:
        return await asyncio.to_thread(self.session.finish)


class _RemoteStt:
    """Collects the command and sends it to the realm's stt capability."""

    def __init__(self, node: VoiceNode) -> None:
        self.node = node
        self.chunks: list[bytes] = []

    def feed(self, pcm: bytes) -> None:
        self.chunks.append(pcm)

    async def finish(self) -> Transcript:
        pcm = b"".join(self.chunks)
        try:
            return await self.node.remote_transcribe(pcm)
        except (MtorError, TimeoutError) as exc:
            local = self.node.stt
            if local is None:
                raise
            self.node.log.warning("remote stt failed (%s): transcribing locally", exc)
            self.node.latency["remote"] = float("inf")
            return await asyncio.to_thread(local.transcribe, pcm)


class VoiceNode(Node):
    type_name = "voice"
    config: VoiceConfig

    def __init__(self, name: str, config: VoiceConfig, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        self.stt: SttBackend | None = None
        self.tts: TtsBackend | None = None
        self.wake: WakeDetector | None = None
        self.vad: Any = None
        self.problems: dict[str, str] = {}
        self.tts_lock = threading.Lock()
        self.pipeline: Pipeline | None = None
        self.realm = RealmVoice(ctx, config, self.recognizer)
        self.arbiter = Arbiter(f"{ctx.node_id}/{name}", config.arbitration_s)
        self.latency: dict[str, float] = {}  # auto routing: seconds per audio second
        intents = config.intents
        self.registry = Registry(
            [from_config(i, d) for i, d in enumerate(intents.devices)]
            + [from_scene(i, s) for i, s in enumerate(intents.scenes)]
        )
        self.recognizers: dict[str, IntentRecognizer] = {}  # by language
        self.devices = BrokerDevices(ctx.bus, intents.discovery.prefix, self.registry)
        self.extras = SatelliteExtras(
            f"{ctx.node_id}/{name}", name, config.area, self._publish_extra
        )
        self._wake_subscribed = False
        self._extras_subscribed = False
        self.wyoming: WyomingBridge | None = None
        self._mic: audio.QueueSource | None = None
        # Extra observers of every voice event (``mtor listen`` prints them).
        self.listeners: list[Callable[[str, Any, dict[str, Any]], None]] = []

    # ------------------------------------------------------------ lifecycle

    def _store(self) -> ModelStore:
        return ModelStore.default(self.config.models_dir, dict(os.environ))

    async def setup(self) -> None:
        await asyncio.to_thread(self._load)
        for what, why in self.problems.items():
            self.log.warning("voice %s unavailable: %s", what, why)
        if self.stt is None and self.tts is None:
            raise MtorError("no voice backend could start: " + "; ".join(self.problems.values()))
        # Before the capabilities are advertised: a voice.announce run on this node the
        # moment it is, publishes a broadcast this satellite must already hear.
        if self.config.source.type != "none" and not self._extras_subscribed:
            self._extras_subscribed = True
            await self.ctx.bus.subscribe(
                topics.EVENT.filter(realm=self.ctx.realm, domain="voice", name="broadcast"),
                self.extras.on_broadcast,
            )
            if self.config.intents.discovery.enabled:
                await self.devices.start()

    def _load(self) -> None:
        cfg = self.config
        store = self._store()
        self.problems = {}  # this setup's, not a previous one's
        stt_cfg = cfg.stt
        phrase = cfg.wake.phrase if cfg.wake.engine == "phrase" else None
        if phrase and phrase.lower() not in (stt_cfg.initial_prompt or "").lower():
            # Whisper hears "hey hal" as "hey, help" unless the prompt names it.
            prompt = ", ".join(p for p in (phrase, stt_cfg.initial_prompt) if p)
            stt_cfg = stt_cfg.model_copy(update={"initial_prompt": prompt})
        try:
            name = stt_cfg.model or DEFAULT_MODELS[stt_cfg.backend]
            path = stt_cfg.model_path or store.path(name)
            self.stt = make_stt(stt_cfg, path, name)
        except (SttUnavailable, ModelError, OSError) as exc:
            self.problems["stt"] = str(exc)
        try:
            tts_path = cfg.tts.model_path
            if cfg.tts.backend == "piper" and tts_path is None:
                tts_path = store.path(cfg.tts.model)
            self.tts = make_tts(cfg.tts, tts_path)
        except (TtsUnavailable, ModelError, OSError) as exc:
            self.problems["tts"] = str(exc)
            if cfg.tts.fallback and cfg.tts.backend != "espeak":
                try:
                    self.tts = make_tts(cfg.tts.model_copy(update={"backend": "espeak"}), None)
                    self.problems["tts"] += " (speaking with espeak-ng instead)"
                except TtsUnavailable as again:
                    self.problems["tts"] += f"; espeak-ng fallback: {again}"
        if cfg.source.type == "none":
            return
        self._load_intents()
        try:
            self.wake = make_wake(cfg.wake, cfg.wake_words)
        except (WakeUnavailable, OSError, ValueError) as exc:
            self.problems["wake"] = str(exc)
        try:
            self.vad = load_silero()
        except (VadUnavailable, OSError) as exc:
            self.problems["vad"] = str(exc)

    def _load_intents(self) -> None:
        cfg = self.config
        languages = [cfg.intents.language] + [w.language for w in cfg.wake_words if w.language]
        if cfg.wake.language:
            languages.append(cfg.wake.language)
        for language in dict.fromkeys(languages):
            if language in self.recognizers:
                continue
            try:
                rec = IntentRecognizer(cfg.intents, self.registry, area=cfg.area, language=language)
                rec.warm_up()  # hassil's first match builds its caches (~0.1 s)
                self.recognizers[language] = rec
            except IntentsUnavailable as exc:
                self.problems[f"intents ({language})"] = str(exc)

    def recognizer(self, language: str | None = None) -> IntentRecognizer | None:
        return self.recognizers.get(language or self.config.intents.language)

    def capabilities(self) -> list[Capability]:
        caps: list[Capability] = []
        if self.config.source.type != "none":
            caps += [
                Capability(name="voice.announce", node=self.name, max_concurrency=4),
                Capability(name="voice.listen", node=self.name, max_concurrency=4),
            ]
        if self.stt is not None and self.config.stt.serve:
            caps.append(
                Capability(
                    name="stt",
                    node=self.name,
                    backend=self.stt.type_name,
                    model=self.stt.model,
                    languages=self.stt.languages,
                    attrs={"max_audio_s": MAX_STT_S, "content_type": audio.CONTENT_TYPE},
                )
            )
        if self.tts is not None and self.config.tts.serve:
            caps.append(
                Capability(
                    name="tts",
                    node=self.name,
                    backend=self.tts.type_name,
                    model=self.tts.model,
                    languages=self.tts.languages,
                    streaming=True,
                    attrs={"content_type": audio.CONTENT_TYPE, "sample_rate": audio.RATE},
                )
            )
        return caps

    def entities(self) -> list[EntitySpec]:
        if self.config.source.type == "none":
            return []

        def topic(name: str) -> str:
            return topics.EVENT.build(
                realm=self.ctx.realm, node_id=self.ctx.node_id, domain="voice", name=name
            )

        return [
            EntitySpec(
                component="sensor",
                object_id=f"{self.name}_voice_state",
                name=f"{self.name} voice state",
                state_topic=topic("state"),
                device_class="enum",
                options=STATES,
                icon="mdi:microphone-message",
            ),
            EntitySpec(
                component="sensor",
                object_id=f"{self.name}_last_transcript",
                name=f"{self.name} last transcript",
                state_topic=topic("transcript"),
                icon="mdi:text-recognition",
                max_length=255,  # the full text stays in the event
            ),
            EntitySpec(
                component="sensor",
                object_id=f"{self.name}_timers",
                name=f"{self.name} timers",
                state_topic=topic("timers"),
                icon="mdi:timer-outline",
                state_class="measurement",
            ),
            EntitySpec(  # voice.listen from a Home Assistant automation or dashboard
                component="button",
                object_id=f"{self.name}_listen",
                name=f"{self.name} listen",
                command_topic=topics.ENTITY_SET.build(
                    realm=self.ctx.realm, node_id=self.ctx.node_id, object_id=f"{self.name}_listen"
                ),
                icon="mdi:microphone",
                on_command=self._listen_pressed,
            ),
        ]

    async def _listen_pressed(self, _value: Any) -> None:
        if self.extras.announcer is not None:
            await self.extras.announcer.listen()

    def _wyoming_models(self) -> Models:
        cfg = self.config
        wake = [
            w for w in [cfg.wake, *cfg.wake_words] if w.engine in ("micro", "open", "porcupine")
        ]
        return Models(
            stt=lambda: self.stt,
            tts=lambda: self.tts,
            tts_lock=self.tts_lock,
            wake=wake,
            remote_stt=self.remote_transcribe,
        )

    async def run(self) -> None:
        await self.realm.start()
        if self.config.wyoming is not None and self.wyoming is None:
            self.wyoming = WyomingBridge(self.config.wyoming, self._wyoming_models())
            await self.wyoming.start()
        # Subscriptions live as long as the node: a supervised restart of run()
        # must not add a second handler (Bus handlers stack per filter).
        if self.config.arbitration_s > 0 and not self._wake_subscribed:
            self._wake_subscribed = True
            await self.ctx.bus.subscribe(
                topics.EVENT.filter(realm=self.ctx.realm, domain="voice", name="wake"),
                self._on_wake_event,
            )
        if self.config.source.type != "none" and (pipeline := self.make_pipeline()):
            self.pipeline = pipeline
            self.extras.announcer = Announcer(pipeline)
            live = self.config.source.type != "file" or self.config.source.realtime
            source = await self._source()
            try:
                await pipeline.run(source, live=live)
            finally:
                # Close the microphone now, not when the generator is collected: a
                # restarted node opens the device again at once.
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
        await asyncio.Event().wait()  # serving tasks (or a finished file) until stopped

    def make_pipeline(self, sink: audio.Sink | None = None) -> Pipeline | None:
        """The conversation loop on this node's models (None when a part is missing)."""
        cfg = self.config
        if self.vad is None or (self.stt is None and cfg.stt.routing == "local"):
            self.log.error("voice satellite cannot run: %s", self.problems)
            return None
        if self.wake is None and cfg.wake.engine in ("micro", "open"):
            self.log.error("voice satellite cannot run: %s", self.problems.get("wake"))
            return None
        hooks = Hooks(
            emit=self._emit,
            act=self._act,
            stt=self._stt_stream,
            ask=self.realm.ask if cfg.intents.chat_fallback else None,
            arbitrate=self.arbiter.decide if cfg.arbitration_s > 0 else None,
            timer=self.extras.timer if cfg.intents.timers else None,
            broadcast=self.extras.broadcast,
            recognizer=self.recognizer,
        )
        return Pipeline(
            cfg,
            hooks,
            wake=self.wake,
            endpointer=Endpointer(cfg.vad, self.vad),
            tts=self.tts,
            tts_lock=self.tts_lock,
            sink=sink or self.sink(),
            recognizer=self.recognizer(),
        )

    async def _source(self) -> AsyncIterator[bytes]:
        src = self.config.source
        if src.type == "file":
            if src.path is None:
                raise MtorError("voice source 'file' needs a path")
            return audio.file_source(src.path, realtime=src.realtime)
        if src.type == "stdin":
            return audio.stdin_source()
        if src.type == "mic":
            return audio.mic_source(src.device)
        if not src.topic:
            raise MtorError("voice source 'mqtt' needs a topic")
        if self._mic is None:
            self._mic = audio.QueueSource()
            await self.ctx.bus.subscribe(src.topic, self._on_audio, qos=0)
        return self._mic.__aiter__()

    async def _on_audio(self, msg: Inbound) -> None:
        if msg.content_type and not msg.content_type.startswith("audio/L16"):
            self.log.warning("ignoring %s audio on %s", msg.content_type, msg.topic)
            return
        if self._mic is not None:
            self._mic.push(msg.payload)

    def sink(self) -> audio.Sink:
        sink = self.config.sink
        if sink.type == "file" and sink.path is not None:
            return audio.WavSink(sink.path)
        if sink.type == "aplay":
            return audio.AplaySink()
        if sink.type == "speaker":
            return audio.SpeakerSink(sink.device)
        if sink.type == "mqtt":

            async def publish(pcm: bytes) -> None:
                await self.ctx.publish_media(sink.stream, pcm, audio.CONTENT_TYPE)

            return audio.MqttSink(publish)
        return audio.NullSink()

    async def close(self) -> None:
        """Drop the models (a restart loads them again); subscriptions, learned devices
        and running timers stay with the node."""
        self.stt = self.tts = self.wake = self.vad = None
        self.pipeline = None
        self.extras.announcer = None
        if self.wyoming is not None:
            await self.wyoming.close()
            self.wyoming = None

    # ------------------------------------------------------------ pipeline hooks

    async def _emit(self, name: str, value: Any, attrs: dict[str, Any]) -> None:
        retain = name in ("state", "transcript")  # dashboards show the latest on connect
        for listener in self.listeners:
            listener(name, value, attrs)
        await self.ctx.publish_event(
            "voice", name, value, attrs={**attrs, "satellite": self.name}, retain=retain
        )

    async def _publish_extra(
        self, name: str, value: Any, attrs: dict[str, Any], retain: bool
    ) -> None:
        for listener in self.listeners:
            listener(name, value, attrs)
        await self.ctx.publish_event(
            "voice", name, value, attrs={**attrs, "satellite": self.name}, retain=retain
        )

    async def _act(self, action: Action) -> None:
        self.log.info("intent action: %s <- %s", action.topic, action.payload[:200])
        # Not waiting for the broker's ack: offline it waits in the outbox, and the
        # answer need not wait for it either.
        await self.ctx.bus.publish(
            action.topic, action.payload, qos=1, retain=action.retain, wait=False
        )

    def _stt_stream(self) -> SttStream:
        routing = self.config.stt.routing
        if routing == "auto" and self.stt is not None:
            local = self.latency.get("local")
            remote = self.latency.get("remote")
            # Try each route once, then keep the faster (re-measured as it is used).
            if remote is None and self.realm.orchestrator_online:
                return _RemoteStt(self)
            if remote is not None and (local is None or remote < local):
                return _RemoteStt(self)
            return _TimedLocal(self, self.stt)
        if routing == "remote" or self.stt is None:
            return _RemoteStt(self)
        return _LocalStt(self.stt)

    async def _on_wake_event(self, msg: Inbound) -> None:
        try:
            event = decode(msg.payload, Event)
        except MessageError as exc:
            self.log.warning("bad wake event on %s: %s", msg.topic, exc)
            return
        fields = topics.EVENT.parse(msg.topic) or {}
        sat = f"{fields.get('node_id', '?')}/{event.attrs.get('satellite', '?')}"
        try:
            score = float(event.attrs.get("score", 0.0))
            energy = float(event.attrs.get("energy_dbfs", -120.0))
        except (TypeError, ValueError):
            return
        self.arbiter.heard(sat, str(event.value), score, energy)

    # ------------------------------------------------------------ remote stt

    async def remote_transcribe(self, pcm: bytes) -> Transcript:
        started = time.perf_counter()
        pcm = pcm[:MAX_STT_BYTES]
        media = topics.MEDIA.build(
            realm=self.ctx.realm, node_id=self.ctx.node_id, stream=f"stt/{uuid.uuid4().hex[:12]}"
        )
        await self.ctx.bus.publish(
            media, pcm, qos=1, retain=True, content_type=audio.CONTENT_TYPE, wait=True
        )
        try:
            out = await self.realm.call("stt", {"media_topic": media}, timeout=MEDIA_WAIT + 30)
        finally:
            await self.ctx.bus.publish(media, b"", qos=1, retain=True)  # clear the retained audio
        self.measured("remote", started, len(pcm))
        return Transcript(str(out.get("text", "")), out.get("language"), route="remote")

    def measured(self, route: str, started: float, nbytes: int) -> None:
        """Auto routing: remember seconds of transcription per second of audio."""
        per_s = (time.perf_counter() - started) / max(nbytes / (audio.RATE * audio.WIDTH), 0.5)
        old = self.latency.get(route)
        self.latency[route] = per_s if old is None else 0.7 * old + 0.3 * per_s

    # ------------------------------------------------------------ tasks

    async def execute(self, task: TaskRun) -> Any:
        if task.capability == "stt":
            return await execute_stt(self, task)
        if task.capability == "tts":
            return await execute_tts(self, task)
        if task.capability == "voice.announce":
            return await execute_announce(self._publish_extra, task)
        if task.capability == "voice.listen":
            return await execute_listen({self.name: self.extras}, task)
        raise TaskError("unavailable", f"voice node {self.name} has no {task.capability!r}")


class _TimedLocal(_LocalStt):
    def __init__(self, node: VoiceNode, backend: SttBackend) -> None:
        super().__init__(backend)
        self.node = node
        self.bytes = 0

    def feed(self, pcm: bytes) -> None:
        self.bytes += len(pcm)
        super().feed(pcm)

    async def finish(self) -> Transcript:
        started = time.perf_counter()
        result = await super().finish()
        self.node.measured("local", started, self.bytes)
        return result
