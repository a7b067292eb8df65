"""Small FastAPI apps the integration tests run in subprocesses (``tests.integration.apps.X:app``).

Task functions live in modules without import-time side effects (`durable_tasks`, `tasks`), so
the test process can import them to re-run or replay what a server process journaled.
"""
