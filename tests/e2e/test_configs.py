"""Static checks of the shipped configuration files, run by the real tools where one exists.

promtool, amtool, the built collector and Jaeger validate their configs; promtool's rule unit
tests (collector-config/alert-rules.test.yml) prove every alert fires on the series it should;
the compose file, dashboard and provisioning are checked for consistency with the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e._infra import (
    CONFIG_DIR,
    METRICS_PATHS,
    REPO_ROOT,
    render_alert_rules,
    render_alertmanager_config,
    render_prometheus_config,
    require,
)

pytestmark = pytest.mark.e2e

ALERTS = {
    "BgTaskFailureRatioHigh",
    "BgTaskDeadLettersAccumulating",
    "BgTaskCircuitOpen",
    "BgTaskDurationP95High",
    "BgTaskStuck",
    "BgTaskTelemetryMissing",
    "BgTaskBacklog",
    "BgTaskPublishBacklog",
    "BgTaskSkipped",
}
DASHBOARD = CONFIG_DIR / "grafana" / "dashboards" / "bgtasks-overview.json"


def run(
    *argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_success(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- Prometheus


@pytest.mark.parametrize("rendered", [False, True], ids=["shipped", "rendered"])
def test_prometheus_config_passes_promtool(tmp_path: Path, rendered: bool) -> None:
    promtool = require("promtool")
    config = (
        render_prometheus_config(
            tmp_path, collector_target="127.0.0.1:18889", alertmanager_target="127.0.0.1:19093"
        )
        if rendered
        else CONFIG_DIR / "prometheus.yml"
    )

    result = run(promtool, "check", "config", config)

    assert_success(result)
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rendered_prometheus_config_changes_only_addresses_and_intervals(tmp_path: Path) -> None:
    config = render_prometheus_config(
        tmp_path, collector_target="127.0.0.1:18889", alertmanager_target="127.0.0.1:19093"
    )
    shipped = load_yaml(CONFIG_DIR / "prometheus.yml")
    expected = {
        **shipped,
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"cluster": "otel-bgtasks"},
        },
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": ["127.0.0.1:19093"]}]}]},
        "scrape_configs": [
            {
                "job_name": "otel-collector",
                "honor_labels": True,
                "static_configs": [{"targets": ["127.0.0.1:18889"]}],
            }
        ],
    }

    assert load_yaml(config) == expected


@pytest.mark.parametrize("for_duration", [None, "0s"], ids=["shipped", "for-0s"])
def test_alert_rules_pass_promtool(tmp_path: Path, for_duration: str | None) -> None:
    promtool = require("promtool")
    rules = render_alert_rules(tmp_path, for_duration=for_duration)

    result = run(promtool, "check", "rules", rules)

    assert_success(result)
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    """Every alert fires (with its labels and annotations) where it should, in simulated time."""
    promtool = require("promtool")

    result = run(promtool, "test", "rules", "alert-rules.test.yml", cwd=CONFIG_DIR)

    assert_success(result)
    assert "SUCCESS" in result.stdout


def test_alert_rules_are_complete_documented_and_tested() -> None:
    rules = [
        rule
        for group in load_yaml(CONFIG_DIR / "alert-rules.yml")["groups"]
        for rule in group["rules"]
    ]
    runbook = (CONFIG_DIR / "RUNBOOK.md").read_text()
    anchors = {heading.lower() for heading in re.findall(r"(?m)^## (\S+)$", runbook)}
    tests = load_yaml(CONFIG_DIR / "alert-rules.test.yml")["tests"]
    proven = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case.get("exp_alerts")
    }

    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["annotations"]["runbook_url"] == (
            f"collector-config/RUNBOOK.md#{rule['alert'].lower()}"
        )
        assert rule["alert"].lower() in anchors, f"RUNBOOK.md has no section {rule['alert']}"
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    assert proven == ALERTS, "every alert needs a promtool test case where it fires"
    assert silent == ALERTS, "every alert needs a promtool test case where it stays silent"


def test_rendered_alert_rules_only_change_for_durations(tmp_path: Path) -> None:
    shipped = load_yaml(CONFIG_DIR / "alert-rules.yml")
    rendered = load_yaml(render_alert_rules(tmp_path, for_duration="0s"))

    for group in shipped["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    assert rendered == shipped


# --------------------------------------------------------------------------- Alertmanager


@pytest.mark.parametrize("rendered", [False, True], ids=["shipped", "rendered"])
def test_alertmanager_config_passes_amtool(tmp_path: Path, rendered: bool) -> None:
    amtool = require("amtool")
    config = (
        render_alertmanager_config(tmp_path, webhook_url="http://127.0.0.1:15001/alerts")
        if rendered
        else CONFIG_DIR / "alertmanager.yml"
    )

    result = run(amtool, "check-config", config)

    assert_success(result)
    assert "SUCCESS" in result.stdout
    assert "1 receivers" in result.stdout


# --------------------------------------------------------------------------- collector, Jaeger


def components(binary: Path) -> dict[str, dict[str, str]]:
    """``{kind: {type: module}}`` from a collector distribution's ``components`` command."""
    result = run(binary, "components")
    assert_success(result)
    listed = yaml.safe_load(result.stdout)
    return {
        kind: {entry["name"]: entry.get("module", "") for entry in listed.get(kind) or []}
        for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
    }


