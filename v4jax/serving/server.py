"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Routes: `POST /v1/completions` (JSON, or server-sent events with `"stream": true`), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`. The engine steps in its own thread; each completion submits one engine
request per choice with a sink that hands events to the request's asyncio queue, so handlers never block the event
loop and a streamed choice sends its text as tokens arrive.

Request fields: `model` (must be the served id), `prompt` (text, a list of texts, token ids, or a list of id
lists), `max_tokens` (default 16), `temperature` (default 1, 0 greedy), `top_p`, `n`, `seed` (default random),
`stop` (up to 4 strings; the text is cut before the first one), `stream`, `stream_options.include_usage`, `user`,
and the vLLM extensions `top_k`, `stop_token_ids`, `ignore_eos`. Text prompts are encoded after the tokenizer's
BOS; generation stops at the tokenizer's EOS unless `ignore_eos`. Fields we do not implement (`echo`, `logprobs`,
`suffix`, penalties, `logit_bias`, `best_of` != n) and unknown fields are refused rather than ignored.

Bad input is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and the server keeps
serving: malformed JSON, missing or wrongly typed fields, out-of-range values, a prompt that does not fit in a cache
row with its max_tokens (`context_length_exceeded`), an unknown model (404 `model_not_found`), unknown routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from v4jax.serving.engine import Engine, Event, FinishReason, PromptTooLong
from v4jax.serving.loading import encode_text
from v4jax.serving.sampling import SEED_MODULUS, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 64  # prompts x n per request
MAX_STOPS = 4
KNOWN_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "user", "echo", "logprobs", "suffix", "best_of", "presence_penalty", "frequency_penalty", "logit_bias",
    "top_k", "stop_token_ids", "ignore_eos"})


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------
# request validation (pure)


@dataclasses.dataclass
class Completion:
    """A validated /v1/completions request: one (prompt ids, sampling) per choice, index = prompt * n + j."""

    choices: list[tuple[list[int], SamplingParams]]
    stops: list[str]
    stream: bool
    include_usage: bool


@dataclasses.dataclass
class ModelInfo:
    name: str
    vocab_size: int
    max_len: int  # tokens per cache row: prompt + max_tokens must fit
    tokenizer: Any  # data.Tokenizer or None


def _check_type(body: dict, field: str, types: tuple, what: str, default=None):
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise APIError(400, f"'{field}' must be {what}, got {json.dumps(value)[:60]}", param=field,
                       code="invalid_type")
    return value


def _number(body, field, default, low, high, *, low_open=False):
    value = _check_type(body, field, (int, float), "a number", default)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise APIError(400, f"'{field}' must be in {bracket}{low}, {high}], got {value}", param=field,
                       code="invalid_value")
    return value


def _integer(body, field, default, low, high=None):
    value = _check_type(body, field, (int,), "an integer", default)
    if value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"'{field}' must be {limit}, got {value}", param=field, code="invalid_value")
    return value


def _refuse_unsupported(body: dict):
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0],
                       code="unknown_parameter")
    for field, ok in [("echo", lambda v: not v), ("logprobs", lambda v: v is None), ("suffix", lambda v: not v),
                      ("presence_penalty", lambda v: not v), ("frequency_penalty", lambda v: not v),
                      ("logit_bias", lambda v: not v)]:
        if field in body and not ok(body[field]):
            raise APIError(400, f"'{field}' is not supported by this server", param=field, code="unsupported")


def _prompts(body: dict, info: ModelInfo) -> list[list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str) or _int_list(prompt) and prompt:
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _int_list(p) for p in prompt):
        items = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       "token-id lists (non-empty)", param="prompt", code="invalid_type")
    out = []
    for item in items:
        if isinstance(item, str):
            if info.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            out.append(encode_text(info.tokenizer, item))
        else:
            if not item or any(not 0 <= t < info.vocab_size for t in item):
                raise APIError(400, f"prompt token ids must be in [0, {info.vocab_size}) and non-empty",
                               param="prompt", code="invalid_value")
            out.append([int(t) for t in item])
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(x) -> bool:
    return isinstance(x, list) and all(_is_int(t) for t in x)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them",
                       param="stop", code="invalid_type")
    return stops


