"""Tokenizers: a thin wrapper over HF `tokenizers`, the streaming detokenizer, and chat templates.

`load_tokenizer(path)` reads an HF directory (tokenizer.json plus tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, generation_config.json) or a `.gguf` file, whose
metadata describes the tokenizer under llama.cpp's key names and is rebuilt here as a
`tokenizers.Tokenizer` that splits text the way llama.cpp does. transformers' GGUF converter
builds the same tokenizer except for pre-tokenizers it has no entry for: for SmolLM's "smollm"
it uses GPT-2's regex, which keeps a space with the number after it (" 12"), where llama.cpp and
SmolLM2's own tokenizer.json split every digit off first.

No torch here: `llmcli tokenize` and `llmcli decode` import this module and must start fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from llmcli.errors import InputError, ModelError

# End-of-turn tokens as llama.cpp names them (llama-vocab.cpp, "special_eog_ids"). A chat model
# ends its reply with one of these rather than with the tokenizer's eos token in some families;
# each one counts as a stop token when the chat template writes it.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
)

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Encoding:
    """One text's tokens: ids, the readable pieces, and [start, end) character offsets into the text."""

    ids: list[int]
    tokens: list[str]
    offsets: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a model adds around it: special tokens, BOS, stop ids, chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str | None] | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        source: Path | None = None,
    ):
        self.backend = backend
        # The names transformers puts in `special_tokens_map` (bos_token, eos_token, unk_token,
        # pad_token, ...): chat templates read them as variables.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.source = source
        ids: list[int] = []
        for i in list(eos_token_ids) + self._end_of_turn_ids():
            if i is not None and i not in ids:
                ids.append(i)
        self._eos_token_ids = ids
        self._byte_fallback_ids: frozenset[int] | None = None

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation: eos, the model's extra stop ids, and the end-of-turn token of its chat template."""
        return list(self._eos_token_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("unk_token"))

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte tokens (<0xE4>) when the decoder joins them with ByteFallback, else empty."""
        if self._byte_fallback_ids is None:
            ids: frozenset[int] = frozenset()
            decoder = self.backend.decoder
            if decoder is not None and b"ByteFallback" in decoder.__getstate__():
                pattern = re.compile(r"<0x[0-9A-Fa-f]{2}>")
                ids = frozenset(i for token, i in self.backend.get_vocab(with_added_tokens=False).items() if pattern.fullmatch(token))
            self._byte_fallback_ids = ids
        return self._byte_fallback_ids

    def _end_of_turn_ids(self) -> list[int]:
        if not self.chat_template:
            return []
        specials = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        found = []
        for token in END_OF_TURN_TOKENS:
            if token in specials and token in self.chat_template:
                token_id = self.backend.token_to_id(token)
                if token_id is not None:
                    found.append(token_id)
        return found

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special: bool | None = None) -> Encoding:
        """Tokens of one text. add_special None or True: the special tokens the model adds (BOS, [CLS]...); False: none."""
        try:
            return self._wrap(self.backend.encode(text, add_special_tokens=add_special is not False))
        except TypeError:
            _check_unicode([text])
            raise

    def encode_batch(self, texts: Sequence[str], add_special: bool | None = None) -> list[Encoding]:
        return [self._wrap(e) for e in self.encode_batch_raw(texts, add_special)]

    def encode_batch_raw(self, texts: Sequence[str], add_special: bool | None = None) -> list[tokenizers.Encoding]:
        """The backend's own encodings of several texts, as encode_batch tokenizes them.

        Their `ids`, `tokens` and `offsets` (as tuples) are built on each access and `len()` counts
        the tokens: for callers that copy out some fields once, such as `llmcli tokenize`, where
        building an Encoding's lists for every text would add about a tenth to the time.
        """
        texts = list(texts)
        try:
            return self.backend.encode_batch(texts, add_special_tokens=add_special is not False)
        except TypeError:
            _check_unicode(texts)
            raise

    def _wrap(self, enc: tokenizers.Encoding) -> Encoding:
        return Encoding(ids=list(enc.ids), tokens=list(enc.tokens), offsets=[[int(a), int(b)] for a, b in enc.offsets])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside the vocabulary (0..{size - 1})",
                "the ids come from another model's tokenizer; decode with the same --model",
            )
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as the prompt text the model was trained on, rendered like transformers renders it."""
        if not self.chat_template:
            where = f" {self.source}" if self.source else ""
            raise ModelError(
                f"model{where} has no chat template",
                "use a chat/instruct model (e.g. smollm2-135m-instruct), or send plain text to `llmcli generate`",
            )
        import jinja2

        template = _compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise InputError(f"the chat template refused the messages: {exc}", "check the roles and their order (e.g. system first, user and assistant alternating)") from None

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, parse_special: bool = False, add_special: bool = False, **kwargs: Any
    ) -> tuple[str, Encoding]:
        """The rendered chat prompt and its tokens; add_special False (the default): nothing added, the template writes any BOS it wants.

        The special tokens the template writes (<|im_start|>, <|im_end|>) are special tokens; the
        text of one inside a message's content is tokenized as plain text, so a message cannot
        close its turn and open another role's. parse_special=True reads special-token text
        everywhere, as transformers' apply_chat_template(tokenize=True) and llama.cpp do. Contents
        without special-token text are tokenized in one piece either way (the same ids).
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        _check_unicode([text])
        specials = self._special_pattern
        contents = [m.get("content") for m in messages]
        if parse_special or specials is None or not any(isinstance(c, str) and specials.search(c) for c in contents):
            return text, self.encode(text, add_special=add_special)
        spans = self._content_spans(messages, add_generation_prompt, text, kwargs)
        return text, self._encode_with_plain_spans(text, spans, add_special)

    def default_system_prompt(self) -> str | None:
        """The system message the chat template writes when the conversation has none (SmolLM2's
        "You are a helpful AI assistant named SmolLM, ..."), or None.

        Found by rendering a user turn with and without a system message of a marker text: the
        template's text around the marker, where the marker's absence leaves the default in its place.
        """
        if not self.chat_template:
            return None
        mark, user = "\U000f8300", "\U000f8301"
        try:
            with_system = self.apply_chat_template([{"role": "system", "content": mark}, {"role": "user", "content": user}], add_generation_prompt=False)
            without = self.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=False)
        except (InputError, ModelError):
            return None
        if with_system.count(mark) != 1 or with_system.count(user) != 1 or without.count(user) != 1:
            return None
        before, _, after = with_system[: with_system.index(user)].partition(mark)
        head = without[: without.index(user)]
        if not (head.startswith(before) and head.endswith(after)) or len(head) <= len(before) + len(after):
            return None
        return head[len(before) : len(head) - len(after)] or None

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """A regex of the special tokens' texts, longest first (None when there are none)."""
        found = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content}, key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in found)) if found else None

    def _content_spans(self, messages: list[dict], add_generation_prompt: bool, text: str, kwargs: dict) -> list[tuple[int, int]]:
        """[start, end) of every message content in the rendered `text`.

        The template is rendered again with a marker in place of each content; the text between
        the markers is the template's own. A template that strips a content is followed; one that
        changes it otherwise cannot be split safely, and is refused rather than reading the
        content's special-token text as special tokens.
        """
        marks = {i: f"\U000f8100{i}\U000f8101" for i, m in enumerate(messages) if isinstance(m.get("content"), str)}
        stand_ins = [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)]
        parts = re.split("\U000f8100(\\d+)\U000f8101", self.apply_chat_template(stand_ins, add_generation_prompt=add_generation_prompt, **kwargs))
        spans: list[tuple[int, int]] = []
        ok = text.startswith(parts[0])
        pos = len(parts[0])
        for k in range(1, len(parts), 2):
            if not ok:
                break
            content, following = messages[int(parts[k])]["content"], parts[k + 1]
            ok = False
            for piece in (content, content.strip()):
                if text.startswith(piece + following, pos):
                    spans.append((pos, pos + len(piece)))
                    pos += len(piece) + len(following)
                    ok = True
                    break
        if not ok or pos != len(text):
            raise InputError(
                "a message holds the text of a special token (such as <|im_end|>) and the chat template changes message contents, so it cannot be kept as plain text",
                "remove the special-token text from the message, or pass --parse-special to read it as special tokens",
            )
        return spans

    def _encode_with_plain_spans(self, text: str, spans: list[tuple[int, int]], add_special: bool) -> Encoding:
        """Tokens of `text` with special-token text read as special tokens outside `spans` only.

        One encode of the whole text, so the pieces around the contents tokenize as they would
        otherwise: a copy of the backend reads no special tokens, and the template's own ones are
        written as placeholder tokens that it does read, then mapped back to their ids and offsets.
        """
        import bisect

        backend, placeholders = self._plain_special_backend
        pattern = self._special_pattern
        # the placeholder text in pieces; per piece its start there, its start in `text`, its length in `text`
        pieces: list[str] = []
        starts: list[int] = []
        origins: list[int] = []
        sizes: list[int] = []

        def add(piece: str, origin: int, size: int) -> None:
            if piece:
                starts.append(starts[-1] + len(pieces[-1]) if pieces else 0)
                pieces.append(piece)
                origins.append(origin)
                sizes.append(size)

        pos = 0
        for start, end in spans + [(len(text), len(text))]:
            cursor = pos
            for match in pattern.finditer(text, pos, start):
                add(text[cursor : match.start()], cursor, match.start() - cursor)
                add(placeholders[match.group()][0], match.start(), len(match.group()))
                cursor = match.end()
            add(text[cursor:start], cursor, start - cursor)
            add(text[start:end], start, end - start)
            pos = end

        def where(offset: int) -> int:
            """An offset into the placeholder text as an offset into `text`."""
            i = bisect.bisect_right(starts, offset) - 1
            if i < 0:
                return offset
            return origins[i] + min(offset - starts[i], sizes[i])

        back = {stand_in: (real_id, token) for token, (_, stand_in, real_id) in placeholders.items()}
        enc = backend.encode("".join(pieces), add_special_tokens=add_special)
        ids, tokens = [], []
        for token_id, token in zip(enc.ids, enc.tokens):
            real_id, real = back.get(token_id, (token_id, token))
            ids.append(real_id)
            tokens.append(real)
        return Encoding(ids=ids, tokens=tokens, offsets=[[where(a), where(b)] for a, b in enc.offsets])

    @cached_property
    def _plain_special_backend(self) -> tuple[tokenizers.Tokenizer, dict[str, tuple[str, int, int]]]:
        """A copy of the backend that reads special-token text as plain text, plus a placeholder
        token for each special token: {token text: (placeholder, placeholder id, real id)}.
        Built on first use (a third of a second for a 50k vocabulary), when a message holds special-token text."""
        copy = tokenizers.Tokenizer.from_str(self.backend.to_str())
        copy.encode_special_tokens = True
        added = {t.content: (i, t) for i, t in self.backend.get_added_tokens_decoder().items() if t.special and t.content}
        stand_ins = {content: f"\U000f8200{i}\U000f8201" for content, (i, _) in added.items()}
        # not special, so that encode_special_tokens leaves them matched; the same flags as the token they stand for
        copy.add_tokens(
            [AddedToken(stand_ins[c], single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=t.normalized, special=False) for c, (_, t) in added.items()]
        )
        return copy, {c: (stand_ins[c], copy.token_to_id(stand_ins[c]), i) for c, (i, _) in added.items()}


