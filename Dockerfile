# syntax=docker/dockerfile:1
# One image for every Whatslike role; the role is chosen at run time (WHATSLIKE_ROLES or
# `serve --roles`). Build from the repository root:  docker build -t whatslike .
# No secret is baked in: credentials come from the environment at run time
# (deploy/docker-compose.yml takes them from deploy/.env).

# The base image is pinned by digest (the tag alone is for the reader): the multi-platform
# index of python:3.11-slim-bookworm (Python 3.11.16, linux/amd64 and linux/arm64 among
# others) that Docker Hub served for that tag on 2026-08-28. To move to a newer one, take the
# index digest of the tag and replace it in both FROM lines:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # "Digest:" at the top
# (or `docker pull python:3.11-slim-bookworm`, which prints it), then build and run the tests.

# --- builder: wheels of the locked dependencies and of the package ------------------------
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The dependencies exactly as locked (`make lock`): every file pip fetches must match one of
# the lock's hashes, or the build stops. Their own layer: rebuilt only when a lock changes.
COPY requirements.lock requirements-build.lock ./
RUN pip install --require-hashes -r requirements-build.lock \
    && pip wheel --require-hashes --wheel-dir /wheels -r requirements.lock
# Only what the wheel needs (see .dockerignore): no tests, no data, no .env. Built with the
# locked setuptools just installed, and without dependencies (they are the wheels above).
COPY pyproject.toml README.md ./
COPY whatslike ./whatslike
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime: the wheels installed offline, no build tools, no sources --------------------
# (--no-index: only the builder's wheels, so only the locked versions, can be installed.)
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    WHATSLIKE_HOST=0.0.0.0 WHATSLIKE_PORT=8000 WHATSLIKE_DATA_DIR=/var/lib/whatslike
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels whatslike \
    && groupadd --system --gid 10001 whatslike \
    && useradd --system --uid 10001 --gid whatslike --home-dir /var/lib/whatslike \
       --shell /usr/sbin/nologin whatslike \
    && install -d -m 0700 -o whatslike -g whatslike /var/lib/whatslike
USER whatslike:whatslike
WORKDIR /var/lib/whatslike
EXPOSE 8000
# /healthz: the process serves (compose asks /readyz, which also checks the backends).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('WHATSLIKE_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["whatslike"]
CMD ["serve"]
