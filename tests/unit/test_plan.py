"""EPLB-style planning: replicate the hottest experts and balance the pools."""

import http.server
import threading

import pytest

from moemesh.checkpoint import Checkpoint
from moemesh.cli import main
from moemesh.errors import InvalidArgument
from moemesh.kustomize import Pool
from moemesh.plan import balance, load_from_metrics
from moemesh.sharding import shard_bytes
from tests.deploy.kustomize_build import build
from tests.deploy.manifests import REPO


def test_skewed_load_is_balanced():
    load = {e: 1.0 for e in range(8)} | {0: 20.0, 1: 10.0}  # experts 0 and 1 are hot, both in shard 0/2
    plan = balance(load, num_experts=8, pools=2, slots=5)
    assert plan.before > 1.7
    assert plan.after < plan.before and plan.after < 1.1
    assert sorted({e for pool in plan.pools for e in pool}) == list(range(8))  # every expert somewhere
    assert all(len(pool) <= 5 and len(pool) == len(set(pool)) for pool in plan.pools)
    assert all(0 in pool for pool in plan.pools)  # the hottest expert is replicated into both pools


def test_uniform_load_stays_balanced():
    plan = balance({e: 5.0 for e in range(16)}, num_experts=16, pools=4, slots=4)
    assert plan.before == pytest.approx(1.0) and plan.after == pytest.approx(1.0)


def test_not_enough_slots():
    with pytest.raises(InvalidArgument, match="cannot hold 8 experts"):
        balance({}, num_experts=8, pools=2, slots=3)


def test_load_from_router_metrics():
    text = (
        "# TYPE moemesh_router_expert_tokens_total counter\n"
        'moemesh_router_expert_tokens_total{expert="0",layer="0"} 5.0\n'
        'moemesh_router_expert_tokens_total{expert="0",layer="1"} 7.0\n'
        'moemesh_router_expert_tokens_total{expert="3",layer="1"} 2.0\n'
        'moemesh_router_expert_tokens_created{expert="3",layer="1"} 1.7e9\n'
    )
    assert load_from_metrics(text) == {0: 12.0, 3: 2.0}


@pytest.fixture
def router_metrics():
    """A router's /metrics with expert 0 hot, on a free port."""
    text = "".join(
        f'moemesh_router_expert_tokens_total{{expert="{e}",layer="0"}} {100 if e == 0 else 5}.0\n' for e in range(4)
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.timeout(120)
def test_plan_writes_a_kustomize_overlay(mixtral_dir, router_metrics, tmp_path, capsys):
    out = tmp_path / "overlay"
    k8s = str(REPO / "deploy" / "k8s")
    argv = ["plan", str(mixtral_dir), "--metrics", router_metrics, "--pools", "2", "--format", "kustomize",
            "--out", str(out), "--k8s", k8s, "--pool-prefix", "hot", "--min-replicas", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    ckpt = Checkpoint(mixtral_dir)
    assert ckpt.config.num_experts == 4
    deployments = {o["metadata"]["name"]: o for o in build(out) if o["kind"] == "Deployment"}
    assert {"moemesh-gateway", "moemesh-router", "moemesh-expert-hot0", "moemesh-expert-hot1"} == set(deployments)
    for i in range(2):
        spec = deployments[f"moemesh-expert-hot{i}"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert f"pool {i}: moemesh expert --model {mixtral_dir} --shard {env['MOEMESH_SHARD']} " in printed
        assert "0" in env["MOEMESH_SHARD"].split(",")  # the hot expert is in both pools
        weights = shard_bytes(ckpt.tensors, env["MOEMESH_SHARD"], ckpt.config.checkpoint_dtype)
        memory = spec["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
        assert memory == f"{Pool('', '', weights).memory_mib()}Mi"
        assert spec["replicas"] == 2


@pytest.mark.timeout(30)
def test_out_goes_with_the_kustomize_format(tmp_path):
    assert main(["plan", str(tmp_path), "--metrics", "127.0.0.1:1", "--out", str(tmp_path)]) == 2
