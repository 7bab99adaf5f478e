#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine, the CUDA tests (pytest -m cuda tests/test_cuda.py), then the GPU
# benchmark (benchmarks/gpu.py), then a short summary table. No install and no network: it runs the
# source tree (PYTHONPATH) with a python that already has torch (CUDA), transformers, tokenizers,
# safetensors, triton and pytest. Without CUDA it prints one line saying why it skipped and exits 0.
#
#   GPU_PYTHON   the python to use; default .venv/bin/python when that sees CUDA, else python3
#   OUT          when set, the whole output also goes to $OUT/gpu-check.log (+ junit and bench json)
#   GPU_CHECK_TEST_TIMEOUT (210 s), GPU_CHECK_BENCH_BUDGET (180 s; the bench is killed at +60 s)
#   GPU_CHECK_BENCH_ARGS   extra arguments for benchmarks/gpu.py (e.g. --sections a,c)
# Exit status: the tests' when they fail, else the bench's (1 when a section raised), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."

probe() {  # prints "ok" when $1 is a python whose torch sees a CUDA device, else the reason
  "$1" -c 'import torch; print("ok" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")' \
    2>&1 | tail -n 1
}

if [ -n "${GPU_PYTHON:-}" ]; then
  candidates=("$GPU_PYTHON")
else
  candidates=()
  [ -x .venv/bin/python ] && candidates+=(.venv/bin/python)
  candidates+=(python3)
fi
PY= reasons=()
for c in "${candidates[@]}"; do
  if ! command -v "$c" >/dev/null 2>&1; then reasons+=("$c: not found"); continue; fi
  why=$(probe "$c")
  if [ "$why" = ok ]; then PY=$c; break; fi
  reasons+=("$c: $why")
done
if [ -z "$PY" ]; then
  msg="gpu-check: skipped: no CUDA device for $(IFS=';'; echo "${reasons[*]}" | sed 's/;/; /g')"
  echo "$msg"
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && echo "$msg" > "$OUT/gpu-check.log"; fi
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# An inherited TRITON_INTERPRET=1 (tests/conftest.py sets it where /dev/nvidiactl is missing) would
# run the kernels in the interpreter: pin it off. transformers must never try the network.
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-210}
BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET:-180}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

main() {
  echo "== gpu-check: $PY ($("$PY" --version 2>&1)), $(date -u '+%Y-%m-%d %H:%M UTC'), tests <= ${TEST_TIMEOUT} s, bench budget ${BENCH_BUDGET} s"
  local t0=$SECONDS
  timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rA -p no:cacheprovider \
    --junitxml "$work/junit.xml" 2>&1 | tee "$work/pytest.out"
  local rc_tests=${PIPESTATUS[0]}
  echo "-- cuda tests: exit $rc_tests in $((SECONDS - t0)) s$([ "$rc_tests" = 124 ] && echo ' (timed out)')"
  t0=$SECONDS
  # shellcheck disable=SC2086
  timeout -k 10 $((BENCH_BUDGET + 60)) "$PY" benchmarks/gpu.py --budget "$BENCH_BUDGET" --json "$work/bench.json" \
    ${GPU_CHECK_BENCH_ARGS:-}
  local rc_bench=$?
  echo "-- bench: exit $rc_bench in $((SECONDS - t0)) s$([ "$rc_bench" = 124 ] && echo ' (timed out)')"
  if [ -n "${OUT:-}" ]; then cp -f "$work"/junit.xml "$work"/bench.json "$OUT"/ 2>/dev/null; fi
  "$PY" - "$work/pytest.out" "$work/bench.json" "$rc_tests" "$rc_bench" <<'EOF'
import json, os, re, sys
pytest_out, bench_json, rc_tests, rc_bench = sys.argv[1:]
lines = open(pytest_out, errors="replace").read().splitlines() if os.path.exists(pytest_out) else []
tests = next((l.strip("= ") for l in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", l)),
             "no pytest summary")
failed = [l.split(" ", 1)[1].split(" - ")[0] for l in lines if l.startswith(("FAILED ", "ERROR "))]
print("\n== gpu-check summary")
bench = json.load(open(bench_json)) if os.path.exists(bench_json) else None
if bench:
    print(bench["header"])
print(f"{'cuda tests':<52}  {tests}  (exit {rc_tests})")
for name in failed:
    print(f"{'  failed':<52}  {name}")
if bench:
    for what, value, target, verdict in bench["summary"]:
        print(f"{what:<52}  {value:>12}  {target:<8}  {verdict}".rstrip())
    print(f"{'bench sections':<52}  " + ", ".join(f"({k}) {v}" for k, v in bench["sections"].items())
          + f"  (exit {rc_bench})")
else:
    print(f"{'bench':<52}  no results (exit {rc_bench})")
EOF
  if [ "$rc_tests" != 0 ]; then return "$rc_tests"; fi
  return "$rc_bench"
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu-check.log"
  exit "${PIPESTATUS[0]}"
fi
main
