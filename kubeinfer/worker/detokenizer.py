"""Streaming token ids -> text deltas, with stop-string handling."""

from __future__ import annotations

from kubeinfer.worker.sampling_params import SamplingParams
from kubeinfer.worker.tokenizer import Tokenizer

# Prompt tokens decoded as context for the first output tokens (as vLLM): decoders such as
# SentencePiece's drop a leading space at the start of a sequence but not mid-sequence.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Owns one request's output text while its tokens arrive one at a time.

    Decoding uses vLLM's window: ``_ids[prefix_offset:read_offset]`` is text already produced
    (decoded only as context), ``_ids[read_offset:]`` is not yet turned into text, so each ``add``
    decodes a few tokens, never the whole sequence. Text is held back while it ends with U+FFFD
    (a multi-byte character split across byte-level tokens), and, when stop strings are set, the
    last ``len(longest stop) - 1`` characters are held back so a partial stop string is never
    emitted and later retracted.

    Invariants: ``text`` (everything returned so far) is a prefix of ``_output``; once ``stopped``,
    ``_output`` ends just before (or, with ``include_stop_str_in_output``, just after) the earliest
    stop string and further tokens are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._output = ""
        self._emitted = 0
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        return self._output[:self._emitted]

    def add(self, token_id: int) -> str:
        """Take the next generated token; return the text that became final ("" if none)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(new_text[len(prefix_text):], final=False)

    def finish(self) -> str:
        """End of generation: return all held-back text (an unfinished character decodes as U+FFFD)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset:])
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return self._append(new_text[len(prefix_text):], final=True)
        return self._append("", final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _append(self, delta: str, final: bool) -> str:
        old_len = len(self._output)
        self._output += delta
        if delta and self.params.stop and not self.stopped:
            self._find_stop(max(0, old_len - self._holdback))
        end = len(self._output) if final or self.stopped else max(self._emitted, len(self._output) - self._holdback)
        out = self._output[self._emitted:end]
        self._emitted = end
        return out

    def _find_stop(self, start: int) -> None:
        # Only a match ending in the new delta is possible (an older one would have stopped us),
        # and it starts at or after `start`, which is never before already-emitted text.
        best = None
        for stop in self.params.stop:
            i = self._output.find(stop, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return
        i, stop = best
        self._output = self._output[:i + len(stop) if self.params.include_stop_str_in_output else i]
        self.stopped = True
        self.stop_reason = stop
