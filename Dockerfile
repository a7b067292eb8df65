# The otel-bgtasks demo application, built from this repository (see docker-compose.yml).
#   docker build -t otel-bgtasks-demo .
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# .dockerignore keeps the context to what the package build needs.
COPY pyproject.toml README.md ./
COPY src ./src
# redis: the compose file's dead-letter store; celery: the worker service (GET /report)
RUN pip install ".[demo,redis,celery]" && rm -rf /src

# Run unprivileged from a writable home: without OTEL_BGTASKS_DLQ_URL the dead letters go to
# ~/.local/state/otel-bgtasks/dead-letters.db.
RUN useradd --system --create-home --home-dir /home/app app
USER app
WORKDIR /home/app

ENV OTEL_SERVICE_NAME=bgtasks-demo \
    OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4317
EXPOSE 8000
CMD ["uvicorn", "otel_bgtasks.demo.app:app", "--host", "0.0.0.0", "--port", "8000"]
