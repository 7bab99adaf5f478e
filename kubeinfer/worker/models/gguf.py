"""Loading llama.cpp GGUF checkpoints: config, tokenizer and weights in Hugging Face naming and layout.

A GGUF file carries everything in one place: hyper-parameters as ``{arch}.*`` metadata, the tokenizer as
``tokenizer.ggml.*`` metadata, and (possibly quantized) tensors under llama.cpp names. This module turns
each into what the rest of the engine already consumes for a Hugging Face checkpoint (ModelConfig,
Tokenizer, and ``(hf_name, tensor)`` pairs), so the model code never sees GGUF specifics.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import gguf
import numpy as np
import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers

from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.tokenizer import Tokenizer

# The bundled model's location needs no gguf: it lives apart, so a machine without gguf still learns
# whether the default model is installed.
from kubeinfer.worker.models.default_model import (DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE,  # noqa: E402,F401
                                                   default_model_path)

# GGUF architecture -> ModelConfig family. llama.cpp files Mistral under "llama" too.
_FAMILIES = {"llama": "llama", "qwen2": "qwen2"}

# Tensor types we load. The quantized ones are dequantized by gguf-py, whose kernels mirror ggml's.
_FLOAT_TYPES = ("F32", "F16", "BF16")
_QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# End-of-turn markers: when the chat template writes one, generation must also stop on it, even if the
# file names a different EOS (SmolLM2's EOS happens to be <|im_end|> itself; Llama 3's is not <|eot_id|>).
_TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")

_MISSING: Any = object()


def open_gguf(path: str) -> gguf.GGUFReader:
    """Open ``path`` as a memory-mapped GGUF of a supported architecture.

    Raises CheckpointError when the file is missing, is not GGUF, is truncated or corrupt, or holds an
    architecture other than those in ``_FAMILIES``. Tensor data is checked to lie inside the file, so
    later reads cannot come up short.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways (ValueError, IndexError, ...) on a damaged file
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        # numpy slicing of the memory map silently stops at the end of the file; a short slice means truncation.
        if t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
    arch = _meta(reader, "general.architecture", None)
    if arch not in _FAMILIES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(_FAMILIES))}")
    return reader


