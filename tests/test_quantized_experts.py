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

INT8_LOGPROB_BOUND = 0.01  # measured ~1e-3 (docs/benchmarks.md, int8 section)


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


def first_token_drift(cluster: Cluster, model_dir) -> float:
    """|log-prob of the first greedy token through the cluster - the same under `transformers` fp32|."""
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, 1)
    response = cluster.stub.Generate(
        gateway_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=1, return_logprobs=True)
        ),
        timeout=60,
    )
    assert list(response.token_ids) == hf_tokens
    return abs(response.logprobs[0] - hf_logprobs(hf_tokens, hf_logits)[0])


@pytest.mark.integration
def test_int8_cluster_stays_close_to_transformers(mixtral_window_dir):
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32", "--quantize", "int8")
    try:
        assert first_token_drift(cluster, mixtral_window_dir) < INT8_LOGPROB_BOUND
        ckpt = Checkpoint(mixtral_window_dir)
        for i, address in enumerate(cluster.experts):
            with grpc.insecure_channel(address) as channel:
                info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
            assert info.parameter_bytes < shard_bytes(ckpt.tensors, f"{i}/2", torch.float32) * 0.3
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
