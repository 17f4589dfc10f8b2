"""`python -m apps.server` over real HTTP on 127.0.0.1 with the official `openai` client, on both
backends: answers equal `generate`'s, concurrent streams equal their solo runs, cancelled streams
free their rows, the prompt cache, stop strings, n with seeds, log-probabilities, errors, API key."""

from __future__ import annotations

import base64
import importlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from backends import available
from server_fixture import API_KEY, ServerProcess

from apps.cli import DEMO_MODEL
from common.generation_defaults import generation_defaults
from common.sampling import SamplingParams

# What the server uses for what a request leaves unset: the demo folder's generation_config.json
DEFAULTS = generation_defaults(DEMO_MODEL)
GREEDY = SamplingParams(**DEFAULTS | {"temperature": 0.0})
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Parser(object):\n    def __init__(self",
           "# Copyright", "x = [", "for i in range(10):\n", "def main():\n    args = ", "try:\n    import"]


@dataclass
class Served:
    server: ServerProcess
    module: Any
    model: Any
    tokenizer: Any
    client: Any

    def solo(self, prompt: str | list[int], max_tokens: int, sampling: SamplingParams = GREEDY) -> list[int]:
        return [r.token for r in self.module.stream_generate(self.model, self.tokenizer, prompt, max_tokens, sampling)]

    def text(self, tokens: list[int]) -> str:
        stops = self.tokenizer.stop_tokens
        return self.tokenizer.decode([t for t in tokens if t not in stops])

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.server.url + path, headers=headers, timeout=30)

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        return httpx.post(self.server.url + path, headers=headers, timeout=60, **kw,
                          **({"content": body} if isinstance(body, (str, bytes)) else {"json": body}))


@pytest.fixture(scope="module", params=["mlx", "torch"])
def served(request: pytest.FixtureRequest):
    from openai import OpenAI

    if request.param not in available():
        pytest.skip(f"{request.param} is not installed")
    server = ServerProcess(request.param, "--api-key", API_KEY, "--max-batch", "8", "--max-queue", "12",
                           "--max-tokens-limit", "256", "--max-body-mb", "1", "--max-image-pixels", "1000000",
                           "--prompt-cache-gb", "0.5", "--dtype", "float32")
    module = importlib.import_module("mlx_llm" if request.param == "mlx" else "torch_backend")
    model, tokenizer = module.load(DEMO_MODEL, dtype="float32")
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield Served(server, module, model, tokenizer, client)
    assert server.stop() == 0


def metric(served: Served, name: str) -> float:
    for line in served.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_chat_and_completions_equal_generate(served: Served) -> None:
    tokens = served.solo(PROMPTS[0], 24)
    want = served.text(tokens)
    prompt_tokens = len(served.tokenizer.encode(PROMPTS[0], bos=True))
    chat = served.client.chat.completions.create(model="demo", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == want and chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (prompt_tokens, 24)
    assert chat.usage.total_tokens == prompt_tokens + 24 and chat.object == "chat.completion"
    done = served.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert done.choices[0].text == want and done.usage.completion_tokens == 24
    chunks = list(served.client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    stream = served.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].text for c in stream) == want
    ids = served.client.completions.create(model="demo", prompt=served.tokenizer.encode(PROMPTS[1]), max_tokens=10,
                                           temperature=0)
    assert ids.choices[0].text == served.text(served.solo(PROMPTS[1], 10))
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["demo_model"]


def test_concurrent_streams_each_equal_their_solo_run(served: Served) -> None:
    lengths = [8 + 5 * i for i in range(8)]
    want = [served.text(served.solo(p, n)) for p, n in zip(PROMPTS, lengths, strict=True)]

    def run(i: int) -> str:
        stream = served.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=lengths[i], temperature=0,
            stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, range(8)))
    assert got == want


