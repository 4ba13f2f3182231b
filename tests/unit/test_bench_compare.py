"""bench.compare's pure parts: the mixed workload, a padded batch's useful tokens, the roofline floors, the
ratio/target table and the plot; and the transformers sides on a tiny random checkpoint."""

import pytest

from bench import hf, roofline
from bench.plot import plot
from bench.targets import TARGETS, ratios, target_rows
from bench.throughput import LevelResult, RequestResult
from bench.workloads import FIRST_TOKEN_ID, Request, fixed_requests, mixed_requests

VOCAB = 5000


@pytest.mark.timeout(10)
def test_mixed_requests_are_deterministic_and_within_their_ranges():
    requests = mixed_requests(64, VOCAB, (16, 256), (16, 128))
    assert requests == mixed_requests(64, VOCAB, (16, 256), (16, 128))
    assert all(16 <= len(r.prompt) <= 256 and 16 <= r.max_new <= 128 for r in requests)
    assert all(FIRST_TOKEN_ID <= t < VOCAB for r in requests for t in r.prompt)
    assert len({len(r.prompt) for r in requests}) > 10 and len({r.max_new for r in requests}) > 10
    assert mixed_requests(4, VOCAB, (8, 8), (3, 3)) == [Request(r.prompt[:8], 3) for r in requests[:4]]


@pytest.mark.timeout(10)
def test_a_padded_batch_counts_only_each_requests_own_tokens():
    requests = [Request([5] * 4, 2), Request([6] * 9, 4)]
    rows = [[11, 12, 13, 14], [21, 22, 23, 24]]  # generate() ran both rows to the longest output
    results = hf.useful_results(requests, 10, rows, step_times=[1.5, 1.7, 1.9, 2.1], t0=1.0)
    assert [r.index for r in results] == [10, 11]
    assert [r.token_ids for r in results] == [[11, 12], [21, 22, 23, 24]]
    assert [r.ttft_s for r in results] == pytest.approx([0.5, 0.5])
    assert [r.latency_s for r in results] == pytest.approx([0.7, 1.1])
    assert [n for _, n in results[1].chunks] == [1, 1, 1, 1]
    assert LevelResult("t", 2, results, wall_s=2.0).tokens == 6


@pytest.mark.timeout(10)
def test_left_padding_right_aligns_the_prompts():
    ids, mask = hf.left_padded([Request([7, 8], 1), Request([1, 2, 3], 1)], pad_id=0)
    assert ids.tolist() == [[0, 7, 8], [1, 2, 3]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]


@pytest.mark.timeout(10)
def test_roofline_floors_grow_with_the_work():
    weights = roofline.Weights(always=1_000_000, routed=8_000_000, num_experts=8, top_k=2, lookup=64)
    assert weights.active == 3_000_000 and weights.read(1) == 3_000_064
    assert weights.read(1000) == pytest.approx(9_000_000 + 64_000, rel=1e-6)  # every expert touched
    machine = roofline.Machine(__import__("torch").bfloat16, gflops=100.0, rows=128, bandwidth_gb_s=10.0)
    assert machine.step_floor_s(weights, 1) == pytest.approx(3_000_064 * 2 / 10e9)  # bandwidth-bound
    assert machine.step_floor_s(weights, 4096) == pytest.approx(2 * 3e6 * 4096 / 100e9)  # compute-bound
    one = roofline.workload_floor_s([Request([1] * 10, 5)], weights, machine)
    assert one == pytest.approx(machine.step_floor_s(weights, 10) + 4 * machine.step_floor_s(weights, 1))
    requests = fixed_requests(4, VOCAB, 8)
    one_stream = roofline.closed_loop_floor_s(requests, 1, weights, machine)
    assert roofline.closed_loop_floor_s(requests, 4, weights, machine) < one_stream


def level(side: str, streams: int, tokens_per_s: float, ttft_s: float = 0.1) -> LevelResult:
    results = [RequestResult(i, [1] * 10, ttft_s * (i + 1), 1.0, [(ttft_s * (i + 1), 1)]) for i in range(4)]
    return LevelResult(side, streams, results, wall_s=40 / tokens_per_s)


@pytest.mark.timeout(10)
def test_ratios_and_targets():
    mixed = {s: level(s, 8, v) for s, v in [("moemesh up", 400), ("llama.cpp", 500), ("in-process", 420),
                                              ("transformers-batch", 80), ("transformers-serial", 20)]}  # fmt: skip
    values = ratios(mixed)
    assert values["moemesh up / best transformers"] == pytest.approx(5.0)  # the batch, the faster one
    assert values["moemesh up / llama.cpp"] == pytest.approx(0.8)
    assert ratios({"moemesh up": level("moemesh up", 1, 10)})["moemesh up / llama.cpp"] is None
    rows = target_rows({("mixed", None): values, ("open loop", None): {"p99 TTFT / lone request": 3.5}})
    assert len(rows) == len(TARGETS)
    by_label = {row[0]: row[1:] for row in rows}
    assert by_label["mixed: moemesh up / best transformers"] == [">= 4", "5.00", "met"]
    assert by_label["mixed: moemesh up / llama.cpp"] == [">= 1", "0.80", "not met"]
    assert by_label["fixed, 32 streams: moemesh up / in-process"] == [">= 0.9", "-", "not run"]
    assert "fixed, 1 stream: in-process / llama.cpp" in by_label
    assert by_label["open loop: p99 TTFT / lone request"] == ["<= 3", "3.50", "not met"]


@pytest.mark.timeout(30)
def test_plot_writes_a_png(tmp_path):
    by_side = {side: [level(side, c, v * c, 0.01 * c) for c in (1, 8, 32)] for side, v in [("a", 10), ("b", 12)]}
    path = plot(by_side, tmp_path / "docs" / "plot.png", "title\ncpu")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_transformers_sides_generate_exactly_the_requested_tokens(tmp_path):
    from tests.helpers import make_mixtral

    model = make_mixtral(
        tmp_path / "tiny", vocab_size=2048, eos_token_id=3
    )  # EOS exists, and generation must run past it
    requests = [Request(list(range(10, 15)), 3), Request(list(range(20, 29)), 6)]
    for side in hf.SIDES:
        [result] = hf.run_transformers(model, side, [2], requests, vocab_size=2048)
        assert [len(r.token_ids) for r in result.results] == [3, 6], side
        assert result.tokens == 9 and all(r.ttft_s <= r.latency_s for r in result.results)
    first, second = result.results  # serial: both sent at once, the second waited for the first
    assert second.ttft_s > first.latency_s


@pytest.mark.timeout(60)
def test_benchmark_model_builds_a_servable_checkpoint(tmp_path):
    """`bench.model` at a tiny shape: a Mixtral checkpoint moemesh loads, with the demo bot's tokenizer."""
    from bench.model import SHAPE, build
    from moemesh.checkpoint import Checkpoint

    tiny = SHAPE | {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_local_experts": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048}  # fmt: skip
    out = build(tmp_path / "bench-model", tiny)
    cfg = Checkpoint(out).config
    assert (cfg.model_type, cfg.num_layers, cfg.num_experts, cfg.vocab_size) == ("mixtral", 2, 4, 2048)
    assert (out / "tokenizer.json").exists() and not (tmp_path / "bench-model.partial").exists()
