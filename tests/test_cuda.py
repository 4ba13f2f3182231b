"""The CUDA path (`--device cuda`) against `transformers` on the same GPU in fp32; skipped without CUDA."""

import pytest
import torch

from moemesh.settings import GatewaySettings
from services.gateway.requests import GenerationRequest, SamplingConfig, merge
from services.gateway.server import build_engine
from tests.helpers import Cluster, hf_greedy, stepwise_logits
from tests.test_parity import (
    LOGIT_TOLERANCE,
    PROMPT,
    STEPS,
    assert_cluster_matches,
    assert_reply_matches,
    engine_reply,
    local_moe,
    max_logit_diff,
)

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"), pytest.mark.timeout(300)]

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def hf_cuda(mixtral_dir) -> tuple[list[int], list[torch.Tensor]]:
    return hf_greedy(mixtral_dir, PROMPT, STEPS, CUDA)


def test_model_on_cuda_matches_transformers(mixtral_dir, hf_cuda):
    tokens, logits = stepwise_logits(mixtral_dir, lambda ckpt: local_moe(ckpt, CUDA), PROMPT, STEPS, CUDA)
    assert tokens == hf_cuda[0]
    assert max_logit_diff(logits, hf_cuda[1]) < LOGIT_TOLERANCE


@pytest.mark.parametrize("max_batch_tokens", [512, 7])  # 7: the prompt is prefilled in chunks
def test_in_process_engine_on_cuda_matches_transformers(mixtral_dir, hf_cuda, max_batch_tokens):
    settings = GatewaySettings(model=mixtral_dir, device="cuda", dtype="float32", max_batch_tokens=max_batch_tokens)
    out = engine_reply(settings)
    assert_reply_matches(out.token_ids, out.logprobs, hf_cuda)


def test_seeded_sampling_on_cuda_repeats(mixtral_dir):
    engine, _ = build_engine(GatewaySettings(model=mixtral_dir, device="cuda", dtype="float32"))
    assert engine.device == CUDA and engine.model.lm_head.weight.device == CUDA
    engine.start()
    try:
        sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
        replies = [merge(list(engine.submit(GenerationRequest(PROMPT, sampling)).outputs())) for _ in range(2)]
    finally:
        engine.stop()
    assert replies[0].token_ids == replies[1].token_ids and len(replies[0].token_ids) == 8


@pytest.mark.integration
def test_distributed_path_on_cuda_matches_transformers(mixtral_dir, hf_cuda):
    """`moemesh up --device cuda`: gateway, router and 2 expert shards on the GPU, fp32."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32", "--device", "cuda")
    try:
        assert_cluster_matches(cluster, hf_cuda, CUDA)
    finally:
        cluster.close()
