"""The shop's app factory: a signup schedules the welcome mail."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI
from pydantic import BaseModel

from otel_bgtasks import background_task
from shop import mailer


@background_task(name="send-welcome-mail")
def send_welcome_mail(address: str) -> None:
    mailer.send(address, "Welcome to the shop")


class Signup(BaseModel):
    email: str


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/signup")
    async def signup(body: Signup, tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(send_welcome_mail, body.email)
        return {"ok": True}

    return app
