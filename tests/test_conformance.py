"""serve against its own OpenAPI document (schemathesis, every check) and against the real `openai`
client, sync and async, streaming and not, on every endpoint, errors as the client's exceptions.

One loopback server (uvicorn in a thread) over a tiny llama and a tiny BERT for the module.
tests/test_serve.py checks what the answers hold against transformers; this file checks their shape.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.tiny import make_tiny

KEY = "sk-conformance"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import uvicorn

    from llmcli.core.loader import load_model
    from llmcli.engine import Engine
    from llmcli.engine.service import Embedder, EngineService
    from llmcli.server import make_app

    root = tmp_path_factory.mktemp("conformance")
    llama, bert = make_tiny("llama", root / "llama"), make_tiny("bert", root / "bert")
    app = make_app(EngineService(Engine(llama, batch_size=4), max_queue=16), model_name="llama", api_key=KEY,
                   embedder=Embedder(load_model(bert)), embedding_name="bert", request_timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


# ------------------------------------------------------------------ schemathesis

@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})


def test_every_operation_conforms(api_schema):
    """Each operation of the document, a few derandomized examples each, every schemathesis check:
    no 5xx, responses and status codes as documented, content types, headers... but one:
    positive_data_acceptance (a request the schema allows must get a 2xx) does not hold by design:
    an empty prompt, a role the template does not know, a token id beyond the vocabulary or a
    prompt longer than the context are schema-valid and answered with a documented 400."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"}
    failures = []
    for operation in operations:

        @settings(max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def conforms(case):
            if isinstance(case.body, dict):  # short generations: the test is about shapes, not about long texts
                for field, most in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
                    if isinstance(case.body.get(field), int) and case.body[field] > most:
                        case.body[field] = most
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60, excluded_checks=[positive_data_acceptance])

        try:
            conforms()
        except BaseException as exc:  # schemathesis's FailureGroup is a BaseExceptionGroup; every operation is tried
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)


# ------------------------------------------------------------------ the openai client


def test_sync_client_round_trips(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"llama", "bert"}
    text = client.completions.create(model="llama", prompt="The quick", max_tokens=4, temperature=0)
    assert text.object == "text_completion" and 1 <= text.usage.completion_tokens <= 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="llama", prompt="The quick", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == text.choices[0].text
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="llama", messages=messages, max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(model="llama", messages=messages, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    vectors = client.embeddings.create(model="bert", input=["one", "two words"])
    assert [len(d.embedding) for d in vectors.data] == [64, 64] and [d.index for d in vectors.data] == [0, 1]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="llama", prompt="x", max_tokens=4, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_async_client_round_trips(base_url):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
        models = await client.models.list()
        prompts = ["The quick", "Once upon"]
        whole = await asyncio.gather(*(client.completions.create(model="llama", prompt=p, max_tokens=4, temperature=0) for p in prompts))
        streams = []
        for p in prompts:
            stream = await client.completions.create(model="llama", prompt=p, max_tokens=4, temperature=0, stream=True)
            streams.append("".join([c.choices[0].text async for c in stream if c.choices]))
        chat_stream = await client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True)
        deltas = [c.choices[0].delta.content or "" async for c in chat_stream if c.choices]
        chat = await client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        vectors = await client.embeddings.create(model="bert", input="hello")
        try:
            await client.embeddings.create(model="llama", input="hello")
        except openai.APIStatusError as exc:
            error_status = exc.status_code
        await client.close()
        return models, whole, streams, deltas, chat, vectors, error_status

    models, whole, streams, deltas, chat, vectors, error_status = asyncio.run(run())
    assert {m.id for m in models.data} >= {"llama", "bert"}
    assert streams == [r.choices[0].text for r in whole]  # concurrent requests answer as streamed ones do
    assert "".join(deltas) == chat.choices[0].message.content
    assert len(vectors.data[0].embedding) == 64
    assert 400 <= error_status < 500
