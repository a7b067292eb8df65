"""Unit tests of the Celery engine's parts that need no broker: the wire format (hostile
input), the outbox (deadline, capacity, order), the upstream filter, configuration checks."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import Celery, signals

from otel_bgtasks.celery import CeleryDispatcher
from otel_bgtasks.celery._outbox import Outbox
from otel_bgtasks.celery._upstream import filter_upstream, unfilter_upstream
from otel_bgtasks.celery._wire import HEADER, MessageError, decode_body, decode_header
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.options import EffectiveOptions
from otel_bgtasks.retry import RetryPolicy

GOOD = {
    "task_name": "t",
    "func_ref": "m:f",
    "serializer": "json",
    "payload": "{}",
    "signature": "",
    "durable": True,
    "route": "celery:q",
}


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ("x", "one JSON object"),
        ([], "one JSON object"),
        ([GOOD, GOOD], "one JSON object"),
        ([{**GOOD, "durable": "yes"}], "'durable'"),
        ([{**GOOD, "func_ref": 3}], "'func_ref' must be a string"),
        ([{**GOOD, "payload": "x" * (4 * 1024 * 1024 + 1)}], "longer than"),
        ([{k: v for k, v in GOOD.items() if k != "task_name"}], "'task_name'"),
    ],
)
def test_a_malformed_body_is_refused_with_what_is_wrong(args: Any, why: str) -> None:
    with pytest.raises(MessageError, match=why) as raised:
        decode_body("abc", args)
    assert "refused" in str(raised.value)
    assert "nothing was run" in str(raised.value)


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (None, "no 'bgtasks' header"),
        ({HEADER: "x"}, "no 'bgtasks' header"),
        ({HEADER: {"task_id": "abc"}}, "enqueued_at"),
        ({HEADER: {"task_id": "abc", "enqueued_at": float("nan")}}, "enqueued_at"),
        ({HEADER: {"task_id": "abc", "enqueued_at": 1e300}}, "enqueued_at"),
        ({HEADER: {"task_id": "abc", "enqueued_at": True}}, "enqueued_at"),
        ({HEADER: {"task_id": "other", "enqueued_at": 1.0}}, "differs"),
        ({HEADER: {"task_id": "abc", "enqueued_at": 1.0, "traceparent": "x" * 100}}, "longer"),
        ({HEADER: {"task_id": "abc", "enqueued_at": 1.0, "max_deliveries": "9"}}, "integer"),
    ],
)
def test_a_malformed_header_is_refused(headers: Any, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        decode_header("abc", headers)


def test_max_deliveries_from_the_broker_is_clamped() -> None:
    header = decode_header("abc", {HEADER: {"task_id": "abc", "enqueued_at": 1.0,
                                            "max_deliveries": 10**9}})  # fmt: skip
    assert header.max_deliveries == 100


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_outbox_publishes_in_order_and_retries_until_the_deadline() -> None:
    clock = Clock()
    published: list[int] = []
    expired: list[tuple[int, str | None]] = []
    failures = {"left": 2}
    done = threading.Event()

    def publish(item: int) -> None:
        if item == 1 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("down")
        if item == 3:
            clock.now = 100.0  # the broker stays down past every deadline
            raise ConnectionError("down for good")
        published.append(item)

    def give_up(item: int, error: BaseException | None) -> None:
        expired.append((item, type(error).__name__ if error else None))
        if item == 4:
            done.set()

    outbox: Outbox[int] = Outbox(
        publish, give_up, capacity=10, deadline=10.0, clock=clock, backoff=(0.0, 0.0)
    )
    outbox.put_many([1, 2, 3, 4])
    assert done.wait(10)
    assert published == [1, 2]
    assert expired == [(3, "ConnectionError"), (4, "ConnectionError")]
    assert outbox.join(5)
    assert outbox.backlog == 0
    outbox.close()


def test_a_full_outbox_hands_over_what_it_cannot_hold() -> None:
    gate = threading.Event()
    expired: list[tuple[int, Any]] = []

    def publish(item: int) -> None:
        gate.wait(10)

    outbox: Outbox[int] = Outbox(
        publish, lambda item, error: expired.append((item, error)), capacity=2, deadline=60.0
    )
    accepted = [outbox.put(i) for i in range(4)]
    assert accepted == [True, True, False, False]
    gate.set()
    assert outbox.join(10)
    assert expired == [(2, None), (3, None)]
    outbox.close()


def test_upstream_receivers_are_skipped_for_our_task_only() -> None:
    calls: list[str] = []

    def upstream_like(sender: Any = None, **_: Any) -> None:
        calls.append(f"upstream:{sender}")

    upstream_like.__module__ = "opentelemetry.instrumentation.celery"

    def ours(sender: Any = None, **_: Any) -> None:
        calls.append(f"other:{sender}")

    signals.before_task_publish.connect(upstream_like, weak=False)
    signals.before_task_publish.connect(ours, weak=False)
    try:
        filter_upstream("our.task")
        signals.before_task_publish.send(sender="our.task")
        signals.before_task_publish.send(sender="their.task")
        unfilter_upstream("our.task")
        signals.before_task_publish.send(sender="our.task")
    finally:
        signals.before_task_publish.disconnect(upstream_like)
        signals.before_task_publish.disconnect(ours)
    assert calls == [
        "other:our.task",
        "upstream:their.task",
        "other:their.task",
        "upstream:our.task",
        "other:our.task",
    ]


def _options(**changes: Any) -> EffectiveOptions:
    base: dict[str, Any] = {
        "name": "charge",
        "function": "m.charge",
        "is_async": False,
        "retry": None,
        "breaker": None,
        "timeout": 5.0,
        "durable": True,
    }
    return EffectiveOptions(**{**base, **changes})


def test_a_durable_task_must_finish_within_the_visibility_timeout() -> None:
    app = Celery("u", broker="redis://127.0.0.1:1/0")
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    dispatcher = CeleryDispatcher(app, queue="unit-visibility")
    dispatcher.check_options(_options())  # 5 s < 60 s
    dispatcher.check_options(_options(durable=False, timeout=None))  # at most once: no bound
    dispatcher.check_options(_options(timeout=None))  # no known worst case: logged, allowed
    with pytest.raises(ConfigurationError) as raised:
        dispatcher.check_options(_options(retry=RetryPolicy(max_attempts=4, max_delay=10.0),
                                          timeout=15.0))  # fmt: skip
    assert "worst-case run is 90s (4 attempts x timeout 15s + 3 retry delays of up to 10s)" in str(
        raised.value
    )
    assert "visibility_timeout=60s" in str(raised.value)
    dispatcher.close()


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"queue": ""}, "queue"),
        ({"publish_timeout": 0}, "publish_timeout"),
        ({"publish_deadline": float("inf")}, "publish_deadline"),
        ({"max_backlog": 1.5}, "max_backlog"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"max_deliveries": 1000}, "at most 100"),
        ({"publish_timeout": 10, "publish_deadline": 5}, "could never be retried"),
    ],
)
def test_dispatcher_settings_are_checked(kwargs: dict[str, Any], why: str) -> None:
    app = Celery("u", broker="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match=why):
        CeleryDispatcher(app, **kwargs)


def test_the_dispatcher_needs_a_celery_app() -> None:
    with pytest.raises(ConfigurationError, match="pass the Celery app"):
        CeleryDispatcher("redis://localhost")  # type: ignore[arg-type]


def test_a_new_dispatcher_for_the_same_queue_takes_over_its_route() -> None:
    from otel_bgtasks.routes import dispatcher_for

    app = Celery("u", broker="redis://127.0.0.1:1/0")
    first = CeleryDispatcher(app, queue="unit-route")
    second = CeleryDispatcher(app, queue="unit-route")
    assert dispatcher_for("celery:unit-route") is second
    second.close()
    assert dispatcher_for("celery:unit-route") is None
    first.close()
