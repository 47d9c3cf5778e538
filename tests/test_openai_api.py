"""The OpenAI-compatible API, driven by the official `openai` client against a real pair."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import openai
import pytest

from tests.helpers import collect, target_only_greedy


@pytest.fixture
def api(tiny, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    base = f"http://127.0.0.1:{pair.draft.http_port}"
    return pair, base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(api):
    _, base, client = api
    assert [m.id for m in client.models.list()] == ["target"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}


def test_completion_greedy_equals_target(api, target_model):
    _, _, client = api
    prompt = "def add(a, b):"
    expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 20)
    result = client.completions.create(model="target", prompt=prompt, max_tokens=20, temperature=0)
    assert result.choices[0].text == target_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage.completion_tokens == len(expected)
    assert result.choices[0].finish_reason in ("length", "stop")
    stream = client.completions.create(
        model="target", prompt=prompt, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == result.choices[0].text


def test_chat_completion_streaming_and_not(api, target_model):
    _, _, client = api
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = target_model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = target_model.tokenizer.decode(
        target_only_greedy(target_model, list(ids), 24), skip_special_tokens=True
    )
    result = client.chat.completions.create(model="target", messages=messages, max_tokens=24, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    chunks = list(
        client.chat.completions.create(
            model="target", messages=messages, max_tokens=24, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_sampling_parameters_and_stop(api):
    _, _, client = api
    kwargs = dict(
        model="target", prompt="The quick brown fox", max_tokens=16, temperature=0.9, top_p=0.9, seed=3
    )
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    greedy = client.completions.create(
        model="target", prompt="The quick brown fox", max_tokens=16, temperature=0
    )
    text = greedy.choices[0].text
    stop = text[4:6]
    stopped = client.completions.create(
        model="target", prompt="The quick brown fox", max_tokens=16, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_a_prompt_given_as_token_ids(api, target_model):
    """As OpenAI and vLLM accept: a list of token ids, or a list holding one such list; ids outside
    the vocabulary get a 400 that says so."""
    _, base, client = api
    ids = target_model.tokenizer.encode("def add(a, b):")
    expected = target_model.tokenizer.decode(target_only_greedy(target_model, ids, 12), skip_special_tokens=True)
    for prompt in (ids, [ids]):
        result = client.completions.create(model="target", prompt=prompt, max_tokens=12, temperature=0)
        assert result.choices[0].text == expected and result.usage.prompt_tokens == len(ids)
    vocab = len(target_model.tokenizer)
    for bad, says in (([1, vocab], "outside the vocabulary"), ([-1], "outside the vocabulary"),
                      ([[1, 2], [3]], "one prompt"), ([[]], "empty"), ([1, "a"], "prompt")):  # fmt: skip
        reply = httpx.post(base + "/v1/completions", json={"prompt": bad, "max_tokens": 2}, timeout=60)
        assert reply.status_code == 400 and says in reply.json()["error"]["message"], (bad, reply.text)


def test_a_tiny_positive_temperature_is_greedy(api, target_model):
    """temperature 1e-39 (positive, but logits / 1e-39 overflow) gives the greedy text, not NaN's token 0."""
    _, _, client = api
    prompt = "def add(a, b):"
    expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 16)
    result = client.completions.create(model="target", prompt=prompt, max_tokens=16, temperature=1e-39, seed=1)
    assert result.choices[0].text == target_model.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": -1},
        {"prompt": "hi", "top_p": 0},
        {"prompt": ""},
        {"prompt": ["a", "b"]},
        {"prompt": "hi", "n": 2},
        {"prompt": "hi", "max_tokens": 10**6},
        {"prompt": "hi", "max_tokens": 10**12},  # past the wire's uint32
        {"prompt": "hi", "seed": 2**64},
        {"prompt": "hi", "top_k": 2**40},
        {"prompt": "\ud800"},  # a lone surrogate
        {"prompt": "hi", "stop": ["\udfff"]},
        {"max_tokens": 5},
    ],
)
def test_bad_parameters_get_400(api, body):
    _, base, _ = api
    raw = json.dumps(body)  # json.dumps escapes lone surrogates as JSON allows
    response = httpx.post(base + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    "stop", [["a", "b", "c", "d", "e"], ["x" * 257], ["x" * 50000] * 200], ids=["5 strings", "257 chars", "200x50000"]
)
def test_stop_strings_are_bounded(api, stop):
    """OpenAI's 4 stop strings of up to 256 characters; beyond, 400 (HTTP) / INVALID_ARGUMENT (gRPC)
    before any work, instead of a hold-back scan that stalls the node."""
    pair, base, client = api
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model="target", prompt="hi", max_tokens=4, stop=stop)
    with pytest.raises(grpc.RpcError) as err:
        collect(pair.draft_stub, prompt="hi", max_tokens=4, stop=stop)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop" in err.value.details()
    assert client.completions.create(model="target", prompt="hi", max_tokens=4, stop=["y" * 256] * 4).choices


