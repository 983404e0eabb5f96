"""POST /v1/completions: text in (strings or token ids), text out, optionally streamed."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmcli.server.errors import ApiError
from llmcli.server.openai_format import SSE_HEADERS, Frame, finish_reason, legacy_logprobs, new_tokens, sse_stream
from llmcli.server.plan import Plan, make_plan, request_grammar
from llmcli.server.schemas import CompletionRequest, as_items
from llmcli.server.state import State

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    state.check_model(body.model, "generate")
    if body.suffix:
        raise ApiError(400, "suffix (insertion) is not supported", "invalid_request_error", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (leave it unset or equal to n)", "invalid_request_error", "best_of")
    service = state.require_service()
    tokenizer = service.engine.tokenizer
    raw = as_items(body.prompt)
    if not raw:
        raise ApiError(400, "the prompt list is empty", "invalid_request_error", "prompt")
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            prompts.append(list(tokenizer.encode(p).ids))
            texts.append(p)
        else:
            prompts.append(list(p))
            texts.append(None)
    grammar = await request_grammar(state, body.response_format)
    plan = make_plan(state, body, prompts, texts, body.echo, cap_to_context=False, grammar=grammar)
    for i, t in enumerate(plan.prompt_texts):
        if t is None:
            try:
                plan.prompt_texts[i] = tokenizer.decode(prompts[i], skip_special_tokens=False)
            except Exception:  # noqa: BLE001 - ids were range-checked; a decoder quirk must not fail the call
                plan.prompt_texts[i] = ""
    plan.submit()
    frame = Frame("text_completion", state.model_name, plan.include_usage)
    if body.stream:
        stream = sse_stream(frame, _stream_choices(plan, body, request), plan.usage, plan.release)
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    await plan.collect(request)
    out = []
    for choice in plan.choices.values():
        p = choice.request.sample_index // body.n
        text = (plan.prompt_texts[p] if body.echo else "") + choice.text
        lp = None
        if body.logprobs is not None:
            gen = legacy_logprobs(choice.logprobs or [], choice.generated_ids, plan.token_text, len(plan.prompt_texts[p]) if body.echo else 0)
            if body.echo:
                head = legacy_logprobs(choice.prompt_logprobs or [None] * len(prompts[p]), prompts[p], plan.token_text, 0)
                lp = {k: head[k] + gen[k] for k in gen}
            else:
                lp = gen
        out.append({"index": choice.index, "text": text, "logprobs": lp, "finish_reason": finish_reason(choice.finish_reason)})
    return frame.payload(out, plan.usage())


async def _stream_choices(plan: Plan, body: CompletionRequest, request: Request) -> AsyncIterator[list[dict]]:
    offsets: dict[int, int] = {}
    async for event in plan.follow(request):
        choice = plan.choices[id(event.request)]
        p = choice.request.sample_index // body.n
        pieces = []
        lp = None
        if choice.index not in offsets:
            offsets[choice.index] = 0
            if body.echo:
                pieces.append(plan.prompt_texts[p])
                if body.logprobs is not None:
                    lp = legacy_logprobs(event.prompt_logprobs or [None] * len(plan.prompts[p]), plan.prompts[p], plan.token_text, 0)
                offsets[choice.index] = len(plan.prompt_texts[p])
        pieces.append(event.text)
        choice.pieces.append(event.text)
        if body.logprobs is not None:
            new_ids, new_entries = new_tokens(choice, event)
            gen = legacy_logprobs(new_entries, new_ids, plan.token_text, offsets[choice.index])
            offsets[choice.index] += sum(len(t) for t in gen["tokens"])
            lp = gen if lp is None else {k: lp[k] + gen[k] for k in gen}
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            choice.generated_ids = list(event.generated_ids)
        text = "".join(pieces)
        if text or lp is not None or event.finish_reason is not None:
            yield [{"index": choice.index, "text": text, "logprobs": lp, "finish_reason": finish_reason(event.finish_reason)}]
