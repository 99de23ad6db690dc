"""The official OpenAI Python SDK against a running Carrel (started by tests/tests/e2e/openai_sdk.rs).

Carrel must work with the SDK unchanged: only base_url and api_key differ from talking to OpenAI.
"""

import os

import openai
import pytest
from openai import OpenAI

BASE_URL = os.environ["CARREL_BASE_URL"]
API_KEY = os.environ["CARREL_API_KEY"]
MODEL = os.environ.get("CARREL_MODEL", "mock-model")


@pytest.fixture
def client():
    return OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=30)


def test_chat_completion(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "When does the library open?"}]
    )
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens > 0


def test_chat_completion_stream(client):
    stream = client.chat.completions.create(
        model=MODEL,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello"}],
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert usage is not None and usage.total_tokens > 0


def test_embeddings(client):
    result = client.embeddings.create(model=MODEL, input="interlibrary loan")
    assert len(result.data) == 1
    assert len(result.data[0].embedding) > 0


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert "frontier-model" not in ids


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=[])
    assert err.value.code == "model_not_found"


def test_bad_key_raises_authentication_error():
    bad = OpenAI(base_url=BASE_URL, api_key="crl_not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