def _check_unicode(texts: Sequence[str]) -> None:
    """An InputError for the first text that holds a lone surrogate, which no tokenizer can encode:
    a JSON escape like "\\ud800", or bytes that are not UTF-8 in a command-line argument (Python
    hands those on as lone surrogates)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"the text holds U+{ord(text[exc.start]):04X} at character {exc.start}, half of a surrogate pair and no character",
                "give UTF-8 text (for a command-line argument, check the terminal's encoding)",
            ) from None
        except AttributeError:  # not a str: the backend's own TypeError says what it got
            pass


@lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """The template compiled in the environment transformers uses (utils/chat_template_utils.py).

    Sandboxed, because a template is code that came with the model; trim_blocks and lstrip_blocks,
    because templates are written for them; `raise_exception` and `strftime_now`, which templates
    call; a `tojson` that does not escape HTML; and `{% generation %}` blocks accepted as plain blocks.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"the model's chat template does not compile: {exc}", "the model files are damaged or the template needs a newer llmcli") from None


# ---------------------------------------------------------------- streaming detokenizer


class StreamingDetokenizer:
    """Text from a growing list of token ids, piece by piece (mlx-lm's, vLLM's incremental detokenizer).

    Each `add` decodes only a short window: the ids since the last emitted boundary plus the ids
    before it (their text is subtracted), so decoders that look at neighbours (a sentencepiece
    leading space, WordPiece's "##") give the same text as decoding everything. Text that ends in
    an incomplete UTF-8 character (decoded as U+FFFD) is held back until the character completes;
    the concatenation of every piece and `finalize()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.byte_ids = tokenizer.byte_fallback_ids
        self.reset()

    def reset(self) -> None:
        self.window: list[int] = []  # the ids being decoded: [already emitted context | pending]
        self.emitted = 0  # how many ids at the start of window are context whose text was emitted
        self.context_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (often "", never half a character)."""
        self.window.append(token_id)
        if token_id in self.byte_ids:
            # ByteFallback turns a whole run of byte tokens into U+FFFDs when any of it is not
            # UTF-8, so nothing of a run is final until a non-byte token ends it.
            return ""
        text = self._decode(self.window)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.context_text) :]
        # The pending ids become the context of the next window, unless they decode to nothing
        # (skipped special tokens): a context must hold text, or the next token loses the
        # space a neighbour gives it (WordPiece).
        pending = self.window[self.emitted :]
        pending_text = self._decode(pending)
        if pending_text:
            self.window, self.context_text = pending, pending_text
        else:
            self.context_text = text
        self.emitted = len(self.window)
        return piece

    def finalize(self) -> str:
        """The text still held back (a trailing incomplete character decodes to U+FFFD, as decode does)."""
        text = self._decode(self.window)
        piece = text[len(self.context_text) :]
        self.window = []
        self.emitted = 0
        self.context_text = ""
        return piece


