"""Structured output with xgrammar: a request's StructuredOutputParams become a grammar, compiled
against the engine's vocabulary once per distinct spec, and a per-request matcher that masks the
logits of every token the grammar does not allow next.

Imported only when a request carries a constraint (xgrammar's import pulls in transformers): the
router to validate one, the engine on its first constrained request.
"""

from __future__ import annotations

import functools
import json
import re

import torch
import xgrammar as xgr

from kubeinfer.worker.sampling_params import StructuredOutputParams
from kubeinfer.worker.tokenizer import Tokenizer

# Compact JSON (no whitespace between tokens), as vLLM's `disable_any_whitespace`: with free
# whitespace a weak or confused model can emit blanks until max_tokens and never close the object.
JSON_OPTIONS = {"any_whitespace": False}
# Compiled grammars kept by the compiler's cache; beyond this it evicts the least recently used.
COMPILE_CACHE_BYTES = 256 << 20
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile; the message is the compiler's."""


def _compiler_message(e: Exception) -> str:
    # xgrammar's C++ errors start with "[time] file.cc:line: "; the client needs only the rest.
    return _LOG_PREFIX.sub("", str(e).strip()).strip()


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (JSON string escapes are xgrammar's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _object_schema(spec: StructuredOutputParams) -> tuple[str, bool]:
    """(schema, strict_mode) for a JSON constraint: json_object is any object, so not strict (strict
    mode forbids properties the schema does not name, which would leave only ``{}``)."""
    return (spec.json, True) if spec.json is not None else ('{"type": "object"}', False)


@functools.lru_cache(maxsize=1024)
def _validate(kind: str, text: str) -> None:
    spec = StructuredOutputParams(**({kind: True} if kind == "json_object" else
                                     {kind: json.loads(text) if kind == "choice" else text}))
    try:
        if kind in ("json", "json_object"):
            schema, strict = _object_schema(spec)
            xgr.Grammar.from_json_schema(schema, strict_mode=strict, **JSON_OPTIONS)
        elif kind == "regex":
            xgr.Grammar.from_regex(spec.regex)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(spec.choice))
        else:
            xgr.Grammar.from_ebnf(spec.grammar)
    except Exception as e:  # xgrammar raises RuntimeError (C++) or ValueError/TypeError (Python side)
        raise GrammarError(f"structured output: cannot compile the {kind}: {_compiler_message(e)}") from None


def validate(spec: StructuredOutputParams) -> None:
    """Parse ``spec`` into a grammar without a vocabulary (what the router can do); GrammarError
    with the compiler's message if it does not parse. Results are cached per spec."""
    _validate(*spec.key())


def vocab_type(tokenizer: Tokenizer) -> xgr.VocabType:
    """How the tokenizer spells bytes in its vocabulary, read from its decoder (as xgrammar's
    ``TokenizerInfo.from_huggingface`` does): byte-level BPE (GPT-2's "Ġ"), byte fallback
    (SentencePiece's "<0x0A>"), or raw text."""
    decoder = json.dumps(json.loads(tokenizer.backend.to_str()).get("decoder"))
    if '"ByteLevel"' in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if '"ByteFallback"' in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: the tokens by id (ids the tokenizer lacks, when the model's
    ``vocab_size`` is padded past it, are empty and never allowed) and the ids that end generation."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        encoded[i] = token
    kind = vocab_type(tokenizer)
    add_prefix_space = False
    if kind is xgr.VocabType.BYTE_FALLBACK:  # a SentencePiece-style tokenizer that prepends "▁"
        first = tokenizer.encode("a", add_special_tokens=False)[:1]
        add_prefix_space = bool(first) and (tokenizer.id_to_token(first[0]) or "").startswith("▁")
    return xgr.TokenizerInfo(encoded[:vocab_size], kind, vocab_size=vocab_size,
                             stop_token_ids=list(tokenizer.eos_token_ids), add_prefix_space=add_prefix_space)


class StructuredOutput:
    """The engine's grammar machinery: owns the TokenizerInfo and GrammarCompiler (with its cache:
    one compile per distinct spec) for one model's vocabulary, and the step's bitmask buffer.

    Invariant: ``bitmask`` has a row per sequence the engine may sample at once and
    ``ceil(vocab_size / 32)`` words per row; rows are filled only for constrained sequences and only
    those rows are applied, so an unconstrained row is never masked.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_num_seqs: int) -> None:
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=COMPILE_CACHE_BYTES)
        self.bitmask = xgr.allocate_token_bitmask(max_num_seqs, vocab_size)

    def compile(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        """The compiled grammar for ``spec`` (from the compiler's cache after the first time);
        GrammarError if it does not compile."""
        try:
            if spec.json is not None or spec.json_object:
                schema, strict = _object_schema(spec)
                return self.compiler.compile_json_schema(schema, strict_mode=strict, **JSON_OPTIONS)
            if spec.regex is not None:
                return self.compiler.compile_regex(spec.regex)
            return self.compiler.compile_grammar(choice_ebnf(spec.choice) if spec.choice is not None
                                                 else spec.grammar)
        except Exception as e:
            raise GrammarError(f"structured output: cannot compile the {spec.kind}: {_compiler_message(e)}") from None

    def matcher(self, spec: StructuredOutputParams) -> xgr.GrammarMatcher:
        """A fresh matcher for one request (its state: the output accepted so far)."""
        return xgr.GrammarMatcher(self.compile(spec))

    def fill_bitmask(self, rows: list[tuple[int, xgr.GrammarMatcher]], num_rows: int) -> torch.Tensor:
        """The step's ``[num_rows, words]`` bitmask with each ``(row, matcher)``'s allowed tokens
        filled in; other rows are left as they are (``apply`` skips them)."""
        if num_rows > self.bitmask.shape[0]:
            self.bitmask = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        for row, matcher in rows:
            matcher.fill_next_token_bitmask(self.bitmask, row)
        return self.bitmask[:num_rows]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place and in one batched op, the logits of ``rows`` that their bitmask rows
    forbid; the other rows are untouched."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[-1], indices=rows)
