# crossdiff GPU worker: CUDA torch, the crossdiff package and pipeline, and a Prefect worker.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t crossdiff-worker .
#   docker run --gpus all -e PREFECT_API_URL=http://SERVER:4200/api -v crossdiff-artifacts:/app/artifacts crossdiff-worker
#
# With no arguments the container is a long-lived Prefect worker polling the process pool
# $CROSSDIFF_POOL (it runs flow runs inside this container, on its GPUs). With arguments it runs them
# instead: a docker work pool starts this image with `prefect flow-run execute` for each flow run.
# The PyPI torch wheel brings its own CUDA libraries; the host needs a recent NVIDIA driver and the
# NVIDIA container toolkit (the nvidia/cuda base image tells the toolkit to mount the driver).
FROM nvidia/cuda:12.9.1-base-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG GIT_COMMIT=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/crossdiff/.cache/huggingface \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    CROSSDIFF_REPO=/app \
    CROSSDIFF_POOL=crossdiff-gpu \
    CROSSDIFF_GIT_COMMIT=${GIT_COMMIT} \
    PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1 \
    PREFECT_WORKER_WEBSERVER_PORT=8080

# Ubuntu's python3 and git; the versions move with the point releases of the base image, so they are
# not pinned (the image is pinned by its tag).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 crossdiff \
    && useradd --system --uid 10001 --gid crossdiff --create-home --home-dir /home/crossdiff crossdiff \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /app
# dependencies first (a layer that survives code edits), then the code
COPY pyproject.toml constraints.txt README.md ./
COPY crossdiff_core/__init__.py crossdiff_core/__init__.py
RUN pip install --no-cache-dir -c constraints.txt ".[data,pipeline]"
COPY --chown=10001:10001 . .
RUN pip install --no-cache-dir --no-deps -e . \
    && mkdir -p /app/artifacts /home/crossdiff/.cache/huggingface \
    && chown -R 10001:10001 /app /home/crossdiff

# not root: the user crossdiff
USER 10001:10001

# The worker's health-check server (--with-healthcheck: GET /health, 503 once the worker stops
# polling) listens on PREFECT_WORKER_WEBSERVER_HOST:PORT, here 127.0.0.1:8080, inside the container
# only (Prefect's default would be every interface); pass -e PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0
# -p 8080:8080 to probe it from outside. A container running a flow run (arguments given) has no
# worker: it is healthy while the Prefect API answers.
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; w = b'\\0worker\\0start' in open('/proc/1/cmdline', 'rb').read(); h = os.environ.get('PREFECT_WORKER_WEBSERVER_HOST', '127.0.0.1'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::') else h; url = f\"http://{h}:{os.environ.get('PREFECT_WORKER_WEBSERVER_PORT', '8080')}/health\" if w else os.environ['PREFECT_API_URL'].rstrip('/') + '/health'; u.urlopen(url, timeout=5)"]

ENTRYPOINT ["/bin/sh", "-c", "if [ \"$#\" -gt 0 ]; then exec \"$@\"; fi; exec prefect worker start --pool \"$CROSSDIFF_POOL\" --type process --with-healthcheck", "--"]
CMD []
