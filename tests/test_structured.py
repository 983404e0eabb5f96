"""Structured output (issue 17): response formats, the per-sequence mask, tools, on every path.

The reference for every JSON output is `jsonschema`; for regexes Python's `re`; for the tool
prompt transformers' own apply_chat_template; for the server the real `openai` client. A tiny
random model gives breadth (a random model under a grammar must still write valid JSON), the
real default model (SmolLM2) a subset.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from llmcli.core.constrained import (  # noqa: E402
    Constraint,
    choice_grammar,
    guidance_tokenizer,
    json_schema_grammar,
    lark_grammar,
    parse_response_format,
    regex_grammar,
    token_bytes,
)
from llmcli.core.generate import Request  # noqa: E402
from llmcli.core.sampling import SamplingParams  # noqa: E402
from llmcli.errors import InputError, UsageError  # noqa: E402
from tests.tiny import make_tiny  # noqa: E402

TEMPLATES = Path(__file__).parent / "chat_templates"


def obj(props: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, "additionalProperties": False}


def digit(lo: int = 0, hi: int = 9) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


# 23 schemas: nested objects, arrays, enums, bounded numbers, required fields, string patterns, ...
SCHEMAS = {
    "flat": obj({"name": {"type": "string", "maxLength": 6}, "age": digit(0, 120)}),
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "nested": obj({"user": obj({"id": digit(1, 999), "admin": {"type": "boolean"}})}),
    "int_array": obj({"scores": {"type": "array", "items": digit(), "minItems": 1, "maxItems": 4}}),
    "enum_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    "bounded_number": obj({"p": {"type": "number", "minimum": 0, "maximum": 1}}),
    "exclusive_bounds": obj({"t": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 5}}),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}),
    "boolean": obj({"ok": {"type": "boolean"}}),
    "nullable": obj({"note": {"type": ["string", "null"], "maxLength": 4}}),
    "any_of": obj({"shape": {"anyOf": [obj({"r": digit(1)}), obj({"w": digit(1), "h": digit(1)})]}}),
    "const": obj({"version": {"const": 2}, "kind": {"const": "point"}}),
    "refs": {"$defs": {"pt": obj({"x": digit(), "y": digit()})}, **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    "object_array": obj({"items": {"type": "array", "items": obj({"sku": {"type": "string", "pattern": "^[a-z]{3}$"}, "qty": digit(1, 5)}), "minItems": 1, "maxItems": 2}}),
    "date_format": obj({"day": {"type": "string", "format": "date"}}),
    "string_lengths": obj({"word": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"}}),
    "optional_fields": obj({"id": digit(0, 50), "tag": {"enum": ["x", "y"]}}, required=["id"]),
    "top_level_enum": {"enum": [1, 2, 3, "many"]},
    "deep": obj({"a": obj({"b": obj({"c": {"enum": [True, False, None]}})})}),
    "tuple": {"type": "array", "prefixItems": [digit(), {"enum": ["on", "off"]}], "items": False, "minItems": 2},
    "map": {"type": "object", "additionalProperties": digit(), "maxProperties": 2},
    "negative_number": obj({"temp": {"type": "number", "minimum": -40, "maximum": -1}}),
    "mixed": obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}, "level": {"enum": ["low", "high"]}}),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": obj({"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"}, "unit": {"enum": ["c", "f"]}}),
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": {"enum": ["utc", "cet"]}})}}


def check_outputs(results: list[tuple[str, str, dict]]) -> int:
    """Every output that did not stop at the length limit parses and validates; returns how many did stop at it."""
    cut = 0
    for name, (text, reason, schema) in results:
        if reason == "length":
            cut += 1
            continue
        assert reason == "stop", (name, reason, text)
        jsonschema.validate(json.loads(text), schema)  # raises, naming the schema's complaint
    return cut


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama with room for the tool prompts, and an Engine over it."""
    from llmcli.engine import Engine

    path = make_tiny("llama", tmp_path_factory.mktemp("structured") / "llama")
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # default RoPE: the weights mean the same
    (path / "config.json").write_text(json.dumps(config))
    return path, Engine(str(path), batch_size=8)


