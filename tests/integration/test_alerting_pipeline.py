"""Alerting end to end: the real instrumentation makes the task spans, the processor runs the
rules, a real loopback server gets the notifications; and a channel that hangs or refuses
never reaches the task path."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.integration.test_alerting_servers import (
    HangingServer,
    RecordingHTTPServer,
    refused_url,
)
from tests.support.waiting import wait_until

from otel_bgtasks import attributes as attr
from otel_bgtasks import schedule
from otel_bgtasks.alerting import (
    AlertingSpanProcessor,
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMoves,
    DeliveryOptions,
    WebhookNotifier,
    install_alerting,
)
from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.stores import open_store

NO_BACKOFF = {"backoff_initial": 0.0, "backoff_max": 0.0}
DOWNSTREAM = {"up": True}


class PaymentGatewayDown(ConnectionError):
    pass


async def charge_card(order: int) -> None:
    if not DOWNSTREAM["up"]:
        raise PaymentGatewayDown(f"gateway refused order {order}")


@pytest.fixture
def http() -> Iterator[RecordingHTTPServer]:
    server = RecordingHTTPServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def downstream_up() -> Iterator[None]:
    DOWNSTREAM["up"] = True
    yield
    DOWNSTREAM["up"] = True


def sent_counts(reader: InMemoryMetricReader) -> dict[tuple[str, str, str], int]:
    counts: dict[tuple[str, str, str], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "bgtasks.alerts.sent":
                    continue
                assert metric.unit == "{notification}"
                for point in metric.data.data_points:
                    a = point.attributes
                    key = (
                        str(a["bgtasks.alert.rule"]),
                        str(a["bgtasks.alert.channel"]),
                        str(a["bgtasks.alert.outcome"]),
                    )
                    counts[key] = int(point.value)
    return counts


# -- end to end ------------------------------------------------------------------------------


async def test_schedule_failing_twice_fires_then_a_success_resolves(telemetry, instrument, http):
    processor = install_alerting(
        telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        rules=[ConsecutiveFailures(2, cooldown=0)],
        notifiers=[WebhookNotifier(http.url("/alerts"))],
        delivery=DeliveryOptions(**NO_BACKOFF),
    )
    instrument(retry=RetryPolicy(max_attempts=1))
    DOWNSTREAM["up"] = False
    await schedule(charge_card, 1).run()
    await schedule(charge_card, 2).run()
    assert processor.force_flush(10_000)
    (firing,) = http.wait_for(1)
    failed_span = telemetry.spans()[-1]
    assert failed_span.name == "process charge_card"
    body = firing.json()
    assert (body["status"], body["rule"], body["key"]) == (
        "firing",
        "consecutive_failures",
        "task:charge_card",
    )
    assert body["summary"] == "Task charge_card failed 2 times in a row"
    assert body["labels"]["task"] == "charge_card"
    assert body["details"]["error_type"].endswith("PaymentGatewayDown")
    assert body["details"]["error_category"] == "connection"
    assert body["run"]["trace_id"] == format(failed_span.context.trace_id, "032x")
    assert body["run"]["task_id"] == failed_span.attributes[attr.TASK_ID]

    DOWNSTREAM["up"] = True
    await schedule(charge_card, 3).run()
    assert processor.force_flush(10_000)
    _, resolved = http.wait_for(2)
    assert (resolved.json()["status"], resolved.json()["key"]) == ("resolved", "task:charge_card")
    assert sent_counts(telemetry.reader) == {("consecutive_failures", "webhook", "sent"): 2}
    # Delivery made no spans of its own: only the three task runs were traced.
    assert [s.name for s in telemetry.spans()] == ["process charge_card"] * 3


def test_fastapi_under_uvicorn_circuit_and_dead_letters(telemetry, instrument, http, tmp_path):
    now = [1_000.0]
    processor = install_alerting(
        telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        rules=[
            ConsecutiveFailures(2, cooldown=0),
            CircuitOpened(cooldown=0),
            DeadLetterMoves(cooldown=0),
        ],
        notifiers=[WebhookNotifier(http.url("/alerts"))],
        delivery=DeliveryOptions(max_concurrency=1, **NO_BACKOFF),  # one thread: in order
    )
    instrument(
        retry=RetryPolicy(max_attempts=1),
        circuit=CircuitBreaker(
            "payments", failure_threshold=2, open_duration=30, clock=lambda: now[0]
        ),
        dead_letter_store=open_store(f"sqlite:///{tmp_path / 'dlq.db'}", buffered=False),
    )
    app = FastAPI()

    @app.post("/orders/{order}")
    async def order(order: int, tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(charge_card, order)
        return {"accepted": order}

    def alerts() -> list[tuple[str, str, str]]:
        assert processor.force_flush(10_000)
        return [(b["rule"], b["status"], b["key"]) for b in (r.json() for r in http.requests)]

    with UvicornThread(app) as server, server.client() as client:
        DOWNSTREAM["up"] = False
        for n in (1, 2, 3):  # fail, fail (the circuit opens), rejected by the open circuit
            assert client.post(f"/orders/{n}").status_code == 200
            wait_for_tasks()
        assert alerts() == [
            ("dead_letter_moves", "firing", "task:charge_card"),
            ("consecutive_failures", "firing", "task:charge_card"),
            ("circuit_opened", "firing", "circuit:payments"),
            ("dead_letter_moves", "firing", "task:charge_card"),
            ("dead_letter_moves", "firing", "task:charge_card"),
        ]
        DOWNSTREAM["up"] = True
        now[0] += 31  # the circuit lets a probe through, which succeeds
        assert client.post("/orders/4").status_code == 200
        wait_for_tasks()
        assert alerts()[5:] == [
            ("consecutive_failures", "resolved", "task:charge_card"),
            ("circuit_opened", "resolved", "circuit:payments"),
        ]
    bodies = [r.json() for r in http.requests]
    opened = bodies[2]
    service = telemetry.tracer_provider.resource.attributes["service.name"]
    assert opened["labels"] == {"circuit": "payments", "task": "charge_card", "service": service}
    assert (opened["details"]["from"], opened["details"]["to"]) == ("closed", "open")
    rejected = bodies[4]
    assert rejected["details"]["outcome"] == "rejected"
    assert rejected["details"]["reason"] == "circuit_open"
    assert rejected["summary"] == "Task charge_card moved to the dead-letter store 3 times in 300s"
    assert bodies[0]["details"]["entry_id"]
    assert sent_counts(telemetry.reader) == {
        ("dead_letter_moves", "webhook", "sent"): 3,
        ("consecutive_failures", "webhook", "sent"): 2,
        ("circuit_opened", "webhook", "sent"): 2,
    }


def test_retries_against_a_real_server_then_delivered(telemetry, http):
    http.statuses = [503, 502]
    processor = install_alerting(
        telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        rules=[ConsecutiveFailures(1)],
        notifiers=[WebhookNotifier(http.url("/alerts"))],
        delivery=DeliveryOptions(max_attempts=3, **NO_BACKOFF),
    )
    end_task_span(telemetry.tracer_provider, "charge_card")
    assert processor.force_flush(10_000)
    assert [r.json()["status"] for r in http.wait_for(3)] == ["firing"] * 3
    assert sent_counts(telemetry.reader) == {("consecutive_failures", "webhook", "sent"): 1}


# -- a channel that hangs or refuses ---------------------------------------------------------


def end_task_span(provider: TracerProvider, name: str, outcome: str = "failure") -> int:
    """End one failed task span; return the nanoseconds `end()` took (every on_end)."""
    span = provider.get_tracer("test").start_span(
        f"process {name}", attributes={attr.TASK_NAME: name, attr.TASK_ID: "1"}
    )
    span.set_attribute(attr.TASK_OUTCOME, outcome)
    started = time.perf_counter_ns()
    span.end()
    return time.perf_counter_ns() - started


def test_a_hanging_channel_holds_no_task_and_the_queue_drops_at_its_bound(telemetry):
    hanging = HangingServer()
    processor = AlertingSpanProcessor(
        [ConsecutiveFailures(1, cooldown=0)],
        [WebhookNotifier(hanging.url(), timeout=60)],
        meter_provider=telemetry.meter_provider,
        delivery=DeliveryOptions(queue_size=2, max_concurrency=1, max_attempts=1),
    )
    telemetry.tracer_provider.add_span_processor(processor)
    delivery = processor.delivery
    try:
        # Ten tasks fail once: ten alerts. The first one's delivery is taken by the only
        # delivery thread and stays in the server's hands, unanswered...
        end_task_span(telemetry.tracer_provider, "task-0")
        wait_until(lambda: hanging.accepted == 1, what="the hanging server to get the request")
        assert delivery.in_flight == 1
        # ...while every on_end has returned: the task path did not wait for it.
        for i in range(1, 10):
            end_task_span(telemetry.tracer_provider, f"task-{i}")
            assert delivery.queued <= 2
        wait_until(
            lambda: (
                processor.pending_signals == 0 and sum(sent_counts(telemetry.reader).values()) == 7
            ),
            what=f"7 drops, got {sent_counts(telemetry.reader)}",
        )
        assert sent_counts(telemetry.reader) == {("consecutive_failures", "webhook", "dropped"): 7}
        assert (delivery.in_flight, delivery.queued, delivery.high_water) == (1, 2, 2)
        assert not processor.force_flush(100)  # delivery is stuck, the flush says so
        processor.shutdown(timeout=0.2)
        assert delivery.queued == 0
        assert sent_counts(telemetry.reader) == {
            ("consecutive_failures", "webhook", "dropped"): 9  # 7 at the bound, 2 at shutdown
        }
    finally:
        processor.shutdown(timeout=0.2)
        hanging.close()  # the stuck request now fails and its thread ends
    wait_until(lambda: delivery.threads_alive == 0, what="the delivery thread to end")
    assert sent_counts(telemetry.reader) == {
        ("consecutive_failures", "webhook", "dropped"): 9,
        ("consecutive_failures", "webhook", "failed"): 1,
    }


def test_a_refused_channel_fails_with_retries_and_counts_every_notification(telemetry):
    with refused_url() as url:
        processor = AlertingSpanProcessor(
            [ConsecutiveFailures(1, cooldown=0)],
            [WebhookNotifier(url)],
            meter_provider=telemetry.meter_provider,
            delivery=DeliveryOptions(queue_size=4, max_concurrency=2, max_attempts=3, **NO_BACKOFF),
        )
        telemetry.tracer_provider.add_span_processor(processor)
        for i in range(20):
            end_task_span(telemetry.tracer_provider, f"task-{i}")
        assert processor.force_flush(10_000)
        processor.shutdown()
    counts = sent_counts(telemetry.reader)
    assert set(counts) <= {
        ("consecutive_failures", "webhook", "failed"),
        ("consecutive_failures", "webhook", "dropped"),
    }
    assert sum(counts.values()) == 20  # each alert counted once, whatever became of it
    assert counts[("consecutive_failures", "webhook", "failed")] >= 1
    assert processor.delivery.high_water <= 4


@pytest.mark.parametrize("channel", ["hanging", "refused"])
def test_task_path_cost_with_and_without_alerting(channel, capsys):
    """Measure what `span.end()` costs a task (all `on_end`s), with no alerting and with
    alerting whose only channel hangs or refuses. Printed, not asserted: timing on a shared
    CI machine is no contract; what is asserted is that nothing on the path waits."""
    runs = 2_000
    results = {}
    processors = []
    with ExitStack() as stack:
        if channel == "hanging":
            hanging = HangingServer()
            stack.callback(hanging.close)
            url = hanging.url()
        else:
            url = stack.enter_context(refused_url())
        for label in ("without alerting", f"with alerting, channel {channel}"):
            provider = TracerProvider(shutdown_on_exit=False)
            provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
            meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            processor = None
            if label.startswith("with "):
                processor = AlertingSpanProcessor(
                    [ConsecutiveFailures(1, cooldown=0)],
                    [WebhookNotifier(url, timeout=60)],
                    meter_provider=meter_provider,
                    delivery=DeliveryOptions(queue_size=8, max_concurrency=2, max_attempts=3),
                )
                provider.add_span_processor(processor)
                processors.append(processor)
            for i in range(200):  # warm up
                end_task_span(provider, f"warm-{i % 50}")
            samples = sorted(end_task_span(provider, f"task-{i % 50}") for i in range(runs))
            results[label] = samples
            if processor is not None:
                assert processor.pending_signals <= processor.queue_size
                assert processor.delivery.queued <= 8
                processor.shutdown(timeout=0.2)
            provider.shutdown()
            meter_provider.shutdown()
    # The servers are closed: deliveries stuck at shutdown end now (failed), threads exit.
    for processor in processors:
        wait_until(lambda p=processor: p.delivery.threads_alive == 0, what="delivery threads")
    with capsys.disabled():
        print(f"\n  span.end() cost per task span ({runs} spans):")
        for label, samples in results.items():
            p50 = statistics.median(samples) / 1000
            p99 = samples[int(len(samples) * 0.99)] / 1000
            print(f"    {label:<34} p50 {p50:7.1f} us   p99 {p99:7.1f} us")
