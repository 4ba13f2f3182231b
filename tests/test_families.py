"""Every family against the `transformers` class of the same name: in one process, distributed, and in bf16."""

import re
import subprocess
import sys

import grpc
import pytest
import torch

from moemesh.checkpoint import Checkpoint
from moemesh.model import DenseModel, KVCache, SequenceSlice, StepBatch, load_experts, load_gates
from moemesh.moe import LocalExperts, RoutedMoE
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2
from services.gateway.router_client import RouterClient
from tests.family_checkpoints import FAMILIES
from tests.helpers import CPU, Cluster, hf_greedy, stepwise_logits
from tests.test_parity import LOGIT_TOLERANCE, PROMPT, hf_logprobs, local_moe, max_logit_diff

STEPS = 32
BF16_LOGIT_BOUND = 0.1  # measured 2026-11-29: see docs/benchmarks.md (bf16 drift)


@pytest.mark.parametrize("family", FAMILIES)
def test_in_process_matches_transformers(family, family_dirs):
    model_dir = family_dirs[family]
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, STEPS)
    tokens, logits = stepwise_logits(model_dir, local_moe, PROMPT, STEPS)
    assert tokens == hf_tokens
    assert max_logit_diff(logits, hf_logits) < LOGIT_TOLERANCE


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_distributed_path_matches_transformers(family, family_dirs):
    """`moemesh up` with 2 expert shards: greedy tokens and logprobs via the gateway, logits via the router."""
    model_dir = family_dirs[family]
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, STEPS)
    cluster = Cluster(model_dir, "--experts", "2", "--dtype", "float32")
    try:
        response = cluster.stub.Generate(
            gateway_pb2.GenerateRequest(
                prompt_token_ids=PROMPT,
                sampling=gateway_pb2.SamplingParams(max_new_tokens=STEPS, return_logprobs=True),
            ),
            timeout=120,
        )
        assert list(response.token_ids) == hf_tokens
        expected = hf_logprobs(hf_tokens, hf_logits)
        assert max(abs(a - b) for a, b in zip(response.logprobs, expected, strict=True)) < LOGIT_TOLERANCE
        router = lambda ckpt: RouterClient([cluster.router], CPU, torch.float32, torch.float32, timeout_s=60)  # noqa: E731
        tokens, logits = stepwise_logits(model_dir, router, PROMPT, STEPS)
        assert tokens == hf_tokens
        assert max_logit_diff(logits, hf_logits) < LOGIT_TOLERANCE
        assert shard_bytes_served(cluster) == shard_bytes_inspected(model_dir, shards=2)
    finally:
        cluster.close()


def shard_bytes_inspected(model_dir, shards: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "inspect", str(model_dir), "--shards", str(shards), "--dtype", "float32"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [int(n.replace(",", "")) for n in re.findall(r"shard \d+/\d+: .*?([\d,]+) bytes", out)]


def shard_bytes_served(cluster: Cluster) -> list[int]:
    """What each expert process reports holding, in shard order."""
    sizes = []
    for address in cluster.experts:
        with grpc.insecure_channel(address) as channel:
            info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
        sizes.append(info.parameter_bytes)
    return sizes


def prompt_logits(model_dir, dtype: torch.dtype) -> torch.Tensor:
    """Our logits [n, V] for every prompt position, computed in `dtype`."""
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    experts = LocalExperts(load_experts(ckpt, pairs, dtype, CPU))
    routed = RoutedMoE(load_gates(ckpt, dtype, CPU), experts, cfg.num_experts)
    n = len(PROMPT)
    cache = KVCache(cfg, dtype, CPU)
    batch = StepBatch(torch.tensor(PROMPT), torch.arange(n), [SequenceSlice(0, n, cache)], torch.arange(n))
    return DenseModel.from_checkpoint(ckpt, dtype, CPU)([batch], routed)


@pytest.mark.parametrize("family", [*FAMILIES, "mixtral"])
def test_bfloat16_drift_is_bounded(family, family_dirs, mixtral_dir):
    from transformers import AutoModelForCausalLM

    model_dir = mixtral_dir if family == "mixtral" else family_dirs[family]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    assert (prompt_logits(model_dir, torch.float32) - expected).abs().max() < LOGIT_TOLERANCE
    drift = (prompt_logits(model_dir, torch.bfloat16) - expected).abs().max().item()
    print(f"{family}: bf16 max |logit - fp32 reference| = {drift:.4f}")
    assert 0 < drift < BF16_LOGIT_BOUND
