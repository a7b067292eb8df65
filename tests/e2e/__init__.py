"""End-to-end tests: the real collector, Jaeger, Prometheus, Alertmanager, Redis and uvicorn."""
