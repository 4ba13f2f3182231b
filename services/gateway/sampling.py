"""Next-token choice for a batch of sequences: greedy, temperature, top-k, top-p, seeded."""

import torch

from services.gateway.requests import SamplingConfig


def sample(
    logits: torch.Tensor, configs: list[SamplingConfig], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """logits: [S, V] float32. Returns each sequence's token and its log-probability under the model."""
    tokens = logits.argmax(dim=-1)  # [S]
    for i, cfg in enumerate(configs):
        if not cfg.greedy:
            tokens[i] = _sample_one(logits[i], cfg, generators[i])
    logprobs = [0.0] * len(configs)
    wanted = [i for i, cfg in enumerate(configs) if cfg.return_logprobs]
    if wanted:
        rows = torch.tensor(wanted)
        picked = logits[rows].log_softmax(dim=-1).gather(1, tokens[rows, None])[:, 0].tolist()
        for i, lp in zip(wanted, picked):
            logprobs[i] = lp
    return tokens.tolist(), logprobs


def _sample_one(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
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
    return int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))
