"""How many bytes the paged KV cache takes: the one formula the engine allocates by and the operator's
pre-flight capacity check estimates with.

Pure arithmetic on names and integers, with no torch import, so the operator (whose image has no
torch) imports it too. ``kubeinfer.worker`` imports its heavy modules lazily for that reason.
"""

from __future__ import annotations

from types import MappingProxyType

# Bytes per element of each engine dtype, by the name EngineConfig.dtype uses.
DTYPE_BYTES = MappingProxyType({"float32": 4, "bfloat16": 2, "float16": 2})
KV_CACHE_DTYPES = ("auto", "int8")
# An int8 cache stores one fp32 scale per (token, kv head) beside the int8 values.
INT8_KV_SCALE_BYTES = 4


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str,
                       kv_cache_dtype: str = "auto") -> int:
    """K and V of one token across every layer. ``kv_cache_dtype`` "auto" stores the model ``dtype``;
    "int8" stores int8 values plus one fp32 scale per kv head."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    per_head = head_dim + INT8_KV_SCALE_BYTES if kv_cache_dtype == "int8" else head_dim * DTYPE_BYTES[dtype]
    return 2 * num_layers * num_kv_heads * per_head


def kv_blocks_for_bytes(memory_bytes: int, bytes_per_token: int, block_size: int) -> int:
    """Whole blocks of ``block_size`` tokens that fit in ``memory_bytes``."""
    return max(memory_bytes, 0) // (bytes_per_token * block_size)


def kv_bytes_for_tokens(tokens_per_seq: int, num_seqs: int, bytes_per_token: int, block_size: int) -> int:
    """The pool that holds ``num_seqs`` sequences of ``tokens_per_seq`` tokens, in whole blocks (the
    allocator hands out blocks, so a sequence's last block is counted whole)."""
    blocks_per_seq = -(-tokens_per_seq // block_size)
    return blocks_per_seq * block_size * bytes_per_token * num_seqs
