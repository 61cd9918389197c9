"""A small reader of the kustomizations under compose/k8s, so that the tests render them where no
kustomize is installed: `resources` (files and folders), `namespace`, `configMapGenerator` (files
and literals, with `disableNameSuffixHash`), and JSON 6902 `patches` aimed by kind, name and label
selector. It refuses whatever else a kustomization asks for, so it never renders less than
kustomize would; where kubectl is installed, a test holds the two renderings equal."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render(folder: Path) -> list[dict]:
    """The manifests `kubectl kustomize folder` prints, in the order they are declared."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - FIELDS
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields this reader does not render: {sorted(unknown)}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        docs += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    options = kustomization.get("generatorOptions", {})
    for generator in kustomization.get("configMapGenerator", []):
        docs.append(_config_map(folder, generator, {**options, **generator.get("options", {})}))
    for patch in kustomization.get("patches", []):
        _patch(docs, patch)
    if namespace := kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    return docs


def _config_map(folder: Path, generator: dict, options: dict) -> dict:
    if set(generator) - {"name", "files", "literals", "options"} or set(options) != {"disableNameSuffixHash"}:
        raise NotImplementedError(f"configMapGenerator {generator['name']}: {generator}, {options}")
    if not options["disableNameSuffixHash"]:
        raise NotImplementedError("name suffix hashes")
    data = {}
    for entry in generator.get("files", []):
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = (folder / path).read_text()
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = value
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}


def _targets(doc: dict, target: dict) -> bool:
    if set(target) - {"kind", "name", "labelSelector"}:
        raise NotImplementedError(f"patch target {target}")
    labels = doc["metadata"].get("labels", {})
    wanted = dict(term.split("=", 1) for term in target.get("labelSelector", "").split(",") if term)
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and all(labels.get(key) == value for key, value in wanted.items())
    )


def _patch(docs: list[dict], patch: dict) -> None:
    if set(patch) != {"target", "patch"}:
        raise NotImplementedError(f"patch {patch}: only inline JSON 6902 patches with a target")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise NotImplementedError("strategic merge patches")
    hits = [doc for doc in docs if _targets(doc, patch["target"])]
    if not hits:
        raise ValueError(f"patch target {patch['target']} matches nothing")
    for doc in hits:
        for operation in operations:
            _apply(doc, operation)


def _apply(doc: dict, operation: dict) -> None:
    """One JSON 6902 operation (add, replace, remove) on `doc`, in place."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op, value = operation["op"], copy.deepcopy(operation.get("value"))
    if op not in ("add", "replace", "remove"):
        raise NotImplementedError(f"JSON patch operation {op}")
    key: int | str = last
    if isinstance(node, list):
        key = len(node) if last == "-" else int(last)
    elif op != "add" and last not in node:
        raise ValueError(f"{operation}: nothing at {operation['path']}")
    if op == "remove":
        del node[key]
    elif op == "add" and isinstance(node, list):
        node.insert(key, value)
    else:
        node[key] = value
