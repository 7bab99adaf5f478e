"""A model as the router serves it (ServedModel) and what the router reads from it: how many
sequences its replicas run at once, and how many of them are alive."""

from __future__ import annotations

from dataclasses import dataclass

from kubeinfer.router.pool import WorkerPool
from kubeinfer.worker.config import EngineConfig  # torch-free: the definitions only
from kubeinfer.worker.tokenizer import Tokenizer


@dataclass
class ServedModel:
    """One model as the router knows it: its tokenizer, context length and replicas."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    pool: WorkerPool
    uri: str = ""
    quantization: str | None = None
    capacity: int | None = None  # sequences all its replicas run at once (None: DEFAULT_SEQS_PER_REPLICA each)


# What a replica runs at once when the router is not told its engine settings: EngineConfig's default.
DEFAULT_SEQS_PER_REPLICA: int = EngineConfig.__dataclass_fields__["max_num_seqs"].default


def replica_capacity(served: ServedModel) -> int:
    """The sequences all of the model's replicas run at once: as told, else the default per replica."""
    if served.capacity:
        return served.capacity
    return DEFAULT_SEQS_PER_REPLICA * max(1, len(getattr(served.pool, "replicas", ()) or ()))


def live_replicas(pool: WorkerPool) -> int | None:
    """How many of the pool's replicas are alive: its ``live_replicas()`` if it has one, else its
    in-process replicas' engines asked directly; None when the pool cannot tell (a remote pool)."""
    live = getattr(pool, "live_replicas", None)
    if live is not None:
        return live()
    replicas = getattr(pool, "replicas", None)
    if isinstance(replicas, dict) and all(hasattr(getattr(r, "engine", None), "alive") for r in replicas.values()):
        return sum(1 for r in replicas.values() if r.engine.alive())
    return None
