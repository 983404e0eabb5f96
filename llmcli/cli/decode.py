"""`llmcli decode`: token ids -> text. `generated_ids` become `completion`, otherwise `ids` become `text`.

No torch here: decoding must start in a fraction of a second.
"""

from __future__ import annotations

import json

import typer
from typing_extensions import Annotated

from llmcli.cli import app
from llmcli.cli.options import InputArg, ModelOpt, OutputOpt, SkipErrorsOpt
from llmcli.cli.stage import check_output, open_output, run_stage
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

    The `{id, delta}` records of `llmcli generate --stream` pass through unchanged; with
    --text-only their text is printed as it arrives, and the final record of that id (the one
    with `generated_ids`) only ends the line, so `generate --stream | decode --text-only` shows
    each completion as it is produced. The deltas of one record are printed while no other
    record's text is open on the line; those of another record are held until its turn (generate
    writes each record's deltas together, in input order, so nothing waits in practice).

    Example: echo "Hi there" | llmcli tokenize | llmcli decode --text-only
    """
    check_output(output, input)
    from llmcli.records import COMPLETION, DELTA, GENERATED_IDS, IDS, TEXT, require_ids

    tokenizer = load_cli_tokenizer(model)
    vocab_size = tokenizer.vocab_size
    sink = open_output(output) if text_only else None
    deltas = _StreamedText(sink) if sink is not None else None

    def transform(record: dict, number: int):
        if GENERATED_IDS in record:
            source, target = GENERATED_IDS, COMPLETION
        elif IDS in record:
            source, target = IDS, TEXT
        elif DELTA in record:
            if not isinstance(record[DELTA], str):
                raise InputError("`delta` must be a string", "use the stream records of `llmcli generate --stream`", line=number)
            if deltas is None:
                return record  # a stream record: nothing to decode
            deltas.add(record, number)
            return []
        else:
            raise InputError(
                "no `generated_ids` or `ids` in the record",
                "pipe through `llmcli tokenize` (for ids) or `llmcli generate` (for generated_ids) first",
                line=number,
            )
        ids = require_ids(record, number, field=source, vocab_size=vocab_size)
        if deltas is not None and deltas.finish(record, number):
            return []
        text = tokenizer.decode(ids, skip_special_tokens=skip_special)
        if sink is not None:
            sink.write(text + "\n")
            sink.flush()
            return []
        out = dict(record)
        out[target] = text
        return out

    run_stage(input, output if sink is None else None, transform, skip_errors=skip_errors)


class _StreamedText:
    """--text-only over `generate --stream`: deltas printed as they come, one record's text at a time.

    A record is known by its `id` and `sample`. The first record whose delta arrives while no
    text is open on the line becomes the open one: its deltas (any held ones first) are printed
    at once, and its final record ends the line. Deltas of other records are held; a held
    record's text is printed whole, with its newline, when its final record arrives. A final
    record of another record while one is open would mix two texts on one line, so it is an
    error instead.
    """

    def __init__(self, sink):
        self.sink = sink
        self.open: str | None = None  # the key of the record whose text is on the line
        self.held: dict[str, list[str]] = {}

    @staticmethod
    def key(record: dict) -> str:
        from llmcli.records import ID, SAMPLE

        return json.dumps([record.get(ID), record.get(SAMPLE)], sort_keys=True)  # any JSON value is an id

    def add(self, record: dict, number: int) -> None:
        from llmcli.records import DELTA

        key = self.key(record)
        if self.open is None:
            self.open = key
        if key == self.open:
            self.sink.write("".join(self.held.pop(key, [])) + record[DELTA])
            self.sink.flush()
        else:
            self.held.setdefault(key, []).append(record[DELTA])

    def finish(self, record: dict, number: int) -> bool:
        """Print the end of a final record's text; False when no delta of it came (decode it instead)."""
        key = self.key(record)
        if key == self.open:
            self.open = None
            self.sink.write("\n")
        elif key in self.held:
            if self.open is not None:
                raise InputError(
                    "the stream mixes the deltas of two records",
                    "decode --text-only reads each record's deltas together, as `llmcli generate --stream` writes them; use the JSONL output",
                    line=number,
                )
            self.sink.write("".join(self.held.pop(key)) + "\n")
        elif self.open is not None:
            raise InputError(
                "a record ends while another one's text is still being printed",
                "decode --text-only reads each record's deltas together, as `llmcli generate --stream` writes them; use the JSONL output",
                line=number,
            )
        else:
            return False
        self.sink.flush()
        return True
