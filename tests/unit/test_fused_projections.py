"""Projections that checkpoints store apart and `moemesh.model` runs as one matmul (q+k+v, gate+up): loading
stacks them, weights and biases, in the order the forward pass splits them."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moemesh.checkpoint import Checkpoint
from moemesh.model import MLP, Attention
from tests.helpers import make_mixtral

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("bias", [False, True])
def test_q_k_v_load_into_one_projection_that_computes_each(tmp_path, bias):
    cfg = dataclasses.replace(Checkpoint(make_mixtral(tmp_path / "m")).config, qkv_bias=bias)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert q != kv  # the split sizes differ, so an order or size mix-up shows
    generator = torch.Generator().manual_seed(0)
    separate = {f"{name}.weight": torch.randn(n, cfg.hidden_size, generator=generator)
                for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))}  # fmt: skip
    if bias:
        separate |= {f"{name}.bias": torch.randn(n, generator=generator)
                     for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))}  # fmt: skip
    attention = Attention(cfg, 0)
    state = dict(separate) | {"o_proj.weight": torch.randn(cfg.hidden_size, q, generator=generator)}
    attention.load_state_dict(state, strict=True)
    x = torch.randn(3, cfg.hidden_size, generator=generator)
    fused = attention.qkv_proj(x).split(attention.qkv_sizes, dim=-1)
    for name, out in zip(("q_proj", "k_proj", "v_proj"), fused, strict=True):
        expected = F.linear(x, separate[f"{name}.weight"], separate.get(f"{name}.bias"))
        torch.testing.assert_close(out, expected)


def test_gate_and_up_load_into_one_projection():
    generator = torch.Generator().manual_seed(1)
    gate, up, down = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator), torch.randn(4, 8)
    mlp = MLP(4, 8)
    mlp.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}, strict=True)
    x = torch.randn(2, 4, generator=generator)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))
