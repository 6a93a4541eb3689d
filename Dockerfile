# One image for the API, the GPU worker, the webhook worker and the reconciler:
#   docker build -t bagel-jobs .
#   docker run --gpus all bagel-jobs worker --queues gpu      (the command picks the role)
#
# torch is the release the tests run on (requirements-cpu.txt: 2.13.0), as its CUDA 13.0 build.
# PyTorch's release compatibility matrix (RELEASE.md in pytorch/pytorch) lists CUDA 12.6 and 13.0
# as the stable builds of 2.13 and 13.2 as experimental; there is no cu128/cu129 build of 2.13.
# cu130 covers Turing through Blackwell (sm 7.5-12.0, Hopper included) and needs an NVIDIA
# driver >= 580 on the host. The torch wheels bring CUDA, cuBLAS and cuDNN as pip packages, so the
# base is the plain CUDA runtime image of the same CUDA release (no second cuDNN); the roles
# without a GPU just ignore it. bitsandbytes is the release the tests use; its wheel ships the
# CUDA 13.0 kernels (libbitsandbytes_cuda130.so). tests/test_dockerfile.py checks these pins.
FROM nvidia/cuda:13.0.2-runtime-ubuntu22.04

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0+cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG BITSANDBYTES_VERSION=0.50.2
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BAGEL_JOBS_API_HOST=0.0.0.0

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10). Not pinned to apt versions
# (DL3008): the PPA keeps only its newest build of each package, so a pinned version would stop
# resolving at its next upload and break the build; the Python minor version is fixed instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} python${PYTHON_VERSION}-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python${PYTHON_VERSION} -m venv $VIRTUAL_ENV

# Layer 1, the CUDA torch build (several GB): changes only with the build arguments above.
RUN pip install --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}"

# Layer 2, every other dependency: pyproject.toml alone is copied, and the runtime dependencies
# plus the quant and service extras are read from it and installed, so this layer changes only
# when pyproject.toml does. torch is named again so that no requirement can swap the CUDA build
# for a PyPI one; bitsandbytes is pinned on top of the extra's lower bound.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; print('\n'.join(p['dependencies'] + extras['quant'] + extras['service']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "bitsandbytes==${BITSANDBYTES_VERSION}" \
 && rm /tmp/requirements.txt

# Layer 3, the source: a code change rebuilds only this. --no-deps: everything is installed above.
COPY bagel ./bagel
COPY bagel_client ./bagel_client
COPY worker ./worker
COPY api ./api
COPY migrations ./migrations
RUN pip install --no-deps .

# Non-root (uid 10001, as the k8s manifests' runAsUser); /data holds the embedded defaults
# (SQLite, local storage, tiny model) when no external services are configured. Real
# deployments mount the checkpoint read-only and set BAGEL_JOBS_MODEL_PATH.
RUN groupadd --gid 10001 bagel \
 && useradd --create-home --uid 10001 --gid 10001 bagel \
 && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data

EXPOSE 8000
# /healthz for the API role, in exec form (no shell, no curl): Python's urllib fails with a
# non-zero exit on a refused connection or any HTTP error status, and the port follows
# BAGEL_JOBS_API_PORT as the API does. Worker roles override the healthcheck in compose/k8s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BAGEL_JOBS_API_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["bagel-jobs"]
CMD ["api"]
