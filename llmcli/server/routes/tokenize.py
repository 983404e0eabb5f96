"""POST /tokenize and /detokenize, in vLLM's shapes, for the text model or the embedding model."""

from __future__ import annotations

from fastapi import APIRouter

from llmcli.errors import LlmcliError
from llmcli.server.errors import ApiError, api_error_from
from llmcli.server.plan import chat_messages
from llmcli.server.schemas import DetokenizeRequest, TokenizeRequest
from llmcli.server.state import State

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State):
    state.check_model(body.model)
    tokenizer, context = await state.tokenizer_for(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of `prompt` and `messages`", "invalid_request_error", "prompt")
    if body.messages is not None:
        if not tokenizer.chat_template:
            raise ApiError(400, f"model {state.model_name} has no chat template", "invalid_request_error", "messages")
        try:
            _, encoding = tokenizer.encode_chat(chat_messages(body.messages), add_generation_prompt=body.add_generation_prompt, parse_special=body.parse_special)
        except LlmcliError as exc:
            raise api_error_from(exc, "messages") from None
        ids = encoding.ids
    else:
        ids = list(tokenizer.encode(body.prompt, add_special=body.add_special_tokens).ids)
    return {"count": len(ids), "max_model_len": context, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State):
    state.check_model(body.model)
    tokenizer, _ = await state.tokenizer_for(body.model)
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "invalid_request_error", "tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}
