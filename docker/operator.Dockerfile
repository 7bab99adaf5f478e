# The kubeinfer operator: kopf + the Kubernetes client + kubeinfer's pure operator and config modules.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t ghcr.io/kubeinfer/operator:0.1.0 .
#
# kubeinfer is installed with --no-deps and only the `operator` extra's packages are added: the
# engine's dependencies (torch, ray, grpc: gigabytes) are not needed to render and apply objects.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml ./
COPY kubeinfer ./kubeinfer
# The operator extra's requirements, read from pyproject.toml so they cannot drift from it.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['operator']))" > /tmp/operator-requirements.txt \
 && pip install -r /tmp/operator-requirements.txt \
 && pip install --no-deps . \
 && rm -rf /src /tmp/operator-requirements.txt \
 # Fails the build if the operator's command needs a module the slim image lacks (e.g. torch). The
 # handlers pull in the capacity check, which shares the engine's KV formula (kubeinfer/worker/kv_sizing.py).
 && kubeinfer operator --help > /dev/null \
 && python -c "import kubeinfer.operator.handlers"

# A numeric non-root user, so that runAsNonRoot can be verified by the kubelet.
RUN useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin kubeinfer
USER 65532:65532
WORKDIR /
EXPOSE 8080
ENTRYPOINT ["kubeinfer"]
CMD ["operator", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
