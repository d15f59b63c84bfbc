"""Continuous batching: requests of different lengths joining and leaving get exactly the tokens they get alone,
nothing recompiles after warm-up, stop / length / cancel end requests, and `serving.generate` agrees."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import config, model, serving
from v4jax.serving.engine import Engine, FinishReason, PromptTooLong
from v4jax.serving.sampling import SamplingParams

SLOTS, MAX_LEN, CHUNK = 4, 64, 16
LENGTHS = [3, 17, 9, 30, 1, 12, 40]  # 1 to 3 prefill chunks
NEW_TOKENS = [8, 3, 12, 5, 10, 6, 4]


@pytest.fixture(scope="module")
def setup():
    cfg = config.preset("tiny-v3")
    params = model.init(cfg, jax.random.key(0))
    engine = Engine(cfg, params, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in LENGTHS]
    return cfg, params, engine, prompts


class CompileCounter:
    """Counts XLA compilations (any function, eager ops included) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def run_alone(engine, prompt, params):
    request = engine.submit(prompt, params)
    engine.run_until_idle()
    return request


def greedy_by_forward(cfg, params, prompt, count):
    """The greedy continuation recomputed with the full forward pass (no cache), one fixed-shape buffer."""
    buffer, length = np.zeros((1, MAX_LEN), np.int32), len(prompt)
    buffer[0, :length] = prompt
    out = []
    for _ in range(count):
        logits = model.forward(cfg, params, jnp.asarray(buffer))
        token = int(np.argmax(logits[0, length - 1]))
        out.append(token)
        buffer[0, length], length = token, length + 1
    return out


def test_joining_and_leaving_gives_each_request_its_alone_tokens(setup):
    cfg, params, engine, prompts = setup
    settings = [SamplingParams(max_tokens=n) for n in NEW_TOKENS]
    with CompileCounter() as compiles:
        alone = [run_alone(engine, p, s).tokens for p, s in zip(prompts, settings)]
        requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]  # 7 requests, 4 slots
        engine.run_until_idle()
    for request, expected, n in zip(requests, alone, NEW_TOKENS):
        assert request.finish_reason is FinishReason.LENGTH and len(request.tokens) == n
        assert request.tokens == expected, request.id
    assert compiles.count == 0, f"{compiles.count} compilations after warm-up"
    assert engine.busy_slots == 0 and engine.pending == 0
    # the cache is the model: the greedy continuation equals a full forward pass per token
    for i in (0, 3):
        assert alone[i] == greedy_by_forward(cfg, params, prompts[i], NEW_TOKENS[i])


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    _, _, engine, prompts = setup
    hot = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=11, max_tokens=10)
    alone = run_alone(engine, prompts[2], hot).tokens
    others = [engine.submit(p, SamplingParams(temperature=1.0, seed=i, max_tokens=6))
              for i, p in enumerate(prompts[:2])]
    batched = engine.submit(prompts[2], hot)
    engine.run_until_idle()
    assert batched.tokens == alone
    assert all(r.finish_reason is FinishReason.LENGTH for r in others)
    assert run_alone(engine, prompts[2], SamplingParams(temperature=1.5, seed=12, max_tokens=10)).tokens != alone


def test_stop_token_ends_the_request_without_it(setup):
    _, _, engine, prompts = setup
    reference = run_alone(engine, prompts[0], SamplingParams(max_tokens=8)).tokens
    stop = reference[3]
    request = run_alone(engine, prompts[0], SamplingParams(max_tokens=8, stop_tokens=(stop,)))
    assert request.finish_reason is FinishReason.STOP
    assert request.tokens == reference[:reference.index(stop)]
    first = run_alone(engine, prompts[0], SamplingParams(max_tokens=8, stop_tokens=(reference[0],)))
    assert first.tokens == [] and first.finish_reason is FinishReason.STOP


def test_a_request_may_fill_its_row_exactly(setup):
    _, _, engine, prompts = setup
    prompt = prompts[6]  # 40 tokens
    request = run_alone(engine, prompt, SamplingParams(max_tokens=MAX_LEN - len(prompt)))
    assert len(request.tokens) == MAX_LEN - len(prompt) and request.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("prompt, fields, error, message", [
    ([1] * 60, {"max_tokens": 5}, PromptTooLong, "plus max_tokens"),
    ([1] * 65, {"max_tokens": 1}, PromptTooLong, "64 tokens"),
    ([], {}, ValueError, "empty"),
    ([1, 512], {}, ValueError, r"\[0, 512\)"),
    ([1, -1], {}, ValueError, r"\[0, 512\)"),
    (["a"], {}, ValueError, "token ids"),
    ([1], {"stop_tokens": (999,)}, ValueError, "stop token"),
])
def test_bad_requests_are_refused(setup, prompt, fields, error, message):
    engine = setup[2]
    with pytest.raises(error, match=message):
        engine.submit(prompt, SamplingParams(**fields))
    assert engine.pending == 0


def test_background_thread_serves_concurrent_requests_and_cancels(setup):
    _, _, engine, prompts = setup
    expected = [run_alone(engine, p, SamplingParams(max_tokens=5)).tokens for p in prompts]
    engine.start()
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = list(engine.submit(prompts[i], SamplingParams(max_tokens=5)))  # iterate: streamed

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected
        events = []
        long = engine.submit(prompts[0], SamplingParams(max_tokens=50), sink=events.append)
        long.cancel()
        long.wait(60)
        assert long.finish_reason is FinishReason.CANCELLED and events[-1].finish_reason is FinishReason.CANCELLED
        assert len(events) == len(long.tokens) + 1
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(prompts[0])


def test_generate_matches_the_engine(setup):
    cfg, params, _, prompts = setup
    # sized from the prompts: 4 prompts of at most 12 tokens + 40 new -> 4 slots x 64 tokens in chunks of 16, the
    # fixture's shapes, so nothing compiles again
    short = [prompts[i] for i in (0, 2, 4, 5)]
    with CompileCounter() as compiles:
        out = serving.generate(cfg, params, short, max_new_tokens=40)
    assert compiles.count <= 2, compiles.count
    assert out == [greedy_by_forward(cfg, params, p, 40) for p in short]
    sizes = {"slots": SLOTS, "max_len": MAX_LEN, "chunk": CHUNK}  # the fixture's shapes: compiled already
    with CompileCounter() as compiles:
        sampled = serving.generate(cfg, params, prompts[:2], 6, 1.0, 3, **sizes)
        assert sampled == serving.generate(cfg, params, prompts[:2], 6, 1.0, 3, **sizes)
        assert sampled != serving.generate(cfg, params, prompts[:2], 6, 1.0, 4, **sizes)
    assert [len(t) for t in sampled] == [6, 6]
    # each new engine calls cache.init_cache twice (its batch cache and its blank row), which may compile; nothing
    # else does: prefill, insert, decode and sampling reuse the programs compiled for these shapes
    assert compiles.count <= 3 * 2, compiles.count
    assert serving.generate(cfg, params, []) == []
