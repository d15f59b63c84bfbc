"""Continuous batching: a fixed number of decode slots; requests join after their prefill and leave on stop.

Legend: b batch (= slots), t time, v vocab.

One cache of batch `slots` holds every running request, one row each. A new request is prefilled alone into a
fresh batch-1 cache (`decode.prefill` runs fixed-size chunks, so every prompt length runs the same compiled
program), its first token is sampled from the prefill's last logits, and the batch-1 cache is `insert`ed into a
free row. Each engine step then runs one `decode_step` over all rows (`active` marks the busy ones; free rows are
left untouched) and the batched sampler, so each busy row gets its next token with its own settings and PRNG stream
(`sampling.sample`). A request leaves its row when it samples a stop token, reaches `max_tokens`, is cancelled, or
its row is full; the row takes the next waiting request at the next step. No shape depends on a request, so after
`warmup` nothing compiles again (checked in tests/test_engine.py by counting XLA compilations). The exception is a
mesh with `context` > 1: a prompt longer than one chunk is prefilled in one pass with its sequence split over
`context` (`decode.prefill`), one compiled program per padded length (a multiple of the chunk).

Threads. `step()` does all the device work and must be called from one thread at a time: either drive the engine
yourself (`run_until_idle`, as `generate` does) or `start()` a background thread that steps whenever there is
work (the HTTP server). `submit` and `Request.cancel` may be called from any thread. Results come back per request:
`Request.wait()` / iterating a `Request` (a thread-safe queue), or a `sink` callback called on the engine thread
with every `Event` (the server bridges it into asyncio).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from v4jax.config import ModelConfig
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode
from v4jax.serving.sampling import BatchParams, SamplingParams, sample_jit

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 8
DEFAULT_CHUNK = 256


# ---------------------------------------------------------------------------------------------------------------
# the engine's own compiled programs (decode.prefill, decode.decode_step and cache.insert compile themselves)

_sample_program = sample_jit
_zeros_like = jax.jit(lambda tree: jax.tree.map(jax.numpy.zeros_like, tree))  # a fresh row from a blank template


def _committed(tree):
    """Arrays pinned where they are (no copy). jit compiles separate programs for committed arrays (restored,
    device_put, step outputs) and uncommitted ones (fresh from init), so the engine passes only committed ones:
    warm-up compiles what later steps run, and engines share programs whatever their parameters' origin."""
    return jax.tree.map(lambda a: jax.device_put(a, a.sharding) if isinstance(a, jax.Array) and not a.committed
                        else a, tree)


# ---------------------------------------------------------------------------------------------------------------
# requests


class FinishReason(enum.StrEnum):
    STOP = "stop"  # sampled a stop token
    LENGTH = "length"  # max_tokens reached, or the row of the cache is full
    CANCELLED = "cancelled"  # Request.cancel() or Engine.stop()
    ERROR = "error"  # the device step raised; `Request.error` has the message


class PromptTooLong(ValueError):
    """len(prompt) + max_tokens exceeds the cache's tokens per row."""


@dataclasses.dataclass(frozen=True)
class Event:
    """One generated token (`token`), or the end of the request (`finish_reason` set, `token` None)."""

    token: int | None
    finish_reason: FinishReason | None = None
    error: str | None = None


