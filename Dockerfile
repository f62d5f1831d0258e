# syntax=docker/dockerfile:1
# One image for every Whatslike role; the role is chosen at run time (WHATSLIKE_ROLES or
# `serve --roles`). Build from the repository root:  docker build -t whatslike .
# No secret is baked in: credentials come from the environment at run time
# (deploy/docker-compose.yml takes them from deploy/.env).

# --- builder: a wheel of the package and wheels of its dependencies -----------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel needs (see .dockerignore): no tests, no data, no .env.
COPY pyproject.toml README.md ./
COPY whatslike ./whatslike
RUN pip wheel --wheel-dir /wheels .

# --- runtime: the wheels installed offline, no build tools, no sources --------------------
FROM python:3.11-slim-bookworm AS runtime
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
