"""The OpenAI-compatible server: request validation and text streaming on values, then one live server on a free
localhost port driven by the official `openai` client (completion, streamed completion, 8 concurrent requests, each
kind of bad request answered with a 4xx in OpenAI's error shape while the server keeps serving)."""

import concurrent.futures
import json

import httpx
import jax
import openai
import pytest

from v4jax import config, model, serving
from v4jax.serving import server
from v4jax.serving.engine import Engine
from v4jax.serving.loading import encode_text
from v4jax.serving.server import APIError, ModelInfo, TextStream, parse_completion
from v4jax.training.data import ByteTokenizer

NAME, SLOTS, MAX_LEN, CHUNK = "tiny-v3", 4, 64, 16
TOKENIZER = ByteTokenizer()
INFO = ModelInfo(NAME, 512, MAX_LEN, TOKENIZER)


# ---------------------------------------------------------------------------------------------------------------
# validation and text, no server


def test_parse_a_completion():
    job = parse_completion({"model": NAME, "prompt": ["hi", [1, 2, 3]], "max_tokens": 5, "temperature": 0,
                            "n": 2, "seed": 9, "stop": "\n", "top_k": 4, "stream": True,
                            "stream_options": {"include_usage": True}}, INFO)
    assert [p for p, _ in job.choices] == [[258, 104, 105]] * 2 + [[1, 2, 3]] * 2
    assert [s.seed for _, s in job.choices] == [9, 10, 11, 12]
    first = job.choices[0][1]
    assert (first.max_tokens, first.temperature, first.top_k, first.stop_tokens) == (5, 0.0, 4, (256,))
    assert job.stops == ["\n"] and job.stream and job.include_usage
    default = parse_completion({"model": NAME, "prompt": "x", "ignore_eos": True}, INFO).choices[0][1]
    assert (default.max_tokens, default.temperature, default.top_p, default.stop_tokens) == (16, 1.0, 1.0, ())