class Request:
    """A submitted request. Fields written by the engine thread: `tokens`, `finish_reason`, `error`.

    Without a sink, events go to an internal queue: iterate the request for its tokens as they come, or `wait()`.
    """

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams,
                 sink: Callable[[Event], None] | None = None):
        self.id, self.prompt, self.params = request_id, prompt, params
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._sink = sink
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if sink is None else None
        self._done = threading.Event()
        self._cancelled = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it finishes with CANCELLED at the engine's next step."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until finished; the generated tokens. TimeoutError if `timeout` seconds pass first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self.tokens

    def __iter__(self) -> Iterator[int]:
        if self._events is None:
            raise TypeError("a request submitted with a sink streams to the sink, not by iteration")
        while True:
            event = self._events.get()
            if event.token is None:
                return
            yield event.token

    def _emit(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
        else:
            self.finish_reason, self.error = event.finish_reason, event.error
        try:
            if self._sink is not None:
                self._sink(event)
            else:
                self._events.put(event)
        except Exception as error:  # noqa: BLE001 (a broken sink, e.g. a closed event loop, must not stop the engine)
            log.warning("request %s: its sink raised %s: %s; cancelling it", self.id, type(error).__name__, error)
            self._cancelled.set()
        finally:
            if event.token is None:
                self._done.set()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    """Continuous batching over `slots` rows of `max_len` tokens each (see the module docstring).

    Args:
      cfg, params: the model (`v4jax.model.init`, a checkpoint or `hf.load`).
      slots: decode rows (requests running at once); further requests wait in a queue.
      max_len: tokens per row (prompt + generated); default `cfg.max_position_embeddings`; rounded up to a
        multiple of the prefill chunk.
      chunk: prefill chunk length (at most max_len).
      mesh: run under this mesh (params sharded on it, e.g. `model.place(params, mesh, "serve")`); None: the
        default device. With `context` > 1, long prompts prefill split over it and the long cache arrays are
        split along positions.
      warmup: compile the three programs now (otherwise on first use).
    """

    def __init__(self, cfg: ModelConfig, params, *, slots: int = DEFAULT_SLOTS, max_len: int | None = None,
                 chunk: int = DEFAULT_CHUNK, mesh: jax.sharding.Mesh | None = None, warmup: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.cfg, self.params, self.mesh, self.slots = cfg, _committed(params), mesh, slots
        self.chunk = min(chunk, max_len)
        with self._on_mesh():
            self.cache = _committed(cache_lib.init_cache(cfg, slots, _round_up(max_len, self.chunk), mesh=mesh))
        self.max_len = decode.max_len(self.cache)
        with self._on_mesh():
            self._blank = _committed(cache_lib.init_cache(cfg, 1, self.max_len, mesh=mesh))  # copied per request
        self._rows: list[Request | None] = [None] * slots
        self._last = np.zeros(slots, np.int32)  # each busy row's newest token: the next decode input
        self._cached = np.zeros(slots, np.int64)  # host mirror of the cache's per-row lengths
        self._sampling = BatchParams.empty(slots)
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run
        if warmup:
            self.warmup()

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def warmup(self) -> None:
        """Compile prefill, sampling, insert and decode on dummy inputs (only while every row is free)."""
        if any(self._rows):
            raise RuntimeError("warmup needs an idle engine")
        # two chunks when a row holds them: a first and a later chunk may differ in what is committed to the device
        width = min(2 * self.chunk, self.max_len)
        with self._on_mesh():
            logits, one = decode.prefill(self.cfg, self.params, _zeros_like(self._blank), np.zeros((1, width), np.int32),
                                         np.array([width - self.chunk + 1], np.int32), chunk=self.chunk)
            np.asarray(_sample_program(logits, *BatchParams.empty(1).arrays()))
            self.cache = cache_lib.insert(self.cache, np.int32(0), one)
            self._decode_and_sample(np.zeros(self.slots, bool))

    def _decode_and_sample(self, active: np.ndarray) -> np.ndarray:
        logits, self.cache = decode.decode_step(self.cfg, self.params, self.cache, self._last, active)
        return np.asarray(_sample_program(logits, *self._sampling.arrays()))

    # ----- requests -----
    def check(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or ValueError (PromptTooLong if it does not fit with max_tokens)."""
        params.validate(self.cfg.vocab_size)
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise ValueError("a prompt is a sequence of token ids") from None
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if len(ids) + params.max_tokens > self.max_len:
            raise PromptTooLong(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is more than the "
                f"{self.max_len} tokens a cache row holds")
        return ids

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
               sink: Callable[[Event], None] | None = None, request_id: str | None = None) -> Request:
        """Queue a request (any thread); ValueError / PromptTooLong for bad input, RuntimeError once stopped."""
        params = SamplingParams() if params is None else params
        request = Request(request_id or f"req-{next(self._ids)}", self.check(prompt, params), params, sink)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._pending.append(request)
            self._wake.notify()
        return request

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ----- stepping (one thread) -----
    def step(self) -> bool:
        """Admit waiting requests into free rows, then one decode step over the busy rows. False if idle."""
        self._drop_cancelled()
        admitted = self._admit()
        if not any(self._rows):
            return admitted
        try:
            with self._on_mesh():
                tokens = self._decode_and_sample(np.array([r is not None for r in self._rows]))
        except Exception as error:  # noqa: BLE001 (the cache was donated: every running request is lost)
            self._fail_all(error)
            return True
        self.steps += 1
        for row, request in enumerate(self._rows):
            if request is not None:
                self._cached[row] += 1
                self._accept(row, int(tokens[row]))
        return True

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (for callers that drive the engine themselves)."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread; submit and wait instead")
        while self._pending or any(self._rows):
            self.step()

    def _admit(self) -> bool:
        admitted = False
        while self._pending and None in self._rows:
            with self._wake:
                request = self._pending.popleft()
            if request._cancelled.is_set():
                request._emit(Event(None, FinishReason.CANCELLED))
                continue
            row = self._rows.index(None)
            try:
                with self._on_mesh():
                    token, one = self._prefill(request)
                    self.cache = cache_lib.insert(self.cache, np.int32(row), one)
            except Exception as error:
                log.exception("prefill of %s failed", request.id)
                request._emit(Event(None, FinishReason.ERROR, f"{type(error).__name__}: {error}"))
                self._fail_all(error)  # the insert may have consumed the shared cache
                continue
            self._rows[row] = request
            self._cached[row] = len(request.prompt)
            self._sampling.set_row(row, request.params)
            self._accept(row, token)
            admitted = True
        return admitted

    def _prefill(self, request: Request) -> tuple[int, object]:
        """The request's prompt in a fresh batch-1 cache, right-padded to whole chunks; its first token."""
        prompt = request.prompt
        tokens = np.zeros((1, _round_up(len(prompt), self.chunk)), np.int32)
        tokens[0, :len(prompt)] = prompt
        logits, one = decode.prefill(self.cfg, self.params, _zeros_like(self._blank), tokens,
                                     np.array([len(prompt)], np.int32), chunk=self.chunk)
        token = _sample_program(logits, *BatchParams.of([request.params]).arrays())
        return int(np.asarray(token)[0]), one

    def _accept(self, row: int, token: int) -> None:
        """Hand `token` to the row's request; free the row if the request is finished."""
        request = self._rows[row]
        if token in request.params.stop_tokens:
            return self._finish(row, FinishReason.STOP)
        request._emit(Event(token))
        if len(request.tokens) >= request.params.max_tokens or self._cached[row] >= self.max_len:
            return self._finish(row, FinishReason.LENGTH)
        self._last[row] = token
        self._sampling.steps[row] = len(request.tokens)

    def _finish(self, row: int, reason: FinishReason, error: str | None = None) -> None:
        request, self._rows[row] = self._rows[row], None
        request._emit(Event(None, reason, error))

    def _drop_cancelled(self) -> None:
        for row, request in enumerate(self._rows):
            if request is not None and request._cancelled.is_set():
                self._finish(row, FinishReason.CANCELLED)

    def _fail_all(self, error: Exception) -> None:
        log.error("engine step failed: %s: %s", type(error).__name__, error)
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, FinishReason.ERROR, f"{type(error).__name__}: {error}")
        with self._on_mesh():
            self.cache = _committed(cache_lib.init_cache(self.cfg, self.slots, self.max_len, mesh=self.mesh))

    # ----- the background thread -----
    def start(self) -> Engine:
        """Step in a daemon thread whenever there is work; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="v4jax-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not any(self._rows):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:
                log.exception("engine step raised")
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, FinishReason.CANCELLED)
        while self._pending:
            self._pending.popleft()._emit(Event(None, FinishReason.CANCELLED))

    def stop(self, timeout: float | None = 30) -> None:
        """Stop the thread; running and waiting requests finish with CANCELLED."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int = 0, *, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), slots: int | None = None, max_len: int | None = None,
             chunk: int | None = None, mesh=None) -> list[list[int]]:
    """Generated token ids for each prompt (a list of token-id lists), through a continuous-batching Engine.

    Prompt i samples with seed `seed + i`; greedy (temperature 0) ignores seeds. A stop token ends its prompt's
    output and is not included. The cache is sized to the longest prompt plus max_new_tokens unless `max_len`.
    """
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    chunk = chunk or min(DEFAULT_CHUNK, max(16, 1 << max(longest - 1, 1).bit_length()))
    max_len = max_len or _round_up(longest + max_new_tokens, chunk)
    slots = slots or min(1 << (len(prompts) - 1).bit_length(), DEFAULT_SLOTS)  # 1, 2, 4, 8: few shapes
    engine = Engine(cfg, params, slots=slots, max_len=max_len, chunk=chunk, mesh=mesh, warmup=False)
    requests = [engine.submit(prompt, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                     seed=seed + i, max_tokens=max_new_tokens,
                                                     stop_tokens=tuple(stop_tokens)))
                for i, prompt in enumerate(prompts)]
    engine.run_until_idle()
    for request in requests:
        if request.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"generation failed: {request.error}")
    return [list(request.tokens) for request in requests]


__all__ = ["Engine", "Event", "FinishReason", "PromptTooLong", "Request", "generate"]
