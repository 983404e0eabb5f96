"""Constrained decoding with llguidance: response formats -> grammars -> a per-sequence token mask.

- `parse_response_format(value)` reads the one shape every path takes (CLI flags, a record's
  `response_format`, the server's `response_format`): OpenAI's `{"type": "json_object"}` and
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, plus llmcli's
  `{"type": "regex", "regex"}`, `{"type": "choice", "choice": [...]}` and
  `{"type": "grammar", "grammar": "<lark>"}`. It returns a `Grammar`, validated by llguidance
  without a tokenizer, so a bad schema, regex or grammar fails before any model loads or any token
  is generated; a schema feature llguidance does not implement is named in the error.
- `guidance_tokenizer(tokenizer, n_vocab)`: llguidance's view of an llmcli Tokenizer (HF
  directory or GGUF), built from each token's bytes, once per tokenizer.
- `Constraint`: one sequence's matcher. Its next mask is computed in a worker thread as soon as
  the previous token is accepted, so it runs while the next forward pass does (llguidance
  releases the GIL); `mask(logits_row)` joins it and sets the disallowed logits to -inf,
  `advance(token)` consumes the sampled token and starts the next mask.

JSON is written in one fixed layout (`{"a": 1, "b": [2, 3]}`: Python's json.dumps separators,
no other whitespace), so a small model cannot loop on whitespace and the output is stable.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llmcli.errors import UsageError

if TYPE_CHECKING:  # torch is imported where a mask is made: parsing a response format needs none
    import torch

    from llmcli.core.tokenizer import Tokenizer

# OpenAI's response_format types, then llmcli's (vLLM calls them guided_regex / guided_choice / guided_grammar)
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "choice", "grammar")
# the JSON layout of every constrained JSON output (json.dumps' default separators, nothing else)
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
FORMAT_HINT = (
    'use {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, '
    '{"type": "regex", "regex": "..."}, {"type": "choice", "choice": ["a", "b"]} or {"type": "grammar", "grammar": "<lark>"}'
)


@dataclass(frozen=True)
class Grammar:
    """A validated llguidance grammar and what it came from (`json_schema`, `regex`, ...), for messages."""

    source: str  # the response format's type
    text: str  # llguidance's grammar (JSON-serialised)
    schema: Any = None  # the JSON schema, when there is one (tool calls check their arguments against it)


def _error(message: str, hint: str = FORMAT_HINT, where: str = "response_format") -> UsageError:
    return UsageError(f"{where}: {message}", hint)


def _library():
    try:
        import llguidance
    except ImportError:  # a broken install: llguidance is a dependency of llmcli
        raise UsageError("structured output needs the llguidance package", "pip install llguidance (llmcli depends on it; reinstall llmcli)") from None
    return llguidance


def _checked(source: str, text: str, where: str, schema: Any = None) -> Grammar:
    """The grammar if llguidance accepts it, else a one-line UsageError naming the problem."""
    llg = _library()
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    if failed:
        # llguidance follows its message with the offending source and a caret: one line is enough
        lines = [line.strip() for line in messages[0].splitlines() if line.strip() and not line[:1].isspace()]
        first = " ".join(lines) or messages[0].strip()
        hint = {
            "json_schema": "fix the schema, or leave out the keywords llguidance does not implement (see docs/structured.md)",
            "regex": "fix the regular expression (Rust regex syntax, matched against the whole output)",
            "grammar": "fix the Lark grammar (llguidance's Lark dialect: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)",
        }.get(source, FORMAT_HINT)
        raise _error(f"invalid {source.replace('_', ' ')}: {first}", hint, where)
    return Grammar(source, text, schema)


def json_schema_grammar(schema: Any, where: str = "response_format") -> Grammar:
    """A grammar for JSON that validates against `schema` (a dict, or True for any JSON object)."""
    llg = _library()
    if schema is True:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise _error(f"a JSON schema must be an object, got {type(schema).__name__}", "give a JSON schema object such as {\"type\": \"object\"}", where)
    try:
        text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise _error(f"invalid json schema: {exc}", "give a JSON schema object", where) from None
    return _checked("json_schema", text, where, schema)


def regex_grammar(pattern: str, where: str = "response_format") -> Grammar:
    if not isinstance(pattern, str) or not pattern:
        raise _error("the regex must be a non-empty string", 'e.g. {"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"}', where)
    return _checked("regex", _library().LLMatcher.grammar_from_regex(pattern), where)


def choice_grammar(choices: Any, where: str = "response_format") -> Grammar:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise _error("choice must be a non-empty list of non-empty strings", 'e.g. {"type": "choice", "choice": ["yes", "no"]}', where)
    # Lark string literals take JSON's escapes, so any text is one literal
    lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return _checked("choice", _library().LLMatcher.grammar_from_lark(lark), where)


def lark_grammar(lark: str, where: str = "response_format") -> Grammar:
    if not isinstance(lark, str) or not lark.strip():
        raise _error("the grammar must be a non-empty Lark text", "e.g. start: \"yes\" | \"no\"", where)
    return _checked("grammar", _library().LLMatcher.grammar_from_lark(lark), where)


def parse_response_format(value: Any, where: str = "response_format") -> Grammar | None:
    """The Grammar a response_format asks for; None for `{"type": "text"}` (no constraint)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _error(f"must be an object, got {type(value).__name__}", FORMAT_HINT, where)
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise _error(f"unknown type {kind!r}; the types are {', '.join(FORMAT_TYPES)}", FORMAT_HINT, where)
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(True, where)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _error("json_schema must be an object {\"name\", \"schema\", \"strict\"}", FORMAT_HINT, where)
        if "schema" not in spec:
            raise _error("json_schema has no `schema`", 'put the JSON schema under response_format.json_schema.schema', where)
        return json_schema_grammar(spec["schema"], f"{where}.json_schema.schema")
    if kind == "regex":
        return regex_grammar(value.get("regex"), f"{where}.regex")
    if kind == "choice":
        return choice_grammar(value.get("choice"), f"{where}.choice")
    return lark_grammar(value.get("grammar"), f"{where}.grammar")


