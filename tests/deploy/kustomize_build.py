"""`kustomize build` for the features deploy/k8s uses, so its overlays build where no kustomize binary can be
installed (PyPI, npm and Debian have none recent enough; tests/deploy/test_k8s.py compares this with the real
one wherever `kustomize` or `kubectl` is on PATH).

Covered: `resources` (files, multi-document, and directories with their own kustomization, built first),
`patches` (strategic merge, from `path` or inline `patch`, matched by kind and name, or by a `target` of kind,
name and an equality `labelSelector`; `$patch: delete` removes what it matches), `nameSuffix` and
`namePrefix` (with HorizontalPodAutoscaler `scaleTargetRef` following the Deployment it names), `labels`
(`pairs`, `includeSelectors`), `replicas` and `images`. Strategic merge: maps merge, `null` deletes, and the
lists Kubernetes merges by key (containers and env by name, volumes by name, volumeMounts by mountPath, ports
by containerPort) merge item by item.
"""

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "nameSuffix", "namePrefix", "labels", "replicas",
                "images"}  # fmt: skip
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}  # fmt: skip
WORKLOADS = {"Deployment", "StatefulSet"}
SELECTING = WORKLOADS | {"PodDisruptionBudget"}  # spec.selector.matchLabels


def build(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_FIELDS
    assert not unknown, f"{directory}: kustomize_build does not cover {sorted(unknown)}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += build(path) if path.is_dir() else _documents(path.read_text())
    for patch in kustomization.get("patches", []):
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        for document in _documents(text):
            _apply_patch(objects, document, patch.get("target"))
    _rename(objects, kustomization.get("namePrefix", ""), kustomization.get("nameSuffix", ""))
    for labels in kustomization.get("labels", []):
        _label(objects, labels["pairs"], labels.get("includeSelectors", False))
    for replicas in kustomization.get("replicas", []):
        for obj in objects:
            if obj["metadata"]["name"] == replicas["name"] and obj["kind"] in WORKLOADS:
                obj["spec"]["replicas"] = replicas["count"]
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    return objects


def merge(target: Any, patch: Any, key: str | None = None) -> Any:
    """`patch` merged into `target` (strategic merge for what deploy/k8s uses); `key` names the field."""
    if isinstance(patch, dict) and isinstance(target, dict):
        merged = dict(target)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = merge(target.get(name), value, name)
        return merged
    if isinstance(patch, list) and isinstance(target, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        merged_list = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, old in enumerate(merged_list) if old[field] == item[field]), None)
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def _documents(text: str) -> list[dict]:
    return [document for document in yaml.safe_load_all(text) if document]


def _apply_patch(objects: list[dict], patch: dict, target: dict | None) -> None:
    selector = target or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    matched = [i for i, obj in enumerate(objects) if _selected(obj, selector)]
    assert matched, f"patch {patch['kind']}/{patch['metadata']['name']} matches nothing"
    if patch.get("$patch") == "delete":
        objects[:] = [obj for i, obj in enumerate(objects) if i not in matched]
        return
    for i in matched:
        body = {name: value for name, value in patch.items() if name != "metadata"} | {
            "metadata": {name: value for name, value in patch["metadata"].items() if name != "name"}
        }
        objects[i] = merge(objects[i], body)


def _selected(obj: dict, selector: dict) -> bool:
    if "kind" in selector and obj["kind"] != selector["kind"]:
        return False
    if "name" in selector and obj["metadata"]["name"] != selector["name"]:
        return False
    labels = obj["metadata"].get("labels", {})
    for term in filter(None, selector.get("labelSelector", "").split(",")):
        name, value = term.split("=")
        if labels.get(name) != value:
            return False
    return True


def _rename(objects: list[dict], prefix: str, suffix: str) -> None:
    if not prefix and not suffix:
        return
    renamed = {}
    for obj in objects:
        old = obj["metadata"]["name"]
        obj["metadata"]["name"] = renamed[obj["kind"], old] = f"{prefix}{old}{suffix}"
    for obj in objects:
        if obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            ref["name"] = renamed.get((ref["kind"], ref["name"]), ref["name"])


def _label(objects: list[dict], pairs: dict, include_selectors: bool) -> None:
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if not include_selectors:
            continue
        spec = obj.get("spec", {})
        if obj["kind"] in SELECTING:
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
        if obj["kind"] in WORKLOADS:
            spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if obj["kind"] == "Service":
            spec.setdefault("selector", {}).update(pairs)


def _set_image(objects: list[dict], image: dict) -> None:
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
