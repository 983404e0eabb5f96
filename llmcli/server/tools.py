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

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

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


def _call(name: str, arguments: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _one_call(text: str, plan: ToolPlan) -> dict | None:
    """The call a JSON text describes, if it names one of the tools and has object arguments."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    arguments = data.get("parameters" if plan.syntax == "llama3_json" and "parameters" in data else "arguments")
    if not isinstance(data.get("name"), str) or not isinstance(arguments, dict) or data["name"] not in {t.name for t in plan.tools}:
        return None
    return _call(data["name"], arguments)


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(the content left, the calls) of a whole answer; text that is no valid call stays content."""
    if plan.syntax == "llama3_json":
        call = _one_call(text.strip(), plan)
        return (None, [call]) if call else (text, [])
    calls, rest, last = [], [], 0
    for match in _HERMES_BLOCK.finditer(text):
        call = _one_call(match.group(1), plan)
        if call is None:
            continue
        rest.append(text[last : match.start()])
        calls.append(call)
        last = match.end()
    rest.append(text[last:])
    content = "".join(rest).strip() if calls else text
    return (content or None), calls


class ToolStream:
    """A streamed answer as OpenAI deltas: content as it comes (held back while it may be the start
    of a call), each call as two deltas (id, type and name; then its arguments) once it is complete."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.buffer = ""
        self.in_call = False
        self.calls = 0
        self.seen_content = False

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        if self.plan.syntax == "llama3_json":
            # the whole answer is one call or plain text: decided by its first character
            stripped = self.buffer.lstrip()
            if stripped and not stripped.startswith("{"):
                return self._content(self._take(len(self.buffer)))
            return []
        out: list[dict] = []
        while True:
            if not self.in_call:
                at = self.buffer.find(HERMES_OPEN)
                if at < 0:
                    keep = _held(self.buffer, HERMES_OPEN)
                    out += self._content(self._take(len(self.buffer) - keep))
                    return out
                out += self._content(self._take(at))
                self.in_call = True
            end = self.buffer.find(HERMES_CLOSE)
            if end < 0:
                return out
            block = self._take(end + len(HERMES_CLOSE))
            match = _HERMES_BLOCK.fullmatch(block.strip())
            call = _one_call(match.group(1), self.plan) if match else None
            out += self._call_deltas(call) if call else self._content(block)
            self.in_call = False

    def finish(self) -> list[dict]:
        """Whatever is left: a last call, or the text as content."""
        rest, self.buffer = self.buffer, ""
        if not rest:
            return []
        if self.plan.syntax == "llama3_json":
            call = _one_call(rest.strip(), self.plan)
            return self._call_deltas(call) if call else self._content(rest)
        return self._content(rest)

    def _take(self, n: int) -> str:
        piece, self.buffer = self.buffer[:n], self.buffer[n:]
        return piece

    def _content(self, text: str) -> list[dict]:
        if not text or (not self.seen_content and not text.strip()):
            return []  # whitespace before a call is not content
        self.seen_content = True
        return [{"content": text}]

    def _call_deltas(self, call: dict) -> list[dict]:
        index, self.calls = self.calls, self.calls + 1
        head = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}]


def _held(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