def test_lone_surrogate_in_a_chat_message_is_400(api):
    _, base, _ = api
    raw = json.dumps({"messages": [{"role": "user", "content": "a\ud800b"}]})
    response = httpx.post(base + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]


def test_unknown_model_is_404_and_bad_chat_is_400(api):
    _, base, client = api
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=4)
    assert httpx.post(base + "/v1/chat/completions", json={"messages": []}).status_code == 400
    assert (
        httpx.post(
            base + "/v1/chat/completions", json={"messages": [{"role": "cat", "content": "x"}]}
        ).status_code
        == 400
    )


def test_concurrent_requests_share_one_engine(api, target_model):
    from concurrent.futures import ThreadPoolExecutor

    _, _, client = api
    prompts = ["def add(a, b):", "The quick brown fox", "for i in range(10):", "Natalia sold clips"]

    def complete(prompt):
        return (
            client.completions.create(model="target", prompt=prompt, max_tokens=16, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(complete, prompts))
    for prompt, text in zip(prompts, texts, strict=True):
        expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 16)
        assert text == target_model.tokenizer.decode(expected, skip_special_tokens=True)


def _bodies():
    """Request bodies as a client might send them: known fields with values at and past every
    bound, wrong types, unicode edge cases (lone surrogates, NUL, astral), token-id prompts."""
    from hypothesis import strategies as st

    edge_ints = st.sampled_from([-1, 0, 1, 3, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, 10**12])
    texts = st.one_of(
        st.text(max_size=12),
        st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "\U0001f600" * 3, "def f():\n\t" * 2]),
    )
    values = st.one_of(
        st.none(), st.booleans(), edge_ints, st.integers(-3, 6), st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([float("-0.0"), 1e308, -2.0, 2.5, 0.5]), texts,
        st.lists(texts, max_size=3), st.lists(st.integers(-2, 500), max_size=4),  # token-id prompts
        st.dictionaries(texts, texts, max_size=2),
    )  # fmt: skip
    messages = st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "cat"]), "content": values}),
        max_size=3,
    )
    sampling = {
        "max_tokens": st.one_of(st.integers(1, 4), edge_ints, values),
        "temperature": values, "top_p": values, "top_k": st.one_of(edge_ints, values), "seed": edge_ints,
        "stop": values, "n": values, "stream": st.one_of(st.booleans(), values), "model": values,
    }  # fmt: skip
    completion = st.fixed_dictionaries({"prompt": values}, optional=sampling)
    chat = st.fixed_dictionaries({"messages": st.one_of(messages, values)}, optional=sampling)
    return st.one_of(st.tuples(st.just("/v1/completions"), completion), st.tuples(st.just("/v1/chat/completions"), chat))


def test_fuzzed_requests_never_get_5xx(api, target_model):
    """Whatever the body, the answer is a 2xx or a 4xx with a message; the node keeps serving."""
    from hypothesis import HealthCheck, given, settings

    _, base, client = api
    http = httpx.Client(base_url=base, timeout=60)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_bodies())
    def check(case):
        path, body = case
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
            body["max_tokens"] = 2**32 if body["max_tokens"] > 2**31 else 4  # keep valid runs short
        raw = json.dumps(body)
        with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as response:
            response.read()
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]["message"]

    check()
    expected = target_only_greedy(target_model, target_model.tokenizer.encode("still up"), 4)
    still_up = client.completions.create(model="target", prompt="still up", max_tokens=4, temperature=0)
    assert still_up.choices[0].text == target_model.tokenizer.decode(expected, skip_special_tokens=True)


