#!/bin/sh
# Regenerates kubeinfer/proto/*_pb2*.py from proto/ (run from the repository root: `make proto`).
# The .proto is mapped to kubeinfer/proto/ so the generated stubs import each other as
# `kubeinfer.proto.inference_pb2`, with no post-processing.
set -e
OUT="${1:-.}"
"${PYTHON:-python3}" -m grpc_tools.protoc \
  --proto_path=kubeinfer/proto=proto/kubeinfer/v1 \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  kubeinfer/proto/inference.proto
