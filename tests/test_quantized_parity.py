"""Quantized checkpoints against `transformers`: the same greedy tokens for 24 steps and near-equal log-probs in
fp32 compute, in one process for every format and family, and through `moemesh up` with 2 expert shards.

The reference is `transformers` on the float model of the weights that code independent of moemesh's decodes
from the checkpoint (`tests/quantized_checkpoints.py`); for DeepSeek-style fp8 also `transformers` loading the
fp8 checkpoint itself. These run with `--quantized-kernels exact`, so the format's decoding alone is under test,
held to fp32 rounding (log-probs within 1e-4). The default kernels round a 4-bit layer's fp32 inputs to bf16:
their log-probs along the reference's tokens are held to 5e-3 (measured ~1e-3; a near-tie of a random tiny
model can then pick another greedy token, so tokens are compared in exact mode only).
"""

import pytest
import torch

from moemesh.checkpoint import Checkpoint
from moemesh.model import DenseModel, KVCache, SequenceSlice, StepBatch
from moemesh.quant_linear import IntLinear, exact_kernels
from moemesh.v1 import gateway_pb2
from services.gateway.experts import local_experts
from tests.family_checkpoints import FAMILIES
from tests.helpers import CPU, Cluster, hf_greedy, make_mixtral, stepwise_logits
from tests.quantized_checkpoints import Format, quantize_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
STEPS = 24
PROMPT = [(31 * i + 7) % 500 for i in range(12)]
EXACT_TOLERANCE, FAST_TOLERANCE = 1e-4, 5e-3
MIXTRAL_FORMATS = [
    Format("gptq", 4, 32), Format("gptq", 4, 32, sym=True, desc_act=True), Format("gptq_v2", 8, 64),
    Format("awq", 4, 32), Format("ct-pack", 4, 32), Format("ct-pack", 4, 0, sym=True),
    Format("ct-int8", 8, 0, sym=True), Format("ct-fp8-channel", 8, 0), Format("ct-fp8-block", 8, 32),
    Format("fp8-block", 8, 32),
]  # fmt: skip
FAMILY_FORMATS = [Format("gptq", 4, 32, desc_act=True), Format("ct-pack", 4, 32), Format("fp8-block", 8, 8)]
# Each with what its expert shards say they hold and run.
UP_FORMATS = {
    Format("gptq", 4, 32, sym=True, desc_act=True): ("gptq 4-bit, groups of 32", "int4 by groups of 32, dequantized"),
    Format("awq", 4, 32): ("awq 4-bit, groups of 32", "int4 by groups of 32, dequantized"),
    Format("fp8-block", 8, 32): ("fp8 e4m3, blocks of 32x32", "fp8 e4m3 blocks 32x32, dequantized"),
}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("mixtral"))


def logprobs(tokens: list[int], logits: list[torch.Tensor]) -> list[float]:
    return [step.log_softmax(-1)[t].item() for t, step in zip(tokens, logits, strict=True)]


def assert_matches(tokens: list[int], ours: list[float], reference: tuple[list[int], list[torch.Tensor]]) -> None:
    ref_tokens, ref_logits = reference
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(ours, logprobs(ref_tokens, ref_logits), strict=True)) < EXACT_TOLERANCE


def in_process(model_dir) -> tuple[list[int], list[float]]:
    with exact_kernels():
        tokens, logits = stepwise_logits(model_dir, lambda c: local_experts(c, torch.float32, CPU), PROMPT, STEPS)
    return tokens, logprobs(tokens, logits)


@pytest.mark.parametrize("fmt", MIXTRAL_FORMATS, ids=lambda f: f.name)
def test_mixtral_in_process_matches_transformers(mixtral, tmp_path, fmt):
    model = quantize_checkpoint(mixtral, tmp_path / "q", fmt)
    reference = hf_greedy(model / "reference", PROMPT, STEPS)
    assert_matches(*in_process(model), reference)
    if fmt.method == "fp8-block":  # transformers reads this format itself (dequantized on the CPU)
        assert_matches(*in_process(model), hf_greedy(model, PROMPT, STEPS))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("fmt", FAMILY_FORMATS, ids=lambda f: f.name)
def test_every_family_in_process_matches_transformers(tmp_path, family, fmt):
    model = quantize_checkpoint(FAMILIES[family](tmp_path / "float"), tmp_path / "q", fmt)
    assert_matches(*in_process(model), hf_greedy(model / "reference", PROMPT, STEPS))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fmt", UP_FORMATS, ids=lambda f: f.name)
def test_up_with_two_shards_matches_transformers(mixtral, tmp_path, fmt):
    model = quantize_checkpoint(mixtral, tmp_path / "q", fmt)
    reference = hf_greedy(model / "reference", PROMPT, STEPS)
    cluster = Cluster(model, "--experts", "2", "--dtype", "float32", "--quantized-kernels", "exact")
    try:
        response = cluster.stub.Generate(
            gateway_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=STEPS, return_logprobs=True)
            ),
            timeout=120,
        )
        assert_matches(list(response.token_ids), list(response.logprobs), reference)
        weights, kernels = UP_FORMATS[fmt]
        compute = [line for line in cluster.up.lines if " expert compute: " in line]
        assert len(compute) == 2, cluster.up.lines
        for line in compute:
            assert f"weights {weights} as stored" in line and line.endswith(f"kernels: experts: {kernels} to float32")
    finally:
        cluster.close()


def forced_logprobs(model_dir, tokens: list[int]) -> list[float]:
    """Our log-probs of `tokens`, each step fed the previous one (teacher forcing), with the default kernels."""
    ckpt = Checkpoint(model_dir)
    dense = DenseModel.from_checkpoint(ckpt, torch.float32, CPU)
    routed = local_experts(ckpt, torch.float32, CPU)
    assert {m.kernel for m in routed.executor.experts[(0, 0)].modules() if isinstance(m, IntLinear)} == {"int4pack"}
    cache = KVCache(ckpt.config, torch.float32, CPU)
    ids, out = PROMPT, []
    for token in tokens:
        n = len(ids)
        batch = StepBatch(
            torch.tensor(ids), torch.arange(cache.length, cache.length + n), [SequenceSlice(0, n, cache)],
            torch.tensor([n - 1]),
        )  # fmt: skip
        out.append(dense([batch], routed)[0].log_softmax(-1)[token].item())
        cache.length += n
        ids = [token]
    return out


@pytest.mark.parametrize("fmt", [f for f in MIXTRAL_FORMATS if f.bits == 4], ids=lambda f: f.name)
def test_the_fast_int4_kernel_stays_within_the_bound(mixtral, tmp_path, fmt):
    model = quantize_checkpoint(mixtral, tmp_path / "q", fmt)
    tokens, logits = hf_greedy(model / "reference", PROMPT, STEPS)
    drift = [abs(a - b) for a, b in zip(forced_logprobs(model, tokens), logprobs(tokens, logits), strict=True)]
    assert 0 < max(drift) < FAST_TOLERANCE