def sse_chunks(base: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_stream_chunks_carry_provenance_and_rounds(api, target_model):
    """The `specwire` field: every token with its source, text and target logprob; the round with
    its timings and the candidates tried. Standard clients (above) ignore it."""
    _, base, client = api
    body = {"prompt": "def add(a, b):", "max_tokens": 30, "temperature": 0, "num_speculative_tokens": 3}
    chunks = sse_chunks(base, "/v1/completions", body)
    tokens = [t for c in chunks for t in c["specwire"]["tokens"]]
    assert "".join(t["text"] for t in tokens) == "".join(c["choices"][0]["text"] for c in chunks)
    assert tokens[0]["source"] == "target" and tokens[0]["logprob"] is None  # the token after the prompt
    assert {"accepted", "recovered"} <= {t["source"] for t in tokens}  # the noisy draft is right and wrong
    assert all(t["logprob"] <= 0 for t in tokens[1:])
    rounds = [c["specwire"]["round"] for c in chunks if "round" in c["specwire"]]
    for chunk in chunks:
        if "round" not in chunk["specwire"]:
            continue
        round_, sources = chunk["specwire"]["round"], [t["source"] for t in chunk["specwire"]["tokens"]]
        if not round_["drafted"]:  # nothing left to draft for (the last token before max_tokens)
            assert sources == ["target"] and not round_["candidates"]
            continue
        assert set(sources) <= {"accepted", "recovered", "bonus"}
        assert sources.count("accepted") == round_["accepted"] <= round_["drafted"] <= 3
        assert round_["candidates"][0]["accepted"] == round_["accepted"]
        assert len(round_["candidates"][0]["tokens"]) == round_["drafted"]
        assert round_["round_s"] >= round_["draft_s"] >= 0 and round_["network_s"] >= 0
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    alone = sse_chunks(base, "/v1/completions", {**body, "target_only": True})
    assert {t["source"] for c in alone for t in c["specwire"]["tokens"]} == {"target"}
    assert all(c["specwire"]["round"]["drafted"] == 0 for c in alone if "round" in c["specwire"])
    assert "".join(c["choices"][0]["text"] for c in alone) == "".join(t["text"] for t in tokens)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="target", prompt="x", extra_body={"num_candidates": 17})


def test_error_mid_stream_is_an_error_event(tiny, pair_factory):
    """A failure after the 200 was sent arrives as an `error` event with the node's message."""
    pair = pair_factory(tiny.draft_noisy, retry_deadline_s=0.5)
    base = f"http://127.0.0.1:{pair.draft.http_port}"
    original, rounds = pair.target.node.verify, {"n": 0}

    def failing(request, *owner):
        rounds["n"] += 1
        if rounds["n"] >= 3:
            from services.errors import SpecwireError
            raise SpecwireError("the target is overloaded")  # INTERNAL, not retried by the draft
        return original(request, *owner)

    pair.target.node.verify = failing
    events = sse_events(base, {"prompt": "def add(a, b):", "max_tokens": 40, "temperature": 0})
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] >= 500 and "target" in error["message"]
    assert "overloaded" not in error["message"]  # INTERNAL: a generic message outward, the detail in the log
    assert "choices" in json.loads(events[0])


def sse_events(base: str, body: dict) -> list[str]:
    """Every `data:` payload of a streamed completion, as sent."""
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_an_unexpected_error_mid_stream_ends_it_with_an_error_event_and_done(api, monkeypatch, caplog):
    pair, base, _ = api
    engine = pair.draft.node

    def broken(*args):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(engine, "_record_round", broken)  # fails after the first round
    events = sse_events(base, {"prompt": "def add(a, b):", "max_tokens": 20, "temperature": 0})
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "secret" not in error["message"]
    assert "secret detail of a bug" in caplog.text  # logged on the node
    assert "choices" in json.loads(events[0])


