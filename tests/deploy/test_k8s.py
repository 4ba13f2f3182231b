"""deploy/k8s: every overlay (dev, prod, and one `moemesh plan --format kustomize` writes) builds, and each
object is valid against the Kubernetes schemas (offline, kubernetes-validate); the pools, probes, drain times
and the autoscaler's metric agree with what the services do."""

import json
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from services.experts.servicer import QUEUE_DEPTH
from services.gateway.health import READINESS
from tests.deploy.kustomize_build import MERGE_KEYS
from tests.deploy.manifests import K8S, OVERLAYS, k8s_objects, plan_overlay, pod_spec

K8S_VERSION = "1.33.0"  # one kubernetes-validate 1.37 ships schemas for; gRPC probes are GA since 1.27


@pytest.fixture(scope="module", params=[*OVERLAYS, "plan"])
def overlay(request, tmp_path_factory):
    if request.param == "plan":
        return plan_overlay(tmp_path_factory.mktemp("overlay") / "plan")
    return K8S / "overlays" / request.param


@pytest.fixture(scope="module")
def objects(overlay):
    return k8s_objects(overlay)


def by_kind(objects, kind):
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


@pytest.mark.timeout(120)
def test_every_object_is_valid(objects):
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.timeout(60)
def test_the_real_kustomize_builds_the_same(overlay, objects):
    binary = shutil.which("kustomize") or shutil.which("kubectl")
    if binary is None:
        pytest.skip("no kustomize or kubectl on PATH (the Python build above stands in)")
    argv = [binary, "build", str(overlay)] if binary.endswith("kustomize") else [binary, "kustomize", str(overlay)]
    real = list(yaml.safe_load_all(subprocess.run(argv, check=True, capture_output=True, text=True).stdout))

    def key(obj):
        return obj["kind"], obj["metadata"]["name"]

    # kustomize moves the items a patch merged into to the front of their list: compare those lists as sets
    assert sorted(map(unordered, real), key=key) == sorted(map(unordered, objects), key=key)


def unordered(value):
    """`value` with the lists strategic merge merges by key sorted by that key."""
    if isinstance(value, dict):
        return {
            name: sorted(map(unordered, item), key=lambda x: json.dumps(x, sort_keys=True))
            if name in MERGE_KEYS and isinstance(item, list)
            else unordered(item)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [unordered(item) for item in value]
    return value


@pytest.mark.timeout(60)
def test_each_pool_has_its_autoscaler_and_disruption_budget(objects):
    deployments = {n: d for n, d in by_kind(objects, "Deployment").items() if n.startswith("moemesh-expert-")}
    autoscalers, budgets = by_kind(objects, "HorizontalPodAutoscaler"), by_kind(objects, "PodDisruptionBudget")
    assert deployments
    for name, deployment in deployments.items():
        pool = deployment["metadata"]["labels"]["moemesh.io/pool"]
        assert deployment["spec"]["selector"]["matchLabels"]["moemesh.io/pool"] == pool
        assert autoscalers[name]["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert budgets[name]["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        metrics = {m["type"]: m for m in autoscalers[name]["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        assert metrics["Pods"]["pods"]["metric"]["name"] == QUEUE_DEPTH._name  # a metric the experts export
        env = {e["name"]: e for e in pod_spec(deployment)["containers"][0]["env"]}
        assert env["MOEMESH_SHARD"]["value"] != "0/1"  # the template's, patched per pool
        assert autoscalers[name]["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    shards = {pod_spec(d)["containers"][0]["env"][3]["value"] for d in deployments.values()}
    assert len(shards) == len(deployments)


@pytest.mark.timeout(60)
def test_probes_are_grpc_on_the_service_port(objects):
    for name, deployment in by_kind(objects, "Deployment").items():
        container = pod_spec(deployment)["containers"][0]
        port = int(container["args"][container["args"].index("--port") + 1])
        readiness = READINESS if name == "moemesh-gateway" else ""
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": readiness}
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": ""}


@pytest.mark.timeout(60)
def test_pods_get_their_drain_time(objects):
    """preStop (while the endpoints drop the pod) + the service's own drain (MOEMESH_GRACE_S) fit in the
    termination grace period, so Kubernetes never kills a draining pod."""
    for name, deployment in by_kind(objects, "Deployment").items():
        spec = pod_spec(deployment)
        container = spec["containers"][0]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = next(float(e["value"]) for e in container["env"] if e["name"] == "MOEMESH_GRACE_S")
        assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + 1, name


@pytest.mark.timeout(60)
def test_only_the_gateway_is_exposed(objects):
    policies = by_kind(objects, "NetworkPolicy")
    internal = policies["moemesh-internal"]["spec"]
    assert internal["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "moemesh"}
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "moemesh"
    public = [p for n, p in policies.items() if n != "moemesh-internal"]
    assert [p["spec"]["podSelector"]["matchLabels"] for p in public] == [{"app.kubernetes.io/name": "moemesh-gateway"}]
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in by_kind(objects, "Service").values())


@pytest.mark.timeout(60)
def test_references_resolve(objects):
    """ConfigMaps, Secrets and volume claims the pods name are part of the overlay, but for the model's volume
    claim, which an overlay without one (a plan's) expects to exist already (overlays/prod creates it)."""
    config_maps, secrets = by_kind(objects, "ConfigMap"), by_kind(objects, "Secret")
    claims = set(by_kind(objects, "PersistentVolumeClaim"))
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps[ref["name"]]["data"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims | {"moemesh-model"}


@pytest.mark.timeout(60)
def test_a_gateway_that_routes_itself_reads_the_registry_the_experts_announce_in():
    objects = k8s_objects(K8S / "overlays" / "dev-routes-itself")
    assert not [obj for obj in objects if obj["metadata"]["name"] == "moemesh-router"]
    deployments = by_kind(objects, "Deployment")
    gateway = pod_spec(deployments["moemesh-gateway"])["containers"][0]
    assert "--router" not in gateway["args"]
    registry = {e["name"]: e for e in gateway["env"]}["MOEMESH_REGISTRY"]
    assert registry["valueFrom"] == {"configMapKeyRef": {"name": "moemesh-redis", "key": "url"}}
    experts = [pod_spec(d)["containers"][0] for name, d in deployments.items() if name.startswith("moemesh-expert-")]
    assert experts
    for expert in experts:
        assert {e["name"]: e for e in expert["env"]}["MOEMESH_REGISTRY"] == registry


@pytest.mark.timeout(30)
def test_the_adapter_serves_the_autoscalers_metric_from_the_scraped_pods():
    rules = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]
    assert [rule["name"]["as"] for rule in rules] == [QUEUE_DEPTH._name]
    assert rules[0]["seriesQuery"].startswith(QUEUE_DEPTH._name + "{")
    assert set(rules[0]["resources"]["overrides"]) == {"namespace", "pod"}
    jobs = yaml.safe_load((K8S / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert [job["job_name"] for job in jobs] == ["moemesh-gateway", "moemesh-router", "moemesh-expert"]
    for job in jobs:
        assert {"namespace", "pod"} <= {r.get("target_label") for r in job["relabel_configs"]}
