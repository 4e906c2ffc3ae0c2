"""The deployment files: docker-compose.yml documents adding a connection and mounts a handlers
directory; the image pins every dependency with constraints.txt, which pins exactly what
hipchat-poller[flower] needs (``.ci/constraints.py`` generates it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, dict[str, dict[str, object]]]:
    found: dict[str, dict[str, dict[str, object]]] = yaml.safe_load(
        (ROOT / "docker-compose.yml").read_text()
    )
    return found


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("constraints", ROOT / ".ci" / "constraints.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    found = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in found.items()}


def test_compose_documents_adding_a_connection_and_reading_status() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"docker compose run --rm -e HIPCHAT_POLLER_TOKEN worker connection add", text)
    assert "docker compose run --rm worker status" in text
    assert "--token " not in text  # the token comes from the environment, never the command


def test_compose_mounts_a_handlers_directory_on_the_images_pythonpath() -> None:
    services = compose()["services"]
    for name in ("worker", "beat"):
        volumes = services[name]["volumes"]
        assert isinstance(volumes, list)
        assert any(str(v).endswith(":/handlers:ro") for v in volumes), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ENV PYTHONPATH=/handlers" in dockerfile


def test_compose_leaves_the_log_level_to_the_setting() -> None:
    services = compose()["services"]
    for name in ("worker", "beat"):
        assert "--loglevel" not in services[name]["command"]  # type: ignore[operator]
        env = services[name]["environment"]
        assert isinstance(env, dict)
        assert "HIPCHAT_POLLER_LOG_LEVEL" in env


def test_the_image_installs_with_the_constraints() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [line for line in lines if line.startswith("COPY ")]
    assert any("constraints.txt" in line.split() for line in copied)
    install = next(line for line in lines if "pip install" in line)
    assert "-c constraints.txt" in install
    assert "'.[flower]'" in install


def test_constraints_pin_exactly_what_the_project_needs() -> None:
    needed = generator().closure()
    pinned = pins()
    assert set(pinned) == set(needed), "regenerate: python .ci/constraints.py > constraints.txt"
    for name, requirement in needed.items():
        assert requirement is not None
        assert Requirement(str(requirement)).specifier.contains(pinned[name], prereleases=True), (
            name,
            str(requirement),
            pinned[name],
        )


def test_the_pins_satisfy_pyprojects_lower_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for text in [*project["dependencies"], *project["optional-dependencies"]["flower"]]:
        requirement = Requirement(text)
        version = pinned[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (text, version)


def test_long_running_services_restart_and_have_healthchecks() -> None:
    services = compose()["services"]
    for name in ("redis", "postgres", "worker", "beat", "flower", "metrics", "prometheus"):
        assert services[name].get("restart") == "unless-stopped", name
        assert services[name].get("healthcheck"), name
    assert services["migrate"].get("restart") is None  # a one-shot: it must not loop
    redis_command = services["redis"]["command"]
    assert isinstance(redis_command, list)
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    worker = services["worker"]
    command = worker["command"]
    assert isinstance(command, list)
    name = command[command.index("-n") + 1]
    assert name == "worker@%h"
    checks = worker["healthcheck"]
    assert isinstance(checks, dict)
    assert "-d worker@$$HOSTNAME" in checks["test"][1]  # the name above, on this container


ANY_INTERFACE = "0.0.0.0"  # noqa: S104 (a container's port is published or scraped)


def option(command: object, name: str) -> str:
    assert isinstance(command, list), command
    return str(command[command.index(name) + 1])


def test_prometheus_scrapes_every_process_that_serves_metrics() -> None:
    """deploy/prometheus.yml's targets are the compose services that serve, on their ports,
    on every interface; the prometheus service reads that very file."""
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.split(":")
                targets[host] = int(port)
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                targets[host] = int(dns["port"])
    assert set(targets) == {"metrics", "worker", "beat"}
    store = services["metrics"]["command"]
    assert option(store, "--port") == str(targets["metrics"])
    assert option(store, "--host") == ANY_INTERFACE
    for name in ("worker", "beat"):
        command = services[name]["command"]
        assert option(command, "--metrics-port") == str(targets[name]), name
        assert option(command, "--metrics-host") == ANY_INTERFACE, name
    command, volumes = services["prometheus"]["command"], services["prometheus"]["volumes"]
    assert isinstance(command, list)
    assert isinstance(volumes, list)
    flags = dict(str(a).split("=", 1) for a in command)
    mounted = {str(v).split(":")[1]: str(v).split(":")[0] for v in volumes}
    assert mounted[flags["--config.file"]] == "./deploy/prometheus.yml"


def test_beats_healthcheck_fails_on_a_stale_or_missing_heartbeat(tmp_path: Path) -> None:
    services = compose()["services"]
    beat = services["beat"]
    environment = beat["environment"]
    assert isinstance(environment, dict)
    path = environment["HIPCHAT_POLLER_BEAT_HEARTBEAT_FILE"]
    checks = beat["healthcheck"]
    assert isinstance(checks, dict)
    kind, program, *args = checks["test"]
    assert (kind, program) == ("CMD", "python")
    heartbeat = tmp_path / "beat.alive"
    argv = [sys.executable, *(a.replace(path, str(heartbeat)) for a in args)]

    def check() -> int:
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode

    assert check() == 1  # no file yet
    heartbeat.touch()
    assert check() == 0
    stale = time.time() - 61
    os.utime(heartbeat, (stale, stale))
    assert check() == 1
