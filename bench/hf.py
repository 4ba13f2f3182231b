"""`transformers` `generate()` as a benchmark side: what serving a MoE with the plain library gives.

Two sides, on the same checkpoint, compute dtype (`moemesh.hardware.auto_compute_dtype` of the checkpoint's)
and torch threads as the in-process moemesh side:

- **transformers-batch**: requests as static batches, left-padded, through one `model.generate()` each:
  greedy, `min_new_tokens = max_new_tokens =` the batch's longest output, so that every row runs to the end
  and EOS never stops one early. A batch is as slow as its longest member; only each request's own tokens
  (its first `max_new`) count as useful. The mixed workload is one batch; the fixed workload at c streams,
  batches of c, one after the other.
- **transformers-serial**: one request at a time (batches of one), the way a naive server loops.

A request's latencies count from when its client sent it (`run_batches`), so a request that waits for a
batch, or for the requests before it, has that wait in its TTFT.

Tokens are timed by a logits processor that `generate()` calls once per step, right after the forward pass
that produced the step's logits: the step's token is known then, for every row of the batch at once.
"""

import gc
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.throughput import LevelResult, RequestResult
from bench.workloads import Request, warmup_request

BATCH = "transformers-batch"
SERIAL = "transformers-serial"
SIDES = (BATCH, SERIAL)


class StepClock:
    """A logits processor that only notes when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def load(model_dir: Path) -> torch.nn.Module:
    """The checkpoint through `AutoModelForCausalLM`, in the dtype moemesh would compute it in."""
    from transformers import AutoModelForCausalLM

    from moemesh.families import load_config
    from moemesh.hardware import auto_compute_dtype

    dtype = auto_compute_dtype(load_config(model_dir).checkpoint_dtype, torch.device("cpu"))
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def left_padded(requests: Sequence[Request], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the prompts padded on the left to the longest."""
    width = max(len(r.prompt) for r in requests)
    ids = [[pad_id] * (width - len(r.prompt)) + r.prompt for r in requests]
    mask = [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in requests]
    return torch.tensor(ids), torch.tensor(mask)


def useful_results(
    requests: Sequence[Request], first_index: int, new_tokens: list[list[int]], step_times: list[float], t0: float
) -> list[RequestResult]:
    """Each request of a padded batch with only its own tokens, the first `max_new` of its row, each timed
    (from `t0`, when the batch started) by the step that produced it; the rest of the row is padding work."""
    results = []
    for offset, (request, row) in enumerate(zip(requests, new_tokens, strict=True)):
        times = [t - t0 for t in step_times[: request.max_new]]
        chunks = [(t, 1) for t in times]
        results.append(RequestResult(first_index + offset, row[: request.max_new], times[0], times[-1], chunks))
    return results


def generate_batch(model: torch.nn.Module, requests: Sequence[Request], first_index: int = 0) -> list[RequestResult]:
    """One static batch through `generate()`, greedy, every row to the longest output."""
    from transformers import LogitsProcessorList

    pad_id = 0
    ids, mask = left_padded(requests, pad_id)
    longest = max(r.max_new for r in requests)
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=longest, min_new_tokens=longest,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=pad_id,
        )  # fmt: skip
    return useful_results(requests, first_index, out[:, ids.shape[1] :].tolist(), clock.times, t0)


def waited(result: RequestResult, seconds: float) -> RequestResult:
    """`result` timed from `seconds` before its batch started, when its client sent it."""
    chunks = [(at + seconds, count) for at, count in result.chunks]
    return RequestResult(result.index, result.token_ids, result.ttft_s + seconds, result.latency_s + seconds, chunks)


def run_batches(model: torch.nn.Module, side: str, concurrency: int, requests: Sequence[Request],
                batch_size: int) -> LevelResult:  # fmt: skip
    """The requests in static batches of `batch_size`, one batch after the other, as `concurrency` clients
    in a closed loop send them: the first `concurrency` at once, then request i when request i -
    `concurrency` has its last token. Latencies count from then, the wait for the batch included."""
    results: list[RequestResult] = []
    finished: list[float] = []  # when each request got its last token
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        began = time.perf_counter()
        for result in generate_batch(model, requests[start : start + batch_size], start):
            i = result.index
            sent = t0 if i < concurrency else finished[i - concurrency]
            results.append(waited(result, began - sent))
            finished.append(began + result.latency_s)
    level = LevelResult(side, concurrency, results, time.perf_counter() - t0)
    print(f"  {side:<12} {concurrency:>3} streams: {level.tokens} useful tokens in {level.wall_s:.2f} s = "
          f"{level.tokens_per_s:.1f} tok/s, mean TTFT {level.mean_ttft_ms:.1f} ms", flush=True)  # fmt: skip
    return level


def run_transformers(model_dir: Path, side: str, levels: list[int], requests: Sequence[Request],
                     vocab_size: int) -> list[LevelResult]:  # fmt: skip
    """`side` (BATCH: batches of c at concurrency c; SERIAL: one at a time) for each concurrency, after one
    warm-up request; the model is freed before returning, so the next side has the memory and caches."""
    model = load(model_dir)
    try:
        generate_batch(model, [warmup_request(vocab_size)])
        return [run_batches(model, side, c, requests, c if side == BATCH else 1) for c in levels]
    finally:
        del model
        gc.collect()
