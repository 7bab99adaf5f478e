"""Where a ModelDeployment's weights are (``builtin://``, ``pvc://``, ``file:///`` uris), what the
operator knows of a model's size, and the error every spec problem ends in. Torch-free: the
operator's image has no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


class SpecError(ValueError):
    """A ModelDeployment spec that cannot be deployed; the message says which field and why."""


@dataclass(frozen=True)
class ModelDims:
    """What the capacity check needs to know about a model's size. Any field may be None (unknown).

    ``float_params`` are the parameters that stay in the engine dtype under weight quantization
    (embeddings, norms): only the transformer layers' linear weights are quantized.
    """

    parameter_count: int | None = None
    float_params: int = 0
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    max_context: int | None = None

    @property
    def knows_kv(self) -> bool:
        return None not in (self.num_layers, self.num_kv_heads, self.head_dim)


# SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads of 64, vocab 49152 (tied embedding).
# 134,515,008 parameters, of which the embedding (49152 x 576) and 61 norms (x 576) stay float.
BUILTIN_MODELS: Mapping[str, ModelDims] = MappingProxyType({
    "smollm2-135m": ModelDims(parameter_count=134_515_008, float_params=49152 * 576 + 61 * 576,
                              num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576,
                              max_context=8192),
})
DEFAULT_MODEL_URI = "builtin://smollm2-135m"
# Where the Ray pods (head: the router's tokenizer; workers: the weights) mount a pvc:// uri's claim (render.py).
PVC_MOUNT_ROOT = "/models"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``builtin://NAME``, ``pvc://CLAIM/PATH`` or ``file:///PATH``.

    Invariants: ``scheme`` is one of the three; a builtin names a known model; a pvc source has a
    DNS-label claim and a non-empty relative path; a file source has an absolute path.
    """

    uri: str
    where: str = field(default="spec.model.uri", compare=False)  # the field it came from, for messages

    def __post_init__(self) -> None:
        scheme, sep, rest = self.uri.partition("://")
        if not sep or scheme not in ("builtin", "pvc", "file"):
            raise SpecError(f"{self.where} {self.uri!r}: unsupported scheme; use {DEFAULT_MODEL_URI}, "
                            "pvc://CLAIM/PATH/IN/CLAIM or file:///PATH/IN/IMAGE")
        if scheme == "builtin" and rest not in BUILTIN_MODELS:
            raise SpecError(f"{self.where} {self.uri!r}: no builtin model {rest!r}; "
                            f"builtin models: {', '.join(BUILTIN_MODELS)}")
        if scheme == "pvc":
            claim, _, path = rest.partition("/")
            if not _DNS_LABEL.match(claim) or len(claim) > 63:
                raise SpecError(f"{self.where} {self.uri!r}: {claim!r} is not a PersistentVolumeClaim name")
            if not path.strip("/") or ".." in path.split("/"):
                raise SpecError(f"{self.where} {self.uri!r}: name the model's folder or file inside the "
                                f"claim, e.g. pvc://{claim}/models/my-model")
        if scheme == "file" and (not rest.startswith("/") or rest == "/"):
            raise SpecError(f"{self.where} {self.uri!r}: a file uri needs an absolute path, "
                            "e.g. file:///opt/models/my-model (three slashes)")

    @property
    def scheme(self) -> str:
        return self.uri.partition("://")[0]

    @property
    def claim(self) -> str | None:
        return self.uri[len("pvc://"):].partition("/")[0] if self.scheme == "pvc" else None

    @property
    def local_path(self) -> str:
        """What the engine loads: the builtin uri itself, or a path inside the worker container."""
        rest = self.uri.partition("://")[2]
        if self.scheme == "pvc":
            claim, _, path = rest.partition("/")
            return f"{PVC_MOUNT_ROOT}/{claim}/{path.strip('/')}"
        return rest if self.scheme == "file" else self.uri