# ---------------------------------------------------------------- loading


def load_tokenizer(path: Path | str, cache_dir: Path | str | None = None) -> Tokenizer:
    """The tokenizer of a model: an HF directory (or its tokenizer.json) or a .gguf file.

    Rebuilding a GGUF tokenizer from its metadata takes about half a second; with cache_dir the
    result is kept there as JSON (keyed by the file's path, size and mtime) and read back in a
    fraction of that, which is what keeps `llmcli tokenize` a fast filter.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist", "give an HF-format model directory or a .gguf file")
    if path.is_dir():
        return _load_hf_dir(path, path / "tokenizer.json")
    if path.suffix.lower() == ".json":
        return _load_hf_dir(path.parent, path)
    if path.suffix.lower() == ".gguf" or _is_gguf(path):
        return _load_gguf_cached(path, Path(cache_dir)) if cache_dir is not None else _load_gguf(path)
    raise ModelError(f"{path} is neither an HF model directory nor a .gguf file", "give the directory that holds tokenizer.json, or a .gguf file")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})", "download the model files again") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _load_hf_dir(folder: Path, tokenizer_file: Path) -> Tokenizer:
    if not tokenizer_file.is_file():
        others = [name for name in ("tokenizer.model", "vocab.txt", "vocab.json", "spiece.model") if (folder / name).is_file()]
        hint = (
            f"{folder} has only {', '.join(others)}; write tokenizer.json with transformers: "
            f"AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')"
            if others
            else "an HF-format model directory needs tokenizer.json (the `tokenizers` format) beside config.json"
        )
        raise ModelError(f"no tokenizer.json in {folder}", hint)
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ModelError(f"cannot read {tokenizer_file}: {exc}", "download the model files again, or save it with a current `tokenizers`") from None
    # Lengths are the pipeline's business (--truncate, context checks), never silently the tokenizer's.
    backend.no_padding()
    backend.no_truncation()

    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    special = {name: _token_text(special_map.get(name)) for name in SPECIAL_NAMES}
    for name in SPECIAL_NAMES:
        if name in config:  # tokenizer_config wins, as in transformers
            special[name] = _token_text(config[name])

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # several named templates: the default one
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")

    # BOS/EOS come from tokenizer.json's post-processor alone; transformers (5.x) also ignores
    # tokenizer_config's add_bos_token for a tokenizer.json, so both tokenize alike.

    eos_ids: list[int] = []
    generation = _read_json(folder / "generation_config.json")
    gen_eos = generation.get("eos_token_id")
    eos_ids += [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
    eos = backend.token_to_id(special["eos_token"]) if special.get("eos_token") else None
    return Tokenizer(
        backend,
        special_tokens=special,
        eos_token_ids=([eos] if eos is not None else []) + eos_ids,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        source=folder,
    )


def _template_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    bos = bos if bos_id is not None else None
    eos = eos if eos_id is not None else None
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = ([(bos, bos_id)] if bos else []) + ([(eos, eos_id)] if eos and eos != bos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------- GGUF

# Pre-tokenizers named by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp defines them (the
# name -> type table in llama_vocab::impl::load, the regexes in llm_tokenizer_bpe). A type is a
# list of regexes applied one after another, each splitting the pieces the previous one left
# (text between matches stays a piece), which is `Split(..., "isolated")` in a Sequence. Where
# llama.cpp rewrote a regex for std::regex, the original from the model's tokenizer.json is used.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
_TEKKEN_SPLIT = _CASED_WORDS.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O_SPLIT = _CASED_WORDS.replace("{c}", _CONTRACTIONS + "?") + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CJK_DEEPSEEK = "[一-龥ࠀ-一가-퟿]+"
_PUNCT_WORDS = r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3_SPLIT,),
    "jais2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "deepseek-llm": (
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        _CJK_DEEPSEEK,
        r"\p{N}+",
    ),
    "deepseek-v3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "spark2_5": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"),
    "youtu": ("[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+", _GPT4O_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1)),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_DEEPSEEK, r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "gpt2": (_GPT2_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "qwen35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "tekken": (_TEKKEN_SPLIT,),
    "chameleon": (
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2_SPLIT,
    ),
    "gpt-4o": (_GPT4O_SPLIT,),
    "tiny_aya": (r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O_SPLIT),
    "bailingmoe": (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "laguna": ("[^\\n]+|[\\n]+", _QWEN2_SPLIT),
    "exaone-moe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
# Every name llama.cpp accepts -> its type above (same regexes, different names in llama.cpp)
_PRE_TYPES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"), "llama3"),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5"), "llama3"),
    "jais-2": "jais2",
    "deepseek-llm": "deepseek-llm",
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), "deepseek-v3"),
    "spark2_5": "spark2_5",
    "youtu": "youtu",
    "deepseek-coder": "deepseek-coder",
    "falcon": "falcon",
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"), "starcoder"),
    **dict.fromkeys(
        ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert",
         "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
        "gpt2",
    ),  # fmt: skip
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), "qwen2"),
    "qwen35": "qwen35",
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), "bloom"),
    "viking": "viking",
    "tekken": "tekken",
    "chameleon": "chameleon",
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt-4o"),
    "granite-embed-multi-97m": "gpt-4o",  # llama.cpp adds \p{M} to its rewrite; the original regex has it
    **dict.fromkeys(("tiny_aya", "cohere2moe"), "tiny_aya"),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), "bailingmoe"),
    "seed-coder": "seed-coder",
    "ufakzeka": "ufakzeka",
    "grok-2": "qwen2",
    "laguna": "laguna",
    "exaone-moe": "exaone-moe",
    "minicpm5": "minicpm5",
    "default": "default",
}
# Names whose word is looked up whole before any merge (llama.cpp's ignore_merges, `"ignore_merges":
# true` in their tokenizer.json), and those that add BOS when the file does not say.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
                  "minicpm5", "youtu", "glm4", "glm5", "tekken", "granite-embed-multi-97m"}  # fmt: skip
_ADD_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "tekken", "chameleon"}
# llama.cpp handles these with code of its own (custom digit grouping, Han rules, zero-width
# splits) or without GPT-2's byte alphabet; nothing here rebuilds them yet.
_UNSUPPORTED_PRE = {"kimi-k2", "superbpe", "afmoe", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "whitespace"}


def _gguf_pre_tokenizer(pre: str | None, path: Path | None = None):
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`; a missing name is llama.cpp's
    "default". A name llama.cpp does not know gets GPT-2's regex, as transformers gives it."""
    if pre in _UNSUPPORTED_PRE:
        raise ModelError(
            f"{path or 'the GGUF file'} uses the pre-tokenizer {pre!r}, which llmcli does not rebuild yet",
            "use the model's HF directory (tokenizer.json) instead",
        )
    kind = _PRE_TYPES.get(pre or "default")
    if kind == "gpt2" or kind is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "starcoder":  # \p{N} then GPT-2's regex, what SmolLM's own tokenizer.json writes
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in _PRE_SPLITS[kind]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


