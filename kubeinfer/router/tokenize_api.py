"""vLLM's tokenizer endpoints over a Router's models, with vLLM's shapes: ``POST /tokenize`` (a
prompt, or chat messages through the model's template), ``POST /detokenize`` and ``GET
/tokenizer_info``. lm-eval's ``local-completions`` looks for them (its ``tokenizer_backend=auto``)
and then needs no local copy of the model's tokenizer.

The same bounds as a generate request's input (``Router.check_input``: the prompt's characters,
valid Unicode, the messages' shape) and no context check: a client tokenizes text to find out how
long it is (``count`` beside ``max_model_len``). Tokenizing runs on a thread, as the request path's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from kubeinfer.router.router import Router
from kubeinfer.router.types import Code, RouterError
from kubeinfer.worker.tokenizer import ChatTemplate


class TokenizeRequest(BaseModel):
    """One of ``prompt`` or ``messages`` (rendered as a chat request's are: ChatTemplate's fields).
    ``add_special_tokens`` defaults as vLLM's does: on for a prompt, off for messages (the chat
    template writes its own)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, router: Router) -> None:
    """Adds the three endpoints to ``app`` (the OpenAI app over ``router``, whose error handlers
    turn a RouterError into its status and JSON body)."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served, _ = router.check_input(body.model, body.prompt, None, body.messages)
        tokenizer = served.tokenizer
        text = body.prompt
        if body.messages is not None:
            try:
                template = ChatTemplate(add_generation_prompt=body.add_generation_prompt,
                                        continue_final_message=body.continue_final_message,
                                        kwargs=body.chat_template_kwargs)
            except ValueError as e:
                raise RouterError(Code.INVALID_ARGUMENT, str(e)) from None
            text = router.render_chat(served, body.messages, template)
        special = body.add_special_tokens if body.add_special_tokens is not None else body.messages is None
        ids = await asyncio.to_thread(tokenizer.encode, text, special)
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids,
                "token_strs": [tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served = router.model(body.model)
        if any(not 0 <= t < served.vocab_size for t in body.tokens):
            raise RouterError(Code.INVALID_ARGUMENT, f"tokens must be integers in [0, {served.vocab_size})")
        text = await asyncio.to_thread(served.tokenizer.decode, body.tokens, False)
        return {"prompt": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        served = router.model(model)
        tokenizer = served.tokenizer
        # A checkpoint may name its special tokens only by id (config.json): their text then.
        bos = tokenizer.bos_token or (tokenizer.id_to_token(tokenizer.bos_token_id)
                                      if tokenizer.bos_token_id is not None else None)
        eos = tokenizer.eos_token or (tokenizer.id_to_token(tokenizer.eos_token_ids[0])
                                      if tokenizer.eos_token_ids else None)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                "eos_token": eos, "pad_token": None, "add_bos_token": tokenizer.add_bos,
                "chat_template": tokenizer.chat_template, "model_max_length": served.max_model_len,
                "vocab_size": served.vocab_size}
