"""`llmcli chat`: an interactive REPL on the model's own chat template, or JSONL `messages` -> `reply`.

On a terminal the reply streams as it is generated, from an EngineService on a background thread,
so Ctrl-C stops the reply (the engine cancels the request and frees its row) without ever
interrupting a forward pass half-way. Piped, every record's conversation goes through the engine's
continuous batcher, like `llmcli generate`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import (
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_MB,
    DeviceOpt,
    DtypeOpt,
    InputArg,
    JsonSchemaOpt,
    MaxBatchedTokensOpt,
    ModelOpt,
    OutputOpt,
    PrefixCacheOpt,
    ProgressOpt,
    QuantizeOpt,
    SkipErrorsOpt,
    ThreadsOpt,
    check_max_batched_tokens,
    response_format_from_flags,
    sampling_options,
)
from llmcli.cli.stage import BadLines, check_output, open_input, open_output, say
from llmcli.core.sampling_params import SamplingParams
from llmcli.core.threads import apply_threads
from llmcli.errors import ContextLengthError, InputError, UsageError

PROMPT = ">>> "

HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (no TEXT: show it, or the template's default one)
  /history       show the conversation as the model receives it (its chat template)
  /save FILE     write the messages as JSON
  /exit          leave (also Ctrl-D at the prompt)
Ctrl-C during a reply stops the reply; your message and the part of the reply shown stay in
the conversation. Ctrl-C at the prompt clears the line, as in Python's REPL."""


# ---------------------------------------------------------------- the conversation and the context window


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = True, parse_special: bool = False) -> tuple[str, list[int]]:
    """The prompt text for the messages and its token ids (the template holds any BOS it wants).

    Special-token text inside a message is plain text unless parse_special (see Tokenizer.encode_chat).
    """
    text, encoding = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, parse_special=parse_special)
    return text, encoding.ids


def fit_messages(
    tokenizer, messages: list[dict], context: int, reserve: int, notify: Callable[[str], None], parse_special: bool = False
) -> tuple[list[dict], str, list[int]]:
    """Drop the oldest turns until the prompt leaves `reserve` tokens for the reply.

    System messages and the last message always stay; a user message goes together with the
    assistant replies that follow it. Returns the kept messages, the prompt text and its ids;
    a ContextLengthError when even the last message alone does not fit.
    """
    kept = list(messages)
    while True:
        text, ids = render(tokenizer, kept, parse_special=parse_special)
        if len(ids) + reserve <= context:
            return kept, text, ids
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if not droppable:
            raise ContextLengthError(
                f"the message needs {len(ids)} tokens but the context holds {context} (with {reserve} kept for the reply)",
                "send a shorter message, lower --max-tokens, or /reset",
            )
        first = droppable[0]
        end = first + 1
        while end < len(kept) - 1 and kept[end]["role"] == "assistant":
            end += 1
        del kept[first:end]
        notify(f"dropped the oldest turn to fit the context ({len(ids)} tokens > {context - reserve})")