TOKENIZER_CACHE_LAYOUT = 2  # 2: a family's fallback chat template (Gemma 3) is in the entry


def _load_gguf_cached(path: Path, cache_dir: Path) -> Tokenizer:
    """The GGUF tokenizer through the cache: `<key>.tokenizer.json` is the backend as `tokenizers`
    writes it (read with Tokenizer.from_file, with no Python JSON parse of its 2 MB), and
    `<key>.meta.json` the rest. The meta file is written last, so it marks a complete entry."""
    import os

    from llmcli.tempfiles import source_key

    key = source_key(path)
    backend_file = cache_dir / f"{key}.tokenizer.json"
    meta_file = cache_dir / f"{key}.meta.json"
    try:
        saved = json.loads(meta_file.read_text(encoding="utf-8"))
        if saved.get("layout") != TOKENIZER_CACHE_LAYOUT:
            raise ValueError("an entry of an older layout: rebuilt")
        return Tokenizer(
            tokenizers.Tokenizer.from_file(str(backend_file)),
            special_tokens=saved["special_tokens"],
            eos_token_ids=saved["eos_token_ids"],
            chat_template=saved["chat_template"],
            source=path,
        )
    except Exception:  # noqa: BLE001 - a missing or unreadable cache entry is simply rebuilt
        pass
    from llmcli.tempfiles import owned_tmp

    tok = _load_gguf(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"layout": TOKENIZER_CACHE_LAYOUT, "special_tokens": tok.special_tokens, "eos_token_ids": tok.eos_token_ids, "chat_template": tok.chat_template}
        for target, text in ((backend_file, tok.backend.to_str()), (meta_file, json.dumps(meta))):
            tmp = owned_tmp(target)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)  # atomic: a concurrent reader sees the old state or the whole file
        (cache_dir / f"{key}.json").unlink(missing_ok=True)  # the entry as older versions wrote it, in one file
    except OSError:
        pass  # a read-only cache only costs speed
    return tok


