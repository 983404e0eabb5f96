"""`llmcli tokenize`: text -> `ids`, `tokens`, `offsets` (or just a `count`), with the model's tokenizer.

No torch here or in what it imports: tokenizing must start in a fraction of a second.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmcli.cli import app
from llmcli.cli.options import InputArg, ModelOpt, OutputOpt, SkipErrorsOpt
from llmcli.cli.stage import BATCH_LINES, check_output, run_batched_stage, say
from llmcli.errors import InputError, UsageError


def load_cli_tokenizer(model: Optional[str]):
    """The tokenizer of --model: a catalogue name (pulled on first use), an HF directory or a .gguf file."""
    from llmcli.catalog import cache_root, resolve_model_path
    from llmcli.core.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(model, say), cache_dir=cache_root() / "tokenizers")


@app.command()
def tokenize(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    lines: Annotated[bool, typer.Option("--lines", help="Read every line as plain text (even one that starts with '{').")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Read JSONL records with a `text` field (a plain line is an error).")] = False,
    add_special: Annotated[
        Optional[bool],
        typer.Option("--add-special/--no-add-special", help="Add the special tokens the model expects (BOS, [CLS] ... [SEP]). Default: the model's own choice.", show_default=False),
    ] = None,
    count: Annotated[bool, typer.Option("--count", help="Add only `count`, the number of tokens, instead of ids/tokens/offsets.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Write JSONL even when stdout is a terminal (where a table is shown otherwise).")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Render the model's chat template first: `messages`, or `text` as the user's turn. Adds `prompt`.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="With --chat: a system message before the user's turn.")] = None,
    parse_special: Annotated[
        bool, typer.Option("--parse-special", help="With --chat: read special-token text inside messages (<|im_end|>) as special tokens, not as plain text.")
    ] = False,
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Split text into the model's tokens: adds `ids`, `tokens` (vocabulary pieces) and `offsets`.

    Input is plain text, one text per line, or JSONL records with a `text` field; which one is
    told from the first non-blank line (a line starting with '{' means JSONL), or forced with
    --lines / --jsonl. Every field of a record is kept. `offsets` are [start, end) character
    offsets into `text`: text[start:end] is what the token covers (a multi-byte character split
    over several byte-level tokens gives each of them that character's offsets). Special tokens
    written in the text (like <|im_start|>) are matched as special tokens. --count writes only
    `count`. On a terminal (and without --json or -o) each record is shown as a table instead.

    --chat renders the model's chat template (with the assistant's turn opened) over the
    record's `messages`, or over `text` as the user's message (after --system, if given), and
    tokenizes that `prompt` instead; `offsets` then point into `prompt`. There only the special
    tokens the template writes are special: special-token text inside a message is plain text,
    so a message cannot end its turn or open another role's (--parse-special: it is read as
    special tokens too).

    Example: echo "Hi there" | llmcli tokenize -m smollm2-135m-instruct
    """
    if system is not None and not chat:
        raise UsageError("--system needs --chat", "add --chat to render the chat template")
    if parse_special and not chat:
        raise UsageError("--parse-special needs --chat", "special-token text is always read as special tokens in plain text; add --chat to render the chat template")
    if lines and jsonl:
        raise UsageError("--lines and --jsonl contradict each other", "give one of them, or neither to detect the format")
    mode = "lines" if lines else "jsonl" if jsonl else "auto"
    check_output(output, input)

    from llmcli.records import COUNT, IDS, OFFSETS, PROMPT, TEXT, TOKENS, require, stdout_is_terminal

    tokenizer = load_cli_tokenizer(model)
    show_table = not as_json and output in (None, "-") and stdout_is_terminal()
    console = None
    if show_table:
        from rich.console import Console

        console = Console()

    if chat:
        # the template already writes every special token the model expects
        add_special = False if add_special is None else add_special

    def transform(items: list[tuple[dict, int]]) -> list:
        """The records of the lines read so far, tokenized together (encode_batch uses every core)."""
        results: list = []
        outs: list[dict] = []
        texts: list[str] = []
        chats: list = []  # with --chat, each record's Encoding (its contents tokenized apart from the template's specials)
        for record, number in items:
            try:
                out = dict(record)
                if chat:
                    text, encoding = encode_chat_record(tokenizer, record, number, system, parse_special, add_special=add_special)
                    out[PROMPT] = text
                    chats.append(encoding)
                else:
                    text = require(record, TEXT, number, stage="llmcli tokenize")
                    if not isinstance(text, str):
                        raise InputError(f"`text` must be a string, got {type(text).__name__}", 'write {"text": "..."}', line=number)
            except InputError as exc:
                results.append(exc)
                continue
            results.append(out)
            outs.append(out)
            texts.append(text)
        encodings = chats if chat else tokenizer.encode_batch_raw(texts, add_special=add_special) if texts else []
        for out, text, enc in zip(outs, texts, encodings):
            if count:
                out[COUNT] = len(enc)
            else:
                out[IDS] = enc.ids
                out[TOKENS] = enc.tokens
                out[OFFSETS] = enc.offsets  # (start, end) tuples, written as [start, end]
            if console is not None:
                _show(console, out, text, count)
        if console is not None:  # shown instead of written
            return [r if isinstance(r, InputError) else [] for r in results]
        return results

    # A table is shown as its record is reached, in order with the errors on stderr: one line at a time.
    run_batched_stage(input, output, transform, mode=mode, skip_errors=skip_errors, max_batch=1 if console is not None else BATCH_LINES, kind="text or JSONL file")


def encode_chat_record(tokenizer, record: dict, number: int, system: Optional[str] = None, parse_special: bool = False, add_special: bool = False):
    """The chat prompt for a record (its `messages`, or its `text` as the user's turn) and its Encoding."""
    from llmcli.records import MESSAGES, TEXT, check_messages

    if MESSAGES in record:
        messages = check_messages(record[MESSAGES], number)
    elif isinstance(record.get(TEXT), str):
        messages = [{"role": "user", "content": record[TEXT]}]
    else:
        raise InputError("no `messages` or `text` in the record for --chat", 'write {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}', line=number)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.encode_chat(messages, add_generation_prompt=True, parse_special=parse_special, add_special=add_special)


def _show(console, record: dict, text: str, count_only: bool) -> None:
    """One record as people read it: a title line, then one row per token."""
    from rich.table import Table
    from rich.text import Text

    from llmcli.cli.render import printable
    from llmcli.records import COUNT, IDS, OFFSETS, TOKENS

    n = record[COUNT] if count_only else len(record[IDS])
    title = f"id {record.get('id')}: {n} token{'s' if n != 1 else ''}"
    if count_only:
        console.print(Text(title))
        return
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("token")
    table.add_column("text")
    table.add_column("offsets", justify="right", style="dim")
    for i, (token_id, token, (start, end)) in enumerate(zip(record[IDS], record[TOKENS], record[OFFSETS])):
        table.add_row(str(i), str(token_id), Text(printable(token or "")), Text(printable(text[start:end])), f"{start}-{end}")
    console.print(table)