def run(engine, requests, batch_size=8):
    return {r.request.id: r for r in engine.iter_results(requests, batch_size=batch_size)}


# ---------------------------------------------------------------- the guarantee


def test_every_schema_validates_on_a_random_model(tiny):
    _, engine = tiny
    prompt = engine.tokenizer.encode("The quick brown fox").ids
    requests = [
        Request(id=name, prompt_ids=prompt, params=SamplingParams(temperature=1.0, seed=7), max_tokens=120, grammar=json_schema_grammar(schema))
        for name, schema in SCHEMAS.items()
    ]
    results = run(engine, requests, batch_size=len(requests))  # one batch: as many forward passes as the longest output
    cut = check_outputs([(n, (results[n].text, results[n].finish_reason, SCHEMAS[n])) for n in SCHEMAS])
    # bounded schemas: the random model ends almost every one; a cut one says "length"
    assert cut <= 2, f"{cut} of {len(SCHEMAS)} outputs hit max_tokens"


def test_default_model_writes_valid_json(smollm2_loaded):
    from llmcli.engine.batcher import ContinuousBatcher

    tok = smollm2_loaded.tokenizer
    chosen = ["nested", "pattern"]  # the README recipe runs a third schema on SmolLM2
    batcher = ContinuousBatcher(smollm2_loaded, batch_size=2, max_len=256)
    for name in chosen:
        _, encoding = tok.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
        batcher.add(Request(id=name, prompt_ids=encoding.ids, max_tokens=40, grammar=json_schema_grammar(SCHEMAS[name])))
    done = {}
    while batcher.has_work():
        for event in batcher.step():
            if event.finish_reason is not None:
                done[event.request.id] = (tok.decode(event.generated_ids), event.finish_reason, SCHEMAS[event.request.id])
    assert set(done) == set(chosen)
    assert check_outputs(list(done.items())) == 0


