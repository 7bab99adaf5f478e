"""The generated gRPC stubs are what proto/generate.sh makes from proto/ (run `make proto` if not)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(["sh", "proto/generate.sh", str(tmp_path)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    generated = sorted(p.name for p in (tmp_path / "kubeinfer" / "proto").iterdir())
    assert generated == ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "kubeinfer" / "proto" / name).read_text()
        committed = (ROOT / "kubeinfer" / "proto" / name).read_text()
        assert committed == fresh, f"kubeinfer/proto/{name} is stale: run `make proto`"
