# The ingestor worker image: `langgraph-kusto worker`, non-root, with a health check.
# Build from the repository root (the context must hold pyproject.toml and the packages):
#   docker build -f infra/worker.Dockerfile -t langgraph-kusto-worker:0.1.0 .
#   az acr build -r <registry> -f infra/worker.Dockerfile -t langgraph-kusto-worker:0.1.0 .
# Settings come from the environment: LANGGRAPH_KUSTO_QUEUE, LANGGRAPH_KUSTO_CLUSTER,
# LANGGRAPH_KUSTO_DATABASE, AZURE_CLIENT_ID (the user-assigned identity), and
# LANGGRAPH_KUSTO_HEALTH_PORT (GET /healthz, 8080 by default).

FROM python:3.12-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

WORKDIR /src
# .dockerignore keeps tests, docs, venvs and caches out of the context.
COPY . .

# Build the project's wheel from the repository, then install it (and its dependencies)
# into a venv that the runtime stage copies as a whole: no compilers or sources ship.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/langgraph_checkpoint_kusto-*.whl \
    && /opt/venv/bin/langgraph-kusto worker --help > /dev/null


FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="langgraph-checkpoint-kusto worker" \
      org.opencontainers.image.description="Receives LangGraph checkpoint events from Azure Service Bus and ingests them into Azure Data Explorer" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    LANGGRAPH_KUSTO_HEALTH_PORT=8080

RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --create-home --home-dir /home/worker \
       --shell /usr/sbin/nologin worker

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/worker

EXPOSE 8080

# Container Apps uses its own probes (infra/modules/worker.bicep); this serves docker run,
# compose and Kubernetes-less hosts. slim images have no curl: ask Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LANGGRAPH_KUSTO_HEALTH_PORT', '8080') + '/healthz', timeout=4)"]

# The worker finishes and settles its batch on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["langgraph-kusto", "worker"]
