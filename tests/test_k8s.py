"""The Kubernetes deployment (compose/k8s), rendered offline (tests/kustomize.py, held equal to
`kubectl kustomize` where kubectl is installed) and validated against the Kubernetes schemas
(`kubernetes-validate`, strict: no unknown field). Then what the schemas cannot see: the wiring
(selectors, ports, volumes, probes on routes the API has), the commands and settings against what
the code reads, the images against compose's, the secrets against those the README creates (none
committed), one worker Deployment per model and a GPU for each in the overlay, Redis' AOF and
password, Flower's auth, the ServiceMonitor's targets, and the Milvus Helm values."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from api.routes.health import router as health_router
from common.registry import load_registry

from .conftest import ROOT
from .deployment import check_embedq_argv, memory_bytes, setting_variables
from .kustomize import render

K8S = ROOT / "compose" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "vllm": K8S / "vllm"}
K8S_VERSION = "1.30.0"
WORKLOADS = {"Deployment", "StatefulSet"}
README = (K8S / "README.md").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())


@pytest.fixture(scope="module", params=list(KUSTOMIZATIONS))
def rendered(request) -> list[dict]:
    return render(KUSTOMIZATIONS[request.param])


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(KUSTOMIZATIONS["base"])


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render(KUSTOMIZATIONS["gpu"])


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(docs: list[dict]):
    """(workload, container) for every container of every workload."""
    for doc in workloads(docs):
        for container in pod(doc)["containers"]:
            yield doc, container


def embedq_containers(docs: list[dict]):
    for doc, container in containers(docs):
        if container.get("command", [""])[0] == "embedq":
            yield doc, container


def role(container: dict) -> str:
    return container["command"][1]


def env_value(container: dict, name: str) -> dict | None:
    return next((entry for entry in container.get("env", []) if entry["name"] == name), None)


def config_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The variables a container takes from ConfigMaps (envFrom)."""
    values = {}
    for source in container.get("envFrom", []):
        values.update(named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return values


def selects(selector: dict, labels: dict) -> bool:
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), expressions
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def readme_secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, from the README's `kubectl create secret generic` commands."""
    secrets = {}
    for command in re.findall(r"create secret generic (\S+)((?:\s+\\?\s*--from-\w+=[\w-]+=\S+)+)", README):
        name, options = command
        secrets[name] = set(re.findall(r"--from-\w+=([\w-]+)=", options))
    return secrets


def secret_refs(tree) -> set[tuple[str, str | None]]:
    """(secret, key) for every secretKeyRef and Bearer credentials, and (secret, None) for every
    secret volume, in `tree`."""
    found = set()
    if isinstance(tree, dict):
        if "secretKeyRef" in tree:
            found.add((tree["secretKeyRef"]["name"], tree["secretKeyRef"]["key"]))
        if tree.get("type") == "Bearer" and "credentials" in tree:  # a ServiceMonitor's authorization
            found.add((tree["credentials"]["name"], tree["credentials"]["key"]))
        if "secret" in tree and "secretName" in tree["secret"]:
            found.add((tree["secret"]["secretName"], None))
        for value in tree.values():
            found |= secret_refs(value)
    elif isinstance(tree, list):
        for value in tree:
            found |= secret_refs(value)
    return found


def test_every_manifest_is_valid_for_kubernetes(rendered):
    assert rendered
    for doc in rendered:
        if doc["kind"] == "ServiceMonitor":
            # A CRD: kubernetes-validate has no schema for it (its shape is checked below).
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_reader_renders_what_kubectl_kustomize_does(name):
    printed = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, check=True, timeout=60
    ).stdout

    def keyed(docs):
        return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}

    assert keyed(render(KUSTOMIZATIONS[name])) == keyed(yaml.safe_load_all(printed))