def test_regex_choice_and_lark_outputs_match(tiny):
    _, engine = tiny
    prompt = engine.tokenizer.encode("Numbers like").ids
    grammars = {
        "regex": (regex_grammar(r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        "choice": (choice_grammar(["yes", "no", 'maybe "so"']), lambda t: t in ("yes", "no", 'maybe "so"')),
        "lark": (lark_grammar('start: "(" pair ("," pair)* ")"\npair: /[a-c]/ "=" /[0-9]/\n'), lambda t: re.fullmatch(r"\([a-c]=[0-9](,[a-c]=[0-9])*\)", t)),
    }
    requests = [
        Request(id=(name, seed), prompt_ids=prompt, params=SamplingParams(temperature=1.0, seed=seed), max_tokens=48, grammar=g)
        for name, (g, _) in grammars.items()
        for seed in range(3)
    ]
    for (name, _), result in run(engine, requests).items():
        if result.finish_reason != "length":
            assert grammars[name][1](result.text), (name, result.text)


# ---------------------------------------------------------------- the mask: alongside the forward, batch-invariant


def test_constrained_output_does_not_depend_on_its_batch(tiny):
    _, engine = tiny
    tok = engine.tokenizer
    grammar = json_schema_grammar(SCHEMAS["object_array"])

    def request(i, constrained, greedy):
        params = SamplingParams() if greedy else SamplingParams(temperature=1.0, seed=3)
        text = ["The quick", "To be, or not", "def add(a, b):", "Paris is"][i % 4]
        return Request(id=(i, greedy), prompt_ids=tok.encode(text).ids, params=params, max_tokens=16, grammar=grammar if constrained else None)

    for greedy in (True, False):
        alone = run(engine, [request(0, True, greedy)], batch_size=1)[(0, greedy)]
        crowd = run(engine, [request(i, i % 2 == 0, greedy) for i in range(4)], batch_size=4)[(0, greedy)]
        assert crowd.generated_ids == alone.generated_ids
        assert crowd.finish_reason == alone.finish_reason


def test_next_mask_starts_before_the_next_forward(tiny):
    path, engine = tiny
    c = Constraint(choice_grammar(["yes", "no"]), engine.tokenizer, engine.config.vocab_size)
    first = c._pending
    assert first is not None  # the first mask is already on its way when the prompt's forward starts
    allowed = c.allowed(engine.config.vocab_size)
    yes = engine.tokenizer.encode("yes", add_special=False).ids
    assert bool(allowed[yes[0]]) and int(allowed.sum()) < engine.config.vocab_size
    finished = c.advance(yes[0])
    assert finished or c._pending is not None  # consumed, and the next mask is computing before the next step


def test_token_bytes_equal_llguidances_own_reading_of_the_tokenizer(tiny):
    import llguidance

    path, engine = tiny
    tok = engine.tokenizer
    ref = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=engine.config.vocab_size)
    ours = guidance_tokenizer(tok, engine.config.vocab_size)
    ids = range(engine.config.vocab_size)
    assert [ours.decode_bytes([i]) for i in ids] == [ref.decode_bytes([i]) for i in ids]
    assert [ours.is_special_token(i) for i in ids] == [ref.is_special_token(i) for i in ids]
    assert token_bytes(tok, 4)[:3] == [b"\xff<|endoftext|>", b"\xff<|im_start|>", b"\xff<|im_end|>"]


def test_token_bytes_of_a_sentencepiece_vocabulary():
    """Gemma's and Llama's kind (GGUF `llama` tokenizers): U+2581 for a space, <0xXX> byte tokens."""
    import llguidance
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmcli.core.tokenizer import Tokenizer
    from tests.tiny import TRAINING_TEXT

    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte tokens are plain vocabulary entries, as in a sentencepiece model
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(backend, special_tokens={"eos_token": "</s>"}, eos_token_ids=[2])
    vocab = backend.get_vocab_size()
    ref = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=2)
    ours = guidance_tokenizer(tok, vocab)
    assert [ours.decode_bytes([i]) for i in range(vocab)] == [ref.decode_bytes([i]) for i in range(vocab)]
    assert ours.decode_bytes([backend.token_to_id("<0xE4>")]) == b"\xe4"


# ---------------------------------------------------------------- bad input: one line, before any token


@pytest.mark.parametrize(
    "value, words",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}, ["Unimplemented", '"if"']),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "propertyNames": {"pattern": "^a"}}}}, ["propertyNames"]),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, ["strin"]),
        ({"type": "regex", "regex": "[a-"}, ["regex", "unclosed"]),
        ({"type": "grammar", "grammar": 'start: "a" b'}, ["grammar", '"b"']),
        ({"type": "choice", "choice": []}, ["choice"]),
        ({"type": "xml"}, ["unknown type 'xml'"]),
    ],
)
def test_bad_formats_are_one_line_errors_naming_the_problem(value, words):
    with pytest.raises(UsageError) as info:
        parse_response_format(value)
    text = str(info.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_cli_generate_and_chat_flags_and_record_formats(tiny, tmp_path):
    from typer.testing import CliRunner

    from llmcli.cli import app

    path, _ = tiny
    schema = SCHEMAS["enum"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    lines = [
        {"text": "The quick"},
        {"text": "Paris", "response_format": {"type": "choice", "choice": ["oui", "non"]}},
        {"text": "Hello", "response_format": {"type": "regex", "regex": "[0-9]{2}"}},
    ]
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "-m", str(path), "--json-schema", str(tmp_path / "s.json"), "-n", "40", "--temperature", "1", "--seed", "1"], input="\n".join(map(json.dumps, lines)))
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.stdout.splitlines()]
    texts = [runner.invoke(app, ["decode", "-m", str(path), "--text-only"], input=json.dumps(r)).stdout.rstrip("\n") for r in records]
    assert all(r["finish_reason"] == "stop" for r in records)
    jsonschema.validate(json.loads(texts[0]), schema)
    assert texts[1] in ("oui", "non") and re.fullmatch("[0-9]{2}", texts[2])
    chat = runner.invoke(app, ["chat", "-m", str(path), "--json", "-n", "60", "--temperature", "1", "--seed", "2"], input=json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert chat.exit_code == 0, chat.output
    reply = json.loads(chat.stdout)["reply"]
    assert isinstance(json.loads(reply), dict)
    # bad input: exit 2 for a flag, exit 1 naming the line for a record, and nothing on stdout
    # bad input: a usage error (exit 2) for a flag, before the model loads; an input error naming the line for a record
    bad = runner.invoke(app, ["generate", "-m", str(tmp_path / "no-such-model"), "--regex", "[a-"], input=json.dumps(lines[0]))
    assert isinstance(bad.exception, UsageError) and bad.exception.exit_code == 2 and "--regex" in str(bad.exception) and bad.stdout == ""
    both = runner.invoke(app, ["generate", "-m", str(path), "--json", "--choice", "a,b"], input=json.dumps(lines[0]))
    assert isinstance(both.exception, UsageError) and "give one of them" in str(both.exception)
    record = {"text": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {}}}}}
    bad_line = runner.invoke(app, ["generate", "-m", str(path), "-n", "2"], input=json.dumps(lines[0]) + "\n" + json.dumps(record))
    assert isinstance(bad_line.exception, InputError) and bad_line.exception.line == 2 and '"if"' in str(bad_line.exception)
    assert len(bad_line.stdout.splitlines()) == 1  # the good line before it was written


