"""Checkpoint directories: checked on open, clear errors naming what is wrong, sharded files, expert shards."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.checkpoint import Checkpoint
from moemesh.errors import CheckpointError, InvalidArgument
from moemesh.families import read_config
from moemesh.sharding import shard_experts
from services.experts.shard import ExpertShard
from tests.helpers import make_mixtral

pytestmark = pytest.mark.timeout(120)

EXPERT_TENSOR = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tiny Mixtral: vocab 512, hidden 64, intermediate 128, 2 layers, 4 experts, top-2; one file."""
    return make_mixtral(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "model"))


def rewrite_tensors(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def load_by_name(ckpt: Checkpoint, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors keyed by their checkpoint names (the services key them by their own module paths)."""
    return ckpt.load({name: (name, ()) for name in names}, dtype, torch.device("cpu"))


def test_loads_with_the_configured_shapes(base):
    ckpt = Checkpoint(base)
    c = ckpt.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size) == ("mixtral", 512, 64, 128)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert (c.num_experts, c.experts_per_token, c.sliding_window) == (4, 2, None)
    assert c.checkpoint_dtype == torch.float32 and c.eos_token_ids == ()
    on_disk = load_file(base / "model.safetensors")
    assert set(ckpt.tensors.all()) == set(on_disk)
    loaded = load_by_name(ckpt, [EXPERT_TENSOR, "model.embed_tokens.weight"], torch.float32)
    assert set(loaded) == {EXPERT_TENSOR, "model.embed_tokens.weight"}
    assert torch.equal(loaded[EXPERT_TENSOR], on_disk[EXPERT_TENSOR])
    assert load_by_name(ckpt, [EXPERT_TENSOR], torch.bfloat16)[EXPERT_TENSOR].dtype == torch.bfloat16


def test_fingerprint_is_stable_and_sees_the_config(base, copy):
    assert Checkpoint(base).fingerprint == Checkpoint(copy).fingerprint
    edit_config(copy, rms_norm_eps=1e-6)
    assert Checkpoint(base).fingerprint != Checkpoint(copy).fingerprint


def test_missing_tensor_is_named(copy):
    rewrite_tensors(copy, lambda t: t.pop(EXPERT_TENSOR))
    with pytest.raises(CheckpointError, match="missing tensor") as err:
        Checkpoint(copy)
    assert EXPERT_TENSOR in str(err.value)


def test_several_missing_tensors_are_counted(copy):
    def drop(t):
        for layer in range(2):
            t.pop(f"model.layers.{layer}.self_attn.q_proj.weight")

    rewrite_tensors(copy, drop)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value)
    assert "1 more" in str(err.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(copy):
    name = "model.layers.0.self_attn.k_proj.weight"  # [2 KV heads * 16, 64]

    def reshape(t):
        t[name] = torch.zeros(48, 64)

    rewrite_tensors(copy, reshape)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    msg = str(err.value)
    assert name in msg
    assert "[48, 64]" in msg and "[32, 64]" in msg


def test_unexpected_tensor_is_named(copy):
    def add(t):
        t["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(128, 64)

    rewrite_tensors(copy, add)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "model.layers.0.block_sparse_moe.experts.4.w1.weight" in str(err.value)


def test_config_disagreeing_with_the_tensors_is_reported(copy):
    edit_config(copy, intermediate_size=96)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "[128, 64]" in str(err.value) and "[96, 64]" in str(err.value)


def test_unknown_model_type_is_named(copy):
    edit_config(copy, model_type="llama4_text")
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "llama4_text" in str(err.value)
    assert "mixtral" in str(err.value)  # and says what is supported


def test_missing_and_invalid_config_json(copy, tmp_path):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(empty)


def test_no_safetensors_files(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        Checkpoint(copy)


def test_corrupt_safetensors_header_names_the_file(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 8 + b"{garbage"  # header length and the start of the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "model.safetensors" in str(err.value)


def test_truncated_safetensors_file_names_the_file(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        Checkpoint(copy)
    assert "model.safetensors" in str(err.value)


def test_sharded_checkpoint_loads_identical_tensors(base, tmp_path):
    from transformers import MixtralForCausalLM

    sharded = tmp_path / "sharded"
    MixtralForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2

    whole, parts = Checkpoint(base), Checkpoint(sharded)
    assert parts.config == whole.config
    names = list(whole.tensors.all())
    a, b = load_by_name(whole, names, torch.float32), load_by_name(parts, names, torch.float32)
    assert set(a) == set(b) == set(names)
    for name in names:
        assert torch.equal(a[name], b[name]), name


def test_sharded_checkpoint_with_a_missing_shard_file(base, tmp_path):
    from transformers import MixtralForCausalLM

    sharded = tmp_path / "sharded"
    MixtralForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(sharded, max_shard_size="50KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint(sharded)
    assert victim.name in str(err.value)


HF_OLD = {
    "model_type": "mixtral",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 6,
    "num_experts_per_tok": 2,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "head_dim": None,
    "sliding_window": 0,
    "eos_token_id": 2,
    "max_position_embeddings": 2048,
}


def test_config_old_style_fields():
    c = read_config(HF_OLD)
    assert c.rope.theta == 10000.0
    assert c.checkpoint_dtype == torch.bfloat16
    assert c.head_dim == 64 // 8  # head_dim: null -> hidden / heads
    assert c.sliding_window is None  # sliding_window: 0 -> no window
    assert c.eos_token_ids == (2,)
    assert (c.num_layers, c.num_experts, c.experts_per_token, c.num_kv_heads) == (3, 6, 2, 2)
    assert c.max_position_embeddings == 2048


def test_config_new_style_fields():
    raw = {k: v for k, v in HF_OLD.items() if k not in ("rope_theta", "torch_dtype")}
    raw |= {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "dtype": "float16",
        "head_dim": 32,
        "sliding_window": 4096,
        "eos_token_id": [2, 7],
        "num_key_value_heads": None,
    }
    c = read_config(raw)
    assert c.rope.theta == 500000.0
    assert c.checkpoint_dtype == torch.float16
    assert c.head_dim == 32
    assert c.sliding_window == 4096
    assert c.eos_token_ids == (2, 7)
    assert c.num_kv_heads == 8  # unset: as many as the query heads


def test_config_defaults_and_rejections():
    raw = {k: v for k, v in HF_OLD.items() if k not in ("rope_theta", "torch_dtype", "eos_token_id")}
    c = read_config(raw)
    assert c.rope.theta == 1e6 and c.checkpoint_dtype == torch.float32 and c.eos_token_ids == ()
    with pytest.raises(CheckpointError, match="dynamic"):
        read_config(HF_OLD | {"rope_scaling": {"type": "dynamic", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="int8"):
        read_config(HF_OLD | {"torch_dtype": "int8"})
    with pytest.raises(CheckpointError, match="None"):
        read_config({k: v for k, v in HF_OLD.items() if k != "model_type"})


def test_expert_shard_holds_only_its_experts(base):
    ckpt = Checkpoint(base)
    c = ckpt.config
    shard = ExpertShard.load(ckpt, "1/2", torch.float32, torch.device("cpu"))
    assert shard.layers == {0: [2, 3], 1: [2, 3]}
    assert set(shard.run.experts) == {(0, 2), (0, 3), (1, 2), (1, 3)}
    shard_bytes = sum(p.numel() * p.element_size() for m in shard.run.experts.values() for p in m.parameters())
    all_expert_bytes = c.num_layers * c.num_experts * 3 * c.hidden_size * c.intermediate_size * 4
    assert shard_bytes * 2 == all_expert_bytes == 2 * shard.parameter_bytes
    # the weights are the checkpoint's
    on_disk = load_file(base / "model.safetensors")
    assert torch.equal(shard.run.experts[(1, 3)].down_proj.weight, on_disk[EXPERT_TENSOR])
    assert shard.fingerprint == ckpt.fingerprint


@pytest.mark.parametrize("num_experts", [1, 4, 6, 8])
def test_parse_shard_covers_every_expert_once(num_experts):
    for count in range(1, num_experts + 1):
        shards = [shard_experts(f"{i}/{count}", num_experts) for i in range(count)]
        assert sorted(e for s in shards for e in s) == list(range(num_experts))
        assert all(s == list(range(s[0], s[-1] + 1)) for s in shards)  # contiguous
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1  # near-equal


@pytest.mark.parametrize(
    "spec", ["", "4", "1,x", "-1", "a/b", "1/2/3", "1/", "/2", "2/2", "-1/2", "0/0", "1/0", "0/5", "0.5/2"]
)
def test_parse_shard_rejects_bad_specs(spec):
    with pytest.raises(InvalidArgument, match="shard"):
        shard_experts(spec, 4)
