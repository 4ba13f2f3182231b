"""Quantized checkpoints: every format decodes to the weights an independent unpacker gives, kernels agree,
weights stay at their stored width, and what is not supported is refused with the field and its value."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moemesh.checkpoint import Checkpoint
from moemesh.errors import CheckpointError
from moemesh.quant import parameter_bytes
from moemesh.quant_formats import IntWeight, quant_format
from moemesh.quant_linear import IntLinear, exact_kernels
from tests.helpers import make_mixtral
from tests.quantized_checkpoints import Format, quantize_checkpoint

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")

FORMATS = [
    Format("gptq", 4, 32), Format("gptq", 4, 64, sym=True, desc_act=True), Format("gptq_v2", 4, 32, desc_act=True),
    Format("gptq", 8, 64, sym=True), Format("gptq", 4, -1), Format("awq", 4, 32), Format("ct-pack", 4, 32, sym=True),
    Format("ct-pack", 4, 32), Format("ct-pack", 8, 0), Format("ct-int8", 8, 0, sym=True),
    Format("ct-fp8-channel", 8, 0), Format("ct-fp8-block", 8, 32), Format("fp8-block", 8, 32),
]  # fmt: skip


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("float"))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_every_quantized_linear_decodes_to_the_reference_weights(float_dir, tmp_path, fmt):
    model = quantize_checkpoint(float_dir, tmp_path / fmt.name, fmt)
    ckpt = Checkpoint(model)
    reference = load_file(model / "reference" / "model.safetensors")
    original = load_file(float_dir / "model.safetensors")
    assert len(ckpt.quantized) == 2 * (4 + 4 * 3)  # 2 layers: q, k, v, o and 4 experts' w1, w2, w3
    table = ckpt.tensors.all()
    for name in ckpt.quantized:
        ours = ckpt.load({name: table[name]}, torch.float32, CPU)[table[name][0]]
        assert torch.equal(ours, reference[name]), name
        assert not torch.equal(ours, original[name])  # quantized indeed
    kept = ckpt.load(ckpt.tensors.expert(0, 1), torch.float32, CPU, keep_quantized=True)
    assert all(not isinstance(w, torch.Tensor) for w in kept.values())


def random_int_weight(out: int, inp: int, bits: int, group: int, ordered: bool = False) -> IntWeight:
    g = torch.Generator().manual_seed(out + inp + bits)
    groups = inp // group
    order = torch.randperm(inp, generator=g) if ordered else None
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand(out, groups, generator=g) / 100 + 1e-3
    zeros = torch.randint(0, 1 << bits, (out, groups), generator=g).float()
    return IntWeight(codes, scales, zeros, bits, group, order)


@pytest.mark.parametrize("ordered", [False, True])
def test_the_int4pack_kernel_computes_what_the_dequantized_weight_does(ordered):
    weight = random_int_weight(96, 256, 4, 64, ordered)
    x = torch.randn(5, 256)
    exact = x @ weight.dequantize().T
    for dtype in (torch.bfloat16, torch.float32):  # fp32 inputs: rounded to bf16 for the kernel
        packed = IntLinear(weight, dtype)
        assert packed.kernel == "int4pack"
        out = packed(x.to(dtype))
        assert out.dtype == dtype and (out.float() - exact).abs().max() < 0.02 * exact.abs().max()
    with exact_kernels():
        plain = IntLinear(weight, torch.float32)
        assert IntLinear(weight, torch.bfloat16).kernel == "int4pack"  # bf16 compute: exact in its dtype
    assert plain.kernel == "dequantize"
    torch.testing.assert_close(plain(x), exact, rtol=1e-5, atol=1e-5)


def test_int4_weights_stay_under_a_third_of_bf16():
    weight = random_int_weight(2816, 1024, 4, 128)
    with exact_kernels():
        layers = [IntLinear(weight, torch.bfloat16), IntLinear(weight, torch.float32)]
    assert [layer.kernel for layer in layers] == ["int4pack", "dequantize"]
    for layer in layers:
        assert parameter_bytes(layer) <= 0.30 * 2816 * 1024 * 2


def config_with(tmp_path, float_dir, quantization_config):
    config = json.loads((float_dir / "config.json").read_text())
    return config | {"quantization_config": quantization_config}


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method: 'bitsandbytes' is not supported"),
        ({"quant_method": "gptq", "bits": 3}, "quantization_config.bits: 3 is not supported"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format: 'marlin'"),
        ({"quant_method": "awq", "version": "gemv"}, "quantization_config.version: 'gemv' is not supported"),
        ({"quant_method": "awq", "zero_point": False}, "quantization_config.zero_point: false is not supported"),
        ({"quant_method": "fp8", "weight_block_size": None}, "quantization_config.weight_block_size: None"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
         "quantization_config.activation_scheme: 'static' is not supported"),
        ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4}}}}, "quantization_config.format: 'nvfp4-pack-quantized'"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"format": "float-quantized",
          "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
          "input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}}},
         "quantization_config.config_groups.g.input_activations: static scales are not supported"),
    ],
)  # fmt: skip
def test_an_unsupported_quantization_is_refused_naming_the_field(qc, message):
    with pytest.raises(CheckpointError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        quant_format({"quantization_config": qc})


def test_a_quantized_tensor_of_the_wrong_shape_is_named(float_dir, tmp_path):
    model = quantize_checkpoint(float_dir, tmp_path / "gptq", Format("gptq", 4, 32))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["group_size"] = 16  # the scales say 32
    (model / "config.json").write_text(json.dumps(config))
    Checkpoint(model)  # group sizes are read from the scales' shapes
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.qzeros"
    tensors[name] = tensors[name][:1]
    from safetensors.torch import save_file

    save_file(tensors, model / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[1, 8\], config implies \[2, 8\]"):
        Checkpoint(model)


def test_projections_of_one_input_are_fused_only_when_their_codes_line_up():
    from moemesh.model import MLP
    from moemesh.quant_linear import install_quantized

    def state(orders):
        return {f"{name}.weight": random_int_weight(rows, cols, 4, 32, order is not None)
                for name, rows, cols, order in zip(("gate_proj", "up_proj", "down_proj"), (96, 96, 64),
                                                   (64, 64, 96), orders)}  # fmt: skip

    same = state([None, None, None])
    mlp = MLP(64, 96)
    install_quantized(mlp, same, torch.float32)
    assert isinstance(mlp.gate_up_proj, IntLinear) and mlp.gate_up_proj.out_features == 192
    other = state([None, 1, None])  # up_proj's columns in another order: no one matmul for both
    mlp = MLP(64, 96)
    gate, up = other["gate_proj.weight"], other["up_proj.weight"]
    install_quantized(mlp, other, torch.float32)
    mlp.load_state_dict(other, strict=True)
    assert isinstance(mlp.gate_up_proj, torch.nn.Linear) and isinstance(mlp.down_proj, IntLinear)
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate.dequantize(), up.dequantize()]))


def test_int4_made_at_load_rounds_each_weight_to_its_nearest_code():
    from moemesh.quant_linear import quantize_int4, rtn_int4

    weight = torch.randn(96, 256)
    codes = rtn_int4(weight)
    assert codes.group_size == 128 and codes.bits == 4
    error = (codes.dequantize() - weight).abs()
    assert bool((error <= codes.scales.repeat_interleave(128, 1) / 2 + 1e-6).all())
    assert rtn_int4(torch.randn(8, 96)).group_size == 32  # 96 columns: groups of 32
    linear = torch.nn.Linear(256, 96, bias=False)
    layer = quantize_int4(linear, torch.bfloat16)
    assert isinstance(layer, IntLinear) and layer.kernel == "int4pack"


def test_an_int4pack_layer_reads_its_weight_back_and_switches_to_a_gemm_for_many_rows():
    weight = random_int_weight(128, 256, 4, 64)
    layer = IntLinear(weight, torch.float32)
    # scale and zero are held in bf16 for the kernel: each weight within their rounding
    torch.testing.assert_close(layer.int4pack_dequantized(torch.float32), weight.dequantize(), rtol=0, atol=2e-3)
    x = torch.randn(40, 256)
    small = layer(x)
    layer.gemm_rows = 8  # as if measured: from 8 rows on, the dense GEMM
    assert (layer(x) - small).abs().max() < 0.02 * small.abs().max()
    assert (layer(x) - x @ weight.dequantize().T).abs().max() < 0.02 * small.abs().max()
    from moemesh.quant_linear import NEVER, PROBE_ROWS

    assert IntLinear(weight, torch.float32).gemm_rows in (*PROBE_ROWS, NEVER)


def test_a_last_shorter_group_decodes_with_the_configured_group_size():
    from tests.quantized_checkpoints import _gptq

    w = torch.randn(16, 80)  # 80 input columns in groups of 32: 32, 32 and 16
    stored: dict[str, torch.Tensor] = {}
    reference = _gptq("layer.weight", w, Format("gptq", 4, 32), stored)
    decoded = quant_format({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}).decode(
        stored.__getitem__, "layer", 16, 80
    )
    assert decoded.group_size == 32 and decoded.scales.shape == (16, 3)
    assert torch.equal(decoded.dequantize(), reference)


def test_compressed_tensors_fp8_by_group_scales_each_row_by_its_own_groups():
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "group",
                                                  "group_size": 32}}}}}  # fmt: skip
    fmt = quant_format(config)
    weight = torch.randn(16, 64).to(torch.float8_e4m3fn)
    scale = torch.rand(16, 2) + 0.5
    stored = {"layer.weight": weight, "layer.weight_scale": scale}
    assert fmt.tensors("layer", 16, 64, {"layer.weight": ("F8_E4M3", (16, 64))})["layer.weight_scale"] == (16, 2)
    expected = weight.float() * scale.repeat_interleave(32, 1)
    assert torch.equal(fmt.decode(stored.__getitem__, "layer", 16, 64).dequantize(), expected)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"num_bits": 8, "type": "float", "strategy": "block"}, "block_structure: None is not supported"),
        ({"num_bits": 4, "type": "int", "strategy": "group"}, "group_size: None is not a group size"),
        ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": False}, "symmetric: false"),
    ],
)
def test_compressed_tensors_options_that_cannot_decode_are_refused(weights, message):
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"g": {"weights": weights}}}}  # fmt: skip
    if weights["type"] == "float":
        config["quantization_config"]["format"] = "float-quantized"
    with pytest.raises(CheckpointError, match=message):
        quant_format(config)


def test_an_odd_input_width_keeps_one_code_a_byte():
    weight = random_int_weight(8, 33, 4, 33)
    layer = IntLinear(weight, torch.float32)
    x = torch.randn(3, 33)
    torch.testing.assert_close(layer(x), x @ weight.dequantize().T, rtol=1e-5, atol=1e-5)


def test_w8a8_quantizes_weights_and_activations_to_int8():
    from moemesh.model import MLP
    from moemesh.quant_linear import W8A8Linear, quantize_linears

    linear = torch.nn.Linear(256, 96, bias=False)
    layer = W8A8Linear(linear)
    x = torch.randn(5, 256)
    exact = linear(x)
    assert 0 < ((layer(x) - exact).norm() / exact.norm()).item() < 0.03
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert parameter_bytes(layer) < 0.3 * 256 * 96 * 4  # int8 codes and a scale a row, against fp32
    mlp = quantize_linears(MLP(64, 96), "w8a8", torch.float32)
    assert isinstance(mlp.gate_up_proj, W8A8Linear) and isinstance(mlp.down_proj, W8A8Linear)