def configured_types(config: dict[str, Any]) -> dict[str, set[str]]:
    """Component types used in a collector config (``otlp_grpc/jaeger`` -> ``otlp_grpc``)."""
    return {
        kind: {component_id.split("/")[0] for component_id in config.get(kind) or {}}
        for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
    }


@pytest.mark.parametrize("metrics_path", sorted(METRICS_PATHS))
def test_collector_config_is_valid(metrics_path: str) -> None:
    otelcol = require("otelcol")

    result = run(
        otelcol,
        "validate",
        f"--config={CONFIG_DIR / 'otelcol.yaml'}",
        env={"OTELCOL_METRICS_EXPORTER": METRICS_PATHS[metrics_path]},
    )

    assert_success(result)


def test_collector_metrics_paths_are_the_configured_exporters() -> None:
    config = load_yaml(CONFIG_DIR / "otelcol.yaml")

    assert config["service"]["pipelines"]["metrics"]["exporters"] == [
        "${env:OTELCOL_METRICS_EXPORTER:-prometheus}"
    ]
    assert set(METRICS_PATHS.values()) <= set(config["exporters"])
    # Both paths put the same resource attributes on every series.
    prometheus = load_yaml(CONFIG_DIR / "prometheus.yml")
    assert (
        config["exporters"]["prometheus"]["resource_constant_labels"]["included"]
        == prometheus["otlp"]["promote_resource_attributes"]
    )


def test_collector_config_uses_current_component_names() -> None:
    """Deprecated aliases (``otlp`` for ``otlp_grpc``, ...) are not listed by ``components``."""
    available = components(require("otelcol"))
    used = configured_types(load_yaml(CONFIG_DIR / "otelcol.yaml"))

    for kind, types in used.items():
        assert types <= set(available[kind]), f"{kind}: {types - set(available[kind])}"


def test_collector_binary_is_built_from_the_manifest() -> None:
    manifest = load_yaml(CONFIG_DIR / "builder-config.yaml")
    available = components(require("otelcol"))

    for kind in ("receivers", "processors", "exporters", "connectors", "extensions"):
        assert sorted(available[kind].values()) == sorted(m["gomod"] for m in manifest[kind])


def test_builder_manifest_pins_the_checked_versions() -> None:
    manifest = load_yaml(CONFIG_DIR / "builder-config.yaml")
    modules = [
        entry["gomod"]
        for kind in (
            "receivers",
            "processors",
            "exporters",
            "connectors",
            "extensions",
            "providers",
        )
        for entry in manifest[kind]
    ]

    for module in modules:
        path, version = module.split()
        if "/confmap/provider/" in path:
            assert version == "v1.71.0", module
        elif path.startswith("github.com/open-telemetry/opentelemetry-collector-contrib/"):
            assert version == "v0.165.1", module
        else:
            assert path.startswith("go.opentelemetry.io/collector/"), module
            assert version == "v0.165.0", module


def test_jaeger_config_is_valid() -> None:
    jaeger = require("jaeger")

    result = run(jaeger, "validate", f"--config=file:{CONFIG_DIR / 'jaeger.yaml'}")

    assert_success(result)


def test_jaeger_config_uses_components_of_its_distribution() -> None:
    available = components(require("jaeger"))
    used = configured_types(load_yaml(CONFIG_DIR / "jaeger.yaml"))

    for kind, types in used.items():
        assert types <= set(available[kind]), f"{kind}: {types - set(available[kind])}"


# --------------------------------------------------------------------------- docker compose


