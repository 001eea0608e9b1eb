"""`unskill serve` on a real uvicorn server on a loopback port, driven by the official openai client."""

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from unskill.runtime import load  # noqa: E402
from unskill.runtime.engine import BatchEngine  # noqa: E402
from unskill.runtime.server import ServeLimits, build_app, serve_in_thread  # noqa: E402

KEY = "test-key"
APPLES = "How many apples are left if Tom eats 3 of his 12 apples?"


@pytest.fixture(scope="module")
def tiny_server(tiny_export, llama_stats):
    """The tiny llama guarded by the apple stats, batch of 4, an API key; (base_url, engine)."""
    _, onnx_dir = tiny_export("llama")
    engine = BatchEngine(load(onnx_dir, stats=[llama_stats[1]], rule="paper", device="cpu"), max_batch=4)
    app = build_app(engine, "tiny", KEY, ServeLimits(max_body_bytes=4096, max_tokens=64, context=96, hold_tokens=4))
    server, port = serve_in_thread(app)
    yield f"http://127.0.0.1:{port}/v1", engine
    server.should_exit = True


def client(base_url, key=KEY):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def test_refusal_is_content_filter_and_other_prompts_are_answered(tiny_server):
    base_url, _ = tiny_server
    refused = client(base_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": APPLES}], max_tokens=8, temperature=0)
    choice = refused.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content == "Your query is not valid."
    assert choice.model_extra["unskill"] == {"abstained": True, "skill": "probe", "layer": 2, "rule": "paper"}
    assert refused.usage.prompt_tokens > 0 and refused.usage.completion_tokens == 0
    answered = client(base_url).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Write a python function"}], max_tokens=8)
    assert answered.choices[0].finish_reason in ("stop", "length") and answered.choices[0].message.content
    assert answered.choices[0].model_extra["unskill"]["abstained"] is False
    assert answered.usage.total_tokens == answered.usage.prompt_tokens + answered.usage.completion_tokens


@pytest.mark.parametrize("prompt", [APPLES, "Write a python function", "The capital of France is"])
def test_streamed_text_equals_non_streamed(tiny_server, prompt):
    base_url, _ = tiny_server
    api = client(base_url)
    messages = [{"role": "user", "content": prompt}]
    whole = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert streamed == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = api.completions.create(model="tiny", prompt=prompt, max_tokens=12)
    streamed_text = "".join(c.choices[0].text for c in api.completions.create(model="tiny", prompt=prompt,
                                                                               max_tokens=12, stream=True))
    assert streamed_text == text.choices[0].text


def test_a_refused_stream_sends_no_partial_answer(tiny_server):
    base_url, _ = tiny_server
    chunks = list(client(base_url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": APPLES}], max_tokens=12, stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert contents == ["Your query is not valid."] and chunks[-1].choices[0].finish_reason == "content_filter"


def test_wrong_or_missing_key_is_401(tiny_server):
    base_url, _ = tiny_server
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(base_url + "/models").status_code == 401
    assert httpx.get(base_url.removesuffix("/v1") + "/health").json()["status"] == "ok"
    assert [m.id for m in client(base_url).models.list().data] == ["tiny"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": "hello"}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}).encode(), 400, "limit of 64"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_k": 10 ** 9}).encode(), 400, "top_k"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}]}).encode(), 400, "empty prompt"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(), 400, "last message"),
    (json.dumps({"messages": [{"role": "user", "content": "apples " * 1000}]}).encode(), 413, "over 4096 bytes"),
    (json.dumps({"messages": [{"role": "user", "content": "apples " * 120}]}).encode(), 400, "context is 96"),
    (json.dumps({"messages": [{"role": "user", "content": "apples " * 45}], "max_tokens": 60}).encode(), 400,
     "over this server's context of 96"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "not found"),
])
def test_bad_requests_get_a_clear_4xx(tiny_server, body, status, message):
    base_url, _ = tiny_server
    response = httpx.post(base_url + "/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_a_client_that_disconnects_frees_its_slot(tiny_server):
    base_url, engine = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a python function"}],
            "max_tokens": 64, "stream": True, "stop": ["never appears"]}
    with httpx.stream("POST", base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())   # the stream has started
    deadline = time.monotonic() + 20
    while engine.load["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load == {"active": 0, "waiting": 0, "max_batch": 4}


def test_concurrent_clients_share_the_batch(tiny_server):
    base_url, engine = tiny_server
    prompts = ["Write a python function", "The capital of France is", "def add(a, b):", "Natalia sold clips"]
    expected = [client(base_url).completions.create(model="tiny", prompt=p, max_tokens=16).choices[0].text
                for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        got[i] = client(base_url).completions.create(model="tiny", prompt=prompts[i], max_tokens=16).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == expected


@pytest.mark.model
def test_smollm2_server_refuses_math_and_answers_code(smollm2_export, smollm2_math_stats):
    engine = BatchEngine(load(smollm2_export, stats=[smollm2_math_stats], rule="paper", device="cpu"), max_batch=4)
    server, port = serve_in_thread(build_app(engine, "smollm2", KEY))
    try:
        api = client(f"http://127.0.0.1:{port}/v1")
        math = api.chat.completions.create(model="smollm2", max_tokens=24, messages=[
            {"role": "user", "content": "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?"}])
        assert math.choices[0].finish_reason == "content_filter"
        assert math.choices[0].message.content == "Your query is not valid."
        code = [{"role": "user", "content": "Write a python function to reverse a string."}]
        whole = api.chat.completions.create(model="smollm2", max_tokens=24, messages=code)
        assert whole.choices[0].finish_reason in ("stop", "length") and "def" in whole.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model="smollm2", max_tokens=24, messages=code, stream=True))
        assert streamed == whole.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            client(f"http://127.0.0.1:{port}/v1", key="nope").chat.completions.create(model="smollm2", messages=code)
    finally:
        server.should_exit = True


