"""Lower-precision experts and wire: `--quantize int8` shards and `--wire-dtype bfloat16`, each close to fp32."""

import grpc
import pytest
import torch

from moemesh.checkpoint import Checkpoint
from moemesh.sharding import shard_bytes
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2
from services.experts.shard import ExpertShard
from tests.helpers import Cluster, hf_greedy
from tests.test_parity import PROMPT, hf_logprobs

# First-token log-prob drift against fp32 `transformers`: int8 (experts) measured ~1e-3 (docs/benchmarks.md, int8
# section); int4 (round-to-nearest by groups, made at load, experts and the gateway's linears) bounded looser.
LOGPROB_BOUND = {"int8": 0.01, "int4": 0.1, "w8a8": 0.1}
# Expert bytes per shard against fp32: int8 a quarter plus scales; int4 an eighth plus a scale and a zero per group
# (groups of 64 here: the tiny model's hidden size; on the benchmark model, 128).
BYTES_SHARE = {"int8": 0.3, "int4": 0.2, "w8a8": 0.3}


def test_int8_shard_holds_a_quarter_of_the_fp32_bytes(mixtral_window_dir):
    ckpt = Checkpoint(mixtral_window_dir)
    cfg = ckpt.config
    full = ExpertShard.load(ckpt, "0/2", torch.float32, torch.device("cpu"))
    quantized = ExpertShard.load(ckpt, "0/2", torch.float32, torch.device("cpu"), quantize="int8")
    assert full.parameter_bytes == shard_bytes(ckpt.tensors, "0/2", torch.float32)
    experts = len(cfg.moe_layers) * len(full.layers[0])
    scales = experts * 4 * (2 * cfg.moe_intermediate_size + cfg.hidden_size)  # one float32 per output row
    assert quantized.parameter_bytes == full.parameter_bytes // 4 + scales
    rows = torch.randn(5, cfg.hidden_size)
    exact = full.run.experts[(0, 0)](rows)
    approx = quantized.run.experts[(0, 0)](rows)
    assert (approx - exact).norm() / exact.norm() < 0.02


def first_token_drift(cluster: Cluster, model_dir, same_token: bool = True) -> float:
    """|log-prob of the first greedy token through the cluster - that token's under `transformers` fp32|; with
    `same_token`, the token is `transformers`' own greedy one."""
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, 1)
    response = cluster.stub.Generate(
        gateway_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=1, return_logprobs=True)
        ),
        timeout=60,
    )
    if same_token:
        assert list(response.token_ids) == hf_tokens
    return abs(response.logprobs[0] - hf_logprobs(list(response.token_ids), hf_logits)[0])


def test_int4_shard_holds_codes_by_group(mixtral_window_dir):
    ckpt = Checkpoint(mixtral_window_dir)
    full = ExpertShard.load(ckpt, "0/2", torch.float32, torch.device("cpu"))
    quantized = ExpertShard.load(ckpt, "0/2", torch.float32, torch.device("cpu"), quantize="int4")
    assert quantized.parameter_bytes < full.parameter_bytes * BYTES_SHARE["int4"]
    rows = torch.randn(5, ckpt.config.hidden_size)
    exact = full.run.experts[(0, 0)](rows)
    approx = quantized.run.experts[(0, 0)](rows)
    assert 0 < (approx - exact).norm() / exact.norm() < 0.25  # ~0.12 a projection on Gaussian weights, 2 chained


@pytest.mark.integration
@pytest.mark.parametrize("quantize", ["int8", "int4", "w8a8"])
def test_quantized_cluster_stays_close_to_transformers(mixtral_window_dir, quantize):
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32", "--quantize", quantize)
    try:
        # int4, w8a8: the gateway's attention and LM head too (a near-tie of this random model may flip the token)
        drift = first_token_drift(cluster, mixtral_window_dir, same_token=quantize == "int8")
        assert drift < LOGPROB_BOUND[quantize]
        ckpt = Checkpoint(mixtral_window_dir)
        for i, address in enumerate(cluster.experts):
            with grpc.insecure_channel(address) as channel:
                info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
            assert info.parameter_bytes < shard_bytes(ckpt.tensors, f"{i}/2", torch.float32) * BYTES_SHARE[quantize]
    finally:
        cluster.close()


@pytest.mark.integration
def test_bfloat16_on_the_wire_stays_close(mixtral_window_dir):
    """fp32 compute with bf16 tensors between services: a measurable, bounded drift."""
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32", "--wire-dtype", "bfloat16")
    try:
        assert 0 < first_token_drift(cluster, mixtral_window_dir) < 0.01
    finally:
        cluster.close()