def compose() -> dict[str, Any]:
    return dict(load_yaml(REPO_ROOT / "docker-compose.yml"))


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """``{container path: repository path}`` of a service's bind mounts."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"not a repository bind mount: {volume}"
        mounts[target] = source
    return mounts


def test_compose_refers_only_to_files_in_the_repository() -> None:
    services = compose()["services"]

    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert (REPO_ROOT / source).exists(), f"{name}: {source} (for {target}) is missing"
        if "build" in service:
            context = REPO_ROOT / service["build"]["context"]
            assert context.is_dir(), f"{name}: build context {context} is missing"
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()


def infra_versions() -> dict[str, str]:
    """``{NAME: value}`` of the ``*_VERSION=`` assignments in scripts/infra.sh."""
    script = (REPO_ROOT / "scripts" / "infra.sh").read_text()
    return dict(re.findall(r"(?m)^([A-Z_]+_VERSION)=(\S+)", script))


def test_compose_pins_the_versions_the_tests_run() -> None:
    services = compose()["services"]
    versions = infra_versions()

    assert services["prometheus"]["image"] == f"prom/prometheus:v{versions['PROMETHEUS_VERSION']}"
    assert services["alertmanager"]["image"] == (
        f"prom/alertmanager:v{versions['ALERTMANAGER_VERSION']}"
    )
    assert services["jaeger"]["image"] == f"jaegertracing/jaeger:{versions['JAEGER_VERSION']}"
    collector_version = load_yaml(CONFIG_DIR / "builder-config.yaml")["dist"]["version"]
    assert services["otel-collector"]["image"] == (
        f"otel/opentelemetry-collector-contrib:{collector_version}"
    )


@pytest.mark.parametrize(
    ("binary", "version_key"),
    [
        ("prometheus", "PROMETHEUS_VERSION"),
        ("promtool", "PROMETHEUS_VERSION"),
        ("alertmanager", "ALERTMANAGER_VERSION"),
        ("amtool", "ALERTMANAGER_VERSION"),
    ],
)
def test_the_tests_run_the_pinned_versions(binary: str, version_key: str) -> None:
    result = run(require(binary), "--version")

    assert_success(result)
    first_line = (result.stdout or result.stderr).splitlines()[0]
    assert f", version {infra_versions()[version_key]} " in first_line, first_line


def test_compose_images_are_pinned() -> None:
    for name, service in compose()["services"].items():
        if "image" in service:
            image, _, tag = service["image"].rpartition(":")
            assert image, f"{name}: {service['image']} has no tag"
            assert tag not in {"latest", "main", "master"}, f"{name}: {service['image']}"


def test_compose_mounts_the_configs_the_tests_load() -> None:
    services = compose()["services"]
    mounted = {source for service in services.values() for source in bind_mounts(service).values()}

    assert mounted == {
        "./collector-config/otelcol.yaml",
        "./collector-config/jaeger.yaml",
        "./collector-config/prometheus.yml",
        "./collector-config/alert-rules.yml",
        "./collector-config/alertmanager.yml",
        "./collector-config/grafana/provisioning",
        "./collector-config/grafana/dashboards",
    }
    # Each process reads its config from where it is mounted.
    collector = services["otel-collector"]
    assert bind_mounts(collector)[collector["command"][0].removeprefix("--config=")]
    jaeger = services["jaeger"]
    assert bind_mounts(jaeger)[jaeger["command"][0].removeprefix("--config=file:")]
    prometheus = services["prometheus"]
    prometheus_config = prometheus["command"][0].removeprefix("--config.file=")
    rules = load_yaml(CONFIG_DIR / "prometheus.yml")["rule_files"]
    for path in [prometheus_config, *(str(Path(prometheus_config).parent / r) for r in rules)]:
        assert path in bind_mounts(prometheus), path
    alertmanager = services["alertmanager"]
    assert bind_mounts(alertmanager)[alertmanager["command"][0].removeprefix("--config.file=")]
    provider = load_yaml(CONFIG_DIR / "grafana/provisioning/dashboards/dashboards.yaml")
    assert provider["providers"][0]["options"]["path"] in bind_mounts(services["grafana"])


def test_compose_wires_services_by_name() -> None:
    services = compose()["services"]
    app_env = services["app"]["environment"]
    collector = load_yaml(CONFIG_DIR / "otelcol.yaml")
    datasources = load_yaml(CONFIG_DIR / "grafana/provisioning/datasources/datasources.yaml")

    assert app_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert app_env["OTEL_SERVICE_NAME"] == "bgtasks-demo"
    assert "${env:OTELCOL_JAEGER_ENDPOINT:-localhost:14317}" in json.dumps(collector)
    assert services["otel-collector"]["environment"]["OTELCOL_JAEGER_ENDPOINT"] == "jaeger:14317"
    assert {ds["uid"]: ds["url"] for ds in datasources["datasources"]} == {
        "prometheus": "http://prometheus:9090",
        "jaeger": "http://jaeger:16686",
    }
    assert "load" in services["loadgen"]["profiles"]
    assert "http://app:8000/" in services["loadgen"]["command"][0]


def test_dockerfile_runs_the_demo_app() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()

    assert (REPO_ROOT / "src/otel_bgtasks/demo/app.py").is_file()
    assert '"otel_bgtasks.demo.app:app"' in dockerfile
    # the demo's server and traffic (demo), the compose file's Redis dead-letter store, and
    # its Celery worker (celery)
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["app"]["environment"]["OTEL_BGTASKS_DLQ_URL"].startswith("redis://")
    assert 'pip install ".[demo,redis,celery]"' in dockerfile
    worker = compose["services"]["worker"]
    assert worker["command"][:3] == ["celery", "-A", "otel_bgtasks.demo.worker"]
    assert worker["environment"]["OTEL_BGTASKS_DLQ_URL"] == (
        compose["services"]["app"]["environment"]["OTEL_BGTASKS_DLQ_URL"]
    )
    assert (REPO_ROOT / "src/otel_bgtasks/demo/worker.py").is_file()


# --------------------------------------------------------------------------- Grafana


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def test_dashboard_panels_have_queries_units_and_legends() -> None:
    dashboard = json.loads(DASHBOARD.read_text())

    assert len(panels(dashboard)) >= 10
    for panel in panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target["legendFormat"].strip(), title
            assert target["datasource"]["uid"] == "prometheus", title
            # Task-level metrics follow the task variable; every selector the job variable.
            if re.search(r"bgtasks_(task|dlq_moves|dlq_replays)_", target["expr"]):
                assert 'bgtasks_task_name=~"$task"' in target["expr"], title
            selectors = re.findall(
                r"\b(?:bgtasks|messaging_client)_[a-z_]+(?:_total|_count|_bucket|_active|"
                r"_pending|_state|_depth|_backlog)\b(\{[^}]*\})?",
                target["expr"],
            )
            assert selectors, title
            assert all('job=~"$job"' in selector for selector in selectors), title


def test_dashboard_covers_the_contract() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for panel in panels(dashboard) for t in panel["targets"])
    units = {
        panel["title"]: panel["fieldConfig"]["defaults"]["unit"] for panel in panels(dashboard)
    }

    for metric in (
        "bgtasks_task_duration_seconds_count",
        "bgtasks_task_duration_seconds_bucket",
        "bgtasks_task_wait_seconds_bucket",
        "bgtasks_task_active",
        "bgtasks_task_retries_total",
        "bgtasks_circuit_state",
        "bgtasks_circuit_transitions_total",
        "bgtasks_dlq_moves_total",
        "bgtasks_dlq_depth",
        "bgtasks_dlq_replays_total",
        "bgtasks_task_pending",
        "bgtasks_task_skipped_total",
        "bgtasks_dispatch_backlog",
        "messaging_client_sent_messages_total",
        "messaging_client_operation_duration_seconds_bucket",
        "bgtasks_task_inlined_total",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, " in exprs
    assert units["Failure ratio"] == "percentunit"
    assert units["Tasks/s by outcome"] == "ops"
    assert units["Task duration p50 / p95 / p99"] == "s"


def test_dashboard_job_and_task_variables_and_circuit_mappings() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    job, variable = dashboard["templating"]["list"]
    (state,) = [p for p in panels(dashboard) if p["title"] == "Circuit state"]
    (mapping,) = state["fieldConfig"]["defaults"]["mappings"]

    assert job["name"] == "job"
    assert job["query"]["query"] == "label_values(bgtasks_task_duration_seconds_count, job)"
    assert variable["name"] == "task"
    assert variable["query"]["query"] == (
        'label_values(bgtasks_task_duration_seconds_count{job=~"$job"}, bgtasks_task_name)'
    )
    for each in (job, variable):
        assert each["includeAll"] is True
        assert each["allValue"] == ".*"
    assert {value: option["text"] for value, option in mapping["options"].items()} == {
        "0": "closed",
        "1": "half-open",
        "2": "open",
    }


def test_grafana_provisioning() -> None:
    datasources = load_yaml(CONFIG_DIR / "grafana/provisioning/datasources/datasources.yaml")
    providers = load_yaml(CONFIG_DIR / "grafana/provisioning/dashboards/dashboards.yaml")

    assert {(ds["uid"], ds["type"]) for ds in datasources["datasources"]} == {
        ("prometheus", "prometheus"),
        ("jaeger", "jaeger"),
    }
    assert [p["type"] for p in providers["providers"]] == ["file"]
