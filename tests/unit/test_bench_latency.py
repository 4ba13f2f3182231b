"""The pure parts of the llama.cpp comparison: percentiles, inter-token gaps, llama-server's streamed
events, the GGUF dtype choice, the per-slot context and the open loop's arrivals (no build, no server)."""

import io
import json
import time

import pytest

from bench.common import inter_token_gaps, percentile
from bench.llamacpp import HELD_BACK, gguf_outtype, slot_context, stream_token_ids
from bench.throughput import RequestResult, collect, open_loop
from bench.workloads import PROMPT_LENGTHS, Request, fixed_requests, warmup_request

pytestmark = pytest.mark.timeout(30)


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_gaps_spread_a_multi_token_message_over_its_tokens():
    assert inter_token_gaps([]) == []
    assert inter_token_gaps([(0.5, 1)]) == []
    assert inter_token_gaps([(0.5, 1), (0.6, 1), (0.8, 1)]) == pytest.approx([0.1, 0.2])
    # Two tokens delivered 0.4 s after the first: two gaps of 0.2 s, not one of 0.4 s and one of 0.
    assert inter_token_gaps([(0.5, 1), (0.9, 2)]) == pytest.approx([0.2, 0.2])


def sse(*events: dict) -> io.BytesIO:
    return io.BytesIO(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))


def test_stream_token_ids_reads_events_up_to_stop():
    body = sse(
        {"content": "a", "tokens": [11], "stop": False, "tokens_predicted": 1},
        {"content": "b", "tokens": [12], "stop": False, "tokens_predicted": 2},
        {"content": "", "tokens": [], "stop": True, "tokens_predicted": 2, "timings": {"predicted_n": 2}},
        {"content": "after stop", "tokens": [99], "stop": False, "tokens_predicted": 3},
    )
    assert list(stream_token_ids(body)) == [[11], [12], []]


def test_stream_token_ids_counts_held_back_tokens():
    """Tokens 21 and 22 end in a partial UTF-8 character: the server streams only 23, which completes it;
    the last token is held back too and only counted by the final event."""
    body = sse(
        {"content": "x", "tokens": [20], "stop": False, "tokens_predicted": 1},
        {"content": "\u00e9", "tokens": [23], "stop": False, "tokens_predicted": 4},
        {"content": "", "tokens": [], "stop": True, "tokens_predicted": 5},
    )
    assert list(stream_token_ids(body)) == [[20], [HELD_BACK, HELD_BACK, 23], [HELD_BACK]]


def test_stream_token_ids_raises_on_an_error_event():
    body = sse(
        {"tokens": [5], "stop": False, "tokens_predicted": 1}, {"error": {"code": 500, "message": "context full"}}
    )
    with pytest.raises(RuntimeError, match="context full"):
        list(stream_token_ids(body))


def test_collect_times_messages_and_skips_empty_ones():
    t0 = time.perf_counter()
    result = collect(3, t0, iter([[11], [], [12, 13], []]))
    assert result.index == 3 and result.token_ids == [11, 12, 13]
    assert [n for _, n in result.chunks] == [1, 2]
    assert result.ttft_s == result.chunks[0][0] <= result.chunks[1][0] <= result.latency_s
    assert collect(0, t0, iter([[]])).ttft_s is None


def test_gguf_outtype_keeps_the_checkpoint_bytes_where_the_cpu_can():
    assert gguf_outtype("bfloat16", {"avx2", "avx512_bf16"}) == "bf16"
    assert gguf_outtype("bfloat16", {"avx2"}) == "f16"
    assert gguf_outtype("float16", {"avx512_bf16"}) == "f16"
    assert gguf_outtype("float32", set()) == "f32"


def test_slot_context_fits_the_longest_prompt_and_the_new_tokens():
    ctx = slot_context(fixed_requests(len(PROMPT_LENGTHS), 5000, 64))
    assert ctx % 256 == 0 and ctx >= max(PROMPT_LENGTHS) + 64
    assert slot_context([warmup_request(5000), *fixed_requests(1, 5000, 64)]) == 256  # 16 + 64 tokens at most
    assert slot_context([Request([1] * 200, 57)]) == 512


def test_open_loop_sends_each_request_when_it_arrives_whatever_is_running():
    sent: list[float] = []
    t0 = time.perf_counter()

    def slow(index: int, request: Request) -> RequestResult:
        sent.append(time.perf_counter() - t0)
        time.sleep(0.2)  # far longer than the mean gap: a closed loop of one would fall behind
        return RequestResult(index, request.prompt[:1], 0.2, 0.2)

    results, wall = open_loop(fixed_requests(20, 5000, 4), slow, rate=200.0)
    assert [r.index for r in results] == list(range(20))
    assert sent == sorted(sent) and sent[-1] < 0.5  # 20 arrivals at 200/s: about 0.1 s, not 20 x 0.2 s
    assert 0.2 <= wall < 1.0