def reply_budget(max_tokens: int, context: int) -> int:
    """Tokens kept free for the reply when fitting the history: max_tokens, but never most of the context."""
    return max(1, min(max_tokens, context // 2))




# ---------------------------------------------------------------- the command


@app.command()
@sampling_options
def chat(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt (piped records that have their own keep theirs).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per reply.")] = 512,
    sampling: SamplingParams = None,  # one flag per knob (--temperature, --top-p, ..., --seed): see sampling_options
    stop: Annotated[Optional[List[str]], typer.Option(help="Stop string (repeatable); not included in the reply.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past the end of the turn (for tests and benchmarks).")] = False,
    show_prompt: Annotated[bool, typer.Option(help="Print the rendered prompt the model receives to stderr before each reply.")] = False,
    parse_special: Annotated[
        bool, typer.Option("--parse-special", help="Read special-token text inside messages (<|im_end|>) as special tokens, not as plain text.")
    ] = False,
    max_context: Annotated[Optional[int], typer.Option(help="Cap the context below the model's (saves memory).")] = None,
    batch_size: Annotated[int, typer.Option(help="Piped records in flight at once.")] = 8,
    prefix_cache_mb: PrefixCacheOpt = DEFAULT_PREFIX_CACHE_MB,
    max_batched_tokens: MaxBatchedTokensOpt = None,
    json_schema: JsonSchemaOpt = None,
    json_object: Annotated[bool, typer.Option("--json", help="Constrain every reply to one JSON object (any keys).")] = False,
    progress: ProgressOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    threads: ThreadsOpt = None,
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Chat with the model: a REPL on a terminal, or JSONL records with `messages` -> the same records plus `reply`.

    The prompt is the model's own chat template. The history is kept within the context window
    (the oldest turns are dropped, with a notice on stderr). Special-token text inside a message
    (<|im_end|>) is plain text, so a message cannot end its turn or open another role's;
    --parse-special reads it as special tokens. Type /help in the REPL for commands; Ctrl-C
    stops a reply and keeps the conversation, Ctrl-D leaves. --json-schema / --json constrain
    every reply to JSON (a reply cut by --max-tokens is incomplete, and says so on stderr).

    Example: echo '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}' | llmcli chat
    """
    from llmcli.core.generate import Request
    from llmcli.engine import Engine

    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1", "use -n 1 or more")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", "use --batch-size 1 or more")
    check_max_batched_tokens(max_batched_tokens)
    interactive = input == "-" and sys.stdin.isatty()
    params = sampling
    grammar = response_format_from_flags(json_schema, json_object=json_object)  # a bad schema fails before the model loads
    stream_in = source = None
    check_output(output, input)
    if not interactive:
        stream_in, source = open_input(input)  # a missing file fails before the model loads
    apply_threads(threads)
    engine = Engine(
        model, dtype=dtype, device=device, quantize=quantize, batch_size=1 if interactive else batch_size, max_context=max_context, max_batched_tokens=max_batched_tokens,
        notify=say, default_model=DEFAULT_MODEL, prefix_cache_mb=prefix_cache_mb,
    )
    tokenizer = engine.tokenizer
    if engine.config.is_encoder:
        raise UsageError(f"{model} is an encoder model; it cannot chat", f"use a chat model such as {DEFAULT_MODEL}")
    if not tokenizer.chat_template:
        raise UsageError("the model has no chat template", "use an instruct/chat model, or `llmcli generate` for plain completion")

    def make_request(request_id, ids: list[int]) -> Request:
        return Request(
            id=request_id,
            prompt_ids=ids,
            params=params,
            max_tokens=max(1, min(max_tokens, engine.context_length - len(ids))),
            stop=list(stop or []),
            ignore_eos=ignore_eos,
            grammar=grammar,
        )

    if interactive:
        _repl(engine, make_request, system, max_tokens, show_prompt, parse_special)
    else:
        _batch(engine, make_request, stream_in, source, output, system, max_tokens, show_prompt, skip_errors, parse_special, progress)


# ---------------------------------------------------------------- piped: records in, records out


def _batch(engine, make_request, stream_in, source, output, system, max_tokens, show_prompt, skip_errors, parse_special, progress=None) -> None:
    from llmcli.cli.progress import make_progress
    from llmcli.records import MESSAGES, REPLY, RecordWriter, check_messages, require

    tokenizer = engine.tokenizer
    context = engine.context_length
    reserve = reply_budget(max_tokens, context)
    bad = BadLines(source, skip_errors)
    records: dict[int, dict] = {}

    def prompt(line) -> tuple[str, list[int]]:
        messages = check_messages(require(line.record, MESSAGES, line.number, stage="chat"), line.number)
        if system is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        _, text, ids = fit_messages(tokenizer, messages, context, reserve, lambda msg: say(f"line {line.number}: {msg}"), parse_special)
        return text, ids

    def requests():
        for line, (text, ids) in bad.results(stream_in, prompt):
            if show_prompt:
                say(f"--- prompt for line {line.number}:\n{text}")
            req = make_request(line.record.get("id", line.number), ids)
            records[id(req)] = line.record
            yield req

    writer = RecordWriter(open_output(output))
    with make_progress(progress, "chatting") as bar:
        for result in engine.iter_results(requests(), on_event=bar.on_event):
            out = dict(records.pop(id(result.request)))
            out[REPLY] = result.text
            if result.request.grammar is not None and result.finish_reason == "length":
                say(f"reply for id {out.get('id', '?')} was cut at --max-tokens before its JSON was complete; raise -n")
            writer.write(out)
            bar.advance(records=1)
    bad.report()


# ---------------------------------------------------------------- the REPL


def _history_file() -> Path | None:
    root = os.environ.get("LLMCLI_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llmcli")
    return Path(root) / "chat_history"


def _setup_readline():
    """Line editing and history (kept across sessions in the llmcli cache when it is writable)."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    path = _history_file()
    try:
        if path is not None and path.exists():
            readline.read_history_file(str(path))
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline, path


def _save_readline(setup) -> None:
    if not setup:
        return
    readline, path = setup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(str(path))
    except OSError:
        pass


def _repl(engine, make_request, system: Optional[str], max_tokens: int, show_prompt: bool, parse_special: bool = False) -> None:
    from llmcli.engine.service import EngineService

    tokenizer = engine.tokenizer
    context = engine.context_length
    reserve = reply_budget(max_tokens, context)
    service = EngineService(engine, batch_size=1, max_queue=1)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    setup = _setup_readline()
    say(f"llmcli chat with {engine.loaded.name} (context {context} tokens). /help for commands, Ctrl-D to leave.")
    turn = 0
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:  # Ctrl-D
                sys.stdout.write("\n")
                return
            except KeyboardInterrupt:
                # as Python's REPL: Ctrl-C drops the line being typed; leaving takes Ctrl-D or /exit
                sys.stdout.write("\n")
                sys.stdout.flush()
                say("(Ctrl-C clears the line; Ctrl-D or /exit leaves)")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if _command(text, messages, tokenizer) == "exit":
                    return
                continue
            turn += 1
            _turn(service, make_request, tokenizer, messages, line, turn, context, reserve, show_prompt, parse_special)
    finally:
        _save_readline(setup)
        service.shutdown(drain=False, timeout=5.0)


def _turn(service, make_request, tokenizer, messages: list[dict], line: str, turn: int, context: int, reserve: int, show_prompt: bool, parse_special: bool) -> None:
    """One exchange: fit the history, stream the reply to stdout, keep both in `messages`.

    Ctrl-C anywhere in here stops the reply (the request is cancelled, its row freed); the
    user's message and the part of the reply that was shown stay in the conversation (as
    llama-cli keeps them), so the history matches the screen and the next turn follows on.
    """
    handle = None
    pieces: list[str] = []
    messages.append({"role": "user", "content": line})
    try:
        try:
            kept, prompt_text, ids = fit_messages(tokenizer, messages, context, reserve, lambda m: say(f"llmcli: {m}"), parse_special)
        except InputError as exc:  # too long for the context, or refused by the template: the REPL goes on
            messages.pop()
            say(f"error: {exc}")
            return
        messages[:] = kept
        if show_prompt:
            say(f"--- prompt ({len(ids)} tokens):\n{prompt_text}\n--- end of prompt ---")
        handle = service.submit(make_request(turn, ids))
        for event in handle:
            if event.text:
                pieces.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:
        if handle is not None:
            service.cancel(handle)
        sys.stdout.write("\n")
        sys.stdout.flush()
        say("[reply stopped]")
    finally:
        if messages and messages[-1]["role"] == "user":
            messages.append({"role": "assistant", "content": "".join(pieces)})


def _command(text: str, messages: list[dict], tokenizer) -> str | None:
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name in ("/help", "/?"):
        print(HELP)
    elif name == "/reset":
        messages[:] = [m for m in messages if m["role"] == "system"]
        say("llmcli: conversation forgotten")
    elif name == "/system":
        current = next((m for m in messages if m["role"] == "system"), None)
        if not arg and current is not None:
            print(current["content"])
        elif not arg:
            default = tokenizer.default_system_prompt()
            print(f"(none set; the chat template adds its own:)\n{default}" if default else "(no system prompt)")
        elif current is not None:
            current["content"] = arg
        else:
            messages.insert(0, {"role": "system", "content": arg})
    elif name == "/history":
        if not messages:
            print("(empty)")
        else:
            print(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    elif name == "/save":
        if not arg:
            say("usage: /save FILE")
            return None
        try:
            Path(arg).expanduser().write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            say(f"error: cannot write {arg}: {exc.strerror}")
            return None
        say(f"llmcli: saved {len(messages)} messages to {arg}")
    else:
        say(f"unknown command {name}; /help lists the commands")
    return None