def test_cancelled_stream_frees_its_row(served: Served) -> None:
    cancelled = metric(served, "llama4_cancelled_generations_total")
    body = {"prompt": PROMPTS[2], "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break  # leave mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(served, "llama4_cancelled_generations_total") == cancelled:
        time.sleep(0.1)
    assert metric(served, "llama4_cancelled_generations_total") == cancelled + 1
    assert metric(served, "llama4_running_rows") == 0
    after = served.client.completions.create(model="demo", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert after.choices[0].text == served.text(served.solo(PROMPTS[3], 6))


def test_repeated_system_prompt_is_served_from_the_cache(served: Served) -> None:
    # 81 tokens: more than the demo model's chunk of 64, and the prompts end in the same chunk (64..127),
    # so the second reuses all it shares with the first (the ring still holds that chunk)
    system = "You answer with Python code only. " * 8
    hits = metric(served, "llama4_prompt_cache_hits_total")
    answers = []
    for user in ("def add(a, b):", "def mul(a, b):"):
        r = served.client.chat.completions.create(model="demo", max_tokens=12, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": user}])
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens))
        assert r.choices[0].message.content == served.text(served.solo(system + "\n\n" + user, 12))
    assert answers[0][1] == 0 and answers[1][1] > 64
    assert metric(served, "llama4_prompt_cache_hits_total") == hits + 1


def test_stop_strings_across_tokens(served: Served) -> None:
    tokens = served.solo(PROMPTS[0], 30)
    pieces = [served.tokenizer.decode([t]) for t in tokens]
    text = "".join(pieces)
    i = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1]
             and text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[: i + 1])) - 1)
    stop = pieces[i][-1] + pieces[i + 1][0]  # its two characters come from two tokens
    want = text[: text.find(stop)]
    r = served.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                         stop=[stop, "never appears"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    stream = served.client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want


def test_n_choices_with_a_seed(served: Served) -> None:
    args = dict(model="demo", prompt=PROMPTS[4], max_tokens=16, temperature=0.9, top_p=0.95, seed=7, n=2)
    first = served.client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    want = [served.text(served.solo(PROMPTS[4], 16, SamplingParams(**DEFAULTS | {"temperature": 0.9, "top_p": 0.95},
                                                                    seed=s))) for s in (7, 8)]
    assert texts == want and texts[0] != texts[1]
    assert [c.text for c in sorted(served.client.completions.create(**args).choices, key=lambda c: c.index)] == want


def _log_softmax(served: Served, prompt: str, tokens: list[int]) -> np.ndarray:
    ids = served.tokenizer.encode(prompt, bos=True)
    x = np.array([ids + tokens])
    if served.module.__name__ == "mlx_llm":
        import mlx.core as mx

        from common.datatypes import TransformerInput
        logits = np.array(served.model(TransformerInput(tokens=mx.array(x))).logits)[0]
    else:
        import torch

        from common.datatypes import TransformerInput
        with torch.inference_mode():
            logits = served.model(TransformerInput(tokens=torch.from_numpy(x))).logits[0].numpy()
    logits = logits[len(ids) - 1 : -1].astype(np.float64)  # [T, V]: the distribution of each generated token
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def test_logprobs_streamed_and_not_equal_the_models_log_softmax(served: Served) -> None:
    tokens = served.solo(PROMPTS[5], 10)
    logp = _log_softmax(served, PROMPTS[5], tokens)
    msg = [{"role": "user", "content": PROMPTS[5]}]
    r = served.client.chat.completions.create(model="demo", messages=msg, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    streamed = [e for c in served.client.chat.completions.create(
        model="demo", messages=msg, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    for entries in (content, streamed):
        assert len(entries) == 10
        for i, e in enumerate(entries):
            assert abs(e.logprob - logp[i, tokens[i]]) < 1e-4
            top = np.argsort(-logp[i], kind="stable")[:3]
            assert [x.logprob for x in e.top_logprobs] == pytest.approx(logp[i, top].tolist(), abs=1e-4)
            assert bytes(e.bytes) == served.tokenizer.decode_bytes([tokens[i]])
    c = served.client.completions.create(model="demo", prompt=PROMPTS[5], max_tokens=10, temperature=0, logprobs=2)
    assert c.choices[0].logprobs.token_logprobs == pytest.approx([logp[i, t] for i, t in enumerate(tokens)], abs=1e-4)
    assert all(len(d) == 2 for d in c.choices[0].logprobs.top_logprobs)


def _png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


BAD = [
    ("/v1/chat/completions", "{not json", 400, "invalid_json"),
    ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 257}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 13}, 429, None),
    ("/v1/completions", {"prompt": [5] * 5000}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": _image_message(_png(40, 30))}, 400, "vision encoder"),
    ("/v1/chat/completions", {"messages": _image_message("data:image/png;base64,iVBORw0KGgoAAAA=")}, 400,
     "could not be decoded"),
    ("/v1/chat/completions", {"messages": _image_message("file:///etc/passwd")}, 400, "data: URL"),
    ("/v1/chat/completions", {"messages": _image_message(_png(1200, 1000))}, 413, "pixels"),
    ("/v1/completions", {"prompt": "x" * 1_100_000}, 413, "request body"),
]


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served: Served, path: str, body: Any, status: int,
                                                               needle: str | None) -> None:
    r = served.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if needle is not None:
        assert needle in " ".join(str(v) for v in error.values())
    ok = served.post("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == served.text(served.solo(PROMPTS[3], 3))


def test_api_key_is_required_except_for_health(served: Served) -> None:
    assert served.get("/health", key=None).status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert served.get(path, key=None).status_code == 401
        assert served.get(path, key="wrong").status_code == 401
        assert served.get(path).status_code == 200
    r = httpx.post(served.server.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert 'llama4_requests_total{endpoint="/v1/completions",status="401"}' in served.get("/metrics").text


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_sigterm_ends_running_streams_and_exits_0(backend_name: str) -> None:
    if backend_name not in available():
        pytest.skip(f"{backend_name} is not installed")
    server = ServerProcess(backend_name)
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.terminate()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
    finally:
        assert server.stop() == 0


def test_repetition_controls_in_requests(served: Served) -> None:
    r = served.client.completions.create(model="demo", prompt=PROMPTS[6], max_tokens=20, temperature=0,
                                         frequency_penalty=0.6, presence_penalty=0.2,
                                         extra_body={"repetition_penalty": 1.3})
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.6, presence_penalty=0.2)
    assert r.choices[0].text == served.text(served.solo(PROMPTS[6], 20, params))
    bad = served.post("/v1/completions", {"prompt": "x", "frequency_penalty": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "frequency_penalty"
