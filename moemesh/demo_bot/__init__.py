"""The demo bot: a small Qwen2-MoE customer-service assistant for the fictional shop Meshmart.

Everything it knows comes from `corpus` (dialogues generated from templates and a seed); `tokenizer`
and `train` turn that corpus into the checkpoint shipped in `models/demo-bot/` (`make demo-model`).
"""