# ---------------------------------------------------------------- tools: the prompt, the parsing


def test_tool_prompt_renders_as_transformers_does(tiny):
    import transformers

    from llmcli.core.tokenizer import load_tokenizer
    from llmcli.server.tools import read_tools, template_messages

    path, _ = tiny
    template = (TEMPLATES / "qwen2.5.jinja").read_text()
    ours = load_tokenizer(path)
    ours.chat_template = template
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    ref.chat_template = template
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18"},
    ]
    plan = read_tools([WEATHER, TIME], "auto", template)
    assert plan.syntax == "hermes" and plan.grammar is None
    rendered, tools = template_messages(messages, plan)
    expected = [dict(m, tool_calls=[{**m["tool_calls"][0], "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]) if "tool_calls" in m else m for m in messages]
    expected[1]["content"] = ""
    assert ours.apply_chat_template(rendered, tools=tools) == ref.apply_chat_template(expected, tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    # a template without tools: the tools go into the system message, calls and results into the turns
    plain = read_tools([WEATHER], "required", (TEMPLATES / "gemma3.jinja").read_text())
    assert plain.syntax == "fallback" and plain.grammar is not None
    fallback, none = template_messages(messages, plain)
    assert none is None and fallback[0]["role"] == "system" and '"get_weather"' in fallback[0]["content"]
    assert fallback[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert fallback[3] == {"role": "user", "content": "<tool_response>\n18\n</tool_response>"}
    assert read_tools([WEATHER], "auto", (TEMPLATES / "llama3.2.jinja").read_text()).syntax == "llama3_json"


NOTE = {
    "type": "function",
    "function": {"name": "note", "parameters": obj({"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}, "meta": {"type": "object"}})},
}
# argument text that json.dumps would write otherwise (escapes, an exponent, no spaces): the stream sends the model's own
NOTE_ARGUMENTS = '{"text": "a \\"quoted\\" {brace} </tool_call> caf\\u00e9 Zürich", "tags": ["x", "y"], "score": -1.5e3,"meta": {"ok": true, "n": null, "deep": [[]]}}'


def strict_json(text: str):
    """json.loads without the NaN and Infinity that Python's json takes and JSON does not."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def client_reads(deltas: list[dict], tools: list[dict], finish_reason: str) -> tuple:
    """The message that the openai client's own stream state accumulates from these deltas, and how
    many non-empty pieces of arguments each call arrived in."""
    from collections import Counter

    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state, pieces = ChatCompletionStreamState(input_tools=tools), Counter()
    deltas = [{"role": "assistant", "content": ""}, *deltas, {}]
    for n, delta in enumerate(deltas):
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason if n == len(deltas) - 1 else None}
        chunk = ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": [choice]})
        for event in state.handle_chunk(chunk):
            if event.type == "tool_calls.function.arguments.delta" and event.arguments_delta:
                pieces[event.index] += 1
    return state.current_completion_snapshot.choices[0].message, pieces  # (get_final_completion refuses a finish_reason "length")


def streamed(plan, pieces: list[str]) -> list[dict]:
    from llmcli.server.tools import ToolStream

    stream = ToolStream(plan)
    return [d for piece in pieces for d in stream.feed(piece)] + stream.finish()


def token_pieces(tokenizer, text: str) -> list[str]:
    """`text` in the pieces a server streams it in: one token at a time through the streaming detokenizer."""
    from llmcli.core.tokenizer import StreamingDetokenizer

    detokenizer = StreamingDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in tokenizer.encode(text, add_special=False).ids] + [detokenizer.finalize()]
    assert "".join(pieces) == text
    return pieces


def test_tool_calls_parse_whole_and_streamed(tiny):
    from llmcli.core.tokenizer import load_tokenizer
    from llmcli.server.tools import parse_tool_calls, read_tools

    tokenizer = load_tokenizer(tiny[0])
    tools = [WEATHER, TIME, NOTE]
    hermes, llama3 = read_tools(tools, "auto", None), read_tools(tools, "auto", (TEMPLATES / "llama3.2.jinja").read_text())
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
        f'<tool_call>\n{{"arguments": {NOTE_ARGUMENTS}, "name": "note"}}\n</tool_call>\n<tool_call>\n{{"name": "get_time", "arguments": {{"zone": "cet"}}}}\n</tool_call>'
    )
    expected = [("get_weather", {"city": "Paris", "unit": "c"}), ("note", json.loads(NOTE_ARGUMENTS)), ("get_time", {"zone": "cet"})]
    # (the syntax, the answer, its content, its calls, which calls name their tool after the arguments: those come in one piece, after the name)
    cases = [(hermes, text, "Let me check.", expected, {1}), (llama3, f' {{"name": "note", "parameters": {NOTE_ARGUMENTS}}}\n', None, expected[1:2], set())]
    for plan, answer, content, calls, name_last in cases:
        whole_content, whole = parse_tool_calls(answer, plan)
        assert whole_content == content and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole] == calls
        assert whole[-1 if plan is hermes else 0]["function"]["arguments"] != json.dumps(json.loads(NOTE_ARGUMENTS), ensure_ascii=False)  # the model's text, kept
        for pieces in (list(answer), token_pieces(tokenizer, answer), [answer]):
            message, argument_pieces = client_reads(streamed(plan, pieces), tools, "tool_calls")
            assert (message.content.strip() or None) == content
            # the streamed arguments add up to the non-streamed ones, in many pieces when the text came in many
            assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [(c["function"]["name"], c["function"]["arguments"]) for c in whole]
            many = [argument_pieces[i] > 1 for i in range(len(whole))]
            assert many == [len(pieces) > 1 and i not in name_last for i in range(len(whole))], argument_pieces
            for call, (_, arguments) in zip(message.tool_calls, calls):
                assert json.loads(call.function.arguments) == arguments


def test_tool_call_lookalikes_stay_content_and_a_cut_call_closes(tiny):
    from llmcli.core.tokenizer import load_tokenizer
    from llmcli.server.tools import parse_tool_calls, read_tools

    tokenizer = load_tokenizer(tiny[0])
    tools = [WEATHER, TIME]
    hermes, llama3 = read_tools(tools, "auto", None), read_tools(tools, "auto", (TEMPLATES / "llama3.2.jinja").read_text())
    lookalikes = [
        (hermes, 'See <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> and <tool_ca'),  # unknown function
        (hermes, '<tool_call>\n{"name": "get_time", "arguments": "utc"}\n</tool_call>'),  # arguments not an object
        (hermes, '<tool_call>\n{"name": "get_time", "arguments": ["utc"]}\n</tool_call>'),
        (hermes, '<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>'),
        (hermes, '<tool_call>\n{"name": "get_time"}\n</tool_call>'),  # no arguments
        (hermes, '<tool_call>\n["get_time", {}]\n</tool_call>'),
        (llama3, '{"name": "Ada", "age": 36}'),  # a JSON answer, no call
        (llama3, '{"zone": "utc", "name": "get_time"}'),
        (llama3, 'Call {"name": "get_time", "parameters": {}}'),
    ]
    for plan, text in lookalikes:
        assert parse_tool_calls(text, plan) == (text, []), text
        for pieces in (list(text), token_pieces(tokenizer, text)):
            message, _ = client_reads(streamed(plan, pieces), tools, "stop")
            assert message.content == text and not message.tool_calls, (text, message)
    # cut off (finish_reason "length") or broken after the head went out: the call stays, its arguments
    # closed into a JSON object, the rest of its block dropped (as vLLM does); the whole answer is no call
    head = '<tool_call>\n{"name": "get_weather", "arguments": {"city": '
    broken = [
        (head + '"Pa', "length", {"city": "Pa"}),
        (head + '"Paris", "un', "length", {"city": "Paris"}),
        (head + '"Paris", "unit": NaN}}\n</tool_call> after', "stop", {"city": "Paris"}),  # json.loads takes NaN, JSON does not
        (head + '["Paris", 1.}}\n</tool_call> after', "stop", {"city": ["Paris", 1]}),
    ]
    for text, reason, arguments in broken:
        assert parse_tool_calls(text, hermes) == (text, [])
        message, _ = client_reads(streamed(hermes, list(text)), tools, reason)
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("get_weather", arguments)]
        assert (message.content or "").strip() == ("after" if text.endswith("after") else "")


def test_tool_stream_agrees_with_the_whole_answer_on_random_calls():
    """Random calls (values of every JSON type, either key order, compact or spaced, sometimes
    corrupted) in random pieces: a call the whole answer has is streamed with the same arguments;
    every streamed call names a tool and its arguments are a strict JSON object."""
    import random

    from llmcli.server.tools import parse_tool_calls, read_tools

    rng = random.Random(0)
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in ("f", "g")]
    hermes, llama3 = read_tools(tools, "auto", None), read_tools(tools, "auto", (TEMPLATES / "llama3.2.jinja").read_text())

    def value(depth: int = 0):
        leaves = [rng.choice(["a", 'é"\\\n', "</tool_call>", "{", ""]), rng.choice([0, -1.5, 1e21, 3]), rng.choice([True, False, None])]
        if depth < 3:
            leaves += [[value(depth + 1) for _ in range(rng.randrange(3))], {f"k{i}": value(depth + 1) for i in range(rng.randrange(3))}]
        return rng.choice(leaves)

    only_streamed = 0
    for _ in range(200):
        plan = rng.choice([hermes, llama3])
        call = {"name": rng.choice("fgh"), ("parameters" if plan is llama3 and rng.random() < 0.5 else "arguments"): {f"p{i}": value() for i in range(rng.randrange(4))}}
        if rng.random() < 0.3:
            call = dict(reversed(call.items()))
        written = json.dumps(call, separators=rng.choice([(", ", ": "), (",", ":")]), ensure_ascii=rng.random() < 0.5)
        text = rng.choice(["", "Hi "]) + f"<tool_call>\n{written}\n</tool_call>" + rng.choice(["", " bye"]) if plan is hermes else written
        if rng.random() < 0.3:
            at = rng.randrange(len(text))
            text = text[:at] + rng.choice(["", "x", "}", '"', ",", "NaN"]) + text[at + rng.randrange(3) :]
        _, whole = parse_tool_calls(text, plan)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3)))
        message, _ = client_reads(streamed(plan, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]), tools, "tool_calls" if whole else "stop")
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        for name, arguments in calls:
            assert name in "fg" and isinstance(strict_json(arguments), dict), (text, calls)
        if whole:
            assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in whole], text
        elif calls:
            only_streamed += 1  # broken after its head went out: the call stays, closed (see ToolStream)
        else:
            assert (message.content or "").strip() == text.strip(), text
    assert 0 < only_streamed < 100


def test_json_prefix_closes_every_prefix_and_refuses_what_json_refuses():
    from llmcli.server.json_prefix import JsonPrefix

    text = ' {"a": "x\\"\\u00e9\\n}", "b": [1, -0.5, 2e-3, true, false, null, {}], "c": {"d": [[]], "e": 10}}'
    for cut in range(len(text) + 1):
        scan = JsonPrefix()
        assert scan.feed(text[:cut]) == cut and not scan.broken
        if scan.safe:
            strict_json(scan.text[: scan.safe] + scan.closing())  # raises if the closed prefix is not JSON
    assert scan.done and {k: strict_json(text[a:b]) for k, (a, b) in scan.members.items()} == strict_json(text)
    for bad in ['{"a": 01}', '{"a": tru }', '{"a": NaN}', '{"a" 1}', '{"a": 1,}', '{"a": "x\ny"}', '{"a": "\\x"}', '[1 2]', '{"a": 1]', '{"a": 1.}', '{"a": "\\u12g4"}']:
        scan = JsonPrefix()
        scan.feed(bad)
        assert scan.broken, bad
        with pytest.raises(ValueError):
            strict_json(bad)


# ---------------------------------------------------------------- the server, through the openai client


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    from llmcli.engine import Engine
    from llmcli.engine.service import EngineService
    from llmcli.server import make_app

    path, _ = tiny
    app = make_app(EngineService(Engine(str(path), batch_size=4), max_queue=8), model_name="tiny")
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), http


def test_server_response_formats_validate(client):
    api, _ = client
    schema = SCHEMAS["refs"]
    fmt = {"type": "json_schema", "json_schema": {"name": "points", "schema": schema, "strict": True}}
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100, temperature=1, seed=1, n=2, response_format=fmt)
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    streamed = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100, temperature=1, seed=1, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content  # the same seed and id stream: the same JSON, streamed
    done = api.completions.create(model="tiny", prompt="The quick", max_tokens=100, temperature=1, seed=3, extra_body={"response_format": {"type": "json_object"}})
    assert done.choices[0].finish_reason == "stop" and isinstance(json.loads(done.choices[0].text), dict)


def test_server_forced_tool_calls(client):
    api, _ = client
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    forced = dict(model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=400, temperature=1, seed=5)
    answers = {}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = api.chat.completions.create(**forced, tool_choice=choice)
        message = answers[str(choice)] = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls", message
        assert message.content is None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert choice == "required" or call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
    # streamed, through the openai client's own stream helper: the arguments grow over many deltas,
    # and what the client accumulates is the non-streamed call of the same seed
    with api.chat.completions.stream(**forced, tool_choice="required") as stream:
        argument_deltas = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta" and e.arguments_delta]
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content and len(streamed.message.tool_calls) == 1
    call, whole = streamed.message.tool_calls[0], answers["required"].tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    assert len(argument_deltas) > 1 and "".join(argument_deltas) == call.function.arguments
    jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
    # the conversation goes on with the call and its result (the fallback writes them into the turns)
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]}, {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    after = api.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=3, temperature=0)
    assert after.choices[0].message.tool_calls is None


def test_server_refuses_bad_formats_and_tools_before_generating(client):
    api, http = client

    def tokens_generated() -> float:
        line = next(ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("llmcli_generation_tokens_total "))
        return float(line.split()[1])

    before = tokens_generated()
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}), "response_format", '"if"'),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]), "tools.0.function.parameters", "nope"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice", "other"),
        (dict(tools=[{"type": "retrieval"}]), "tools.0", "function"),
    ]
    for extra, param, word in cases:
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, **extra)
        body = info.value.body
        assert set(body) >= {"message", "type", "param", "code"} and body["param"] == param and word in body["message"], body
    r = http.post("/v1/completions", json={"prompt": "x", "response_format": {"type": "regex", "regex": "("}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert tokens_generated() == before
