"""Text <-> token ids, and the chat template, over a `tokenizers.Tokenizer` backend."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import tokenizers

from kubeinfer.worker.models.config import CheckpointError


# Names the template already receives; a request's extra template variables may not replace them.
_TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"})


@dataclass(frozen=True)
class ChatTemplate:
    """How a chat request's messages are rendered (vLLM's chat extras): ``tools`` (OpenAI's list,
    handed to the template as transformers does), ``add_generation_prompt`` (open the assistant's
    turn), ``continue_final_message`` (leave the final assistant message open, so the reply
    continues it; excludes ``add_generation_prompt``) and ``kwargs`` (more template variables, such
    as Qwen3's ``enable_thinking``). Invariant once constructed: the two flags are not both set and
    ``kwargs`` replaces none of the template's own names."""

    tools: list[dict] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.kwargs is not None and not isinstance(self.kwargs, dict):
            raise ValueError("chat_template_kwargs must be an object")
        taken = sorted(_TEMPLATE_NAMES & set(self.kwargs or {}))
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)} (the request's own fields do)")


class Tokenizer:
    """Owns a `tokenizers` backend plus the special-token facts the engine needs.

    ``eos_token_ids`` is every id that ends generation (the model's EOS plus, for chat models, the
    end-of-turn token). ``add_bos`` says whether ``encode`` prepends ``bos_token_id``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], chat_template: str | None = None, add_bos: bool = False,
                 bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = None
        if chat_template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = _tojson  # transformers' (jinja's own escapes <, > and & for HTML)
            self._template = env.from_string(chat_template)

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` and ``generation_config.json`` if present)."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise CheckpointError(f"{path}: no tokenizer.json (a Hugging Face fast tokenizer is required)")
        backend = tokenizers.Tokenizer.from_file(tok_file)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        model_cfg = _read_json(os.path.join(path, "config.json"))
        gen_cfg = _read_json(os.path.join(path, "generation_config.json"))

        def token_str(v):
            return v.get("content") if isinstance(v, dict) else v

        bos_token = token_str(cfg.get("bos_token"))
        eos_token = token_str(cfg.get("eos_token"))
        bos_id = backend.token_to_id(bos_token) if bos_token else model_cfg.get("bos_token_id")
        eos_ids: list[int] = []
        for source in (gen_cfg.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos_ids += source if isinstance(source, list) else ([source] if source is not None else [])
        if eos_token and backend.token_to_id(eos_token) is not None:
            eos_ids.append(backend.token_to_id(eos_token))
        template = cfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # Usually the backend's post-processor adds BOS; `add_bos_token` covers tokenizers without one
        # (encode never doubles a BOS that is already there).
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids, chat_template=template,
                   add_bos=bool(cfg.get("add_bos_token", False)), bos_token=bos_token, eos_token=eos_token)

    def save(self, path: str) -> None:
        """Write tokenizer.json + tokenizer_config.json so ``from_hf_dir`` rebuilds this tokenizer."""
        self.backend.save(os.path.join(path, "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos,
               "chat_template": self.chat_template}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it throughout): a long prompt tokenized on a
        # thread then leaves the router's event loop free.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], options: ChatTemplate | None = None) -> str:
        """Render ``messages`` ([{role, content}, ...]) with the model's chat template, as ``options``
        say (default: a generation prompt, no tools). Tools (OpenAI's ``[{"type": "function",
        "function": {...}}]``) are handed to the template as ``tools``, as transformers does (a
        template that ignores them renders none); ``continue_final_message`` ends the text where the
        final message's content ends, as transformers does."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each chat message needs a 'role' and a 'content'")
        options = options or ChatTemplate()
        text = self._template.render(**(options.kwargs or {}), messages=messages,
                                     add_generation_prompt=options.add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     tools=options.tools)
        if not options.continue_final_message:
            return text
        final = messages[-1]["content"].strip() if messages[-1]["role"] == "assistant" else ""
        if not final or final not in text:
            raise ValueError("continue_final_message needs a final assistant message with content the template keeps")
        return text[:text.rindex(final) + len(final)]


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
