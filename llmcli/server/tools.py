"""Tool calls for /v1/chat/completions: the tools in the prompt, the grammar that forces a call, and
the calls parsed back out of the text (whole, or as stream deltas), in OpenAI's shapes.

The call syntax depends on the chat template (docs/structured.md lists them):

- `hermes`: templates that write `<tool_call>` (Qwen2.5, Qwen3, Hermes): the model answers
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call.
- `llama3_json`: templates that take `tools` without `<tool_call>` (Llama 3.1/3.2): the whole
  answer is one `{"name": ..., "parameters": {...}}` object.
- `fallback`: templates that ignore `tools` (SmolLM2, Gemma 3, Phi-3.5): the tools are described
  in the system message, in Qwen's words and the hermes syntax, which is then parsed the same way;
  earlier assistant calls and tool results are written into the turns as `<tool_call>` and
  `<tool_response>` blocks.

tool_choice `auto` leaves the model free and parses whatever calls it writes; `required` and a
named function constrain the output to one call whose arguments match the tool's `parameters`
schema; `none` leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmcli.core import constrained
from llmcli.core.constrained import Grammar
from llmcli.errors import UsageError
from llmcli.server.errors import ApiError
from llmcli.server.json_prefix import JsonPrefix

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"

FALLBACK_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


@dataclass
class Tool:
    name: str
    spec: dict  # {"type": "function", "function": {...}} as the client sent it (what templates render)
    parameters: dict


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice mean for this template."""

    tools: list[Tool]
    syntax: str  # "hermes" | "llama3_json" | "fallback"
    choice: str  # "auto" | "required" | "none" | a function's name
    grammar: Grammar | None = None  # set when a call is forced

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def template_syntax(template: str | None) -> str:
    """The tool-call syntax a chat template teaches its model (see the module docstring)."""
    if not template or "tools" not in template:
        return "fallback"
    return "hermes" if HERMES_OPEN in template else "llama3_json"


def read_tools(tools: list[Any] | None, tool_choice: Any, template: str | None) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (400 naming the field) and plan the prompt, the grammar and the parsing."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None
    out: list[Tool] = []
    for i, spec in enumerate(tools):
        fn = spec.get("function") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}", f"tools.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -, got {name!r}", f"tools.{i}.function.name")
        if any(t.name == name for t in out):
            raise _bad(f"tools[{i}]: two tools are named {name!r}", f"tools.{i}.function.name")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        try:
            constrained.json_schema_grammar(parameters, f"tools[{i}].function.parameters")  # a bad schema is refused here, before any token
        except UsageError as exc:
            raise _bad(str(exc), f"tools.{i}.function.parameters") from None
        out.append(Tool(name, spec, parameters))
    choice = _read_choice(tool_choice, [t.name for t in out])
    plan = ToolPlan(out, template_syntax(template), choice)
    if choice not in ("auto", "none"):
        forced = out if choice == "required" else [t for t in out if t.name == choice]
        plan.grammar = call_grammar(forced, plan.syntax)
    return plan


def _read_choice(tool_choice: Any, names: list[str]) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "none", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise _bad(f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(names)})", "tool_choice")
        return name
    raise _bad('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}', "tool_choice")


def call_grammar(tools: list[Tool], syntax: str) -> Grammar:
    """A grammar for exactly one call of one of `tools`, its arguments valid under the tool's parameters.

    One call, not several: a forced answer then ends as soon as its call is complete (OpenAI may
    return several calls for `required`; clients loop on tool calls either way)."""
    arguments_key = "parameters" if syntax == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"anyOf": options, "x-guidance": constrained.JSON_OPTIONS} if len(options) > 1 else {**options[0], "x-guidance": constrained.JSON_OPTIONS}
    body = "%json " + json.dumps(schema)
    if syntax == "llama3_json":
        lark = f"start: {body}\n"
    else:
        lark = f'start: "<tool_call>\\n" {body} "\\n</tool_call>"\n'
    return constrained.lark_grammar(lark, "tools")


# ---------------------------------------------------------------- the prompt


def template_messages(messages: list[dict], plan: ToolPlan | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and `tools` to render: the template's own tool support, or the fallback's text."""
    if plan is None or plan.choice == "none":
        return [_plain_turn(m) for m in messages], None
    specs = [t.spec for t in plan.tools]
    if plan.syntax != "fallback":
        return [_structured_turn(m) for m in messages], specs
    description = FALLBACK_PROMPT.format(tools="".join("\n" + json.dumps(s, ensure_ascii=False) for s in specs))
    out = [_plain_turn(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{description}" if out[0]["content"] else description}
    else:
        out.insert(0, {"role": "system", "content": description})
    return out, None


def _arguments(call: dict) -> Any:
    args = call.get("function", {}).get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _structured_turn(m: dict) -> dict:
    """A message for a template that renders tool calls itself: arguments as objects, as HF templates expect."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id"), "type": "function", "function": {"name": c.get("function", {}).get("name"), "arguments": _arguments(c)}} for c in m["tool_calls"]
        ]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _plain_turn(m: dict) -> dict:
    """A message for a template that knows only text turns: calls and results written as hermes blocks."""
    content = m.get("content") or ""
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    if m.get("tool_calls"):
        blocks = [
            HERMES_OPEN + "\n" + json.dumps({"name": c.get("function", {}).get("name"), "arguments": _arguments(c)}, ensure_ascii=False) + "\n" + HERMES_CLOSE
            for c in m["tool_calls"]
        ]
        content = "\n".join(([content] if content else []) + blocks)
    return {"role": m["role"], "content": content}


