# One image for the API, the GPU worker, the webhook worker and the reconciler:
#   docker build -t bagel-jobs .
#   docker run --gpus all bagel-jobs worker --queues gpu      (the command picks the role)
# CUDA runtime base: the GPU worker needs the CUDA user-space libraries; the other roles just
# ignore them. torch comes from the CUDA wheel index matching the base image.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BAGEL_JOBS_API_HOST=0.0.0.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common curl ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} python${PYTHON_VERSION}-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python${PYTHON_VERSION} -m venv $VIRTUAL_ENV

WORKDIR /app
# Dependencies first (cached layer): the CUDA torch build, then the project with its extras.
COPY pyproject.toml ./
RUN pip install --upgrade pip \
 && pip install --index-url ${TORCH_INDEX_URL} "torch>=2.4"
COPY bagel ./bagel
COPY worker ./worker
COPY api ./api
COPY migrations ./migrations
RUN pip install ".[quant,service]"

# Non-root; /data holds the embedded defaults (SQLite, local storage, tiny model) when no
# external services are configured. Real deployments mount the checkpoint read-only and set
# BAGEL_JOBS_MODEL_PATH.
RUN useradd --create-home --uid 10001 bagel && mkdir -p /data && chown bagel:bagel /data
USER bagel
WORKDIR /data

EXPOSE 8000
# /healthz for the API role; worker roles override the healthcheck in compose/k8s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${BAGEL_JOBS_API_PORT:-8000}/healthz" || exit 1

ENTRYPOINT ["bagel-jobs"]
CMD ["api"]
