"""Kernel backends: the one decision, made when the model is built, of which kernels run every layer.

A backend object owns the kernels of one device family for one engine: attention over the paged
cache (and the per-step metadata those kernels read), RMSNorm (with the residual add fused),
rotary embedding, the SwiGLU gate, the runtime modules of quantized linears, weight packing, and
the greedy argmax. ``LlamaForCausalLM.bind(backend)`` hands each module the kernels it calls, so a
module's ``forward`` never asks where it runs. Three backends, chosen by ``select_backend``:

* ``torch`` (kernels/torch_backend.py): the reference, on any device.
* ``cpp`` (kernels/cpp_backend.py): the C++ CPU kernels (per instruction set: AVX2, AVX-512, AMX).
* ``triton`` (kernels/triton_backend.py): Triton kernels, on CUDA (or in Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch


@dataclass
class StepInputs:
    """One step's batch on the host, flattened in the order the model runs it (decodes first).

    ``prefills`` holds ``(start, end, first_position, context_len, block_table)`` per prefill chunk:
    rows ``[start, end)`` of the batch are positions ``[first_position, context_len)`` of a
    sequence. ``seq_tables``, ``query_lens`` and ``context_lens`` describe every chunk of the step
    in batch order: a decode row is a chunk of one (a speculating sequence's last token and each of
    its drafts are rows of their own, with growing context lengths over one block table).
    """

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, int, list[int]]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    seq_tables: list[list[int]] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)

    def query_chunks(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step as query chunks, on the host: ``block_tables`` ``[S, max_blocks]`` (zero-padded),
        ``context_lens`` ``[S]`` and ``cu_seqlens_q`` ``[S+1]`` (chunk boundaries in the batch), the
        form the Triton kernels and the C++ prefill attention take."""
        width = max(len(t) for t in self.seq_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in self.seq_tables], dtype=dtype)
        cu = torch.tensor([0] + self.query_lens, dtype=dtype).cumsum(0, dtype=dtype)
        return tables, torch.tensor(self.context_lens, dtype=dtype), cu


class KernelBackend:
    """Base of the backends. Invariants: one instance per engine, fixed ``device``, ``dtype`` and
    KV format; ``block_size`` and ``max_seq_len`` are set once by the model runner before any step.
    Subclasses provide ``rms_norm``, ``add_rms_norm_`` (adds ``x`` into ``residual`` in place and
    returns the norm of the sum), ``rotary_`` (in place on the first heads), ``silu_mul``,
    ``greedy_argmax``, ``attention`` (writes the step's K/V into the cache, then attends),
    ``attention_metadata``, ``quantized_linear`` and ``prepare_model``. ``sample_rows`` is the
    backend's sampling kernel (temperature, top-k/top-p/min-p and the draw in one call, see
    sampling.Sampler), or None where the sampler's torch path serves.
    """

    name: ClassVar[str] = ""
    sample_rows: Callable[..., torch.Tensor] | None = None
    # Whether decode steps may be captured as CUDA graphs (their kernels read no host state).
    supports_cuda_graphs: ClassVar[bool] = False

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kv_int8: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_int8 = kv_int8
        self.block_size = 16
        self.max_seq_len: int | None = None
        self.pack_weights = True  # off for torch.compile'd decode steps, which fuse plain ops better

    def configure_cache(self, block_size: int, max_seq_len: int) -> None:
        self.block_size, self.max_seq_len = block_size, max_seq_len

    def decode_stack(self, model):
        """A callable running a decode-only step of ``model``'s whole stack in one kernel call
        (kernels/decode_stack.py), or None: this backend's modules run it layer by layer."""
        return None

    def __repr__(self) -> str:
        kv = "int8" if self.kv_int8 else str(self.dtype).removeprefix("torch.")
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, kv={kv})"


_CPP_DTYPES = (torch.float32, torch.bfloat16)


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32, *,
                   kv_int8: bool = False, quantization: str | None = None,
                   compile_decode: bool = False) -> KernelBackend:
    """The backend for (device, dtype, weight scheme, KV dtype, this CPU), or ValueError naming why
    the asked-for one cannot run it.

    ``auto``: ``triton`` on CUDA (``torch`` if triton does not import); on a CPU ``cpp`` for an fp32
    or bf16 model with a float KV cache and eager decode steps when the C++ kernels build, else
    ``torch``. The weight scheme does not change the choice today (every backend runs int8 and
    int4); it is checked so a new scheme must state where it runs.
    """
    from kubeinfer.worker.config import KERNEL_BACKENDS
    from kubeinfer.worker.kernels.cpu import load_cpu_kernels
    from kubeinfer.worker.kernels.triton_support import triton_importable
    device = torch.device(device)
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}, got {name!r}")
    if quantization not in (None, "int8", "int4"):
        raise ValueError(f"no kernel backend runs quantization {quantization!r}")
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda:
            name = "triton" if triton_importable() else "torch"
        elif dtype in _CPP_DTYPES and not kv_int8 and not compile_decode and load_cpu_kernels() is not None:
            name = "cpp"
        else:
            name = "torch"
    if name == "cpp":
        if cuda:
            raise ValueError("kernel_backend='cpp' runs on the CPU only; on CUDA use triton or torch")
        if dtype not in _CPP_DTYPES or kv_int8 or compile_decode:
            raise ValueError("kernel_backend='cpp' needs dtype float32 or bfloat16, a KV cache of that dtype "
                             "(not int8) and compile off")
        if load_cpu_kernels() is None:
            raise ValueError("kernel_backend='cpp': the C++ CPU kernels could not be built here (see the log)")
        from kubeinfer.worker.kernels.cpp_backend import CppBackend
        return CppBackend(device, dtype, kv_int8)
    if name == "triton":
        if not triton_importable():
            raise ValueError("kernel_backend='triton' needs the triton package (pip install triton)")
        if not cuda and not _triton_interpreted():
            raise ValueError("kernel_backend='triton' on a CPU runs only in Triton's interpreter "
                             "(TRITON_INTERPRET=1, for tests); use cpp or torch")
        if compile_decode:
            raise ValueError("kernel_backend='triton' and compile cannot be combined: decode steps use CUDA "
                             "graphs instead (enforce_eager turns them off)")
        from kubeinfer.worker.kernels.triton_backend import TritonBackend
        return TritonBackend(device, dtype, kv_int8)
    from kubeinfer.worker.kernels.torch_backend import TorchBackend
    backend = TorchBackend(device, dtype, kv_int8)
    backend.pack_weights = not compile_decode
    return backend


def _triton_interpreted() -> bool:
    from kubeinfer.worker.kernels.triton_support import triton_interpreted
    return triton_interpreted()