# ---------------------------------------------------------------- the answer


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _call_so_far(scan: JsonPrefix, plan: ToolPlan) -> tuple[str | None, tuple[str, int, int | None] | None] | None:
    """What a (partly written) call object says so far: (its tool's name once read, its arguments
    object's key, start and end once begun), or None when it cannot become a call of one of the tools."""
    if scan.broken or scan.duplicate or (scan.start is not None and scan.text[scan.start] != "{"):
        return None
    name = None
    if "name" in scan.members:
        start, end = scan.members["name"]
        name = json.loads(scan.text[start:end])
        if not isinstance(name, str) or name not in {t.name for t in plan.tools}:
            return None
    keys = ("parameters", "arguments") if plan.syntax == "llama3_json" else ("arguments",)
    spans = [(key, *span) for key in keys if (span := scan.span(key)) is not None]
    if len(spans) > 1 or (spans and scan.text[spans[0][1]] != "{"):
        return None  # both "parameters" and "arguments" is no call either: which would it be?
    arguments = spans[0] if spans else None
    if scan.done and (name is None or arguments is None):
        return None
    return name, arguments


def _one_call(text: str, plan: ToolPlan) -> tuple[dict, int] | None:
    """The call that the JSON object at the start of `text` describes, if it names one of the tools
    and has object arguments, and where that object ends.

    The arguments are the model's own text of the object, not json.dumps of it, so that a stream
    can send them while they are written (ToolStream) and its pieces add up to this same string;
    a re-serialisation could only be sent once the object is whole (json.dumps writes numbers and
    escapes its own way)."""
    scan = JsonPrefix()
    end = scan.feed(text)
    parts = _call_so_far(scan, plan) if scan.done else None
    if parts is None:
        return None
    try:
        json.loads(scan.text, parse_constant=_refuse_constant)  # the scanner shapes the call; json, independently, checks it is JSON
    except ValueError:
        return None
    name, (_key, start, stop) = parts
    return _call(name, scan.text[start:stop]), end


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(the content left, the calls) of a whole answer; text that is no valid call stays content.

    A hermes block is read as ToolStream reads it, the JSON first and then `</tool_call>`, so a
    `</tool_call>` inside a JSON string does not end it (a regex up to the first one would)."""
    if plan.syntax == "llama3_json":
        answer = text.lstrip()
        found = _one_call(answer, plan)
        return (None, [found[0]]) if found and not answer[found[1] :].strip() else (text, [])
    calls, rest, last, at = [], [], 0, text.find(HERMES_OPEN)
    while at >= 0:
        body = at + len(HERMES_OPEN)
        found = _one_call(text[body:], plan)
        after = text[body + found[1] :].lstrip() if found else ""
        if found and after.startswith(HERMES_CLOSE):
            rest.append(text[last:at])
            calls.append(found[0])
            last = len(text) - len(after) + len(HERMES_CLOSE)
            at = text.find(HERMES_OPEN, last)
        else:
            at = text.find(HERMES_OPEN, body)  # no call: the block stays content, a later <tool_call> may still be one
    rest.append(text[last:])
    content = "".join(rest).strip() if calls else text
    return (content or None), calls


@dataclass
class _StreamedCall:
    opening: str  # the text before the JSON ("<tool_call>" for hermes), content again if this is no call
    scan: JsonPrefix
    index: int | None = None  # set once the head went out
    key: str = ""  # the member that holds the arguments ("arguments", or "parameters" in llama3_json)
    sent: int = 0  # how much of scan.text went out as arguments


class ToolStream:
    """A streamed answer as OpenAI deltas. Content goes out as it comes, held back while it may be
    the start of a call. A call goes out as a head (index, id, type, name, arguments "") as soon
    as its name is read and names one of the tools and its arguments object has begun, then as
    pieces of the arguments' text as the model writes them: all of it but what closing() could
    not yet end (a key without its value, a comma, half a number or escape). The pieces add up to
    parse_tool_calls' `function.arguments` for the same text.

    Text that began like a call and turns out not to be one (an unknown name, arguments that are
    no object, broken JSON) goes out as content if its head has not gone out. Once it has, the
    call stays a call, as in vLLM (whose serving_chat ends a call that the text broke off or cut
    short by sending what its partial-JSON parse needs to close the arguments): the arguments sent
    so far are closed into a JSON object (`JsonPrefix.closing`) and the rest of the block is
    dropped. Only a cut-off answer (finish_reason "length") or an unconstrained model that breaks
    its own JSON gets there; a forced call's grammar writes the whole call.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.buffer = ""
        self.mode = "start" if plan.syntax == "llama3_json" else "text"
        self.call: _StreamedCall | None = None
        self.calls = 0
        self.seen_content = False

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        out: list[dict] = []
        steps = {
            "start": self._start, "content": self._plain, "trailing": self._trailing,  # llama3_json
            "text": self._text, "close": self._close, "skip": self._skip,  # hermes ("skip" also llama3_json)
            "call": self._read_call,
        }  # fmt: skip
        while self.buffer:
            before = (self.mode, len(self.buffer))
            out += steps[self.mode]()
            if (self.mode, len(self.buffer)) == before:
                break  # waiting for more text
        return out

    def finish(self) -> list[dict]:
        """Whatever is left: held text as content, or the end of a call cut short."""
        rest, self.buffer = self.buffer, ""
        call, self.call = self.call, None
        if self.mode == "call" and call is not None:
            if call.index is None:
                return self._content(call.opening + call.scan.text + rest)
            return self._more_arguments(call, closing=True)
        if self.mode in ("start", "content", "text"):
            return self._content(rest)
        return []  # after a whole call ("close", "trailing") or inside a dropped one ("skip")

    # the llama3_json answer: one call, or plain text decided by its first character

    def _start(self) -> list[dict]:
        stripped = self.buffer.lstrip()
        if stripped:
            self.mode = "call" if stripped.startswith("{") else "content"
            self.call = _StreamedCall("", JsonPrefix()) if self.mode == "call" else None
        return []

    def _plain(self) -> list[dict]:
        return self._content(self._take(len(self.buffer)))

    def _trailing(self) -> list[dict]:
        # after the call object only whitespace may follow
        stripped = self.buffer.lstrip()
        self.buffer = stripped
        return self._give_up() if stripped else []

    # hermes: <tool_call> blocks among content

    def _text(self) -> list[dict]:
        at = self.buffer.find(HERMES_OPEN)
        if at < 0:
            return self._content(self._take(len(self.buffer) - _held(self.buffer, HERMES_OPEN)))
        out = self._content(self._take(at))
        self.call = _StreamedCall(self._take(len(HERMES_OPEN)), JsonPrefix())
        self.mode = "call"
        return out

    def _close(self) -> list[dict]:
        # after the call object: whitespace, then </tool_call> (held back until it is whole)
        stripped = self.buffer.lstrip()
        if stripped.startswith(HERMES_CLOSE):
            self.buffer = stripped[len(HERMES_CLOSE) :]
            self.call, self.mode = None, "text"
            return []
        if HERMES_CLOSE.startswith(stripped):
            return []
        return self._give_up()

    def _skip(self) -> list[dict]:
        # the rest of a call dropped after its head went out: up to </tool_call>, or (llama3_json) all of it
        hermes = self.plan.syntax != "llama3_json"
        at = self.buffer.find(HERMES_CLOSE) if hermes else -1
        if at < 0:
            self._take(len(self.buffer) - (_held(self.buffer, HERMES_CLOSE) if hermes else 0))
        else:
            self._take(at + len(HERMES_CLOSE))
            self.mode = "text"
        return []

    # both syntaxes: the call object

    def _read_call(self) -> list[dict]:
        call = self.call
        assert call is not None
        self._take(call.scan.feed(self.buffer))
        parts = _call_so_far(call.scan, self.plan)
        if parts is None:
            return self._give_up()
        name, arguments = parts
        out = []
        if call.index is None and name is not None and arguments is not None:
            call.index, self.calls = self.calls, self.calls + 1
            call.key, call.sent = arguments[0], arguments[1]
            out.append({"tool_calls": [{"index": call.index, **_call(name, "")}]})
        if call.index is not None:
            out += self._more_arguments(call)
        if call.scan.done:
            self.mode = "trailing" if self.plan.syntax == "llama3_json" else "close"
        return out

    def _give_up(self) -> list[dict]:
        """The text is no call (see the class docstring for one whose head went out)."""
        call, self.call = self.call, None
        assert call is not None
        if call.index is None:
            self.mode = "content" if self.plan.syntax == "llama3_json" else "text"
            return self._content(call.opening + call.scan.text)
        self.mode = "skip"
        return self._more_arguments(call, closing=True)

    def _more_arguments(self, call: _StreamedCall, closing: bool = False) -> list[dict]:
        """The arguments' text not yet sent: up to their end, or up to what `closing` (for a call
        the text broke or cut off) or a later character can end."""
        span = call.scan.span(call.key)
        end = span[1] if span is not None and span[1] is not None else None
        piece = call.scan.text[call.sent : end if end is not None else call.scan.safe]
        if end is None and closing:
            piece += call.scan.closing(depth=1)  # the call object itself is depth 0
        call.sent += len(piece)
        return [{"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]}] if piece else []

    def _take(self, n: int) -> str:
        piece, self.buffer = self.buffer[:n], self.buffer[n:]
        return piece

    def _content(self, text: str) -> list[dict]:
        if not text or (not self.seen_content and not text.strip()):
            return []  # whitespace before a call is not content
        self.seen_content = True
        return [{"content": text}]


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
