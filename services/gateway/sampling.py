"""Next-token choice for a batch of sequences: greedy, temperature, top-k, top-p, seeded.

Sampling runs where the logits are. On a GPU the alternative, sampling on the host, would first copy a
step's [S, V] float32 logits off it (33 MB at 64 streams of a 129k vocabulary) and then sort the vocabulary on
the CPU for top-p. So each sequence's generator lives on the model's device (the engine creates it there), and
a seed repeats its tokens on one kind of device, not across kinds. The tokens come to the host in one copy per
step (`tolist`), plus one for the logprobs when any are asked for.
"""

import torch

from services.gateway.requests import SamplingConfig


def sample(
    logits: torch.Tensor, configs: list[SamplingConfig], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """logits: [S, V] float32. Returns each sequence's token and its log-probability under the model."""
    tokens = logits.argmax(dim=-1)  # [S]
    for i, cfg in enumerate(configs):
        if not cfg.greedy:
            tokens[i] = _sample_one(logits[i], cfg, generators[i])  # stays on the device: no host sync
    logprobs = [0.0] * len(configs)
    wanted = [i for i, cfg in enumerate(configs) if cfg.return_logprobs]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        picked = logits[rows].log_softmax(dim=-1).gather(1, tokens[rows, None])[:, 0].tolist()
        for i, lp in zip(wanted, picked):
            logprobs[i] = lp
    return tokens.tolist(), logprobs


def _sample_one(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    # shifted so the best score is 0: logits / T alone overflows to inf for tiny T, and softmax(inf) is NaN
    scores = (logits - logits.max()) / cfg.temperature  # [V]
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[0])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_scores.softmax(dim=-1) >= cfg.top_p  # keeps the token that crosses top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0]
