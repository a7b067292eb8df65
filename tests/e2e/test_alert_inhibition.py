"""Alertmanager's inhibit rule is scoped to one stack (issue 19, item 9).

Two stacks (two Prometheus servers, external label ``cluster``) send to one Alertmanager. The
collector of stack ``a`` is down: its BgTaskTelemetryMissing inhibits the other alerts of
stack ``a`` only; stack ``b``'s alerts stay active. Alerts are posted to the real Alertmanager
(collector-config/alertmanager.yml, rendered) through its API, as Prometheus posts them.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime

import pytest

from tests.e2e._infra import Alertmanager, AlertWebhook, eventually

pytestmark = pytest.mark.e2e


def _post(url: str, alerts: list[dict[str, object]]) -> None:
    request = urllib.request.Request(
        f"{url}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _alert(name: str, cluster: str, **labels: str) -> dict[str, object]:
    return {
        "labels": {"alertname": name, "cluster": cluster, "severity": "warning", **labels},
        "annotations": {"summary": name},
        "startsAt": datetime.now(UTC).isoformat(),
    }


def test_a_missing_collector_silences_its_own_stack_only(tmp_path):
    webhook = AlertWebhook()
    webhook.start()
    alertmanager = Alertmanager(tmp_path, webhook_url=webhook.url)
    try:
        alertmanager.start()
        _post(
            alertmanager.url,
            [
                _alert("BgTaskTelemetryMissing", "a", job="otel-collector", instance="c-a:8889"),
                _alert("BgTaskFailureRatioHigh", "a", job="shop", bgtasks_task_name="sync-crm"),
                _alert("BgTaskDeadLettersAccumulating", "a", job="shop"),
                _alert("BgTaskFailureRatioHigh", "b", job="shop", bgtasks_task_name="sync-crm"),
                _alert("BgTaskDeadLettersAccumulating", "b", job="shop"),
            ],
        )

        def states() -> dict[tuple[str, str], str]:
            found = {
                (a["labels"]["alertname"], a["labels"]["cluster"]): a["status"]["state"]
                for a in alertmanager.alerts()
            }
            return found if "active" in found.values() and len(found) == 5 else {}

        expected = {
            ("BgTaskTelemetryMissing", "a"): "active",
            ("BgTaskFailureRatioHigh", "a"): "suppressed",
            ("BgTaskDeadLettersAccumulating", "a"): "suppressed",
            ("BgTaskFailureRatioHigh", "b"): "active",
            ("BgTaskDeadLettersAccumulating", "b"): "active",
        }
        eventually(lambda: states() == expected, message=f"inhibition as {expected}")
        # and what reaches the pager: stack b's alerts, stack a's missing telemetry
        eventually(
            lambda: {
                (a["labels"]["alertname"], a["labels"]["cluster"])
                for a in webhook.alerts(status="firing")
            }
            == {k for k, v in expected.items() if v == "active"},
            message="the notifications of the alerts not inhibited",
        )
    finally:
        alertmanager.stop()
        webhook.stop()