def slow_rounds(pair, seconds: float) -> None:
    original = pair.target.node.verify

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    pair.target.node.verify = slow


def wait_until_no_target_sessions(pair, timeout_s: float = 15) -> int:
    deadline = time.monotonic() + timeout_s
    while len(pair.target.node.sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(pair.target.node.sessions)


def test_a_client_that_leaves_a_non_streaming_request_cancels_its_generation(api):
    """The generation stops after the round in flight and its target session is freed, instead of
    running to max_tokens for nobody."""
    pair, base, _ = api
    slow_rounds(pair, 0.2)
    body = {"prompt": "Natalia sold clips", "max_tokens": 1000, "temperature": 0, "num_speculative_tokens": 1}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, timeout=1.5)
    cancelled = pair.draft.node.metrics.requests.labels("cancelled")
    deadline = time.monotonic() + 30  # a busy machine may still be prefilling when the client leaves
    while cancelled._value.get() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled._value.get() == 1
    assert wait_until_no_target_sessions(pair) == 0


def test_a_client_that_leaves_before_the_first_chunk_cancels_its_stream(api):
    """Gone while the prompt is still prefilling: the generation stops after its first chunk."""
    pair, base, _ = api
    slow_rounds(pair, 0.2)
    verifier = pair.target.node
    prefill = verifier.backend.prefill

    def slow_prefill(session):
        time.sleep(2)
        return prefill(session)

    verifier.backend.prefill = slow_prefill
    body = {"prompt": "Natalia sold clips", "max_tokens": 1000, "temperature": 0, "num_speculative_tokens": 1}
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
        "POST", base + "/v1/completions", json={**body, "stream": True}, timeout=1.0
    ) as response:
        response.read()
    deadline = time.monotonic() + 15
    while not verifier.metrics.sessions_opened._value.get() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert verifier.metrics.sessions_opened._value.get() == 1
    assert wait_until_no_target_sessions(pair) == 0


def test_concurrent_http_generations_are_bounded(tiny, pair_factory):
    """Past `--http-max-streams` generations at once a request gets 429 with a clear message (no new
    thread); a finished one frees its slot."""
    pair = pair_factory(tiny.draft_noisy, http_max_streams=1)
    base = f"http://127.0.0.1:{pair.draft.http_port}"
    slow_rounds(pair, 0.2)
    body = {"prompt": "Natalia sold clips", "max_tokens": 1000, "temperature": 0, "num_speculative_tokens": 1, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as first:
        assert first.status_code == 200
        next(first.iter_lines())
        for stream in (True, False):
            busy = httpx.post(base + "/v1/completions", json={**body, "stream": stream, "max_tokens": 2}, timeout=60)
            assert busy.status_code == 429 and "1 HTTP generations" in busy.json()["error"]["message"]
    assert wait_until_no_target_sessions(pair) == 0
    done = httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
    assert done.status_code == 200


def test_models_is_answered_for_a_target_that_came_up_after_the_draft(tiny, target_model):
    """The draft's first look at a target that was not yet listening left its channel in gRPC's
    reconnect backoff, and /v1/models answered 503 although the target was up (seen in the capacity
    benchmark): it now waits for the target as a generation does."""
    from draft_node.config import DraftConfig
    from draft_node.server import start_draft
    from services.model_loading import load_model
    from specwire.local_pair import free_port
    from target_node.config import TargetConfig
    from target_node.server import start_target

    port = free_port()
    draft = start_draft(
        DraftConfig(model=tiny.draft_noisy, port=0, metrics_port=-1, http_port=0, target=f"127.0.0.1:{port}"),
        load_model(tiny.draft_noisy),
    )
    target = None
    try:
        time.sleep(3)  # the draft has tried the target and is backing off
        target = start_target(TargetConfig(model="tiny", port=port, metrics_port=-1), target_model)
        models = httpx.get(f"http://127.0.0.1:{draft.http_port}/v1/models", timeout=30)
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == [target_model.model_id]
    finally:
        draft.stop(0)
        if target is not None:
            target.stop(0)
