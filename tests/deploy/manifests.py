"""The deployment files under test: the Compose file and the built Kubernetes overlays, with each container's
`moemesh` command line and environment."""

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from moemesh.kustomize import Pool, write_overlay
from tests.deploy.kustomize_build import build

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["dev", "prod", "dev-routes-itself"]
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")  # ${NAME:-default}


@dataclass(frozen=True)
class Container:
    where: str  # for messages: file and service or object
    argv: list[str]  # what follows `moemesh`
    env: dict[str, str]  # literal values; a valueFrom is ""


def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def with_defaults(text: str) -> str:
    """`${NAME:-default}` as Compose reads it when NAME is unset."""
    return DEFAULTED.sub(lambda m: m.group(2), text)


def compose_containers() -> list[Container]:
    """Every service running the moemesh image, and every `moemesh health` healthcheck."""
    found = []
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("moemesh"):
            env = {k: with_defaults(str(v)) for k, v in service.get("environment", {}).items()}
            found.append(Container(f"compose {name}", service["command"], env))
        test = service.get("healthcheck", {}).get("test", [])
        if test[1:2] == ["moemesh"]:
            found.append(Container(f"compose {name} healthcheck", test[2:], {}))
    return found


def plan_overlay(out: Path) -> Path:
    """An overlay as `moemesh plan --format kustomize` writes it: three pools of listed experts."""
    pools = [Pool("hot0", "0,1,2", 3 << 20, 2, 6), Pool("hot1", "0,3,4,5", 4 << 20), Pool("hot2", "1,6,7", 3 << 20)]
    write_overlay(out, pools, K8S / "base", K8S / "pool")
    return out


def k8s_objects(overlay: Path) -> list[dict]:
    return build(overlay)


def pod_spec(obj: dict) -> dict | None:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("Deployment", "StatefulSet") else None


def k8s_containers(objects: list[dict], overlay: str) -> list[Container]:
    found = []
    for obj in objects:
        spec = pod_spec(obj)
        for container in spec["containers"] if spec else []:
            if container["image"].split("/")[-1].startswith("moemesh"):
                env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
                found.append(Container(f"{overlay} {obj['metadata']['name']}", container["args"], env))
    return found
