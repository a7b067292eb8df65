"""docker-compose.yml loaded by compose-go, the library ``docker compose`` loads files with.

``compose-check`` (scripts/compose-check, built by ``scripts/infra.sh compose``) runs the loader
(schema, interpolation, profiles, path resolution, its consistency checks) and then checks what
only an engine would notice: bind-mounted files, build context, pinned images, depends_on
across profiles, published ports. Each broken copy below must fail with a message that names
the problem, so a broken compose file fails CI without a Docker engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e._infra import CONFIG_DIR, REPO_ROOT, require

pytestmark = pytest.mark.e2e

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

Mutation = Callable[[dict[str, Any], Path], None]


def compose_check(
    file: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the checker on ``file`` from its directory, as ``docker compose -f`` would be run,
    with only PATH and ``env`` in its environment (no stray COMPOSE_* variables)."""
    return subprocess.run(
        [str(require("compose-check")), *args, file.name],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), **(env or {})},
        cwd=file.parent,
        check=False,
    )


def checked(file: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = compose_check(file, *args, env=env)
    assert result.returncode == 0, f"compose-check failed:\n{result.stderr}"
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def errors(file: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The error lines of a run that must fail."""
    result = compose_check(file, *args, env=env)
    assert result.returncode == 1, f"expected a failure, got:\n{result.stdout}{result.stderr}"
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines
    assert all(line.startswith("compose-check: error: ") for line in lines), lines
    return [line.removeprefix("compose-check: error: ") for line in lines]


def raw_images() -> dict[str, str]:
    """Image of each service as written (version pins are asserted by the images test)."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return {name: s["image"] for name, s in services.items() if "image" in s}


def expected_services() -> dict[str, dict[str, Any]]:
    images = raw_images()

    def service(
        name: str,
        *,
        ports: list[str] | None = None,
        mounts: dict[str, str] | None = None,
        depends_on: list[str] | None = None,
        profiles: list[str] | None = None,
    ) -> dict[str, Any]:
        return {
            "profiles": profiles or [],
            "image": images[name],
            "ports": ports or [],
            "mounts": [
                {"source": source, "target": target, "read_only": True}
                for source, target in (mounts or {}).items()
            ],
            "depends_on": depends_on or [],
        }

    return {
        "app": {
            "profiles": [],
            "build": {"context": ".", "dockerfile": "Dockerfile"},
            "ports": ["8000:8000/tcp"],
            "mounts": [],
            "depends_on": ["otel-collector", "redis"],
        },
        "worker": {
            "profiles": [],
            "build": {"context": ".", "dockerfile": "Dockerfile"},
            "ports": [],
            "mounts": [],
            "depends_on": ["otel-collector", "redis"],
        },
        "redis": service("redis", ports=["6379:6379/tcp"]),
        "otel-collector": service(
            "otel-collector",
            ports=["4317:4317/tcp", "4318:4318/tcp", "13133:13133/tcp"],
            mounts={"collector-config/otelcol.yaml": "/etc/otelcol-contrib/config.yaml"},
            depends_on=["jaeger"],
        ),
        "jaeger": service(
            "jaeger",
            ports=["16686:16686/tcp"],
            mounts={"collector-config/jaeger.yaml": "/etc/jaeger/config.yaml"},
        ),
        "prometheus": service(
            "prometheus",
            ports=["9090:9090/tcp"],
            mounts={
                "collector-config/prometheus.yml": "/etc/prometheus/prometheus.yml",
                "collector-config/alert-rules.yml": "/etc/prometheus/alert-rules.yml",
            },
            depends_on=["alertmanager", "otel-collector"],
        ),
        "alertmanager": service(
            "alertmanager",
            ports=["9093:9093/tcp"],
            mounts={"collector-config/alertmanager.yml": "/etc/alertmanager/alertmanager.yml"},
            depends_on=["alert-webhook"],
        ),
        "alert-webhook": service("alert-webhook"),
        "grafana": service(
            "grafana",
            ports=["3000:3000/tcp"],
            mounts={
                "collector-config/grafana/provisioning": "/etc/grafana/provisioning",
                "collector-config/grafana/dashboards": "/var/lib/grafana/dashboards",
            },
            depends_on=["jaeger", "prometheus"],
        ),
        "loadgen": service("loadgen", profiles=["load"], depends_on=["app"]),
    }


# --------------------------------------------------------------------------- the shipped file


def test_compose_file_loads_without_profiles() -> None:
    services = expected_services()
    del services["loadgen"]

    assert checked(COMPOSE_FILE) == {
        "file": "docker-compose.yml",
        "profiles": [],
        "services": services,
        "disabled_services": ["loadgen"],
        # The file needs no environment: nothing to set before `docker compose up`.
        "variables": {},
    }


def test_compose_file_loads_with_the_load_profile() -> None:
    assert checked(COMPOSE_FILE, "--profile", "load") == {
        "file": "docker-compose.yml",
        "profiles": ["load"],
        "services": expected_services(),
        "disabled_services": [],
        "variables": {},
    }


# --------------------------------------------------------------------------- broken copies


def copy_project(tmp_path: Path) -> dict[str, Any]:
    """The files docker-compose.yml refers to, copied into tmp_path; returns the parsed file."""
    shutil.copytree(CONFIG_DIR, tmp_path / CONFIG_DIR.name)
    shutil.copy(REPO_ROOT / "Dockerfile", tmp_path / "Dockerfile")
    model: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return model


def write_compose(tmp_path: Path, model: dict[str, Any]) -> Path:
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    return path


def test_an_unchanged_copy_passes(tmp_path: Path) -> None:
    """The copy itself is sound, so each failure below comes from its one change."""
    path = write_compose(tmp_path, copy_project(tmp_path))

    for args in ((), ("--profile", "load")):
        assert checked(path, *args) == checked(COMPOSE_FILE, *args)


def delete_mounted_file(model: dict[str, Any], root: Path) -> None:
    (root / "collector-config" / "jaeger.yaml").unlink()


def misspell_mounted_file(model: dict[str, Any], root: Path) -> None:
    volumes = model["services"]["prometheus"]["volumes"]
    volumes[1] = volumes[1].replace("alert-rules.yml:", "alert-rule.yml:", 1)


def mount_outside_the_project(model: dict[str, Any], root: Path) -> None:
    model["services"]["grafana"]["volumes"].append("/etc/hostname:/etc/hostname:ro")


def delete_dockerfile(model: dict[str, Any], root: Path) -> None:
    (root / "Dockerfile").unlink()


def depend_on_unknown_service(model: dict[str, Any], root: Path) -> None:
    model["services"]["app"]["depends_on"].append("otel-colector")


def depend_on_load_profile(model: dict[str, Any], root: Path) -> None:
    model["services"]["grafana"]["depends_on"].append("loadgen")


def publish_bad_port(model: dict[str, Any], root: Path) -> None:
    model["services"]["jaeger"]["ports"] = ["166860:16686"]


def publish_taken_port(model: dict[str, Any], root: Path) -> None:
    model["services"]["redis"]["ports"] = ["4317:6379"]


def misspell_a_key(model: dict[str, Any], root: Path) -> None:
    model["services"]["app"]["enviroment"] = model["services"]["app"].pop("environment")


def give_depends_on_a_wrong_type(model: dict[str, Any], root: Path) -> None:
    model["services"]["prometheus"]["depends_on"] = "otel-collector"


def unescape_a_shell_variable(model: dict[str, Any], root: Path) -> None:
    command = model["services"]["loadgen"]["command"]
    command[0] = command[0].replace("$$path", "$path")


def unpin_an_image(model: dict[str, Any], root: Path) -> None:
    model["services"]["redis"]["image"] = "redis"


BROKEN: dict[str, tuple[Mutation, tuple[str, ...], list[str]]] = {
    "mounted file deleted": (
        delete_mounted_file,
        (),
        [
            'service "jaeger": bind mount source collector-config/jaeger.yaml does not exist '
            "(mounted at /etc/jaeger/config.yaml)"
        ],
    ),
    "mounted file misspelt": (
        misspell_mounted_file,
        (),
        [
            'service "prometheus": bind mount source collector-config/alert-rule.yml does not '
            "exist (mounted at /etc/prometheus/alert-rules.yml)"
        ],
    ),
    "mount outside the project": (
        mount_outside_the_project,
        (),
        [
            'service "grafana": bind mount source /etc/hostname is outside the project '
            "directory {root} (mounted at /etc/hostname)"
        ],
    ),
    "Dockerfile deleted": (
        delete_dockerfile,
        (),
        [
            'service "app": Dockerfile Dockerfile does not exist',
            'service "worker": Dockerfile Dockerfile does not exist',
        ],
    ),
    "depends_on an unknown service": (
        depend_on_unknown_service,
        (),
        [
            'docker-compose.yml: service "app" depends on undefined service "otel-colector": '
            "invalid compose project",
            'service "app": depends_on unknown service "otel-colector"',
        ],
    ),
    "default service depends_on a load service": (
        depend_on_load_profile,
        (),
        [
            'docker-compose.yml: service "grafana" depends on undefined service "loadgen": '
            "invalid compose project",
            'service "grafana": depends_on "loadgen", which is only in profiles [load]: not '
            'started with profiles [] (add the profile to "grafana", or mark the dependency '
            "required: false)",
        ],
    ),
    "port out of range": (
        publish_bad_port,
        (),
        ["docker-compose.yml: Invalid hostPort: 166860"],
    ),
    "host port published twice": (
        publish_taken_port,
        (),
        [
            'service "redis": publishes host port 4317/tcp, already published by service '
            '"otel-collector"'
        ],
    ),
    "misspelt key": (
        misspell_a_key,
        (),
        [
            # compose-go's schema says "false schema" for a key the spec does not allow.
            "docker-compose.yml: validating {root}/docker-compose.yml: "
            "services.app.enviroment false schema"
        ],
    ),
    "wrong type": (
        give_depends_on_a_wrong_type,
        (),
        [
            "docker-compose.yml: validating {root}/docker-compose.yml: "
            "services.prometheus.depends_on must be a array"
        ],
    ),
    "unescaped $ in a shell command": (
        unescape_a_shell_variable,
        ("--profile", "load"),
        [
            'docker-compose.yml: the loader warns: The "path" variable is not set. '
            "Defaulting to a blank string."
        ],
    ),
    "image not pinned": (
        unpin_an_image,
        (),
        ['service "redis": image "redis" is not pinned: give it a version tag'],
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_copy_fails_naming_the_problem(tmp_path: Path, case: str) -> None:
    mutate, args, expected = BROKEN[case]
    model = copy_project(tmp_path)
    mutate(model, tmp_path)
    path = write_compose(tmp_path, model)

    assert errors(path, *args) == [line.format(root=tmp_path) for line in expected]


def test_a_load_dependency_is_fine_when_the_profile_is_enabled(tmp_path: Path) -> None:
    """depends_on is checked per profile set: with --profile load, loadgen runs too."""
    model = copy_project(tmp_path)
    depend_on_load_profile(model, tmp_path)
    path = write_compose(tmp_path, model)

    report = checked(path, "--profile", "load")

    assert report["services"]["grafana"]["depends_on"] == ["jaeger", "loadgen", "prometheus"]


def test_variables_are_interpolated_from_the_environment_and_env_files(tmp_path: Path) -> None:
    model = copy_project(tmp_path)
    model["services"]["redis"]["image"] = "redis:${REDIS_TAG}"
    model["services"]["app"]["ports"] = ["${APP_PORT:-8000}:8000"]
    path = write_compose(tmp_path, model)
    env_file = tmp_path / "stack.env"
    env_file.write_text("REDIS_TAG=7.0.15-alpine\n")

    missing = errors(path)
    from_env = checked(path, env={"REDIS_TAG": "7.2.4", "APP_PORT": "18000"})
    from_file = checked(path, "--env-file", str(env_file))

    assert missing == [
        'docker-compose.yml: the loader warns: The "REDIS_TAG" variable is not set. '
        "Defaulting to a blank string.",
        'service "redis": image "redis:": invalid reference format',
    ]
    assert from_env["variables"] == {"APP_PORT": "8000", "REDIS_TAG": None}
    assert from_env["services"]["redis"]["image"] == "redis:7.2.4"
    assert from_env["services"]["app"]["ports"] == ["18000:8000/tcp"]
    assert from_file["services"]["redis"]["image"] == "redis:7.0.15-alpine"
    assert from_file["services"]["app"]["ports"] == ["8000:8000/tcp"]
