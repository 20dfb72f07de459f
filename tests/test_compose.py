"""docker-compose.yml and the Dockerfiles, checked without a Docker engine (none runs here).

The compose file must parse, run the same commands that ``ldd``/the end-to-end tests run, set only
``LDD_*`` variables that ``core.settings.Settings`` reads (the same ones the end-to-end tests set),
and keep the production rules of DESIGN section 6 (Redis append-only, GPU reserved, shared artifacts,
health checks, workers scalable).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.cli import api_command, worker_command
from core.db import normalise_url
from core.settings import ENV_PREFIX, Settings
from tests.test_e2e_service import service_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "api", "worker"}
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"], name
    assert set(compose["volumes"]) >= {"redis-data", "pg-data", "artifacts"}


def test_redis_is_append_only_with_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])


def test_commands_are_the_ones_ldd_runs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # ``ldd up``/``ldd api`` run `python -m uvicorn ...`; the image calls the uvicorn script: same arguments.
    ours = api_command("0.0.0.0", 8000)
    assert ours[:3] == [sys.executable, "-m", "uvicorn"]
    assert services["api"]["command"] == ours[2:]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert worker_command() == [sys.executable, "-m", "worker"]
    # The Dockerfiles' default commands are the same as the compose commands.
    for name, dockerfile in (("api", "docker/api.Dockerfile"), ("worker", "docker/worker.Dockerfile")):
        text = (ROOT / dockerfile).read_text()
        cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
        assert cmd is not None, dockerfile
        assert yaml.safe_load(cmd.group(1)) == services[name]["command"], dockerfile
        assert services[name]["build"]["dockerfile"] == dockerfile


def test_every_ldd_variable_is_a_setting_and_the_e2e_tests_use_the_same(compose: dict[str, Any]) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    e2e = set(service_env(Path("/data"), store_url="sqlite://", broker_url="redis://x"))
    for name in ("api", "worker"):
        env = _env(compose["services"][name])
        ldd = {k for k in env if k.startswith(ENV_PREFIX)}
        assert ldd <= fields, (name, ldd - fields)
        assert ldd == e2e, (name, ldd ^ e2e)
        settings = Settings.from_env(env)  # every value parses
        assert str(settings.data_dir) == "/data"
        assert settings.broker_url.startswith("redis://redis:6379")
        assert normalise_url(settings.store_url).startswith("postgresql+psycopg://")
        assert settings.api_keys == []  # auth off unless LDD_API_KEYS is given
    assert _env(compose["services"]["api"]) == _env(compose["services"]["worker"])


def test_worker_reserves_one_gpu_and_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # `docker compose up --scale worker=N` needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker


def test_api_and_workers_share_the_artifacts_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "worker"):
        data_dir = _env(services[name])["LDD_DATA_DIR"]
        assert f"artifacts:{data_dir}" in services[name]["volumes"], name
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["environment"]["POSTGRES_DB"] in _env(services["api"])["LDD_STORE_URL"]


def test_images_install_the_right_extras() -> None:
    api = (ROOT / "docker/api.Dockerfile").read_text()
    worker = (ROOT / "docker/worker.Dockerfile").read_text()
    assert (
        'pip install ".[serve,queue]"' in api
        and "train" not in api
        and "torch" not in re.sub(r"'torch' not in sys.modules|must not pull torch|no torch", "", api)
    )
    assert 'pip install ".[train,queue,gpu]"' in worker
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(r.startswith("torch") for extra in ("serve", "queue") for r in extras[extra])