def _load_gguf(path: Path) -> Tokenizer:
    from llmcli.core.gguf_meta import gguf_metadata
    from llmcli.core.models.registry import family_chat_template

    meta = gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not kind or not tokens:
        raise ModelError(
            f"{path} has no tokenizer in its metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)",
            "convert the model again with llama.cpp's convert_hf_to_gguf.py, which stores the tokenizer, or use the HF directory",
        )
    token_types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if kind == "gpt2":
        backend = _gguf_byte_level(meta, tokens, token_types, path)
        default_add_bos = meta.get("tokenizer.ggml.pre") in _ADD_BOS
    elif kind == "llama":
        backend = _gguf_sentencepiece(meta, tokens, token_types)
        # Older files have no flag, and llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        default_add_bos = True
    else:
        raise ModelError(
            f"{path} uses tokenizer model {kind!r}; llmcli reads GGUF tokenizers 'gpt2' (byte-level BPE) and 'llama' (sentencepiece BPE)",
            "use the model's HF directory (tokenizer.json) instead",
        )

    def named(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

    special = {
        "bos_token": named("bos_token_id"),
        "eos_token": named("eos_token_id"),
        "unk_token": named("unknown_token_id"),
        "pad_token": named("padding_token_id"),
        "sep_token": named("seperator_token_id") or named("separator_token_id"),
        "cls_token": named("cls_token_id"),
        "mask_token": named("mask_token_id"),
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _template_processor(backend, special["bos_token"] if add_bos else None, special["eos_token"] if add_eos else None)
    stop = [meta.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return Tokenizer(
        backend,
        special_tokens=special,
        eos_token_ids=[i for i in stop if isinstance(i, int) and 0 <= i < len(tokens)],
        chat_template=meta.get("tokenizer.chat_template") or family_chat_template(meta.get("general.architecture")),
        source=path,
    )


def _gguf_byte_level(meta: dict, tokens: list[str], token_types: list[int], path: Path | None = None) -> tokenizers.Tokenizer:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # llama.cpp stores byte-level tokens already spelled in GPT-2's alphabet; a token that is
        # not (a raw control string with odd characters) is respelled byte by byte, as transformers does.
        spelled = token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre")
    pre_tokenizer = _gguf_pre_tokenizer(pre, path)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES)
    )
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(backend, tokens, token_types, byte_level=True)
    return backend


def _gguf_sentencepiece(meta: dict, tokens: list[str], token_types: list[int]) -> tokenizers.Tokenizer:
    """Llama/Mistral-style sentencepiece BPE (transformers' LlamaTokenizer over the file's vocabulary)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges:
        merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(tokens, vocab, scores)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_special_tokens(backend, tokens, token_types, byte_level=False)
    return backend


def _merges_from_scores(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE keeps scores, not merges: every split of a token into two known pieces is a
    merge, ranked by the merged token's score (transformers' generate_merges, same order)."""
    found = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _add_gguf_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int], byte_level: bool) -> None:
    """Control tokens (<|im_start|>) become special added tokens so they are matched whole, never split;
    user-defined ones (<think>) become plain added tokens. In a byte-level vocabulary a "control"
    token spelled outside the byte alphabet is a llama.cpp mislabel and is left alone."""
    letters = set(_byte_alphabet().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == _CONTROL and (letters is None or set(token) <= letters)
    ]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(token, normalized=False, special=False) for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    if user:
        backend.add_tokens(user)