# ---------------------------------------------------------------- the tokenizer llguidance sees

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: "Tokenizer", n_vocab: int) -> list[bytes]:
    """Each token id's bytes, as llguidance wants them: special tokens prefixed with 0xFF (never text).

    Byte-level vocabularies (GPT-2's alphabet) map each character back to its byte;
    sentencepiece ones write a space as U+2581 and a raw byte as <0xE4>. Ids past the tokenizer's
    vocabulary (a padded embedding) are empty and never allowed.
    """
    from llmcli.core.tokenizer import _byte_alphabet

    backend = tokenizer.backend
    decoder = backend.decoder
    byte_level = decoder is not None and b"ByteLevel" in decoder.__getstate__()
    to_byte = {c: b for b, c in _byte_alphabet().items()}
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    out = [b""] * n_vocab
    for text, i in backend.get_vocab(with_added_tokens=True).items():
        if i >= n_vocab:
            continue
        if i in special:
            out[i] = b"\xff" + text.encode("utf-8")
        elif byte_level:
            try:
                out[i] = bytes(to_byte[c] for c in text)
            except KeyError:  # an added token written as plain text
                out[i] = text.encode("utf-8")
        else:
            raw = _BYTE_TOKEN.fullmatch(text)
            out[i] = bytes([int(raw.group(1), 16)]) if raw else text.replace("\u2581", " ").encode("utf-8")
    return out


class _TokenizerView:
    """The object llguidance.TokenizerWrapper reads: token bytes, eos/bos, special ids and encode()."""

    def __init__(self, tokenizer: "Tokenizer", n_vocab: int):
        self._tokenizer = tokenizer
        self.tokens = token_bytes(tokenizer, n_vocab)
        self.eos_token_id = (tokenizer.eos_token_ids or [tokenizer.eos_token_id or 0])[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = [i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special and i < n_vocab]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special=False).ids


