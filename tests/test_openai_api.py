"""The OpenAI-compatible API, driven by the official `openai` client against a real pair."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import target_only_greedy


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
        {"max_tokens": 5},
    ],
)
def test_bad_parameters_get_400(api, body):
    _, base, _ = api
    response = httpx.post(base + "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


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
