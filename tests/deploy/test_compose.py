"""deploy/compose: the Compose file parses, and what it names exists: bind-mounted files, named volumes, the
build context, services it depends on; Prometheus scrapes every moemesh service on its metrics port, and its
configuration passes promtool; spans go to the collector's OTLP receiver."""

import re
import shutil
import subprocess

import pytest
import yaml

from moemesh import cli
from tests.deploy.manifests import COMPOSE_DIR, compose, with_defaults


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.timeout(30)
def test_what_services_name_exists():
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = with_defaults(volume).split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
            if service["depends_on"][dependency]["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
        if "build" in service:
            assert (COMPOSE_DIR / service["build"]["context"] / "Dockerfile").is_file()
        for port in service.get("ports", []):
            published, target = port.split(":")
            assert published == target
        if service.get("image", "").startswith("moemesh"):
            assert "healthcheck" in service, name
            assert "container_name" not in service, f"{name}: a fixed name cannot be scaled"
            assert flag(service["healthcheck"]["test"], "health").endswith(":" + flag(service["command"], "--port"))


@pytest.mark.timeout(30)
def test_only_the_gateway_is_published_of_moemesh():
    published = [name for name, s in compose()["services"].items() if s.get("image", "").startswith("moemesh") and
                 s.get("ports")]  # fmt: skip
    assert published == ["gateway"]


@pytest.mark.timeout(30)
def test_prometheus_scrapes_every_service_on_its_metrics_port():
    services = compose()["services"]
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            scraped |= {name: (job["job_name"], sd["port"]) for name in sd["names"]}
    for name, service in services.items():
        if service.get("image", "").startswith("moemesh"):
            role = cli._parser().parse_args(service["command"]).command
            assert scraped[name] == (f"moemesh-{role}", int(flag(service["command"], "--metrics-port"))), name
    mounted = [v.split(":")[1] for v in services["prometheus"]["volumes"]]
    assert set(config["rule_files"]) <= set(mounted)


@pytest.mark.timeout(60)
def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: `make install` installs it")
    text = (COMPOSE_DIR / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(COMPOSE_DIR.parent / "observability" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(30)
def test_spans_reach_the_collector():
    services = compose()["services"]
    collector = yaml.safe_load((COMPOSE_DIR / "otel-collector.yaml").read_text())
    grpc_port = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    for name, service in services.items():
        env = service.get("environment", {})
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            host, port = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
            assert host in services and port == grpc_port, name
