"""`moemesh.quant`: per-channel int8 weights, `Int8Linear` against float `nn.Linear`, `quantize_int8`, bytes.

Error bounds used below. Per element, round-to-nearest gives |q * s - w| <= s / 2 with s = max|w_row| / 127.
For a Gaussian weight row of K entries, max|w| is about 3.3 sigma at K = 1024 (below 4.5 sigma with
overwhelming probability), so the rounding error (uniform, std s / sqrt(12)) relative to the weight's
sigma is at most 4.5 / (127 * sqrt(12)) ~= 1.0%, and about 0.75% typically. Summed over K independent
terms the output error keeps that ratio: ||y_int8 - y|| / ||y|| ~= 0.75%, so 2% is a safe bound that a
broken scale (off by a factor, wrong axis) or a dropped rounding would exceed by far. bf16 adds its own
rounding of the output and the scales (2^-9 relative each, ~0.1-0.2% RMS), well inside the same 2%.
Against a float Linear holding the *dequantized* weight, only the arithmetic differs: fp32 within 1e-5,
bf16 within 1% (a couple of bf16 roundings of the output, 2^-9 each).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moemesh.quant import (
    INT8PACK_MAX_ROWS,
    Int8Linear,
    dequantize_weight,
    parameter_bytes,
    quantize_int8,
    quantize_weight,
)

pytestmark = pytest.mark.timeout(120)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def linear(in_f: int, out_f: int, seed: int = 0, bias: bool = False, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=gen(seed)) * 0.02)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=gen(seed + 1)) * 0.02)
    return layer.to(dtype).requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Per-channel quantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_is_within_half_a_step_per_element(dtype):
    w = torch.randn(96, 300, generator=gen(0))
    w = w * torch.logspace(-6, 2, 96)[:, None]  # row magnitudes over 8 decades: scales must be per row
    w[5, 17] = 40.0  # an outlier widens only its own row's step
    w[7] = 0.0  # an all-zero row
    w = w.to(dtype)
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (96,)
    assert q.abs().max().item() <= 127
    w32 = w.float()
    assert torch.equal(scales, w32.abs().amax(dim=1) / 127)
    rows_with_max = torch.arange(96)[scales > 0]
    assert (q[rows_with_max, w32[rows_with_max].abs().argmax(dim=1)].abs() == 127).all()  # full range used
    assert (q[7] == 0).all() and scales[7] == 0
    err = (dequantize_weight(q, scales) - w32).abs()
    bound = scales[:, None] / 2 * (1 + 1e-5)  # fp32 rounding of w / s and q * s
    assert (err <= bound).all(), (err / scales[:, None].clamp_min(1e-30)).max()
    assert (q[0] != 0).sum() > 250  # the 1e-6 row keeps its resolution (one scale for all would zero it)


def test_quantization_is_deterministic_and_sign_symmetric():
    w = torch.randn(64, 128, generator=gen(1))
    q1, s1 = quantize_weight(w)
    q2, s2 = quantize_weight(w.clone())
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    qn, sn = quantize_weight(-w)
    assert torch.equal(qn, -q1) and torch.equal(sn, s1)


# ---------------------------------------------------------------------------------------------------
# Int8Linear vs nn.Linear


TOKENS = [1, 5, INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 1, 200]  # both sides of the kernel switch


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_float_linear(dtype, tokens):
    in_f, out_f = 1024, 384
    ref = linear(in_f, out_f)  # fp32
    q = Int8Linear.from_linear(linear(in_f, out_f).to(dtype))
    x = torch.randn(tokens, in_f, generator=gen(2)).to(dtype)
    with torch.inference_mode():
        out = q(x)
        exact = ref(x.float())  # the original weights, fp32 arithmetic
        dequant = F.linear(x.float(), q.dequantized(torch.float32))  # the int8 weights, fp32 arithmetic
    assert out.dtype == dtype and out.shape == (tokens, out_f)
    assert rel_err(out, exact) < 2e-2
    assert rel_err(dequant, exact) > 1e-3  # the weights really are quantized
    assert rel_err(out, dequant) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_shapes_bias_and_strides(dtype):
    ref = linear(96, 37, bias=True)  # odd out_features, a bias
    q = Int8Linear.from_linear(ref)
    x = torch.randn(3, 96, 5, generator=gen(3)).transpose(1, 2)  # [3, 5, 96], last dim not contiguous
    with torch.inference_mode():
        out = q(x.to(dtype))
        want = F.linear(x, q.dequantized(), ref.bias)
    assert out.shape == (3, 5, 37) and out.dtype == dtype
    assert rel_err(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert q(torch.empty(0, 96, dtype=dtype)).shape == (0, 37)


def test_int8_linear_is_deterministic():
    q = Int8Linear.from_linear(linear(256, 128))
    again = Int8Linear.from_linear(linear(256, 128))
    assert torch.equal(q.weight, again.weight) and torch.equal(q.scales, again.scales)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 64):
            x = torch.randn(tokens, 256, generator=gen(4)).to(dtype)
            with torch.inference_mode():
                assert torch.equal(q(x), q(x)) and torch.equal(q(x), again(x))


def test_state_dict_round_trip():
    q = Int8Linear.from_linear(linear(64, 32))
    fresh = Int8Linear(64, 32)
    fresh.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"weight", "scales"}
    x = torch.randn(4, 64, generator=gen(5))
    assert torch.equal(fresh(x), q(x))


# ---------------------------------------------------------------------------------------------------
# quantize_int8 and parameter_bytes


class Block(nn.Module):
    """Linears at several depths, one reached under two names, next to non-Linear parameters."""

    def __init__(self):
        super().__init__()
        self.gate = linear(128, 256, seed=10)
        self.up = linear(128, 256, seed=11)
        self.down = linear(256, 128, seed=12)
        self.norm = nn.LayerNorm(128)
        self.heads = nn.ModuleList([linear(128, 64, seed=13), nn.Sequential(linear(128, 64, seed=14), nn.GELU())])
        self.alias = self.heads[0]
        self.register_buffer("table", torch.arange(16, dtype=torch.float32))

    def forward(self, x):
        h = self.down(F.silu(self.gate(x)) * self.up(x))
        h = self.norm(h)
        return torch.cat([self.heads[0](h), self.heads[1](h), self.alias(h)], dim=-1)


def test_quantize_int8_replaces_every_linear_in_place():
    block = Block().requires_grad_(False)
    x = torch.randn(10, 128, generator=gen(6))
    with torch.inference_mode():
        before = block(x)
    float_bytes = parameter_bytes(block)
    assert quantize_int8(block) is block
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert isinstance(block.gate, Int8Linear) and isinstance(block.heads[1][0], Int8Linear)
    assert block.alias is block.heads[0]  # a shared Linear stays shared
    assert sum(isinstance(m, Int8Linear) for m in block.modules()) == 5
    assert isinstance(block.norm, nn.LayerNorm) and block.table.dtype == torch.float32
    with torch.inference_mode():
        assert rel_err(block(x), before) < 2e-2

    linears = [(128, 256), (128, 256), (256, 128), (128, 64), (128, 64)]  # (in, out)
    others = 2 * 128 * 4 + 16 * 4  # LayerNorm weight and bias, the buffer
    assert float_bytes == sum(4 * i * o for i, o in linears) + others
    assert parameter_bytes(block) == sum(i * o + 4 * o for i, o in linears) + others  # int8 + fp32 scales
    linear_ratio = (parameter_bytes(block) - others) / (float_bytes - others)
    assert 0.25 < linear_ratio < 0.25 * (1 + 4 / 128) + 1e-9  # a quarter, plus one scale per 128 weights


def test_quantize_int8_of_a_linear_returns_its_int8_linear():
    layer = linear(32, 16)
    q = quantize_int8(layer)
    assert isinstance(q, Int8Linear) and (q.in_features, q.out_features) == (32, 16)


def test_parameter_bytes_counts_parameters_and_buffers_once():
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    m.register_buffer("b", torch.zeros(3, 4, dtype=torch.int8))
    m.child = nn.Linear(8, 2, bias=False)
    m.same = m.child
    assert parameter_bytes(m) == 10 * 2 + 12 + 8 * 2 * 4


@pytest.mark.parametrize("tokens", [1, INT8PACK_MAX_ROWS + 1])
def test_float16_large_activations_do_not_overflow(tokens):
    ref = linear(1024, 64)
    q = Int8Linear.from_linear(ref)
    x = torch.randn(tokens, 1024, generator=gen(7)) * 100  # unscaled int8 sums would pass fp16's 65504
    with torch.inference_mode():
        out = q(x.half())
    assert torch.isfinite(out).all()
    assert rel_err(out, F.linear(x.half().float(), q.dequantized())) < 1e-2


def test_output_follows_a_new_state_dict_and_in_place_changes():
    q = Int8Linear.from_linear(linear(64, 32, seed=0))
    other = Int8Linear.from_linear(linear(64, 32, seed=9))
    x = torch.randn(2, 64, generator=gen(8)).bfloat16()
    with torch.inference_mode():
        q(x)  # converts and keeps q's bf16 scales
        q.load_state_dict(other.state_dict())  # copies in place into q's buffers
        assert torch.equal(q(x), other(x))
        q.scales.mul_(2)
        assert torch.equal(q(x), other(x) * 2)


def test_built_in_inference_mode_runs_in_and_out_of_it():
    with torch.inference_mode():
        q = quantize_int8(nn.Sequential(linear(64, 32)))
        x = torch.randn(2, 64, generator=gen(9)).bfloat16()
        inside = q(x)
    assert torch.equal(q(x), inside)
