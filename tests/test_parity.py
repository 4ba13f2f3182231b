"""Reference parity: our engine, in one process and through the distributed path, against `transformers`."""

import pytest
import torch

from moemesh.model import load_experts, load_gates
from moemesh.moe import LocalExperts, RoutedMoE
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2
from services.gateway.requests import GenerationRequest, SamplingConfig, merge
from services.gateway.router_client import RouterClient
from services.gateway.server import build_engine
from tests.helpers import hf_greedy, stepwise_logits

STEPS = 32
PROMPT = [(37 * i + 11) % 500 for i in range(20)]  # longer than the 8-token window
CHECKPOINTS = ["mixtral_dir", "mixtral_window_dir"]
CLUSTERS = {"mixtral_dir": "cluster", "mixtral_window_dir": "window_cluster"}
LOGIT_TOLERANCE = 1e-4


def local_moe(ckpt) -> RoutedMoE:
    cfg = ckpt.config
    pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    return RoutedMoE(
        load_gates(ckpt, torch.float32), LocalExperts(load_experts(ckpt, pairs, torch.float32)), cfg.num_experts
    )


def max_logit_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def hf_logprobs(tokens: list[int], logits: list[torch.Tensor]) -> list[float]:
    return [step.log_softmax(-1)[t].item() for t, step in zip(tokens, logits)]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_in_process_model_logits_match_transformers(checkpoint, request):
    model_dir = request.getfixturevalue(checkpoint)
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, STEPS)
    tokens, logits = stepwise_logits(model_dir, local_moe, PROMPT, STEPS)
    assert tokens == hf_tokens
    assert max_logit_diff(logits, hf_logits) < LOGIT_TOLERANCE


@pytest.mark.parametrize("max_batch_tokens", [512, 7])  # 7: the prompt is prefilled in chunks
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_in_process_engine_matches_transformers(checkpoint, max_batch_tokens, request):
    model_dir = request.getfixturevalue(checkpoint)
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, STEPS)
    engine, _ = build_engine(GatewaySettings(model=model_dir, dtype="float32", max_batch_tokens=max_batch_tokens))
    engine.start()
    try:
        seq = engine.submit(GenerationRequest(PROMPT, SamplingConfig(max_new_tokens=STEPS, return_logprobs=True)))
        out = merge(list(seq.outputs()))
    finally:
        engine.stop()
    assert out.token_ids == hf_tokens
    assert out.finish_reason == "length"
    assert max(abs(a - b) for a, b in zip(out.logprobs, hf_logprobs(hf_tokens, hf_logits))) < LOGIT_TOLERANCE


@pytest.mark.integration
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_distributed_path_matches_transformers(checkpoint, request):
    """Through `moemesh up` (real router, 2-3 expert shards, redis-server): tokens, logprobs and logits."""
    model_dir = request.getfixturevalue(checkpoint)
    cluster = request.getfixturevalue(CLUSTERS[checkpoint])
    hf_tokens, hf_logits = hf_greedy(model_dir, PROMPT, STEPS)

    response = cluster.stub.Generate(
        gateway_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=STEPS, return_logprobs=True)
        ),
        timeout=120,
    )
    assert list(response.token_ids) == hf_tokens
    assert response.usage.prompt_tokens == len(PROMPT) and response.usage.completion_tokens == STEPS
    diffs = [abs(a - b) for a, b in zip(response.logprobs, hf_logprobs(hf_tokens, hf_logits), strict=True)]
    assert max(diffs) < LOGIT_TOLERANCE

    router = lambda ckpt: RouterClient([cluster.router], torch.float32, torch.float32, timeout_s=60)  # noqa: E731
    tokens, logits = stepwise_logits(model_dir, router, PROMPT, STEPS)
    assert tokens == hf_tokens
    assert max_logit_diff(logits, hf_logits) < LOGIT_TOLERANCE
