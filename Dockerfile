# pdgate: the gateway (`pdgate serve`, the default) and emulated instances (`pdgate backend`).
#
#   docker build -t pdgate:local .
#   docker run --rm -p 8000:8000 pdgate:local                       # gateway, embedded config
#   docker run --rm -p 8000:8000 -v $PWD/my.yaml:/etc/pdgate/pdgate.yaml:ro \
#       pdgate:local serve --host 0.0.0.0 --config /etc/pdgate/pdgate.yaml
#   docker run --rm -p 8100:8100 -e PDGATE_HEALTH_URL=http://127.0.0.1:8100/health \
#       pdgate:local backend --device h100-sxm --model llama-3.1-8b --host 0.0.0.0 --port 8100
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PDGATE_HEALTH_URL=http://127.0.0.1:8000/health

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
# The pinned versions first (scripts/lock refreshes them), then pdgate itself on top.
RUN pip install --no-cache-dir -r requirements.lock
COPY gateway/ gateway/
COPY backends/ backends/
COPY config/ config/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pdgate

WORKDIR /home/pdgate
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8000
# The gateway's liveness endpoint; `pdgate backend` containers point PDGATE_HEALTH_URL at theirs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['PDGATE_HEALTH_URL'], timeout=2)"]

ENTRYPOINT ["pdgate"]
CMD ["serve", "--host", "0.0.0.0"]