def parse_completion(body: Any, info: ModelInfo) -> Completion:
    """Validate a /v1/completions body; APIError (4xx) naming the field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model is None:
        raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != info.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{info.name}'",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    best_of = _integer(body, "best_of", n, 1)
    if best_of != n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported")
    seed = _check_type(body, "seed", (int,), "an integer", None)
    stream = _check_type(body, "stream", (bool,), "a boolean", False)
    options = _check_type(body, "stream_options", (dict,), "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", param="stream_options")
    _check_type(body, "user", (str,), "a string")
    ignore_eos = _check_type(body, "ignore_eos", (bool,), "a boolean", False)
    stop_ids = _check_type(body, "stop_token_ids", (list,), "a list of token ids", [])
    if not all(_is_int(t) and 0 <= t < info.vocab_size for t in stop_ids):
        raise APIError(400, f"'stop_token_ids' must be token ids in [0, {info.vocab_size})",
                       param="stop_token_ids", code="invalid_value")
    stops = _stops(body)
    prompts = _prompts(body, info)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    for prompt in prompts:
        if len(prompt) + max_tokens > info.max_len:
            raise APIError(400, f"This model's maximum context length is {info.max_len} tokens, however you "
                           f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in your prompt; "
                           f"{max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="prompt" if len(prompt) >= info.max_len else "max_tokens",
                           code="context_length_exceeded")
    eos = getattr(info.tokenizer, "eos_id", None)
    stop_tokens = tuple(stop_ids) + ((eos,) if eos is not None and not ignore_eos else ())
    seed = secrets.randbelow(SEED_MODULUS) if seed is None else seed
    choices = [(prompt, SamplingParams(temperature=float(temperature), top_k=max(top_k, 0), top_p=float(top_p),
                                       seed=seed + index, max_tokens=max_tokens, stop_tokens=stop_tokens))
               for index, prompt in enumerate(p for p in prompts for _ in range(n))]
    return Completion(choices, stops, stream, include_usage)


# ---------------------------------------------------------------------------------------------------------------
# text out


class TextStream:
    """Token ids -> text deltas, cut before the first stop string.

    The whole output is decoded after each token (so multi-byte characters split over tokens come out whole);
    the last `longest stop - 1` characters and a trailing incomplete character are held back until it is clear
    they do not start a stop string.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # everything sent so far
        self.stopped = False  # a stop string was found

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def _cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return text[:min(found)]
        return text

    def push(self, token: int) -> str:
        """The text that may be sent after `token`."""
        self.ids.append(token)
        text = self._cut(self._decode())
        if not self.stopped:
            text = text[:len(text) - self.hold] if self.hold else text
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence so far
        return self._send(text)

    def finish(self) -> str:
        """The rest of the text once no more tokens come."""
        return self._send(self._cut(self._decode()) if not self.stopped else self.text)

    def _send(self, text: str) -> str:
        if len(text) <= len(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def finish_reason(reason: FinishReason | None, stream: TextStream) -> str:
    return "stop" if stream.stopped or reason is FinishReason.STOP else "length"


def sse(payload: Any) -> str:
    """One server-sent event carrying `payload` (JSON, or the literal [DONE])."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# the app


class Choice:
    def __init__(self, index: int, prompt_tokens: int, stream: TextStream):
        self.index, self.prompt_tokens, self.stream = index, prompt_tokens, stream
        self.request = None
        self.finished: Event | None = None


def make_app(engine: Engine, tokenizer, model_name: str, *, stop_engine_on_shutdown: bool = True):
    """The FastAPI app serving `engine` as model `model_name`; its lifespan starts (and stops) the engine."""
    info = ModelInfo(model_name, engine.cfg.vocab_size, engine.max_len, tokenizer)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if stop_engine_on_shutdown:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="v4jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), code=str(error.status_code)),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        return JSONResponse(error_body(str(error.errors())[:500]), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"{type(error).__name__}: {error}", "server_error"), status_code=500)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "v4jax",
                "max_model_len": engine.max_len}

    @app.get("/health")
    async def health():
        state = {"slots": engine.slots, "busy": engine.busy_slots, "pending": engine.pending}
        if not engine.alive:
            return JSONResponse({"status": "engine stopped", **state}, status_code=503)
        return {"status": "ok", **state}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"We could not parse the JSON body of your request ({error})",
                           code="invalid_json") from None
        job = parse_completion(body, info)
        if not engine.alive:
            raise APIError(503, "the engine is not running", kind="server_error")
        queue: asyncio.Queue = asyncio.Queue()
        choices = _submit(engine, job, tokenizer, queue, asyncio.get_running_loop())
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if job.stream:
            return StreamingResponse(_stream(job, choices, queue, meta), media_type="text/event-stream")
        try:
            while not all(c.finished for c in choices):
                _handle(choices, *(await queue.get()))
        finally:
            _cancel(choices)
        _raise_failures(choices)
        for choice in choices:
            choice.stream.finish()
        return {**meta, "choices": [_choice(c, c.stream.text, c.finished) for c in choices],
                "usage": _usage(choices)}

    return app


def _submit(engine: Engine, job: Completion, tokenizer, queue: asyncio.Queue, loop) -> list[Choice]:
    for prompt, params in job.choices:  # refuse before anything is queued
        try:
            engine.check(prompt, params)
        except PromptTooLong as error:
            raise APIError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
        except ValueError as error:
            raise APIError(400, str(error), param="prompt", code="invalid_value") from None
    choices = [Choice(i, len(prompt), TextStream(tokenizer, job.stops)) for i, (prompt, _) in enumerate(job.choices)]
    try:
        for choice, (prompt, params) in zip(choices, job.choices):
            def sink(event, index=choice.index):
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            choice.request = engine.submit(prompt, params, sink=sink)
    except RuntimeError as error:  # the engine stopped meanwhile
        _cancel(choices)
        raise APIError(503, str(error), kind="server_error") from None
    return choices


def _handle(choices: list[Choice], index: int, event: Event) -> str:
    """Apply one engine event to its choice; the text that may be sent now."""
    choice = choices[index]
    if event.token is None:
        choice.finished = event
        return ""
    if choice.stream.stopped:
        return ""
    delta = choice.stream.push(event.token)
    if choice.stream.stopped:
        choice.request.cancel()  # a stop string: the engine frees the slot at its next step
    return delta


def _cancel(choices: list[Choice]):
    for choice in choices:
        if choice.request is not None and not choice.request.done:
            choice.request.cancel()


def _failure(choices: list[Choice]) -> str | None:
    for choice in choices:
        event = choice.finished
        if event is not None and (event.finish_reason is FinishReason.ERROR or (
                event.finish_reason is FinishReason.CANCELLED and not choice.stream.stopped)):
            return event.error or "the request was cancelled (the engine is stopping)"
    return None


def _raise_failures(choices: list[Choice]):
    message = _failure(choices)
    if message is not None:
        raise APIError(500, f"generation failed: {message}", kind="server_error")


def _choice(choice: Choice, text: str, finished: Event | None) -> dict:
    reason = None if finished is None else finish_reason(finished.finish_reason, choice.stream)
    return {"text": text, "index": choice.index, "logprobs": None, "finish_reason": reason}


def _usage(choices: list[Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(len(c.stream.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(job: Completion, choices: list[Choice], queue: asyncio.Queue, meta: dict):
    try:
        while not all(c.finished for c in choices):
            index, event = await queue.get()
            delta = _handle(choices, index, event)
            choice = choices[index]
            if choice.finished is not None:
                message = _failure([choice])
                if message is not None:
                    yield sse(error_body(f"generation failed: {message}", "server_error"))
                    return
                yield sse({**meta, "choices": [_choice(choice, choice.stream.finish(), choice.finished)]})
            elif delta:
                yield sse({**meta, "choices": [_choice(choice, delta, None)]})
        if job.include_usage:
            yield sse({**meta, "choices": [], "usage": _usage(choices)})
        yield sse("[DONE]")
    finally:  # also when the client goes away mid-stream
        _cancel(choices)


# ---------------------------------------------------------------------------------------------------------------
# running it


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on an already bound socket (port 0: a free port)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="v4jax-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn handles SIGINT / SIGTERM; the engine stops with the app)."""
    import uvicorn

    uvicorn.run(make_app(engine, tokenizer, model_name), host=host, port=port, log_level=log_level)


__all__ = ["APIError", "BackgroundServer", "Completion", "ModelInfo", "TextStream", "error_body", "make_app",
           "parse_completion", "serve", "sse"]
