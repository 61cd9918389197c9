"""The compose deployment, checked by parsing it (no Docker engine runs here) as `docker compose`
would run it, its variables interpolated: images and builds, service wiring, models the workers
name, GPU reservations, Prometheus targets, the Grafana dashboard's metric names against what
`/metrics` exports, and the hardening: required secrets, Redis' password, Milvus' auth and token,
MinIO's credentials, memory limits, published ports and networks, Flower's auth."""

from __future__ import annotations

import inspect
import ipaddress
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import flower.events
import pytest
import yaml

from api.metrics import HttpStats
from api.routes.metrics import RedisReading, render
from common.registry import load_registry

from .conftest import ROOT
from .deployment import MissingVariable, check_embedq_argv, interpolated, memory_bytes, setting_variables

COMPOSE = ROOT / "compose"
BASE = COMPOSE / "docker-compose.yml"
GPU = COMPOSE / "docker-compose.gpu.yml"
EMBEDQ_COMMANDS = {"api", "worker", "ingest-worker", "search-worker", "flower"}
# What an operator must set (compose refuses to start without each), with test values.
SECRETS = {
    "EMBEDQ_API_KEYS_FILE": "./models.yaml",  # any file: compose only mounts it
    "EMBEDQ_METRICS_KEY_FILE": "./models.yaml",
    "REDIS_PASSWORD": "redis-pass",
    "MILVUS_ROOT_PASSWORD": "milvus-pass",
    "MINIO_ROOT_USER": "minio-user",
    "MINIO_ROOT_PASSWORD": "minio-pass",
    "FLOWER_BASIC_AUTH": "admin:flower-pass",
    "GRAFANA_ADMIN_PASSWORD": "grafana-pass",
}
# The only services that publish ports, and those with a route out of the host besides them.
PUBLISHED = {"api", "grafana"}
STORES = {"redis", "etcd", "minio", "milvus"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of an override file, as far as these checks need it: mappings merge, the
    rest is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(cmd: list[str], name: str) -> str | None:
    for i, part in enumerate(cmd):
        if part == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def embedq_role(service: dict) -> str | None:
    cmd = command(service)
    return cmd[1] if len(cmd) > 1 and cmd[0] == "embedq" and cmd[1] in EMBEDQ_COMMANDS else None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    ports = set()
    for entry in service.get("ports", []) + service.get("expose", []):
        ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def mount_source(service: dict, target: str) -> str | None:
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if len(parts) >= 2 and parts[1] == target:
            return parts[0]
    return None


@pytest.fixture(scope="module")
def raw_base() -> dict:
    return load(BASE)


@pytest.fixture(scope="module")
def base(raw_base) -> dict:
    return interpolated(raw_base, SECRETS)


@pytest.fixture(scope="module")
def gpu() -> dict:
    return interpolated(load(GPU), SECRETS)


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def project(request, base, gpu) -> dict:
    """The services as `docker compose up` sees them: the base file, or the base with the GPU override."""
    return base if request.param == "cpu" else merged(base, gpu)


def test_every_service_has_an_image_or_a_build(project):
    for name, service in project["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = COMPOSE / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            assert (context / "pyproject.toml").is_file(), f"{name}: build context is not the repository root"
        else:
            # Third-party images are pinned, so a deployment does not change under it.
            image = service["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"


def test_api_and_workers_reach_redis_and_milvus(project):
    services = project["services"]
    roles = {name: embedq_role(service) for name, service in services.items()}
    assert {"api", "worker", "ingest-worker", "search-worker"} <= set(roles.values())
    for name, role in roles.items():
        if role not in ("api", "worker", "ingest-worker", "search-worker"):
            continue
        env = environment(services[name])
        redis_url = urlsplit(env["EMBEDQ_REDIS_URL"])
        assert redis_url.scheme == "redis" and redis_url.hostname in services, name
        assert services[redis_url.hostname]["image"].startswith("redis:"), name
        milvus = urlsplit(env["EMBEDQ_MILVUS_URI"])
        assert milvus.hostname in services and milvus.port == 19530, name
        assert services[milvus.hostname]["image"].startswith("milvusdb/milvus:"), name
        # Uploads and page images pass between them through one blob store, which every machine
        # reaches: a bucket of the compose MinIO, not a volume of one host.
        assert env["EMBEDQ_BLOB_URI"] == environment(services["api"])["EMBEDQ_BLOB_URI"], name
        assert env["EMBEDQ_BLOB_URI"].startswith("s3://"), name
        endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
        assert services[endpoint.hostname]["image"].startswith("minio/minio:"), name
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"], name


def test_workers_name_models_of_the_file_they_mount(project):
    services = project["services"]
    served: set[str] = set()
    for name, service in services.items():
        if embedq_role(service) != "worker":
            continue
        models_file = environment(service)["EMBEDQ_MODELS_FILE"]
        source = mount_source(service, models_file)
        assert source, f"{name} does not mount {models_file}"
        names = {spec.name for spec in load_registry(COMPOSE / source)}
        model = option(command(service), "--model")
        assert model in names, f"{name}: {model} is not in {source}"
        assert option(command(service), "--device"), name
        served.add(model)
    assert served == {spec.name for spec in load_registry(COMPOSE / "models.yaml")}, "a model without a worker"


def test_gpu_override_pins_each_worker_to_one_nvidia_card(base, gpu):
    workers = {name: merged(base["services"].get(name, {}), s) for name, s in gpu["services"].items()}
    cards = []
    for name, service in workers.items():
        assert embedq_role(service) == "worker", name
        # Each container sees only its reserved card, which is therefore cuda:0 inside it.
        assert option(command(service), "--device") == "cuda:0", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        (card,) = device["device_ids"]
        cards.append(card)
        assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple", "not the CUDA torch wheel"
    assert len(cards) == len(set(cards)), "two workers share a GPU"
    assert "worker-minilm" in workers, "the CPU worker would keep running beside the GPU ones"


def test_depends_on_and_volumes_are_declared(project):
    services = project["services"]
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"{name} depends on unknown {other}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source}"
            else:
                assert source in project["volumes"], f"{name}: undeclared volume {source}"
    for stateful, data in [("redis", "/data"), ("milvus", "/var/lib/milvus"), ("grafana", "/var/lib/grafana")]:
        assert mount_source(services[stateful], data) in project["volumes"], stateful


def test_healthchecks(base):
    services = base["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/health/live" in api_check and f":{option(command(services['api']), '--port')}/" in api_check


def test_prometheus_scrapes_api_and_flower_on_their_ports(base):
    services = base["services"]
    config = load(COMPOSE / "prometheus.yml")
    assert mount_source(services["prometheus"], "/etc/prometheus/prometheus.yml") == "./prometheus.yml"
    targets = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert host in services, target
                assert int(port) in container_ports(services[host]), target
                targets[embedq_role(services[host])] = int(port)
    assert targets == {"api": int(option(command(services["api"]), "--port")), "flower": 5555}
    # The API's /metrics needs a key: Prometheus sends the one in its secret.
    (api_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "embedq-api"]
    (secret,) = services["prometheus"]["secrets"]
    assert api_job["authorization"] == {"type": "Bearer", "credentials_file": f"/run/secrets/{secret}"}


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(base):
    grafana = base["services"]["grafana"]
    (source,) = load(COMPOSE / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port in container_ports(base["services"]["prometheus"])
    (provider,) = load(COMPOSE / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert mount_source(grafana, provider["options"]["path"]) == "./grafana/dashboards"
    assert mount_source(grafana, "/etc/grafana/provisioning") == "./grafana/provisioning"
    dashboard = json.loads((COMPOSE / "grafana/dashboards/embedq.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def exported_metric_names() -> set[str]:
    """The sample names `/metrics` writes when every family has a series."""
    http = HttpStats()
    http.observe("GET", "/health/live", 200, 0.001)
    reading = RedisReading(
        queue_depth={("m", "text"): 1},
        workers_alive={("m", "text"): 1},
        worker_stats={"m@h:1": {"model": "m", "device": "cpu", "batches": "1", "items": "1"}},
    )
    lines = render(http, reading).decode().splitlines()
    return {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}


def flower_metric_names() -> set[str]:
    return set(re.findall(r"['\"](flower_\w+)['\"]", inspect.getsource(flower.events)))


def test_dashboard_queries_name_exported_metrics():
    dashboard = json.loads((COMPOSE / "grafana/dashboards/embedq.json").read_text())
    embedq, flower_names = exported_metric_names(), flower_metric_names()
    assert {"embedq_http_requests_total", "embedq_worker_oom_splits_total"} <= embedq and flower_names
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\b(?:embedq|flower)_[a-z0-9_]+", target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            for name in names:
                if name.startswith("embedq_"):
                    assert name in embedq, f"{panel['title']}: {name} is not exported"
                else:
                    assert re.sub(r"_(bucket|sum|count)$", "", name) in flower_names, f"{panel['title']}: {name}"
                used.add(name)
    for wanted in [
        "embedq_http_request_duration_seconds_bucket",
        "embedq_queue_depth",
        "embedq_workers_alive",
        "embedq_worker_batches_total",
        "embedq_worker_items_total",
        "embedq_worker_oom_splits_total",
    ]:
        assert wanted in used, f"no panel shows {wanted}"


def test_flower_requires_auth(raw_base):
    (name,) = [name for name, service in raw_base["services"].items() if embedq_role(service) == "flower"]
    service = raw_base["services"][name]
    env = environment(service)
    address = option(command(service), "--address")
    assert address, "Flower's address must be explicit"
    assert env.get("FLOWER_UNAUTHENTICATED_API", "false").lower() not in ("1", "true", "yes")
    assert not any("unauthenticated" in part for part in command(service))
    if not ipaddress.ip_address(address).is_loopback:
        # `${VAR:?message}`: compose refuses to start when the credentials are not set.
        assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", env.get("FLOWER_BASIC_AUTH", "")), "no basic auth"
    for published in service.get("ports", []):
        host_ip = str(published).split(":")[0] if str(published).count(":") == 2 else "0.0.0.0"
        assert ipaddress.ip_address(host_ip).is_loopback, f"Flower published beyond loopback: {published}"


@pytest.mark.parametrize("path", [BASE, GPU], ids=["cpu", "gpu"])
@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(path, secret):
    text = path.read_text()
    references = re.findall(rf"\$\{{{secret}([^A-Za-z0-9_][^}}]*)?\}}", text)
    if path == GPU and not references:
        return  # the override does not use it
    # `${VAR:?message}` at every use: no default lets a deployment start without it.
    assert references and all(ref.startswith(":?") and len(ref) > 2 for ref in references), (secret, references)
    with pytest.raises(MissingVariable) as missing:
        interpolated(load(path), {k: v for k, v in SECRETS.items() if k != secret})
    assert missing.value.name == secret
    assert "minioadmin" not in text


def test_the_api_reads_its_keys_from_the_required_file(raw_base, base):
    api = base["services"]["api"]
    assert re.fullmatch(r"\$\{EMBEDQ_API_KEYS_FILE:\?[^}]+\}", raw_base["secrets"]["api-keys"]["file"])
    (secret,) = api["secrets"]
    assert environment(api)["EMBEDQ_API_KEYS_FILE"] == f"/run/secrets/{secret}"
    for name, service in base["services"].items():
        assert "EMBEDQ_API_KEYS" not in environment(service), f"{name}: keys in the environment"


def test_redis_requires_the_password_every_service_is_given(project):
    services = project["services"]
    redis_cmd = command(services["redis"])
    assert option(redis_cmd, "--requirepass") == SECRETS["REDIS_PASSWORD"]
    assert environment(services["redis"])["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]  # its healthcheck
    # Never evicting (a key evicted is a task or a job lost), and full before the container is.
    assert option(redis_cmd, "--maxmemory-policy") == "noeviction"
    assert memory_bytes(option(redis_cmd, "--maxmemory")) < memory_limit(services["redis"])
    for name, service in services.items():
        if url := environment(service).get("EMBEDQ_REDIS_URL"):
            assert urlsplit(url).password == SECRETS["REDIS_PASSWORD"], name


def test_the_embedding_cache_is_a_bounded_evicting_redis_of_its_own(project):
    services = project["services"]
    for name, service in services.items():
        if embedq_role(service) in ("api", "worker"):
            url = urlsplit(environment(service)["EMBEDQ_CACHE_URL"])
            assert (url.hostname, url.password) == ("cache", SECRETS["REDIS_PASSWORD"]), name
    cache_cmd = command(services["cache"])
    assert option(cache_cmd, "--requirepass") == SECRETS["REDIS_PASSWORD"]
    assert option(cache_cmd, "--maxmemory-policy") == "allkeys-lru"
    assert memory_bytes(option(cache_cmd, "--maxmemory")) < memory_limit(services["cache"])
    assert services["cache"]["networks"] == ["internal"]


def test_milvus_has_auth_on_and_embedq_passes_its_token(project):
    services = project["services"]
    milvus = environment(services["milvus"])
    assert milvus["COMMON_SECURITY_AUTHORIZATIONENABLED"] == "true"
    assert milvus["COMMON_SECURITY_DEFAULTROOTPASSWORD"] == SECRETS["MILVUS_ROOT_PASSWORD"]
    for name, service in services.items():
        env = environment(service)
        if "EMBEDQ_MILVUS_URI" in env:
            assert env["EMBEDQ_MILVUS_TOKEN"] == f"root:{SECRETS['MILVUS_ROOT_PASSWORD']}", name


def test_minio_credentials_are_required_and_milvus_uses_them(base):
    minio, milvus = environment(base["services"]["minio"]), environment(base["services"]["milvus"])
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        SECRETS["MINIO_ROOT_USER"],
        SECRETS["MINIO_ROOT_PASSWORD"],
    )
    assert (milvus["MINIO_ACCESS_KEY_ID"], milvus["MINIO_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )


def memory_limit(service: dict) -> int:
    return memory_bytes(service["deploy"]["resources"]["limits"]["memory"])


def test_every_service_has_a_memory_limit(project):
    for name, service in project["services"].items():
        assert memory_limit(service) > 0, name
    search = project["services"]["search"]
    # The search worker refuses loads past its budget; past the container's limit it would be killed.
    assert float(environment(search)["EMBEDQ_SEARCH_MEMORY_GB"]) * 2**30 < memory_limit(search)


def test_only_the_api_and_grafana_publish_ports_the_rest_stay_internal(project):
    services, networks = project["services"], project["networks"]
    assert networks["internal"]["internal"] is True
    for name, service in services.items():
        joined = set(service["networks"])
        assert "internal" in joined and joined <= set(networks), name
        if service.get("ports"):
            assert name in PUBLISHED, f"{name} publishes {service['ports']}"
        if "edge" in joined:
            # Besides the published ones, only model workers get a route out (hub downloads, upstreams).
            assert name in PUBLISHED or embedq_role(service) == "worker", name
    for name in STORES | {"flower", "prometheus"}:
        assert set(services[name]["networks"]) == {"internal"}, name
    for published in services["grafana"]["ports"]:
        assert ipaddress.ip_address(str(published).split(":")[0]).is_loopback, published


def test_embedq_services_run_real_commands_with_real_settings(project):
    known = setting_variables()
    for name, service in project["services"].items():
        if embedq_role(service):
            check_embedq_argv(command(service))
        for variable in environment(service):
            if variable.startswith("EMBEDQ_"):
                assert variable in known, f"{name}: {variable} is not a setting of common/settings.py"
