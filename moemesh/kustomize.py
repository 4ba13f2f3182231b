"""Kustomize overlays of expert pools: what `moemesh plan --format kustomize` writes, and the checked-in
`deploy/k8s/overlays/*` hold.

An overlay is the base (Redis, router, gateway) plus one instance of the pool template (`deploy/k8s/pool`: a
Deployment, its HorizontalPodAutoscaler and its PodDisruptionBudget) per pool: a directory `pool-<name>` whose
kustomization adds the suffix `-<name>` and the label `moemesh.io/pool=<name>` (selectors included, so each
pool's autoscaler and disruption budget count its own pods only), and patches the template with the pool's
experts (MOEMESH_SHARD), replica counts and resources.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

POOL_LABEL = "moemesh.io/pool"
TEMPLATE_NAME = "moemesh-expert"  # the pool template's Deployment, autoscaler and disruption budget
MIB = 1024 * 1024
RUNTIME_MIB = 1024  # a replica's memory besides its weights: Python, torch, gRPC buffers
WEIGHT_HEADROOM = 1.25  # activations and transient copies while loading, per byte of weights


@dataclass(frozen=True)
class Pool:
    name: str  # DNS-label safe: lower-case letters and digits
    shard: str  # what `moemesh expert --shard` takes: i/N or expert ids 3,5,7
    weight_bytes: int  # expert weights the pool's replicas hold (`moemesh inspect`, sharding.shard_bytes)
    min_replicas: int = 1
    max_replicas: int = 4

    def memory_mib(self) -> int:
        """The memory a replica requests; its limit is twice this."""
        return math.ceil(self.weight_bytes * WEIGHT_HEADROOM / MIB) + RUNTIME_MIB


def write_overlay(out: Path, pools: list[Pool], base: Path, template: Path) -> list[Path]:
    """Writes an overlay of `base` with `pools` into `out` (created); returns the files written."""
    written = [_write(out / "kustomization.yaml", _kustomization([_relative(base, out), *_dirs(pools)]))]
    for pool in pools:
        written += write_pool(out / f"pool-{pool.name}", pool, template)
    return written


def write_pool(directory: Path, pool: Pool, template: Path) -> list[Path]:
    """One pool's kustomization over the pool template, and its patches."""
    kustomization = _kustomization([_relative(template, directory)]) | {
        "nameSuffix": f"-{pool.name}",
        "labels": [{"pairs": {POOL_LABEL: pool.name}, "includeSelectors": True}],
        "patches": [{"path": "deployment.yaml"}, {"path": "autoscaler.yaml"}],
    }
    return [
        _write(directory / "kustomization.yaml", kustomization),
        _write(directory / "deployment.yaml", _deployment_patch(pool)),
        _write(directory / "autoscaler.yaml", _autoscaler_patch(pool)),
    ]


def _deployment_patch(pool: Pool) -> dict:
    memory = pool.memory_mib()
    container = {
        "name": "expert",
        "env": [{"name": "MOEMESH_SHARD", "value": pool.shard}],
        "resources": {
            "requests": {"cpu": "1", "memory": f"{memory}Mi"},
            "limits": {"cpu": "4", "memory": f"{2 * memory}Mi"},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": TEMPLATE_NAME},
        "spec": {"replicas": pool.min_replicas, "template": {"spec": {"containers": [container]}}},
    }


def _autoscaler_patch(pool: Pool) -> dict:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": TEMPLATE_NAME},
        "spec": {"minReplicas": pool.min_replicas, "maxReplicas": pool.max_replicas},
    }


def _kustomization(resources: list[str]) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}


def _dirs(pools: list[Pool]) -> list[str]:
    return [f"pool-{pool.name}" for pool in pools]


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _write(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path
