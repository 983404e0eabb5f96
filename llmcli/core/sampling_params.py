"""The sampling parameters, without torch: `SamplingParams` and the knobs it declares.

A field with `knob(...)` metadata is a sampling knob: declared here once, it becomes a flag of
`generate` and `chat` (cli/options.py's `sampling_options`), a field of the server's requests with
its API range and default (server/schemas.py), and a setting the batcher reads (`plain_greedy`).
Kept free of torch so that `--help` and the CLI's option building stay fast; llmcli.core.sampling
re-exports everything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmcli.errors import UsageError

# OpenAI's documented ranges; vLLM clamps logit_bias to the same +-100.
LOGIT_BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0
# JSON has no -Infinity; vLLM's OpenAI server reports a filtered-out token's logprob as this.
MIN_LOGPROB = -9999.0
# The most alternatives a logprobs entry lists: OpenAI's cap (top_logprobs <= 20), for the CLI and the server.
MAX_LOGPROBS = 20

# ---------------------------------------------------------------- parameters


def knob(help: str, cli: str | None = None, api_default: Any = None, keeps_argmax: bool = False, **bounds: float) -> dict:
    """The metadata that makes a SamplingParams field a sampling knob: declared here once, it becomes
    a flag of `generate` and `chat` (cli/options.py) and a field of the server's requests
    (server/schemas.py), so a new knob is one new field.

    help: the flag's help; cli: the flag's value type when it is not the field's (logit_bias is
    written TOKEN:BIAS); api_default: what a request that leaves the field out gets (None: the
    field's default); keeps_argmax: greedy decoding picks the raw argmax whatever its value (a
    filter that always keeps the top token), so the batcher may skip the sampling path;
    bounds: the API's range (ge, gt, le), checked by the request schema.
    """
    return {"knob": True, "help": help, "cli": cli, "api_default": api_default, "keeps_argmax": keeps_argmax, "bounds": bounds}


@dataclass
class SamplingParams:
    """One request's sampling settings; the defaults switch every filter off (greedy decoding).

    repetition_penalty has HF semantics (over prompt and generated tokens, divides a positive
    logit, multiplies a negative one); presence_penalty and frequency_penalty have OpenAI
    semantics (subtracted, over generated tokens only). logit_bias maps token id -> added bias.
    logprobs: None = not reported, k = the chosen token's logprob and k top alternatives.

    The fields with `knob(...)` metadata are the sampling knobs that the CLI and the server
    expose under the same names (see `knobs()`); logprobs is shaped differently by each API.
    """

    temperature: float = field(default=0.0, metadata=knob("0 = greedy.", api_default=1.0, keeps_argmax=True, ge=0, le=2))  # OpenAI's default is 1
    top_k: int = field(default=0, metadata=knob("Keep the k most likely tokens (0 = off).", keeps_argmax=True, ge=0))
    top_p: float = field(default=1.0, metadata=knob("Nucleus sampling mass (1 = off).", keeps_argmax=True, gt=0, le=1))
    min_p: float = field(default=0.0, metadata=knob("Drop tokens below min_p x the top probability (0 = off).", keeps_argmax=True, ge=0, le=1))
    repetition_penalty: float = field(default=1.0, metadata=knob("HF repetition penalty over prompt and output (1 = off).", gt=0))
    presence_penalty: float = field(default=0.0, metadata=knob("OpenAI presence penalty over the output.", ge=-PENALTY_LIMIT, le=PENALTY_LIMIT))
    frequency_penalty: float = field(default=0.0, metadata=knob("OpenAI frequency penalty over the output.", ge=-PENALTY_LIMIT, le=PENALTY_LIMIT))
    logit_bias: dict[int, float] = field(default_factory=dict, metadata=knob("TOKEN_ID:BIAS, repeatable, or a JSON object.", cli="list"))
    seed: int | None = field(default=None, metadata=knob("Seed: each record (or chat session) samples from its own stream derived from seed and id.", keeps_argmax=True))
    logprobs: int | None = None

    @staticmethod
    def knobs() -> list:
        """The dataclass fields that are sampling knobs, in declaration order."""
        return [f for f in dataclasses.fields(SamplingParams) if f.metadata.get("knob")]

    @staticmethod
    def knob_default(f) -> Any:
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def plain_greedy(self) -> bool:
        """Greedy, and every knob that could move the argmax (bias, penalties) at its neutral value: the chosen token is the raw argmax."""
        return self.greedy and all(getattr(self, f.name) == self.knob_default(f) for f in self.knobs() if not f.metadata["keeps_argmax"])

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise UsageError (with the fix) for any out-of-range value; normalises logit_bias keys to int."""
        _check_number("temperature", self.temperature, "use 0 for greedy decoding or a positive value such as 0.7")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}", "use 0 for greedy decoding or a positive value such as 0.7")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UsageError(f"top_k must be a whole number >= 0, got {self.top_k!r}", "use 0 to switch top-k off, or e.g. 40")
        _check_number("top_p", self.top_p, "use a value in (0, 1], e.g. 0.9; 1 switches top-p off")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", "use a value in (0, 1], e.g. 0.9; 1 switches top-p off")
        _check_number("min_p", self.min_p, "use a value in [0, 1], e.g. 0.05; 0 switches min-p off")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p}", "use a value in [0, 1], e.g. 0.05; 0 switches min-p off")
        _check_number("repetition_penalty", self.repetition_penalty, "use a positive value; 1 is off, 1.1-1.3 is typical")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "use a positive value; 1 is off, 1.1-1.3 is typical")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value, f"use a value in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]; 0 is off")
            if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise UsageError(f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {value}", "the OpenAI range; 0 is off")
        self.logit_bias = _normalise_bias(self.logit_bias)
        if self.seed is not None and not _is_int(self.seed):
            raise UsageError(f"seed must be a whole number, got {self.seed!r}", "give an integer such as 42, or no seed")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise UsageError(
                f"logprobs must be a whole number from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}",
                f"use 0 for the chosen token only, or up to {MAX_LOGPROBS} alternatives (the server's and OpenAI's cap)",
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}", hint)


def _normalise_bias(bias: Any) -> dict[int, float]:
    # JSON objects (OpenAI's logit_bias) arrive with string keys: {"42": -100}
    hint = 'give token ids and biases in [-100, 100], e.g. {"42": -100}'
    if not isinstance(bias, Mapping):
        raise UsageError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}", hint)
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            token = None
        if token is None or token < 0:
            raise UsageError(f"logit_bias key {key!r} is not a token id", hint)
        _check_number(f"logit_bias[{key}]", value, hint)
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise UsageError(f"logit_bias[{key}] = {value} is outside [-100, 100]", "-100 bans a token, +100 all but forces it")
        out[token] = float(value)
    return out
