# The two commands of the README. Each sets itself up: a virtual environment in .venv with the
# package and its dev tools; `make test` also obtains the real telemetry components
# (scripts/infra.sh: collector, Jaeger, Prometheus and Alertmanager built with Go, Redis from
# apt). Without Go or apt those tests skip with a reason, unless
# OTEL_BGTASKS_REQUIRE_INFRA=1 (as in CI) turns the skip into a failure.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/otel-bgtasks

.PHONY: demo test lint unit bench infra clean upstream upstream-all

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m otel_bgtasks.demo

infra:
	@scripts/infra.sh || { \
	  if [ "$${OTEL_BGTASKS_REQUIRE_INFRA:-0}" = 1 ]; then exit 1; fi; \
	  echo "infra: could not obtain the telemetry components; their tests will skip"; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: $(VENV)/.installed infra lint
	@if [ -f "$(CACHE)/env.sh" ]; then . "$(CACHE)/env.sh"; fi; \
	$(PY) -m pytest --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Starlette's own test suite, unchanged, on asyncio and trio, with the package instrumented
# (scripts/upstream/run.py; about a minute once its environment is cached). CI runs it.
upstream: $(VENV)/.installed
	$(PY) scripts/upstream/run.py --suite starlette

# Starlette's and FastAPI's suites on both backends (about 10 minutes on 2 cores).
upstream-all: $(VENV)/.installed
	$(PY) scripts/upstream/run.py

bench: $(VENV)/.installed infra
	@if [ -f "$(CACHE)/env.sh" ]; then . "$(CACHE)/env.sh"; fi; \
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