def read_gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    """The ModelConfig described by the ``{arch}.*`` metadata of an opened GGUF.

    ``tie_word_embeddings`` is True exactly when the file has no ``output.weight`` (llama.cpp then reuses
    the token embedding as the LM head). ``eos_token_ids`` holds the EOS id plus any end-of-turn /
    end-of-message ids the file names.
    """
    arch = _meta(reader, "general.architecture")
    family = _FAMILIES.get(arch)
    if family is None:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(_FAMILIES))}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # Llama 3.1-style rope scaling is stored only as precomputed per-frequency factors, which
        # ModelConfig cannot express; loading without them would silently change every position's rotation.
        raise CheckpointError("GGUF files with a rope_freqs tensor (Llama 3.1 rope scaling) are not supported")

    def get(key: str, default: Any = _MISSING) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab_size = get("vocab_size", None)
    if vocab_size is None:  # older files: the vocabulary's length is the authority
        vocab_size = len(_meta(reader, "tokenizer.ggml.tokens"))
    head_dim = get("attention.key_length", None) or hidden // num_heads
    eos_ids = [_meta(reader, f"tokenizer.ggml.{k}", None) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return ModelConfig(
        family=family,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get("rope.scaling.type", None),
                                   get("rope.scaling.factor", None) or get("rope.scale_linear", None)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
    )


def read_gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A Tokenizer rebuilt from the ``tokenizer.ggml.*`` metadata with the `tokenizers` library.

    Supports byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and sentencepiece-style BPE
    (``"llama"``). Tokens typed CONTROL become special tokens (matched whole, dropped by
    ``decode(skip_special_tokens=True)``); USER_DEFINED ones become plain added tokens (matched whole).
    ``eos_token_ids`` = EOS, EOT/EOM if named, and the end-of-turn marker the chat template writes.
    """
    model = _meta(reader, "tokenizer.ggml.model", None)
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = _meta(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    if model == "gpt2":
        backend = _byte_level_bpe(tokens, _meta(reader, "tokenizer.ggml.merges"),
                                  _meta(reader, "tokenizer.ggml.pre", "default"))
    elif model == "llama":
        backend = _sentencepiece_bpe(tokens, _meta(reader, "tokenizer.ggml.scores"), token_types,
                                     _meta(reader, "tokenizer.ggml.unknown_token_id", None),
                                     bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True)))
    else:
        raise CheckpointError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")
    # Tokens already in the vocabulary keep their ids when added, so the vocabulary size does not change.
    backend.add_special_tokens([tokenizers.AddedToken(tok, special=True, normalized=False)
                                for tok, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([tokenizers.AddedToken(tok, special=False, normalized=False)
                        for tok, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

    def token_at(key: str) -> tuple[int | None, str | None]:
        i = _meta(reader, f"tokenizer.ggml.{key}", None)
        return (i, tokens[i]) if i is not None and 0 <= i < len(tokens) else (None, None)

    bos_id, bos = token_at("bos_token_id")
    eos_id, eos = token_at("eos_token_id")
    template = _meta(reader, "tokenizer.chat_template", None)
    eos_ids = [eos_id, token_at("eot_token_id")[0], token_at("eom_token_id")[0]]
    eos_ids += [backend.token_to_id(m) for m in _TURN_END_MARKERS if template and m in template]
    # llama.cpp defaults add_bos to True for sentencepiece vocabularies that do not say otherwise.
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_ids=[i for i in eos_ids if i is not None],
                     chat_template=template, add_bos=add_bos, bos_token=bos, eos_token=eos)


def iter_gguf_tensors(reader: gguf.GGUFReader, config: ModelConfig,
                      dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every tensor, dequantized to ``dtype``, one at a time.

    Names and layouts are Hugging Face Llama's (``model.embed_tokens.weight``,
    ``model.layers.N.self_attn.q_proj.weight``, ..., ``lm_head.weight`` only when the file has one);
    shapes are ``(out_features, in_features)``. For the llama architecture the rows of Q and K are
    un-permuted from llama.cpp's interleaved rotary layout back to HF's half-split layout. Each yielded
    tensor is a fresh copy that does not reference the memory map; only one is alive here at a time.
    """
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        weight = _dequantize(t, dtype)
        if config.family == "llama":
            # llama.cpp's converter permutes Q/K rows so its rotary kernel can rotate adjacent pairs
            # (x0, x1); HF rotates (x_i, x_{i+d/2}). Qwen2 files are written unpermuted.
            if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
                weight = _unpermute(weight, config.num_heads)
            elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
                weight = _unpermute(weight, config.num_kv_heads)
        yield hf_name, weight


def _meta(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as a Python object (str, int, float, bool or list); ``default`` if absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata is missing required key {key!r}")
        return default
    return field.contents()


def _rope_scaling(kind: str | None, factor: float | None) -> dict[str, Any] | None:
    if kind is None and factor:  # old files only wrote `rope.scale_linear`
        kind = "linear"
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise CheckpointError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear)")


def _hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise CheckpointError(f"unexpected tensor {name!r} in GGUF file")


def _dequantize(t: Any, dtype: torch.dtype) -> torch.Tensor:
    """One reader tensor as a torch tensor of ``dtype`` with shape reversed(t.shape) (GGUF lists ne0 first)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    kind = t.tensor_type.name
    # np.array(...) copies out of the read-only memory map, which torch cannot wrap safely.
    if kind == "F32":
        out = torch.from_numpy(np.array(t.data, dtype=np.float32))
    elif kind == "F16":
        out = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif kind == "BF16":  # numpy has no bfloat16: carry the raw bits and reinterpret them in torch
        out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
    elif kind in _QUANT_TYPES:
        out = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    else:
        raise CheckpointError(
            f"tensor {t.name}: GGUF tensor type {kind} is not supported "
            f"(supported: {', '.join(_FLOAT_TYPES + _QUANT_TYPES)})")
    return out.reshape(shape).to(dtype)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: per head, rows (0, 1, 2, 3, ...) -> (0, 2, ..., 1, 3, ...)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# The Split regexes of the pre-tokenizers llama.cpp knows by `tokenizer.ggml.pre` name (llama-vocab.cpp),
# written as the Hugging Face tokenizer.json of the same models has them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "stablelm2": _QWEN2_SPLIT}
# llama.cpp: every digit alone, then GPT-2's regex. HF SmolLM2/StarCoder spell this Digits + ByteLevel.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Llama 3's tokenizer.json sets ignore_merges (a whole word in the vocabulary wins over merging);
# llama.cpp does the same for these pre-tokenizers.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)},
                                 merges=[tuple(m.split(" ", 1)) for m in merges],
                                 ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        # "gpt-2", "default" and names we do not know: GPT-2's own regex. Right for "gpt-2"; for others it
        # is the closest common choice (llama.cpp's "default" differs only in how it groups punctuation/digits).
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int], unk_id: int | None,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """llama.cpp's SPM tokenizer as a `tokenizers` BPE: it merges the adjacent pair whose result scores
    best, which is BPE with merges ranked by the merged token's score; unknown bytes fall back to <0xNN>."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for tok, score, kind in zip(tokens, scores, token_types):
        if kind != 1:  # only NORMAL tokens arise from merges (not control, byte or user-defined ones)
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[tok], vocab[left], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp writes spaces as "▁" and, with add_space_prefix, prepends one to the text (not to
    # pieces after a special token): Metaspace's "first" scheme. split=False keeps the text one word.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
