"""Find, read and validate a checkpoint: a Hugging Face folder (safetensors) or a GGUF file."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.models.llama import LlamaForCausalLM
from kubeinfer.worker.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    """A model ready to run, with the tokenizer and config that came with it."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: str


def resolve_model_path(path: str | None) -> str:
    """None and ``builtin://smollm2-135m`` mean the bundled default model."""
    if path is None or path == "builtin://smollm2-135m":
        from kubeinfer.worker.models.default_model import default_model_path
        return default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path!r} does not exist")
    return path


def load_model_info(path: str | None) -> tuple[ModelConfig, Tokenizer]:
    """The config and tokenizer of a checkpoint without its weights (for a router that tokenizes)."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        config, _, tokenizer = _open_hf_dir(path, torch.float32)  # the tensor iterator is lazy
        return config, tokenizer
    if _is_gguf(path):
        from kubeinfer.worker.models import gguf
        reader = gguf.open_gguf(path)
        return gguf.read_gguf_config(reader), gguf.read_gguf_tokenizer(reader)
    raise CheckpointError(
        f"{path!r} is neither a Hugging Face model folder (config.json + *.safetensors + tokenizer.json) "
        "nor a GGUF file")


def load_model(path: str | None, dtype: torch.dtype, max_positions: int | None = None,
               quantization: str | None = None, group_size: int | None = None, backend=None) -> LoadedModel:
    """Build the model on ``backend``'s device (a kernels.backend.KernelBackend; default: the torch
    backend on the CPU) and fill it tensor by tensor, each tensor read from the file, cast, and
    copied to the device on its own (peak host memory: one tensor; no full float copy on the host).

    ``quantization`` swaps the per-layer linears for int8 / int4 modules of the backend's kernels:
    GGUF Q8_0 / Q4_x tensors go straight into those formats, float weights are quantized one matrix
    at a time on the device as they load (models/quantize_on_load.py), so the device never holds the
    float layers. A checkpoint saved by ``kubeinfer quantize`` loads in its own scheme.
    The model is returned bound to the backend's kernels (``LlamaForCausalLM.bind``).
    """
    from kubeinfer.worker import quant
    if backend is None:
        from kubeinfer.worker.kernels.torch_backend import TorchBackend
        backend = TorchBackend("cpu", dtype)
    path = resolve_model_path(path)
    scheme = quant.get_scheme(quantization, group_size) if quantization else None
    if os.path.isdir(path):
        config, tensors, tokenizer = _open_hf_dir(path, dtype)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        saved = quant.quant_scheme_of(files[0])
        if saved is not None:
            if scheme is not None and scheme != saved:
                raise CheckpointError(f"{path} holds {saved.describe()} weights; it cannot be loaded as "
                                      f"{scheme.describe()} (leave quantization unset to use it as saved)")
            if len(files) != 1:
                raise CheckpointError(f"{path}: a quantized checkpoint is one safetensors file, found {len(files)}")
            scheme, items = quant.load_quantized_tensors(files[0], config)
            return _build_quantized(config, scheme, items, tokenizer, dtype, max_positions, path, backend)
        if scheme is not None:
            from kubeinfer.worker.models.quantize_on_load import quantize_while_loading
            items = quantize_while_loading(tensors, config, scheme, backend.device)
            return _build_quantized(config, scheme, items, tokenizer, dtype, max_positions, path, backend)
    elif _is_gguf(path):
        from kubeinfer.worker.models import gguf
        reader = gguf.open_gguf(path)
        config = gguf.read_gguf_config(reader)
        tokenizer = gguf.read_gguf_tokenizer(reader)
        if scheme is not None:
            from kubeinfer.worker.models.gguf_quant import iter_gguf_quantized
            items = iter_gguf_quantized(reader, config, scheme, dtype)
            return _build_quantized(config, scheme, items, tokenizer, dtype, max_positions, path, backend)
        tensors = gguf.iter_gguf_tensors(reader, config, dtype)
    else:
        raise CheckpointError(
            f"{path!r} is neither a Hugging Face model folder (config.json + *.safetensors + tokenizer.json) "
            "nor a GGUF file")
    return finish_model(build_model(config, tensors, tokenizer, dtype, max_positions, source=path, backend=backend), backend)


def finish_model(loaded: LoadedModel, backend) -> LoadedModel:
    """The backend's packing, the weights moved onto huge pages (CPU), then the backend's kernels
    bound into every layer (last: a decode stack takes aliases of the weights)."""
    backend.prepare_model(loaded.model)
    if backend.device.type == "cpu":
        from kubeinfer.worker.huge_pages import move_weights_to_huge_pages
        move_weights_to_huge_pages(loaded.model)
    loaded.model.bind(backend)
    return loaded


def _build_quantized(config, scheme, items, tokenizer, dtype, max_positions, source, backend) -> LoadedModel:
    """Install already-quantized modules into a meta-device model: no float copy of those weights."""
    from kubeinfer.worker import quant
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions or config.max_position_embeddings, dtype).to(dtype)
    quant.install_quantized(model, scheme, items, backend, backend.device)
    model.rotary.to_(backend.device)
    model.quantize_head(backend)
    model.eval()
    return finish_model(LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source), backend)


def build_model(config: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], tokenizer: Tokenizer,
                dtype: torch.dtype, max_positions: int | None = None, source: str = "",
                backend=None) -> LoadedModel:
    """Allocate the model for ``config`` on ``backend``'s device (the CPU without one) and fill it
    from Hugging Face-named ``tensors``, one at a time. Not yet bound to kernels (load_model does)."""
    device = backend.device if backend is not None else torch.device("cpu")
    positions = max_positions or config.max_position_embeddings
    with torch.device("meta"):  # no memory until to_empty, and no random init we would overwrite
        model = LlamaForCausalLM(config, positions, dtype).to(dtype)
    model = model.to_empty(device=device)
    model.rotary.to_(device)
    with torch.no_grad():
        model.load_weights(tensors)
    model.eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source)


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror}") from None


def _open_hf_dir(path: str, dtype: torch.dtype) -> tuple[ModelConfig, Iterator, Tokenizer]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            config = ModelConfig.from_hf_dict(json.load(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    tokenizer = Tokenizer.from_hf_dir(path)
    if config.eos_token_ids:
        tokenizer.eos_token_ids = tuple(dict.fromkeys(tokenizer.eos_token_ids + config.eos_token_ids))
    return config, _iter_safetensors(files, dtype), tokenizer


def _iter_safetensors(files: list[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:  # memory-mapped: one tensor materialised at a time
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors file ({e})") from None
