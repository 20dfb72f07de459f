"""docker-compose.yml, scripts/compose_gpus.py and the Dockerfiles, checked without a Docker engine (none runs here).

The compose file must parse, run the same commands that ``ldd``/the end-to-end tests run, set only ``LDD_*``
variables that ``core.settings.Settings`` reads (those the end-to-end tests set, plus the deployment's own), and
keep the production rules of DESIGN section 6: Redis append-only, MinIO as the object storage with its bucket
created before API and workers start, no volume shared between services, every worker pinned to its own GPU
(base file + the generated override, or the workers-only file of a second machine), a kill grace that fits in the
worker's stop grace, health checks that import what exists, and a GPU serving variant of the API.
``docker compose config`` runs on the files only where a docker binary with compose exists.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from api.cli import api_command, worker_command
from core.db import normalise_url
from core.settings import ENV_PREFIX, Settings
from core.storage import S3Storage, open_storage
from tests.test_e2e_service import service_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compose_gpus.py"
LONG_RUNNING = {"redis", "postgres", "minio", "api", "api-gpu", "worker"}
ONE_SHOT = {"minio-init"}
LDD_SERVICES = ("api", "api-gpu", "worker")
# Variables of a deployment that the end-to-end tests (one machine, local folders) do not set.
DEPLOYMENT_ONLY = {"LDD_STORAGE_URL", "LDD_CACHE_BYTES", "LDD_KILL_GRACE_SECONDS"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _generate(out: Path, *args: str) -> dict[str, Any]:
    """Run scripts/compose_gpus.py as a user would and read the file it wrote."""
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], check=True, capture_output=True)
    return yaml.safe_load(out.read_text())


@pytest.fixture(scope="module")
def override(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _generate(tmp_path_factory.mktemp("gpus") / "docker-compose.gpus.yml", "4")


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def _interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` with the variables ``env``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        if (env or {}).get(name):
            return (env or {})[name]
        if op == ":?":
            raise ValueError(f"{name} is required: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(sub, value)


def _env(service: dict[str, Any], variables: Mapping[str, str] | None = None) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v), variables) for k, v in env.items()}


def _seconds(duration: str) -> float:
    """A compose duration (``60s``, ``1m30s``, ``1h``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    (gpu,) = [d for d in devices if "gpu" in d["capabilities"]]
    assert gpu["driver"] == "nvidia" and "count" not in gpu  # count and device_ids exclude each other
    return [_interpolate(str(i)) for i in gpu["device_ids"]]


def _workers(*files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = {name: svc for f in files for name, svc in f["services"].items()}
    return {name: svc for name, svc in services.items() if name == "worker" or name.startswith("worker-")}


def _named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for v in service.get("volumes", []):
        source = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
        if source and not source.startswith((".", "/", "~")):  # named, not a bind mount
            names.append(source)
    return names


def _mc_bucket(compose: dict[str, Any]) -> tuple[str, str]:
    """(endpoint of the mc alias, bucket) that minio-init's command creates."""
    script = " ".join(compose["services"]["minio-init"]["command"])
    alias = re.search(r"mc alias set (\S+) (\S+) ", script)
    made = re.search(r"mc mb --ignore-existing (\S+)/(\S+)", script)
    assert alias and made, script
    assert made.group(1) == alias.group(1), script
    return alias.group(2), made.group(2)


def test_services_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    for name in ONE_SHOT:  # runs once and exits: restarting it would never let it count as completed
        assert services[name]["restart"] == "no", name
    assert "artifacts" not in compose["volumes"]  # no longer shared: each service has its own
    for name, svc in services.items():
        assert set(_named_volumes(svc)) <= set(compose["volumes"]), name


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
    assert services["api"]["command"] == services["api-gpu"]["command"] == ours[2:]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert worker_command() == [sys.executable, "-m", "worker"]
    # The Dockerfiles' default commands are the same as the compose commands.
    for name in LDD_SERVICES:
        dockerfile = services[name]["build"]["dockerfile"]
        assert dockerfile == f"docker/{name}.Dockerfile"
        cmd = re.search(r"^CMD (\[.*\])$", (ROOT / dockerfile).read_text(), re.M)
        assert cmd is not None, dockerfile
        assert yaml.safe_load(cmd.group(1)) == services[name]["command"], dockerfile


def test_every_ldd_variable_is_a_setting_and_the_e2e_tests_use_the_same(compose: dict[str, Any]) -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    e2e = set(service_env(Path("/data"), store_url="sqlite://", broker_url="redis://x"))
    for name, svc in compose["services"].items():
        ldd = {k for k in _env(svc) if k.startswith(ENV_PREFIX)}
        assert ldd <= fields, (name, ldd - fields)
        if name not in LDD_SERVICES:
            assert not ldd, name
            continue
        extra = {"LDD_PROVIDERS"} if name == "api-gpu" else set()
        assert ldd == e2e | DEPLOYMENT_ONLY | extra, (name, ldd ^ (e2e | DEPLOYMENT_ONLY | extra))
        settings = Settings.from_env(_env(svc))  # every value parses
        assert str(settings.data_dir) == "/data"
        assert settings.broker_url.startswith("redis://redis:6379")
        assert normalise_url(settings.store_url).startswith("postgresql+psycopg://")
        assert settings.api_keys == []  # auth off unless LDD_API_KEYS is given
        assert settings.storage_url.startswith("s3://") and settings.cache_bytes >= 1_000_000_000
        assert settings.providers == (["cuda", "cpu"] if name == "api-gpu" else [])
    # One environment for the API and the workers (the GPU API adds its providers only).
    api = _env(compose["services"]["api"])
    assert api == _env(compose["services"]["worker"])
    assert _env(compose["services"]["api-gpu"]) == {**api, "LDD_PROVIDERS": "cuda,cpu"}


def test_the_store_url_follows_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    variables = {"POSTGRES_PASSWORD": "s3cret"}
    pg = _env(services["postgres"], variables)
    url = urlsplit(_env(services["api"], variables)["LDD_STORE_URL"])
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/" + pg["POSTGRES_DB"])
    assert (url.username, url.password) == (pg["POSTGRES_USER"], "s3cret")


def test_storage_is_the_bucket_that_minio_init_creates(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    variables = {"MINIO_ROOT_USER": "admin", "MINIO_ROOT_PASSWORD": "a-long-secret"}
    minio = _env(services["minio"], variables)
    init = _env(services["minio-init"], variables)
    assert init == {k: minio[k] for k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")}
    assert len(_env(services["minio"])["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses to start with less
    alias_url, bucket = _mc_bucket(compose)
    for name in LDD_SERVICES:
        env = _env(services[name], variables)
        # The S3 client of core.storage, built from the service's own variables (boto3 reads them itself).
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        storage = open_storage(env["LDD_STORAGE_URL"], "/unused")
        assert isinstance(storage, S3Storage), name
        assert storage.bucket == bucket and storage.prefix, name
        assert storage.client.meta.endpoint_url == env["AWS_ENDPOINT_URL"] == alias_url, name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            minio["MINIO_ROOT_USER"],
            minio["MINIO_ROOT_PASSWORD"],
        ), name
        # The endpoint is the minio service on the port its server listens on (9000 unless --address says).
        endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
        assert endpoint.hostname == "minio" and endpoint.port == 9000, name
        assert "--address" not in services["minio"]["command"]
        assert env["AWS_DEFAULT_REGION"]


def test_api_and_workers_wait_for_broker_store_and_bucket(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for name in LDD_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name


def test_published_ports_are_loopback_unless_asked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "minio"):
        for port in services[name]["ports"]:
            assert _interpolate(port).startswith("127.0.0.1:"), (name, port)
            assert _interpolate(port, {"LDD_BIND": "10.0.0.5"}).startswith("10.0.0.5:"), (name, port)
    host_port = {name: services[name]["ports"][0].rsplit(":", 2)[-2] for name in ("api", "api-gpu")}
    assert host_port["api"] != host_port["api-gpu"]


def test_kill_grace_fits_in_the_stop_grace(compose: dict[str, Any], override: dict[str, Any]) -> None:
    workers = _workers(compose, override)
    assert set(workers) == {"worker", "worker-gpu1", "worker-gpu2", "worker-gpu3"}
    for name, svc in workers.items():
        grace = Settings.from_env(_env(svc)).kill_grace_seconds
        stop = _seconds(svc["stop_grace_period"])
        # The child's checkpoint + exit fit before Docker's SIGKILL, with time left for the worker to requeue.
        assert 30 <= grace < stop and stop - grace >= 5, (name, grace, stop)


def test_every_worker_has_its_own_gpu(compose: dict[str, Any], override: dict[str, Any]) -> None:
    base = compose["services"]["worker"]
    assert _gpu_ids(base) == ["0"]
    # `--scale worker=N` would repeat one definition: no fixed name (it would fail) and no host port.
    assert "container_name" not in base and "ports" not in base
    workers = _workers(compose, override)
    ids = [i for svc in workers.values() for i in _gpu_ids(svc)]
    assert sorted(ids) == ["0", "1", "2", "3"], ids  # each GPU once: none shared, none left out
    for name, svc in workers.items():
        assert _gpu_ids(svc) == [name.removeprefix("worker-gpu") if name != "worker" else "0"]
        # A copy of the base worker in everything but its GPU and its volume.
        same = {k: v for k, v in svc.items() if k not in ("deploy", "volumes")}
        assert same == {k: v for k, v in base.items() if k not in ("deploy", "volumes")}, name
    # The override only adds services: it redefines nothing of the base file.
    assert not set(override["services"]) & set(compose["services"])


def test_no_volume_is_shared_between_services(compose: dict[str, Any], override: dict[str, Any]) -> None:
    services = {**compose["services"], **override["services"]}
    owners: dict[str, str] = {}
    for name, svc in services.items():
        for volume in _named_volumes(svc):
            assert volume not in owners, f"{volume} is mounted by {owners[volume]} and {name}"
            owners[volume] = name
    for name in ("api", "api-gpu", *_workers(compose, override)):
        data_dir = _env(services[name])["LDD_DATA_DIR"]
        (volume,) = _named_volumes(services[name])
        assert f"{volume}:{data_dir}" in services[name]["volumes"], name
        assert volume in {**compose["volumes"], **(override.get("volumes") or {})}, name


def test_one_gpu_needs_no_override(tmp_path: Path) -> None:
    assert _generate(tmp_path / "one.yml", "1")["services"] == {}
    bad = subprocess.run([sys.executable, str(SCRIPT), "0", "--out", str(tmp_path / "x.yml")], capture_output=True)
    assert bad.returncode != 0 and not (tmp_path / "x.yml").exists()


def test_a_second_machine_runs_workers_only_against_ldd_host(tmp_path: Path, compose: dict[str, Any]) -> None:
    out = tmp_path / "deploy" / "docker-compose.workers.yml"
    out.parent.mkdir()
    doc = _generate(out, "2", "--no-api")
    assert doc["name"] == compose["name"]
    assert set(doc["services"]) == {"worker", "worker-gpu1"}
    assert sorted(i for svc in doc["services"].values() for i in _gpu_ids(svc)) == ["0", "1"]
    first = {"LDD_HOST": "10.0.0.5", "POSTGRES_PASSWORD": "pw", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"}
    base_env = _env(compose["services"]["worker"], first)
    for name, svc in doc["services"].items():
        assert "depends_on" not in svc, name  # nothing of the first machine runs here
        assert (out.parent / svc["build"]["context"]).resolve() == ROOT, name
        assert set(_named_volumes(svc)) <= set(doc["volumes"]), name
        with pytest.raises(ValueError, match="LDD_HOST"):
            _env(svc)  # compose refuses to start without LDD_HOST
        env = _env(svc, first)
        settings = Settings.from_env(env)
        assert settings.broker_url == "redis://10.0.0.5:6379/0", name
        store = urlsplit(settings.store_url)
        assert (store.hostname, store.port, store.password) == ("10.0.0.5", 5432, "pw"), name
        assert env["AWS_ENDPOINT_URL"] == "http://10.0.0.5:9000", name
        # Everything else is the first machine's worker environment (same bucket, same credentials, same limits).
        moved = {"LDD_BROKER_URL", "LDD_STORE_URL", "AWS_ENDPOINT_URL"}
        assert {k: v for k, v in env.items() if k not in moved} == {
            k: v for k, v in base_env.items() if k not in moved
        }, name
    volumes = [v for svc in doc["services"].values() for v in _named_volumes(svc)]
    assert len(volumes) == len(set(volumes)) == 2


_IMPORT = re.compile(r"from ([\w.]+) import (\w+)|import ([\w.]+)")


def test_health_checks_import_what_exists(compose: dict[str, Any]) -> None:
    snippets = []
    for name, svc in compose["services"].items():
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            snippets.append((name, test[3]))
    for dockerfile in sorted((ROOT / "docker").glob("*.Dockerfile")):
        snippets += [(dockerfile.name, s) for s in re.findall(r'CMD python -c "([^"]+)"', dockerfile.read_text())]
    assert len(snippets) >= 6, snippets
    for where, code in snippets:
        for module, attr, plain in _IMPORT.findall(code):
            mod = importlib.import_module(module or plain)
            assert not attr or hasattr(mod, attr), (where, code)


def test_images_install_the_right_extras() -> None:
    api = (ROOT / "docker/api.Dockerfile").read_text()
    worker = (ROOT / "docker/worker.Dockerfile").read_text()
    api_gpu = (ROOT / "docker/api-gpu.Dockerfile").read_text()
    for text in (api, api_gpu):
        assert (
            'pip install ".[serve,queue]"' in text
            and "train" not in text
            and "torch" not in re.sub(r"'torch' not in sys.modules|must not pull torch|no torch", "", text)
        )
    assert 'pip install ".[train,queue,gpu]"' in worker
    # The GPU API replaces the CPU onnxruntime with the CUDA build, after installing the extras.
    order = [api_gpu.index(s) for s in ('".[serve,queue]"', "pip uninstall -y onnxruntime", '"onnxruntime-gpu')]
    assert order == sorted(order), order
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in api_gpu
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(r.startswith("torch") for extra in ("serve", "queue") for r in extras[extra])


def test_the_gpu_api_serves_on_its_own_gpu_under_a_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_gpu = services["api-gpu"]
    assert api_gpu["profiles"] == ["gpu-serving"]  # `docker compose up` alone does not start it
    assert all("profiles" not in svc for name, svc in services.items() if name != "api-gpu")
    assert _gpu_ids(api_gpu) == ["0"]
    assert _interpolate(api_gpu["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0], {
        "LDD_SERVING_GPU": "3"
    }) == "3"  # fmt: skip
    assert "deploy" not in services["api"]  # the CPU API reserves no GPU


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.skipif(_docker_compose() is None, reason="no docker binary with compose here")
def test_docker_compose_config_accepts_the_files(tmp_path: Path) -> None:
    cmd = _docker_compose()
    assert cmd is not None
    env = {**os.environ, "LDD_HOST": "10.0.0.5"}
    gpus = tmp_path / "docker-compose.gpus.yml"
    _generate(gpus, "4")
    workers = tmp_path / "docker-compose.workers.yml"
    _generate(workers, "2", "--no-api")
    base = ["-f", str(ROOT / "docker-compose.yml")]
    for files in ([*base, "-f", str(gpus), "--profile", "gpu-serving"], ["-f", str(workers)]):
        run = subprocess.run([*cmd, *files, "config", "--quiet"], env=env, capture_output=True, text=True)
        assert run.returncode == 0, (files, run.stderr)
    # Without LDD_HOST the workers-only file is refused, not run against a wrong host.
    env.pop("LDD_HOST")
    run = subprocess.run([*cmd, "-f", str(workers), "config", "--quiet"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "LDD_HOST" in run.stderr
