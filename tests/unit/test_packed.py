"""Packed linear layers (`moemesh.packed`): oneDNN bf16 and fbgemm fp16 weights give `nn.Linear`'s outputs, and
are applied only where they can be."""

import pytest
import torch
from torch import nn

from moemesh import model as model_module
from moemesh import packed
from moemesh.checkpoint import Checkpoint
from moemesh.model import MLP, DenseModel
from moemesh.packed import HalfLinear, PackedLinear, half_weights_supported, pack_linears, packing_supported
from services.gateway.experts import local_experts
from tests.helpers import CPU, hf_greedy, make_mixtral, stepwise_logits

pytestmark = pytest.mark.timeout(120)

BF16 = torch.bfloat16
needs_packing = pytest.mark.skipif(not packing_supported(BF16, CPU), reason="this CPU has no native bf16 in oneDNN")


def test_packing_is_only_for_bf16_on_cpu():
    assert not packing_supported(torch.float32, CPU)
    assert not packing_supported(torch.float16, CPU)
    assert not packing_supported(BF16, torch.device("meta"))
    mlp = MLP(16, 32)  # fp32, of an fp32 checkpoint
    assert pack_linears(mlp, torch.float32) is mlp and type(mlp.gate_up_proj) is nn.Linear


@needs_packing
@pytest.mark.parametrize("rows", [(1,), (7,), (3, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_linear_bit_for_bit(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(BF16)
    x = torch.randn(*rows, 96, dtype=BF16)
    expected = linear(x)
    got = PackedLinear(linear.weight, linear.bias)(x)
    assert got.shape == expected.shape == (*rows, 200)
    assert torch.equal(got, expected)


@needs_packing
def test_packed_linear_takes_non_contiguous_inputs():
    weight = torch.randn(64, 32, dtype=BF16)
    transposed, sliced = torch.randn(32, 10, dtype=BF16).t(), torch.randn(10, 64, dtype=BF16)[:, :32]
    for x in (transposed, sliced):
        assert not x.is_contiguous()
        assert torch.equal(PackedLinear(weight)(x), torch.nn.functional.linear(x, weight))


@needs_packing
def test_pack_linears_swaps_every_linear_inside():
    mlp = MLP(16, 32).to(BF16)
    assert pack_linears(mlp, BF16) is mlp
    assert type(mlp.gate_up_proj) is PackedLinear and type(mlp.down_proj) is PackedLinear
    assert type(pack_linears(nn.Linear(4, 4).to(BF16), BF16)) is PackedLinear


@needs_packing
def test_bf16_model_loads_packed_and_decodes_as_unpacked(tmp_path, monkeypatch):
    model_dir = make_mixtral(tmp_path / "m", initializer_range=0.2)

    def routed(ckpt):
        moe = local_experts(ckpt, BF16, CPU)
        is_packed = [type(m.down_proj) is PackedLinear for m in moe.executor.experts.values()]
        assert all(is_packed) == packed.packing_supported(BF16, CPU)
        return moe

    prompt = [(37 * i + 11) % 500 for i in range(12)]
    tokens, logits = stepwise_logits(model_dir, routed, prompt, 8, dtype=BF16)
    dense = DenseModel.from_checkpoint(Checkpoint(model_dir), BF16, CPU)
    assert type(dense.lm_head) is PackedLinear and type(dense.layers[0].self_attn.qkv_proj) is PackedLinear

    monkeypatch.setattr(packed, "packing_supported", lambda dtype, device: False)
    monkeypatch.setattr(model_module, "packing_supported", lambda dtype, device: False)
    plain_tokens, plain_logits = stepwise_logits(model_dir, routed, prompt, 8, dtype=BF16)
    assert tokens == plain_tokens
    for ours, plain in zip(logits, plain_logits, strict=True):
        assert (ours - plain).abs().max().item() <= 0.05 * plain.abs().max().item()


needs_half = pytest.mark.skipif(
    not half_weights_supported(BF16, torch.float32, CPU), reason="this torch build has no fbgemm fp16 kernels"
)


def test_half_weights_are_for_half_checkpoints_in_fp32_on_cpu():
    assert not half_weights_supported(torch.float32, torch.float32, CPU)  # fp32 checkpoint: fp32 weights
    assert not half_weights_supported(BF16, BF16, CPU)  # bf16 compute: bf16 weights
    assert not half_weights_supported(BF16, torch.float32, torch.device("meta"))


@needs_half
@pytest.mark.parametrize("rows", [(1,), (7,), (3, 5), (0,)])
@pytest.mark.parametrize("bias", [False, True])
def test_half_linear_matches_fp32_linear_of_bf16_weights(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():  # values a bf16 checkpoint holds, as loaded for fp32 compute
        linear.weight.copy_(linear.weight.bfloat16().float())
    x = torch.randn(*rows, 96)
    expected = linear(x)
    got = HalfLinear(linear.weight, linear.bias)(x)
    assert got.shape == expected.shape == (*rows, 200) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_half
def test_pack_linears_holds_half_checkpoints_fp16_unless_out_of_range():
    mlp = MLP(16, 32)
    assert pack_linears(mlp, BF16) is mlp
    assert type(mlp.gate_up_proj) is HalfLinear and type(mlp.down_proj) is HalfLinear
    huge = nn.Linear(4, 4)
    with torch.no_grad():
        huge.weight[0, 0] = 1e6  # beyond fp16: kept in fp32
    assert pack_linears(huge, BF16) is huge


@needs_half
def test_bf16_checkpoint_in_fp32_holds_half_weights_and_matches_transformers(tmp_path):
    """A bf16 checkpoint computed in fp32 (what `--dtype auto` does on a CPU without native bf16): linears hold
    fp16, embeddings bf16, and the logits are those of `transformers` in fp32 on the same weights."""
    from transformers import AutoModelForCausalLM

    fp32_dir = make_mixtral(tmp_path / "fp32", initializer_range=0.2)
    model_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(fp32_dir).to(BF16).save_pretrained(model_dir)
    ckpt = Checkpoint(model_dir)
    assert ckpt.config.checkpoint_dtype == BF16
    dense = DenseModel.from_checkpoint(ckpt, torch.float32, CPU)
    assert type(dense.lm_head) is HalfLinear and type(dense.layers[0].self_attn.qkv_proj) is HalfLinear
    assert dense.embed_tokens.weight.dtype == BF16 and dense.norm.weight.dtype == torch.float32

    prompt = [(37 * i + 11) % 500 for i in range(12)]
    expected_tokens, expected_logits = hf_greedy(model_dir, prompt, 8)
    tokens, logits = stepwise_logits(model_dir, lambda ckpt: local_experts(ckpt, torch.float32, CPU), prompt, 8)
    assert tokens == expected_tokens
    for ours, theirs in zip(logits, expected_logits, strict=True):
        assert (ours - theirs).abs().max().item() < 1e-4
