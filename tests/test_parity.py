"""Reference parity: our engine, in one process and through the distributed path, against `transformers`."""

import pytest
import torch

from moemesh.moe import RoutedMoE
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2
from services.gateway.experts import local_experts
from services.gateway.requests import GenerationRequest, SamplingConfig, StepOutput, merge
from services.gateway.router_client import RouterClient
from services.gateway.server import build_engine
from tests.helpers import CPU, Cluster, hf_greedy, stepwise_logits

STEPS = 32
PROMPT = [(37 * i + 11) % 500 for i in range(20)]  # longer than the 8-token window
CHECKPOINTS = ["mixtral_dir", "mixtral_window_dir"]
CLUSTERS = {"mixtral_dir": "cluster", "mixtral_window_dir": "window_cluster"}
LOGIT_TOLERANCE = 1e-4


def local_moe(ckpt, device: torch.device = CPU) -> RoutedMoE:
    return local_experts(ckpt, torch.float32, device)


def max_logit_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def hf_logprobs(tokens: list[int], logits: list[torch.Tensor]) -> list[float]:
    return [step.log_softmax(-1)[t].item() for t, step in zip(tokens, logits)]


def engine_reply(settings: GatewaySettings) -> StepOutput:
    """PROMPT's greedy reply (STEPS tokens, with logprobs) from an in-process engine built from `settings`."""
    engine, _ = build_engine(settings)
    engine.start()
    try:
        seq = engine.submit(GenerationRequest(PROMPT, SamplingConfig(max_new_tokens=STEPS, return_logprobs=True)))
        return merge(list(seq.outputs()))
    finally:
        engine.stop()


def assert_reply_matches(tokens: list[int], logprobs: list[float], hf: tuple[list[int], list[torch.Tensor]]) -> None:
    """Same tokens as `transformers` (`hf_greedy`'s answer), each logprob within LOGIT_TOLERANCE."""
    hf_tokens, hf_logits = hf
    assert tokens == hf_tokens
    diffs = [abs(a - b) for a, b in zip(logprobs, hf_logprobs(hf_tokens, hf_logits), strict=True)]
    assert max(diffs) < LOGIT_TOLERANCE


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
    settings = GatewaySettings(model=model_dir, device="cpu", dtype="float32", max_batch_tokens=max_batch_tokens)
    out = engine_reply(settings)
    assert out.finish_reason == "length"
    assert_reply_matches(out.token_ids, out.logprobs, hf_greedy(model_dir, PROMPT, STEPS))


@pytest.mark.integration
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_distributed_path_matches_transformers(checkpoint, request):
    """Through `moemesh up` (real router, 2-3 expert shards, redis-server): tokens, logprobs and logits."""
    model_dir = request.getfixturevalue(checkpoint)
    assert_cluster_matches(request.getfixturevalue(CLUSTERS[checkpoint]), hf_greedy(model_dir, PROMPT, STEPS))


def assert_cluster_matches(
    cluster: Cluster, hf: tuple[list[int], list[torch.Tensor]], device: torch.device = CPU
) -> None:
    """A running fp32 `moemesh up` gives `transformers`' tokens and logprobs (`hf`), and our dense model on
    `device` stepping through its router gives the same logits."""
    response = cluster.stub.Generate(
        gateway_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=STEPS, return_logprobs=True)
        ),
        timeout=120,
    )
    assert_reply_matches(list(response.token_ids), list(response.logprobs), hf)
    assert response.usage.prompt_tokens == len(PROMPT) and response.usage.completion_tokens == STEPS

    router = lambda ckpt: RouterClient([cluster.router], device, torch.float32, torch.float32, timeout_s=60)  # noqa: E731
    tokens, logits = stepwise_logits(cluster.model_dir, router, PROMPT, STEPS, device)
    assert tokens == hf[0]
    assert max_logit_diff(logits, hf[1]) < LOGIT_TOLERANCE


def test_gateway_that_routes_itself_matches_transformers(mixtral_dir):
    """`moemesh up --routers 0`: the gateway gates and calls the 2 expert shards itself (found in the registry);
    the same tokens and logprobs as `transformers`, and its metrics count the tokens sent to each expert."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--routers", "0", "--dtype", "float32")
    try:
        assert cluster.routers == [] and cluster.child_pids(r"moemesh\.cli gateway .*--registry redis://")
        response = cluster.stub.Generate(
            gateway_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=STEPS, return_logprobs=True)
            ),
            timeout=120,
        )
        assert_reply_matches(list(response.token_ids), list(response.logprobs), hf_greedy(mixtral_dir, PROMPT, STEPS))
        routed = cluster.metric("moemesh_router_expert_tokens_total")
        assert routed == 2 * (len(PROMPT) + STEPS - 1) * 2  # top-2, every MoE layer (2)
    finally:
        cluster.close()