def test_selectors_ports_and_volumes_are_wired(rendered):
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered]
    assert len(names) == len(set(names)), "a name twice"
    docs = workloads(rendered)
    for doc in docs:
        assert doc["metadata"]["namespace"] == "embedq"
        labels = doc["spec"]["template"]["metadata"]["labels"]
        owners = [other for other in docs if selects(other["spec"]["selector"], labels)]
        assert owners == [doc], f"{doc['metadata']['name']}: its pods are selected by {len(owners)} workloads"
        spec = pod(doc)
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, mount
        for volume in volumes.values():
            if "configMap" in volume:
                named(rendered, "ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                named(rendered, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    for service in [d for d in rendered if d["kind"] == "Service"]:
        (target,) = [d for d in docs if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(d))]
        ports = {p["name"] for c in pod(target)["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def pod_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_the_api_is_probed_on_its_health_routes_scaled_and_served(base):
    api = named(base, "Deployment", "embedq-api")
    (container,) = pod(api)["containers"]
    assert role(container) == "api"
    routes = {route.path for route in health_router.routes}
    port = container["command"][container["command"].index("--port") + 1]
    assert {p["name"]: str(p["containerPort"]) for p in container["ports"]}["http"] == port
    for probe, path in [("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "http"} and path in routes, probe
    service = named(base, "Service", "embedq-api")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(api))
    hpa = named(base, "HorizontalPodAutoscaler", "embedq-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedq-api"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert container["resources"]["requests"]["cpu"], "an HPA on CPU needs a CPU request"


def model_workers(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """--model -> (Deployment, container), asserting one Deployment per model."""
    found = {}
    for doc, container in embedq_containers(docs):
        if role(container) == "worker":
            model = container["command"][container["command"].index("--model") + 1]
            assert model not in found, f"two Deployments for {model}"
            assert doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "model-worker"
            found[model] = (doc, container)
    return found


def device(container: dict) -> str:
    return container["command"][container["command"].index("--device") + 1]


def test_one_worker_deployment_per_model_with_a_gpu_in_the_overlay(base, gpu):
    models_file = K8S / "base" / "models.yaml"
    served = {spec.name for spec in load_registry(models_file)}
    assert named(base, "ConfigMap", "embedq-models")["data"]["models.yaml"] == models_file.read_text()
    cpu_workers, gpu_workers = model_workers(base), model_workers(gpu)
    assert set(cpu_workers) == set(gpu_workers) == served
    for model, (_, container) in cpu_workers.items():
        assert device(container) == "cpu" and container["image"] == "embedq:cpu", model
        assert "nvidia.com/gpu" not in container["resources"]["limits"], model
    for model, (doc, container) in gpu_workers.items():
        # The pod sees only its one GPU, as cuda:0.
        assert device(container) == "cuda:0" and container["image"] == "embedq:gpu", model
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, model
        assert any(t["key"] == "nvidia.com/gpu" for t in pod(doc)["tolerations"]), model
    others = [c for d, c in embedq_containers(gpu) if role(c) != "worker"]
    assert others and all(c["image"] == "embedq:cpu" for c in others), "only model workers run the CUDA image"


def test_images_match_compose_and_are_pinned(rendered):
    compose_images = {name: s["image"] for name, s in COMPOSE["services"].items() if "image" in s}
    for doc, container in containers(rendered):
        image = container["image"]
        if container.get("command", [""])[0] == "embedq":
            assert image in ("embedq:cpu", "embedq:gpu"), (doc["metadata"]["name"], image)
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        if name.split("/")[-1] == "redis":
            assert image == compose_images["redis"], "Redis differs from compose's"
    values = yaml.safe_load((K8S / "milvus-values.yaml").read_text())
    assert compose_images["milvus"] == f"milvusdb/milvus:{values['image']['all']['tag']}", "Milvus differs"


def test_embedq_containers_run_real_commands_with_real_settings(rendered):
    known = setting_variables()
    for doc, container in embedq_containers(rendered):
        where = doc["metadata"]["name"]
        check_embedq_argv(container["command"])
        from_config = config_env(rendered, container)
        defined = set(from_config)
        for entry in container.get("env", []):
            # $(VAR) is expanded by Kubernetes from variables defined before it.
            for ref in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
                assert ref in defined, f"{where}: {entry['name']} uses $({ref}) before it is defined"
            defined.add(entry["name"])
        for variable in defined:
            if variable.startswith("EMBEDQ_"):
                assert variable in known, f"{where}: {variable} is not a setting of common/settings.py"
        assert "FLOWER_UNAUTHENTICATED_API" not in defined, where


def test_every_embedq_container_reaches_redis_with_its_password_and_milvus_with_its_token(rendered):
    redis = [d for d in rendered if d["kind"] == "StatefulSet"]
    for doc, container in embedq_containers(rendered):
        where = doc["metadata"]["name"]
        password = env_value(container, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
        assert password == {"name": "embedq-redis", "key": "password"}, where
        url = urlsplit(env_value(container, "EMBEDQ_REDIS_URL")["value"])
        assert url.password == "$(REDIS_PASSWORD)" and url.port == 6379, where
        if redis:
            assert url.hostname == named(rendered, "StatefulSet", url.hostname)["spec"]["serviceName"], where
        if "EMBEDQ_MILVUS_URI" in config_env(rendered, container):
            token = env_value(container, "EMBEDQ_MILVUS_TOKEN")["valueFrom"]["secretKeyRef"]
            assert token == {"name": "embedq-milvus", "key": "token"}, where


def test_the_api_reads_its_keys_from_a_mounted_secret(base):
    (container,) = pod(named(base, "Deployment", "embedq-api"))["containers"]
    path = Path(env_value(container, "EMBEDQ_API_KEYS_FILE")["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod(named(base, "Deployment", "embedq-api"))["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "embedq-api-keys"
    assert path.name in readme_secrets()["embedq-api-keys"], "the Secret's key is the file's name"
    assert env_value(container, "EMBEDQ_API_KEYS") is None


def test_secrets_are_referenced_not_committed_and_the_readme_creates_each(rendered):
    created = readme_secrets()
    assert not [d for d in rendered if d["kind"] == "Secret"], "a Secret committed"
    for name, key in secret_refs(rendered):
        assert name in created, f"{name} is not among the README's secrets"
        assert key is None or key in created[name], f"{name} has no key {key} in the README"


def test_every_secret_the_readme_creates_is_used():
    used = secret_refs([d for path in KUSTOMIZATIONS.values() for d in render(path)])
    used |= secret_refs(yaml.safe_load((K8S / "milvus-values.yaml").read_text()))
    values = yaml.safe_load((K8S / "milvus-values.yaml").read_text())
    used |= {(values["minio"]["existingSecret"], key) for key in ("accesskey", "secretkey")}
    for name, keys in readme_secrets().items():
        for key in keys:
            assert (name, key) in used or (name, None) in used, f"{name}/{key} is created and never used"


def test_redis_keeps_an_append_only_file_on_its_volume_and_needs_its_password(base):
    redis = named(base, "StatefulSet", "embedq-redis")
    (container,) = pod(redis)["containers"]
    args = container["args"]

    def arg(name: str) -> str:
        return args[args.index(name) + 1]

    assert (arg("--appendonly"), arg("--appendfsync"), arg("--requirepass")) == ("yes", "everysec", "$(REDIS_PASSWORD)")
    assert arg("--maxmemory-policy") == "noeviction"
    assert memory_bytes(arg("--maxmemory")) < memory_bytes(container["resources"]["limits"]["memory"])
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == data["name"]
    assert env_value(container, "REDISCLI_AUTH")["valueFrom"]["secretKeyRef"]["name"] == "embedq-redis"
    assert named(base, "Service", redis["spec"]["serviceName"])
    policy = named(base, "NetworkPolicy", "embedq-redis")
    assert selects(policy["spec"]["podSelector"], pod_labels(redis))
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    for doc in workloads(base):
        if doc is not redis:
            assert selects(source["podSelector"], pod_labels(doc)), f"{doc['metadata']['name']} cannot reach Redis"


def test_flower_needs_basic_auth(base):
    (container,) = pod(named(base, "Deployment", "embedq-flower"))["containers"]
    assert role(container) == "flower"
    auth = env_value(container, "FLOWER_BASIC_AUTH")["valueFrom"]["secretKeyRef"]
    assert auth == {"name": "embedq-flower", "key": "basic-auth"}
    assert named(base, "Service", "embedq-flower")["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_every_container_has_a_memory_limit(rendered):
    for doc, container in containers(rendered):
        limit = memory_bytes(container["resources"]["limits"]["memory"])
        if budget := env_value(container, "EMBEDQ_SEARCH_MEMORY_GB"):
            assert float(budget["value"]) * 2**30 < limit, doc["metadata"]["name"]
    searchers = [c for _, c in embedq_containers(rendered) if role(c) == "search-worker"]
    assert all(env_value(c, "EMBEDQ_SEARCH_MEMORY_GB") for c in searchers), "the default reads the node's RAM"


def test_the_service_monitor_scrapes_the_api_and_flower(base):
    monitor = named(base, "ServiceMonitor", "embedq")
    services = [
        d for d in base if d["kind"] == "Service" and selects(monitor["spec"]["selector"], d["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {"embedq-api", "embedq-flower"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        for service in services:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]


def test_milvus_comes_from_its_chart_with_auth_on_and_no_credential_in_the_values(base):
    values_text = (K8S / "milvus-values.yaml").read_text()
    values = yaml.safe_load(values_text)
    assert yaml.safe_load(values["extraConfigFiles"]["user.yaml"])["common"]["security"]["authorizationEnabled"]
    env = {e["name"] for e in values["standalone"]["extraEnv"]}
    assert {"COMMON_SECURITY_DEFAULTROOTPASSWORD", "MINIO_ACCESS_KEY_ID", "MINIO_SECRET_ACCESS_KEY"} <= env
    assert not re.search(r"(?i)(password|secretkey|accesskey)\s*:\s*\S", values_text), "a credential in the values"
    (release, chart, values_file) = re.search(r"helm upgrade --install (\S+) (\S+) -n embedq -f (\S+)", README).groups()
    assert chart.endswith("/milvus") and (ROOT / values_file).resolve() == (K8S / "milvus-values.yaml").resolve()
    uri = urlsplit(named(base, "ConfigMap", "embedq-env")["data"]["EMBEDQ_MILVUS_URI"])
    assert (uri.hostname, uri.port) == (release, 19530), "EMBEDQ_MILVUS_URI is not the chart's Service"


def test_the_vllm_deployment_serves_embeddings_behind_its_key():
    docs = render(KUSTOMIZATIONS["vllm"])
    (container,) = pod(named(docs, "Deployment", "embedq-vllm"))["containers"]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[args.index("--runner") + 1] == "pooling"
    assert env_value(container, "VLLM_API_KEY")["valueFrom"]["secretKeyRef"] == {
        "name": "embedq-vllm",
        "key": "api-key",
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    service = named(docs, "Service", "embedq-vllm")
    port = service["spec"]["ports"][0]["port"]
    assert str(port) == args[args.index("--port") + 1]
    assert f"http://{service['metadata']['name']}:{port}/v1" in README, "the README's upstream URL"
    assert args[0] in README, "the README's upstream model name"