@pytest.mark.parametrize("body, status, param, code", [
    ([1, 2], 400, None, "invalid_type"),
    ({"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": 3, "prompt": "x"}, 400, "model", "invalid_type"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": NAME}, 400, "prompt", "missing_required_parameter"),
    ({"model": NAME, "prompt": 5}, 400, "prompt", "invalid_type"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "invalid_type"),
    ({"model": NAME, "prompt": [[1], "a", 3]}, 400, "prompt", "invalid_type"),
    ({"model": NAME, "prompt": [1, 512]}, 400, "prompt", "invalid_value"),
    ({"model": NAME, "prompt": [[]]}, 400, "prompt", "invalid_value"),
    ({"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"model": NAME, "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ({"model": NAME, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "prompt": "x", "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ({"model": NAME, "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": NAME, "prompt": "x" * 100}, 400, "prompt", "context_length_exceeded"),
    ({"model": NAME, "prompt": "x" * 50, "max_tokens": 14}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": NAME, "prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"model": NAME, "prompt": ["x"] * 9, "n": 8}, 400, "n", None),
    ({"model": NAME, "prompt": "x", "seed": "1"}, 400, "seed", "invalid_type"),
    ({"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"model": NAME, "prompt": "x", "stop": ["a"] * 5}, 400, "stop", "invalid_type"),
    ({"model": NAME, "prompt": "x", "stop": [""]}, 400, "stop", "invalid_type"),
    ({"model": NAME, "prompt": "x", "stop_token_ids": [999]}, 400, "stop_token_ids", "invalid_value"),
    ({"model": NAME, "prompt": "x", "echo": True}, 400, "echo", "unsupported"),
    ({"model": NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported"),
    ({"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported"),
    ({"model": NAME, "prompt": "x", "temprature": 1}, 400, "temprature", "unknown_parameter"),
])
def test_bad_bodies_are_4xx_naming_the_field(body, status, param, code):
    with pytest.raises(APIError) as info:
        parse_completion(body, INFO)
    error = info.value
    assert (error.status, error.param, error.code) == (status, param, code), error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def stream_text(ids, stops):
    stream = TextStream(TOKENIZER, stops)
    deltas = [stream.push(t) for t in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == stream.text
    return stream


def test_text_stream_cuts_at_the_first_stop_string_and_holds_back_partial_characters():
    ids = list(b"hello world. bye")
    assert stream_text(ids, []).text == "hello world. bye"
    stopped = stream_text(ids, ["bye", "o w"])
    assert stopped.text == "hell" and stopped.stopped
    deltas = []
    stream = TextStream(TOKENIZER, ["xyz"])
    for t in ids:
        deltas.append(stream.push(t))
    assert all(len("".join(deltas[:i + 1])) <= i + 1 - 2 or i + 1 < 2 for i in range(len(ids)))  # 2 held back
    euro = list("€!".encode())  # three bytes, one character
    stream = TextStream(TOKENIZER, [])
    assert [stream.push(t) for t in euro] == ["", "", "€", "!"]
    assert not stream_text(ids, ["zzz"]).stopped


def test_sse_events():
    assert server.sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert server.sse("[DONE]") == "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# the live server


@pytest.fixture(scope="module")
def live():
    cfg = config.preset("tiny-v3")
    params = model.init(cfg, jax.random.key(0))
    engine = Engine(cfg, params, slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK)
    background = server.BackgroundServer(server.make_app(engine, TOKENIZER, NAME)).start()
    client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield cfg, params, background, client
    background.stop()
    assert not engine.alive


def expected_text(cfg, params, prompt: str, max_tokens: int) -> str:
    """What the server must answer at temperature 0: serving.generate on the BOS-prefixed bytes, stop at EOS."""
    ids = serving.generate(cfg, params, [encode_text(TOKENIZER, prompt)], max_tokens, stop_tokens=(256,),
                           slots=SLOTS, max_len=MAX_LEN, chunk=CHUNK)[0]
    return TOKENIZER.decode(ids)


def test_models_and_health(live):
    _, _, background, client = live
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{background.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["slots"] == SLOTS


def test_completion(live):
    cfg, params, _, client = live
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.text == expected_text(cfg, params, "Hello", 12)
    assert choice.finish_reason in ("stop", "length") and out.object == "text_completion" and out.model == NAME
    assert out.usage.prompt_tokens == 6 and 0 < out.usage.completion_tokens <= 12 or choice.finish_reason == "stop"


def test_streamed_completion_equals_the_plain_one(live):
    _, _, _, client = live
    plain = client.completions.create(model=NAME, prompt="def f(", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=NAME, prompt="def f(", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and plain.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20 == plain.usage.completion_tokens


def test_sampling_with_a_seed_reproduces_and_n_choices(live):
    _, _, _, client = live
    ask = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 2,
               "extra_body": {"ignore_eos": True, "top_k": 20}}
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 16


def test_stop_string(live):
    _, _, _, client = live
    full = client.completions.create(model=NAME, prompt="abc", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    visible = [i for i, ch in enumerate(full) if ch != "\ufffd" and i > 0]
    if not visible:
        pytest.skip(f"this random model's greedy text has no character to stop at: {full!r}")
    stop = full[visible[len(visible) // 2]]
    for stream in (False, True):
        out = client.completions.create(model=NAME, prompt="abc", max_tokens=30, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"ignore_eos": True})
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_requests(live):
    cfg, params, _, client = live
    prompts = [f"request {i}: " + "x" * (3 * i) for i in range(8)]

    def ask(prompt):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [expected_text(cfg, params, p, 6) for p in prompts]


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny-v3", "prompt": ', 400, "invalid_json"),
    ("not an object", json.dumps(["x"]).encode(), 400, "invalid_type"),
    ("missing prompt", {"model": NAME}, 400, "missing_required_parameter"),
    ("missing model", {"prompt": "x"}, 400, "missing_required_parameter"),
    ("wrong type", {"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "invalid_type"),
    ("wrong type prompt", {"model": NAME, "prompt": {"text": "x"}}, 400, "invalid_type"),
    ("prompt longer than the cache", {"model": NAME, "prompt": "y" * 200}, 400, "context_length_exceeded"),
    ("negative max_tokens", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ("absurd max_tokens", {"model": NAME, "prompt": "x", "max_tokens": 10**15}, 400, "context_length_exceeded"),
    ("unknown model", {"model": "gpt-5", "prompt": "x"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("what, body, status, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(live, what, body, status, code):
    background = live[2]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{background.url}/v1/completions", content=content, timeout=30,
                       headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(f"{background.url}/health", timeout=30).status_code == 200


def test_bad_requests_through_the_client(live):
    _, _, background, client = live
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.body["code"] == "model_not_found"  # the client unwraps {"error": ...}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="z" * 300, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)]:
        reply = httpx.request(method, f"{background.url}{path}", timeout=30)
        assert reply.status_code == status and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=NAME, prompt="still here", max_tokens=2, temperature=0).choices
