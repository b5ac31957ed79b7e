# The recovery worker's image: dynamiq-redis-ckpt with its `worker` command, and the example flows for trying it.
# Build from the repository root:  docker build -t dynamiq-redis-ckpt-worker:dev .
# A real deployment builds FROM this image, adds its app's flows module to /app (or installs its app), and sets
# --flows to it (deploy/kubernetes: the ConfigMap's FLOWS).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PYTHONPATH=/app

WORKDIR /app
COPY pyproject.toml README.md /src/
COPY dynamiq_redis_ckpt /src/dynamiq_redis_ckpt
RUN pip install /src && rm -rf /src

COPY deploy/compose/example_flows.py deploy/compose/example_app.py /app/

# Not root. The root filesystem can be read-only: nothing writes outside /tmp (HOME), mounted writable in Kubernetes.
RUN groupadd --system --gid 10001 ckpt \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin ckpt
USER 10001:10001

# /metrics, /healthz (the poll loop completed a pass within --stall-seconds) and /readyz (Redis answers).
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

# The Redis url comes from $DYNAMIQ_REDIS_CKPT_URL. SIGTERM drains: running runs are handed back at once.
ENTRYPOINT ["dynamiq-redis-ckpt", "worker"]
CMD ["--flows", "example_flows:build_flow", "--metrics-port", "9464"]
