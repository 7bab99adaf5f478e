"""Per-request sampling parameters: torch-free, so the router validates a request's sampling
without a tensor library; the engine's sampler (kubeinfer.worker.sampling) reads them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token in effect, 100 forces it


@dataclass
class StructuredOutputParams:
    """One request's output constraint (vLLM's guided decoding): exactly one of a JSON schema
    (``json``), any JSON object (``json_object``, OpenAI's ``response_format: json_object``), a
    regular expression, a list of choices, or an EBNF grammar (xgrammar's dialect).

    Invariant once constructed: exactly one kind is set; ``json`` is the schema as a JSON text (a
    dict is serialised as given: its key order is the order of the output's properties); ``choice``
    is a non-empty list of strings. Whether the text compiles is the grammar engine's to say
    (kubeinfer.worker.structured_output), not this torch-free class's.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json, ensure_ascii=False)  # key order kept: it is the output's order
        _check(self.json is None or isinstance(self.json, str), "structured_output.json",
               "a JSON schema (an object, or its JSON text)", self.json)
        _check(self.regex is None or isinstance(self.regex, str), "structured_output.regex", "a string", self.regex)
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()),
               "structured_output.grammar", "a non-empty EBNF string", self.grammar)
        if self.choice is not None:
            _check(isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                   and all(isinstance(c, str) for c in self.choice),
                   "structured_output.choice", "a non-empty list of strings", self.choice)
            self.choice = list(self.choice)
        _check(isinstance(self.json_object, bool), "structured_output.json_object", "a boolean", self.json_object)
        kinds = [k for k, v in self._kinds() if v]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one structured-output constraint (json, regex, choice, grammar or "
                             f"json_object), got {', '.join(kinds) or 'none'}")

    def _kinds(self) -> list[tuple[str, bool]]:
        return [("json", self.json is not None), ("regex", self.regex is not None),
                ("choice", self.choice is not None), ("grammar", self.grammar is not None),
                ("json_object", self.json_object)]

    @property
    def kind(self) -> str:
        return next(k for k, v in self._kinds() if v)

    def key(self) -> tuple[str, str]:
        """(kind, text): equal keys compile to the same grammar."""
        kind = self.kind
        text = {"json": self.json, "regex": self.regex, "grammar": self.grammar, "json_object": "",
                "choice": json.dumps(self.choice, ensure_ascii=False)}[kind]
        return kind, text


@dataclass
class SamplingParams:
    """One request's decoding settings, with vLLM's names, defaults and meanings.

    Invariant: every field is in range once constructed (``__post_init__`` raises ``ValueError``
    naming the field otherwise); ``stop`` is always a list of non-empty strings and ``top_k`` is 0
    when disabled (-1 is accepted as vLLM's older spelling of "disabled"); ``structured_output``
    is None or a StructuredOutputParams (a dict of its fields is converted).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # vLLM's extension: the logprob of every prompt token after the first (and of the k most likely
    # tokens at each position), computed in the prefill pass; such a request skips the prefix cache.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    # A grammar the output must match (the engine masks the logits of every other token).
    structured_output: StructuredOutputParams | None = None
    # OpenAI's logit_bias: token id -> a value added to that token's logit before sampling (and to
    # the logits the returned logprobs are computed from), after penalties, as vLLM applies it.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and (self.top_k >= 1 or self.top_k in (0, -1)), "top_k",
               "0 or -1 (disabled) or an integer >= 1", self.top_k)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", "> 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(self.seed is None or _is_int(self.seed), "seed", "None or an integer", self.seed)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "integers >= 0", self.stop_token_ids)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.prompt_logprobs)
        _check(_is_int(self.priority), "priority", "an integer", self.priority)
        if isinstance(self.structured_output, dict):  # the shape it travels in from the router
            self.structured_output = StructuredOutputParams(**self.structured_output)
        _check(self.structured_output is None or isinstance(self.structured_output, StructuredOutputParams),
               "structured_output", "None or a StructuredOutputParams", self.structured_output)
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", "a map of token ids to numbers", self.logit_bias)
            # Keys arrive as strings from JSON: token ids written in decimal are taken as such.
            bias = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in self.logit_bias.items()}
            low, high = LOGIT_BIAS_RANGE
            for k, v in bias.items():  # the first bad entry named, not the whole map
                _check(_is_int(k) and k >= 0, "logit_bias", "keyed by token ids (integers >= 0)", k)
                _check(_is_num(v) and low <= v <= high, f"logit_bias[{k}]", f"in [{low:g}, {high:g}]", v)
            self.logit_bias = {k: float(v) for k, v in bias.items()} or None
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