_tokenizers_lock = threading.Lock()
_tokenizers: dict[tuple[int, int], tuple[Any, Any]] = {}


def guidance_tokenizer(tokenizer: "Tokenizer", n_vocab: int):
    """llguidance's LLTokenizer for this tokenizer and a model vocabulary of n_vocab ids (built once:
    about a second for a 50k vocabulary, several for Gemma's 262k). Every end-of-sequence and
    end-of-turn id ends a constrained output once its grammar is complete."""
    key = (id(tokenizer), n_vocab)
    with _tokenizers_lock:
        found = _tokenizers.get(key)
        if found is not None and found[0] is tokenizer:
            return found[1]
        llg = _library()
        view = _TokenizerView(tokenizer, n_vocab)
        eos = list(tokenizer.eos_token_ids) or [view.eos_token_id]
        built = llg.LLTokenizer(llg.TokenizerWrapper(view), n_vocab=n_vocab, eos_token=eos)
        _tokenizers[key] = (tokenizer, built)
        return built


# ---------------------------------------------------------------- one sequence's matcher


@lru_cache(maxsize=1)
def _worker() -> ThreadPoolExecutor:
    # one thread: the masks of a step are computed one after another, alongside the forward pass
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmcli-mask")


@lru_cache(maxsize=4)
def _bit_values(device: str):
    import torch

    return torch.tensor([1 << b for b in range(32)], dtype=torch.int64, device=device).to(torch.int32)


class Constraint:
    """A grammar's matcher for one sequence, with its next-token mask computed ahead in a worker thread."""

    def __init__(self, grammar: Grammar, tokenizer: "Tokenizer", n_vocab: int):
        import torch

        llg = _library()
        self.grammar = grammar
        self.n_vocab = n_vocab
        self.matcher = llg.LLMatcher(guidance_tokenizer(tokenizer, n_vocab), grammar.text, log_level=0)
        if self.matcher.is_error():  # validated already; a tokenizer-specific failure lands here
            raise _error(f"the {grammar.source} cannot be used with this tokenizer: {self.matcher.get_error()}")
        self._bits = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)
        self._pending: Future | None = None
        self._start()

    def _fill(self) -> None:
        # llguidance writes the mask straight into the tensor's memory, without the GIL
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)

    def _start(self) -> None:
        self._pending = _worker().submit(self._fill)

    def _join(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def allowed(self, vocab: int, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """The next token's allowed ids as a (vocab,) bool tensor (waits for the mask if still computing)."""
        self._join()
        bits = self._bits.to(device)
        return ((bits[:, None] & _bit_values(str(bits.device))) != 0).reshape(-1)[:vocab]

    def mask(self, logits: "torch.Tensor") -> None:
        """Set the disallowed entries of one row of logits (V,) to -inf, in place.

        When nothing the grammar allows is left (min_tokens blocking the end token the grammar
        needs), the grammar wins: its tokens get logit 0, so the output stays valid.
        """
        import torch

        allowed = self.allowed(logits.shape[-1], logits.device)
        if not bool((allowed & (logits > float("-inf"))).any()):
            logits.copy_(torch.zeros_like(logits).masked_fill_(~allowed, float("-inf")))
            return
        logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, token: int) -> bool:
        """Consume the sampled token and start computing the next mask; True when the grammar is
        complete (nothing but an end token may follow), so the sequence should end here."""
        self._join()
        self.matcher.consume_token(int(token))
        if self.matcher.is_stopped():
            return True
        self._start()
        return False

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete under the grammar."""
        self._join()
        return self.matcher.is_accepting()

    def close(self) -> None:
        """Wait for a mask still being computed (the matcher must not be freed under the worker)."""
        self._join()


def mask_logits(constraints: list["Constraint | None"], logits: "torch.Tensor") -> "torch.Tensor":
    """The batch's logits (n, V) with each constrained row's disallowed tokens at -inf (a copy when any row is constrained)."""
    if not any(c is not None for c in constraints):
        return logits
    out = logits.clone()
    for row, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.mask(out[row])
    return out
