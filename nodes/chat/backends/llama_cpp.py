"""A local GGUF model run in-process by llama.cpp (llama-cpp-python).

One model instance per process and set of load parameters
(:class:`SharedModel`), however many chat nodes use it: requests queue on an
``asyncio.Lock`` and generate in a worker thread, so the event loop never
blocks.  The thread streams tokens back through ``call_soon_threadsafe`` and
checks the task's ``cancel_flag`` and deadline between tokens.  The model's
own chat template formats the conversation; a task's ``json_schema`` becomes
a grammar that constrains the output.  A model may load at start or on first
use, and unload after an idle period to free RAM on a small board.

Quiet without touching the process: llama-cpp-python's ``verbose=False``
points file descriptors 1 and 2 at /dev/null while a model loads (in a worker
thread), so every log line of the daemon in that window was lost.  Here
llama.cpp's own log goes through a callback into this module's logger
(warnings and errors kept, the rest at debug), the Python-side chatter of the
load goes to a buffer, and the descriptors are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from daemon.errors import TaskError
from daemon.modelstore import ModelError
from nodes.chat.backends.base import (
    BackendEnv,
    BackendUnavailable,
    ChatRequest,
    ChatResult,
    Message,
)
from nodes.chat.config import LlamaCppBackendConfig

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

WARMUP_PROMPT: Final = "Say hello in five words."
CHARS_PER_TOKEN: Final = 3.0  # conservative estimate used to fit history into n_ctx


@dataclass(frozen=True)
class ModelKey:
    path: str
    n_ctx: int
    n_threads: int
    n_batch: int
    chat_format: str | None
    seed: int | None


class SharedModel:
    """One loaded llama.cpp model, shared by every backend with the same key."""

    _registry: ClassVar[dict[ModelKey, SharedModel]] = {}

    def __init__(self, key: ModelKey) -> None:
        self.key = key
        self.llm: Llama | None = None
        self.users = 0
        self.queue = asyncio.Lock()  # one request at a time, in arrival order
        self.thread_lock = threading.Lock()  # guards the model even if a waiter is cancelled
        self.stats: dict[str, Any] = {}
        self.idle_unload: float | None = None
        self.warmup_tokens = 0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task[None] | None = None

    @classmethod
    def acquire(cls, key: ModelKey) -> SharedModel:
        shared = cls._registry.get(key)
        if shared is None:
            shared = cls._registry[key] = SharedModel(key)
        shared.users += 1
        return shared

    async def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._registry.pop(self.key, None)
            self._cancel_idle()
            async with self.queue:
                await self._unload()

    # ---------------------------------------------------------- load / unload

    async def ensure_loaded(self) -> bool:
        """Load if needed (call holding ``queue``); True if it loaded now."""
        if self.llm is not None:
            return False
        self.llm = await asyncio.to_thread(self._load)
        return True

    def _load(self) -> Llama:
        from llama_cpp import Llama

        NativeLog.install()
        k = self.key
        start = time.monotonic()
        chatter = io.StringIO()
        # verbose=True: llama-cpp-python leaves fds 1 and 2 alone (verbose=False
        # would point them at /dev/null for the whole load); what it prints in
        # Python goes to the buffer (logging handlers keep their own streams).
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            llm = Llama(
                model_path=k.path,
                n_ctx=k.n_ctx,
                n_threads=k.n_threads,
                n_batch=min(k.n_batch, k.n_ctx),
                chat_format=k.chat_format,
                seed=k.seed if k.seed is not None else 0xFFFFFFFF,
                verbose=True,
            )
        llm.verbose = False  # no timing prints per request from here on
        log.debug("llama.cpp load output: %s", chatter.getvalue()[-2000:])
        loaded = time.monotonic()
        self.stats = {"load_s": round(loaded - start, 2), "context_length": llm.n_ctx()}
        trained = _trained_context(llm)
        if trained:
            self.stats["trained_context_length"] = trained
        if self.warmup_tokens:
            self.stats.update(_warmup(llm, self.warmup_tokens))
        log.info("loaded %s in %.1fs: %s", Path(k.path).name, loaded - start, self.stats)
        return llm

    async def _unload(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            await asyncio.to_thread(_close, llm, self.thread_lock)
            log.info("unloaded %s", Path(self.key.path).name)

    def touch(self) -> None:
        """(Re)start the idle-unload timer after a request."""
        if not self.idle_unload:
            return
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        self._idle_handle = loop.call_later(self.idle_unload, self._start_idle_unload)

    def _start_idle_unload(self) -> None:
        self._idle_task = asyncio.create_task(self._idle_unload_now())

    async def _idle_unload_now(self) -> None:
        async with self.queue:
            if self.llm is not None:
                log.info("model idle for %ss", self.idle_unload)
                await self._unload()

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None


# ggml_log_level as the bundled llama.cpp numbers it: NONE 0, DEBUG 1, INFO 2, WARN 3,
# ERROR 4, CONT 5 (the previous line's level; llama-cpp-python's own _logger.py still
# names the older numbering, where 2 was WARN: its INFO lines came out as warnings).
_GGML_LEVELS: Final = {3: logging.WARNING, 4: logging.ERROR}


class NativeLog:
    """llama.cpp's log lines into ``<this module>.native``: warnings and errors
    as such, the rest at debug.  One per process (``llama_log_set`` is global)."""

    installed: ClassVar[NativeLog | None] = None

    def __init__(self) -> None:
        self.log = logging.getLogger(__name__ + ".native")
        self.pending: list[str] = []  # a line llama.cpp sends in pieces
        self.level = logging.DEBUG
        self.callback: Any = None  # kept referenced: llama.cpp holds only the C pointer

    @classmethod
    def install(cls) -> None:
        if cls.installed is not None:
            return
        import llama_cpp

        me = cls()

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            me.on_text(level, text)

        me.callback = callback
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        cls.installed = me

    def on_text(self, level: int, text: bytes) -> None:
        if level != 5:
            self.level = _GGML_LEVELS.get(level, logging.DEBUG)
        self.pending.append(text.decode("utf-8", "replace"))
        if not self.pending[-1].endswith("\n"):
            return
        line = "".join(self.pending).strip()
        self.pending.clear()
        if line:
            self.log.log(self.level, "%s", line[:500])


def _close(llm: Llama, lock: threading.Lock) -> None:
    with lock:
        llm.close()


def _trained_context(llm: Llama) -> int | None:
    meta = llm.metadata
    arch = meta.get("general.architecture")
    value = meta.get(f"{arch}.context_length") if arch else None
    return int(value) if value and value.isdigit() else None


def _warmup(llm: Llama, max_tokens: int) -> dict[str, Any]:
    """Generate a few tokens to measure time to first token and decode speed."""
    # A one-token run first: the very first evaluation pays one-off costs
    # (page faults of the mmapped weights, allocations) that are not the speed.
    # (A different prompt, so the measured run evaluates its own prompt.)
    llm.create_chat_completion(
        messages=[{"role": "user", "content": "Hi."}], max_tokens=1, temperature=0.0
    )
    start = time.monotonic()
    first: float | None = None
    n = 0
    stream = _chunks(
        llm,
        messages=[{"role": "user", "content": WARMUP_PROMPT}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.monotonic()
    end = time.monotonic()
    out: dict[str, Any] = {}
    if first is not None:
        out["time_to_first_token_ms"] = round((first - start) * 1000, 1)
        if n > 1 and end > first:
            out["tokens_per_s"] = round((n - 1) / (end - first), 1)
    return out


class LlamaCppBackend:
    type_name = "llama_cpp"
    max_concurrency = 1  # one generation at a time per model; others queue

    def __init__(self, config: LlamaCppBackendConfig, env: BackendEnv) -> None:
        self.config = config
        self.env = env
        self.model = config.model if config.model_path is None else config.model_path.stem
        self._languages: list[str] = list(config.languages or [])
        self._shared: SharedModel | None = None

    async def start(self) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                "llama_cpp: llama-cpp-python is not installed (install the `chat` extra)"
            ) from exc
        path = await asyncio.to_thread(self._model_path)
        key = ModelKey(
            path=str(path),
            n_ctx=self.config.n_ctx,
            n_threads=self.config.n_threads or max(1, os.cpu_count() or 1),
            n_batch=self.config.n_batch,
            chat_format=self.config.chat_format,
            seed=self.config.seed,
        )
        shared = SharedModel.acquire(key)
        shared.idle_unload = self.config.idle_unload
        shared.warmup_tokens = self.config.warmup_tokens
        self._shared = shared
        if self.config.load == "startup":
            try:
                async with shared.queue:
                    await shared.ensure_loaded()
            except Exception as exc:
                await self.close()
                raise BackendUnavailable(f"llama_cpp: cannot load {path}: {exc}") from exc
            shared.touch()

    def _model_path(self) -> Path:
        if self.config.model_path is not None:
            if not self.config.model_path.is_file():
                raise BackendUnavailable(f"llama_cpp: no model file {self.config.model_path}")
            return self.config.model_path
        store = self.env.store
        try:
            entry = store.entry(self.config.model)
            path = store.path(self.config.model)
        except ModelError as exc:
            raise BackendUnavailable(f"llama_cpp: {exc}") from exc
        if not self._languages:
            self._languages = list(entry.languages)
        return path

    def languages(self) -> list[str]:
        return self._languages

    def attrs(self) -> dict[str, Any]:
        shared = self._shared
        attrs: dict[str, Any] = {
            "json_schema": True,
            "context_length": self.config.n_ctx,
            "n_threads": shared.key.n_threads if shared else self.config.n_threads,
            "load": self.config.load,
            "loaded": bool(shared and shared.llm is not None),
        }
        if shared is not None:
            attrs.update(shared.stats)
        return attrs

    async def complete(self, request: ChatRequest) -> ChatResult:
        shared = self._shared
        if shared is None:
            raise TaskError("unavailable", "llama_cpp backend is not started")
        async with shared.queue:
            try:
                loaded_now = await shared.ensure_loaded()
            except Exception as exc:
                raise TaskError("unavailable", f"cannot load model {self.model}: {exc}") from exc
            if loaded_now and self.env.announce is not None:
                await self.env.announce()  # the advert now has tokens/s
            try:
                return await self._generate(shared, request)
            finally:
                shared.touch()

    async def _generate(self, shared: SharedModel, request: ChatRequest) -> ChatResult:
        llm = shared.llm
        assert llm is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()
        deadline = None if request.timeout is None else time.monotonic() + request.timeout
        max_tokens = min(request.max_tokens, max(16, shared.key.n_ctx // 2))
        messages = _fit(request.messages, request.system, shared.key.n_ctx - max_tokens)
        kwargs: dict[str, Any] = {"max_tokens": max_tokens}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}

        def push(item: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> tuple[int, str | None, int]:
            try:
                with shared.thread_lock:
                    return _stream_tokens(
                        llm,
                        messages,
                        kwargs,
                        push=push,
                        should_stop=lambda: request.cancel_flag.is_set() or stop.is_set(),
                        deadline=deadline,
                    )
            finally:
                push(None)

        fut = asyncio.ensure_future(asyncio.to_thread(work))
        parts: list[str] = []
        try:
            while (item := await queue.get()) is not None:
                parts.append(item)
                await request.emit(item)
            n, finish, prompt_tokens = await fut
        except BaseException as exc:
            stop.set()
            # Let the thread notice at the next token: the model must be idle before
            # the queue moves on (thread_lock guards it even if we are cancelled again).
            await asyncio.wait({fut})
            if isinstance(exc, Exception) and not isinstance(exc, TaskError):
                raise _convert(exc, request) from exc
            raise
        if finish == "cancelled":
            raise TaskError("cancelled", f"cancelled after {n} tokens")
        if finish == "timeout":
            raise TaskError("timeout", f"deadline reached after {n} tokens")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
        return ChatResult("".join(parts), self.model, usage, finish)

    async def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            await shared.release()


def _chunks(llm: Llama, **kwargs: Any) -> Generator[dict[str, Any], None, None]:
    """``create_chat_completion(stream=True)``, typed as the generator it is."""
    return cast(
        "Generator[dict[str, Any], None, None]",
        llm.create_chat_completion(stream=True, **kwargs),
    )


def _stream_tokens(
    llm: Llama,
    messages: list[Any],
    kwargs: dict[str, Any],
    *,
    push: Callable[[str], None],
    should_stop: Callable[[], bool],
    deadline: float | None,
) -> tuple[int, str | None, int]:
    """Generate in this (worker) thread, pushing each text delta; checks for
    cancellation and the deadline between tokens.  Returns (tokens, finish
    reason, prompt tokens)."""
    n = 0
    finish: str | None = None
    stream = _chunks(llm, messages=messages, **kwargs)
    try:
        for chunk in stream:
            if should_stop():
                finish = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                finish = "timeout"
                break
            choice = chunk["choices"][0]
            delta = choice["delta"].get("content")
            if delta:
                n += 1
                push(delta)
            finish = choice.get("finish_reason") or finish
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    # The context now holds the prompt and the generated tokens.
    return n, finish, max(0, llm.n_tokens - n)


def _fit(messages: list[Message], system: str | None, budget_tokens: int) -> list[Any]:
    """The chat-template messages, oldest history dropped to fit the context."""
    turns = list(messages)

    def size() -> float:
        chars = sum(len(m["content"]) + 8 for m in turns) + len(system or "")
        return chars / CHARS_PER_TOKEN

    while len(turns) > 1 and size() > budget_tokens:
        del turns[0]
        while len(turns) > 1 and turns[0]["role"] != "user":
            del turns[0]
    out: list[Any] = []
    if system:
        out.append({"role": "system", "content": system})
    out.extend(turns)
    return out


def _convert(exc: Exception, request: ChatRequest) -> TaskError:
    text = str(exc)[:300]
    if "context window" in text or "exceed" in text:
        return TaskError("bad_input", f"the prompt does not fit the model's context: {text}")
    if request.json_schema is not None and isinstance(
        exc, ValueError | KeyError | TypeError | NotImplementedError | RuntimeError
    ):
        return TaskError("bad_input", f"json_schema not usable: {type(exc).__name__}: {text}")
    return TaskError("backend_error", f"llama.cpp failed: {type(exc).__name__}: {text}")
