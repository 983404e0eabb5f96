"""POST /v1/chat/completions: messages rendered with the model's chat template, optionally streamed;
response_format constrains the reply, tools are rendered, forced and parsed by server/tools.py."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmcli.errors import LlmcliError
from llmcli.server.errors import ApiError, api_error_from
from llmcli.server.openai_format import SSE_HEADERS, Frame, chat_logprobs, finish_reason, new_tokens, sse_stream
from llmcli.server.plan import Plan, chat_messages, make_plan, request_grammar
from llmcli.server.schemas import ChatCompletionRequest
from llmcli.server.state import State
from llmcli.server.tools import ToolPlan, ToolStream, parse_tool_calls, read_tools, template_messages

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    state.check_model(body.model, "generate")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request_error", "top_logprobs")
    service = state.require_service()
    tokenizer = service.engine.tokenizer
    if not tokenizer.chat_template:
        raise ApiError(400, f"model {state.model_name} has no chat template", "invalid_request_error", "messages", None)
    tools = read_tools(body.tools, body.tool_choice, tokenizer.chat_template)
    messages, template_tools = template_messages(chat_messages(body.messages), tools)
    try:
        # the template already holds any BOS it wants (as transformers' apply_chat_template(tokenize=True))
        rendered, encoding = tokenizer.encode_chat(messages, add_generation_prompt=True, parse_special=body.parse_special, **({"tools": template_tools} if template_tools else {}))
    except LlmcliError as exc:
        raise api_error_from(exc, "messages") from None
    grammar = await request_grammar(state, body.response_format, tools.grammar if tools else None)
    plan = make_plan(state, body, [encoding.ids], [rendered], False, cap_to_context=True, grammar=grammar)
    plan.submit()
    parsing = tools if tools is not None and tools.parses else None
    if body.stream:
        frame = Frame("chat.completion.chunk", state.model_name, plan.include_usage)
        stream = sse_stream(frame, _stream_choices(plan, body, request, parsing), plan.usage, plan.release)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    await plan.collect(request)
    out = []
    for choice in plan.choices.values():
        message: dict = {"role": "assistant", "content": choice.text}
        reason = finish_reason(choice.finish_reason)
        if parsing is not None:
            content, calls = parse_tool_calls(choice.text, parsing)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        out.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": chat_logprobs(choice.logprobs or [], plan.token_text) if body.logprobs else None,
                "finish_reason": reason,
            }
        )
    return Frame("chat.completion", state.model_name).payload(out, plan.usage())


async def _stream_choices(plan: Plan, body: ChatCompletionRequest, request: Request, tools: ToolPlan | None) -> AsyncIterator[list[dict]]:
    # the role first, as OpenAI does, so a client can open the message before any text
    yield [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for c in plan.choices.values()]
    parsers = {c.index: ToolStream(tools) for c in plan.choices.values()} if tools is not None else {}
    async for event in plan.follow(request):
        choice = plan.choices[id(event.request)]
        choice.pieces.append(event.text)
        lp = None
        if body.logprobs:
            _ids, entries = new_tokens(choice, event)
            if entries:
                lp = chat_logprobs(entries, plan.token_text)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            choice.generated_ids = list(event.generated_ids)
        parser = parsers.get(choice.index)
        if parser is None:
            if event.text or lp is not None:
                yield [{"index": choice.index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}]
        else:
            # content as it comes, each tool call as its head and then its arguments as written (the logprobs ride on the first delta)
            deltas = parser.feed(event.text) + (parser.finish() if event.finish_reason is not None else [])
            for n, delta in enumerate(deltas or ([{"content": ""}] if lp is not None else [])):
                yield [{"index": choice.index, "delta": delta, "logprobs": lp if n == 0 else None, "finish_reason": None}]
        if event.finish_reason is not None:
            reason = finish_reason(event.finish_reason)
            if parser is not None and parser.calls and reason == "stop":
                reason = "tool_calls"
            yield [{"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": reason}]