def test_serve_cli_refuses_bad_options_before_loading(tmp_path, capsys):
    import socket

    from unskill.cli import main as unskill

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cases = [(["--port", "70000"], "--port must be in 0..65535"), (["--max-batch", "0"], "--max-batch must be >= 1"),
                 (["--hold-tokens", "-2"], "--hold-tokens"), (["--port", str(port)], "Address already in use"),
                 (["--alpha", "1e-300"], "refuse nothing"), (["--alpha", "1e300"], "refuse everything"),
                 (["--port", "0"], "no manifest")]
        for extra, message in cases:
            assert unskill(["serve", "--model", str(tmp_path), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _post(base_url, body: bytes, path="/chat/completions", **headers):
    return httpx.post(base_url + path, content=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers})


def _openai_error(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


def _chat(content, **fields):
    return json.dumps({"messages": [{"role": "user", "content": content}], **fields}).encode()


@pytest.mark.parametrize("seed", [-1, -(2 ** 63), 2 ** 63, 2 ** 64])
def test_a_bad_seed_is_400_and_breaks_no_stream_beside_it(tiny_server, seed):
    base_url, _ = tiny_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a python function"}],
            "max_tokens": 40, "stream": True, "stop": ["never appears"]}
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as stream:
        lines = stream.iter_lines()
        first = next(lines)
        response = _post(base_url, _chat("Write a python function", temperature=0.7, seed=seed))
        assert response.status_code == 400 and "seed must be" in _openai_error(response)
        events = [first] + [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in line for line in events)


def test_an_underflowing_temperature_is_answered(tiny_server):
    base_url, _ = tiny_server
    for temperature in (5e-324, 1e-300):
        response = _post(base_url, _chat("Write a python function", temperature=temperature, seed=1, max_tokens=4))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_body_edges_get_openai_errors(tiny_server):
    base_url, _ = tiny_server

    def chunked():   # no content-length: only counting the bytes can stop it
        for _ in range(32):
            yield b" " * (64 << 10)
    response = _post(base_url, chunked())
    assert response.status_code == 413 and "over 4096 bytes" in _openai_error(response)
    response = _post(base_url, b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}')
    assert response.status_code == 400 and "not valid UTF-8" in _openai_error(response)
    response = _post(base_url, _chat("x"), path="/no/such/route")
    assert response.status_code == 404 and _openai_error(response)
