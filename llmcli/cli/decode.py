"""`llmcli decode`: token ids -> text. `generated_ids` become `completion`, otherwise `ids` become `text`.

No torch here: decoding must start in a fraction of a second.
"""

from __future__ import annotations

import typer
from typing_extensions import Annotated

from llmcli.cli import InputArg, ModelOpt, OutputOpt, SkipErrorsOpt, app, run_stage
from llmcli.cli.tokenize import load_cli_tokenizer
from llmcli.errors import InputError


@app.command()
def decode(
    input: InputArg = "-",
    output: OutputOpt = None,
    model: ModelOpt = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="Print only the decoded text of each record, followed by a newline, instead of JSONL.")] = False,
    skip_special: Annotated[
        bool, typer.Option("--skip-special/--keep-special", help="Leave special tokens (<|im_end|>, [CLS]...) out of the text, or keep them.")
    ] = True,
    skip_errors: SkipErrorsOpt = False,
) -> None:
    """Turn token ids back into text, with the tokenizer of the model that made them.

    A record with `generated_ids` (from `llmcli generate`) gets `completion`; otherwise its `ids`
    (from `llmcli tokenize`) are decoded into `text`, replacing any `text` already there. Every
    other field is kept. Special tokens are left out unless --keep-special.

    --text-only prints just the text of each record followed by one newline, exactly as decoded:
    a text that contains newlines spans several lines, so use the JSONL output when each record
    must stay on one line.

    Example: echo "Hi there" | llmcli tokenize | llmcli decode --text-only
    """
    from llmcli.cli import open_output
    from llmcli.records import COMPLETION, GENERATED_IDS, IDS, TEXT, require_ids

    tokenizer = load_cli_tokenizer(model)
    vocab_size = tokenizer.vocab_size
    sink = open_output(output) if text_only else None

    def transform(record: dict, number: int):
        if GENERATED_IDS in record:
            source, target = GENERATED_IDS, COMPLETION
        elif IDS in record:
            source, target = IDS, TEXT
        else:
            raise InputError(
                "no `generated_ids` or `ids` in the record",
                "pipe through `llmcli tokenize` (for ids) or `llmcli generate` (for generated_ids) first",
                line=number,
            )
        ids = require_ids(record, number, field=source, vocab_size=vocab_size)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special)
        if sink is not None:
            sink.write(text + "\n")
            sink.flush()
            return []
        out = dict(record)
        out[target] = text
        return out

    run_stage(input, output if sink is None else None, transform, skip_errors=skip_errors)
