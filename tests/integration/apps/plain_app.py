"""A FastAPI app without a line of telemetry code: only `opentelemetry-instrument` sees it."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI

app = FastAPI()


async def send_report(user_id: int) -> None:
    return None


def resize_avatar(user_id: int) -> None:  # sync: Starlette's thread pool
    return None


@app.get("/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


@app.get("/report")
async def report(tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(send_report, 1)
    tasks.add_task(resize_avatar, 2)
    return {"scheduled": "send_report, resize_avatar"}
