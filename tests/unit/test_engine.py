"""The in-process engine (`build_engine` without a router): batching, cancellation, admission, stops, eos."""

import json
import queue
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from moemesh.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from moemesh.settings import GatewaySettings
from services.gateway import metrics
from services.gateway.engine import Engine
from services.gateway.requests import GenerationRequest, SamplingConfig, StepOutput, merge
from services.gateway.server import build_engine
from services.gateway.text import TextCodec
from tests.helpers import make_mixtral, stepwise_logits

pytestmark = pytest.mark.timeout(120)

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny Mixtral, vocab 512, room for long generations.

    Initialized 10x larger than `transformers`' default so attention is far from uniform: with the
    default, positions and other sequences' keys barely move the logits, and mistakes would not show.
    """
    return make_mixtral(tmp_path_factory.mktemp("engine-model"), max_position_embeddings=1024, initializer_range=0.2)


def start(model_dir: Path, **settings) -> Engine:
    engine, _ = build_engine(GatewaySettings(model=model_dir, dtype="float32", **settings))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(model_dir):
    """Small step budget, so long prompts are prefilled in chunks next to other sequences' decodes."""
    e = start(model_dir, max_batch_tokens=48)
    yield e
    e.stop()


def request(prompt: list[int], max_new_tokens: int = 8, priority: int = 0, **sampling) -> GenerationRequest:
    return GenerationRequest(list(prompt), SamplingConfig(max_new_tokens=max_new_tokens, **sampling), priority)


def collect(seq, timeout_s: float = 60) -> StepOutput:
    """All of a sequence's outputs merged; fails instead of hanging if the last one never comes."""
    box: queue.SimpleQueue = queue.SimpleQueue()

    def read():
        try:
            box.put(merge(list(seq.outputs())))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box.put(exc)

    threading.Thread(target=read, daemon=True).start()
    try:
        result = box.get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"no last output within {timeout_s} s")
    if isinstance(result, BaseException):
        raise result
    return result


def generate(engine: Engine, prompt: list[int], max_new_tokens: int = 8, **sampling) -> StepOutput:
    return collect(engine.submit(request(prompt, max_new_tokens, **sampling)))


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_greedy_length_finish_and_usage(engine):
    out = generate(engine, [1, 2, 3, 4, 5], max_new_tokens=6, return_logprobs=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 6 and all(0 <= t < VOCAB for t in out.token_ids)
    assert (out.prompt_tokens, out.completion_tokens) == (5, 6)
    assert len(out.logprobs) == 6 and all(lp <= 0.0 for lp in out.logprobs)
    assert out.text == ""  # no tokenizer
    assert generate(engine, [1, 2, 3, 4, 5], max_new_tokens=6).token_ids == out.token_ids  # deterministic


def test_each_step_streams_one_token_and_only_the_last_finishes(engine):
    outputs = list(engine.submit(request([7, 8, 9], max_new_tokens=5)).outputs())
    assert [len(o.token_ids) for o in outputs] == [1] * 5
    assert [o.finish_reason for o in outputs] == [""] * 4 + ["length"]


def test_batching_invariance(engine):
    rng = random.Random(0)
    lengths = [1, 2, 3, 5, 8, 13, 21, 30, 40, 47, 48, 49, 64, 80, 100, 130]  # around and over the 48-token budget
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]
    alone = [generate(engine, p, max_new_tokens=8).token_ids for p in prompts]
    seqs = [engine.submit(request(p, max_new_tokens=8)) for p in prompts]  # all at once
    together = [collect(s) for s in seqs]
    assert [o.token_ids for o in together] == alone
    assert all(o.finish_reason == "length" and o.completion_tokens == 8 for o in together)
    assert [o.prompt_tokens for o in together] == lengths


def test_micro_batches_give_the_tokens_of_one_batch(engine, model_dir):
    """Steps split into ping-pong micro-batches (forced here, though the experts are in-process) give each
    sequence the tokens it has alone; with a budget of 48 tokens, steps mix decodes and prefill chunks."""
    split = start(model_dir, max_batch_tokens=48, micro_batches=3, micro_batch_min_tokens=1)
    try:
        rng = random.Random(2)
        prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 3, 9, 30, 47, 60, 2, 5)]
        alone = [generate(engine, p, max_new_tokens=6).token_ids for p in prompts]
        seqs = [split.submit(request(p, max_new_tokens=6)) for p in prompts]
        assert [collect(s).token_ids for s in seqs] == alone
    finally:
        split.stop()


def test_micro_batches_take_turns_at_every_moe_layer(model_dir):
    """With two micro-batches A and B, B's layer runs while A's routed experts are in flight, and A's next
    layer while B's are (ping-pong); the logits come back in the batches' order, as one by one."""
    from moemesh.checkpoint import Checkpoint
    from moemesh.model import DenseModel, KVCache, SequenceSlice, StepBatch
    from services.gateway.server import build_engine as build

    in_process, _ = build(GatewaySettings(model=model_dir, dtype="float32"))
    events = []

    class Recording:
        def submit(self, layer, hidden, deadline):
            events.append(("submit", layer, hidden.shape[0]))
            output = in_process.routed.submit(layer, hidden, deadline)
            return lambda: events.append(("wait", layer, hidden.shape[0])) or output()

    ckpt = Checkpoint(model_dir)
    dense = DenseModel.from_checkpoint(ckpt, torch.float32, torch.device("cpu"))
    prompts = [[3, 4, 5], [6, 7]]

    def batch(prompt):
        cache = KVCache(ckpt.config, torch.float32, torch.device("cpu"))
        n = len(prompt)
        return StepBatch(torch.tensor(prompt), torch.arange(n), [SequenceSlice(0, n, cache)], torch.tensor([n - 1]))

    together = dense([batch(p) for p in prompts], Recording())
    first, *rest = ckpt.config.moe_layers
    expected = [("submit", first, 3), ("submit", first, 2)]
    for before, layer in zip([first, *rest], rest):
        expected += [("wait", before, 3), ("submit", layer, 3), ("wait", before, 2), ("submit", layer, 2)]
    expected += [("wait", ckpt.config.moe_layers[-1], 3), ("wait", ckpt.config.moe_layers[-1], 2)]
    assert rest and events == expected
    one_by_one = torch.cat([dense([batch(p)], in_process.routed) for p in prompts])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "parts", "min_tokens", "expected"),
    [
        ([1, 1, 1, 1], 2, 1, [[1, 1], [1, 1]]),
        ([1, 1, 1, 1], 2, 4, [[1, 1, 1, 1]]),  # too few tokens for two micro-batches of 4
        ([1] * 6 + [30], 2, 4, [[1] * 6 + [30]]),  # the big chunk came last: its 30 tokens cannot be split
        ([30, 1, 1, 1, 1, 1, 1], 2, 4, [[30], [1] * 6]),
        ([30, 1, 1], 2, 4, [[30, 1, 1]]),  # what follows the big chunk is too small for a micro-batch
        ([1, 1], 3, 1, [[1], [1]]),  # never more micro-batches than sequences
        ([5, 5, 5, 5, 5, 5], 3, 1, [[5, 5], [5, 5], [5, 5]]),
    ],
)
def test_split_micro_batches(tokens, parts, min_tokens, expected):
    from services.gateway.runner import split_micro_batches

    chosen = [(object(), n) for n in tokens]
    groups = split_micro_batches(chosen, parts, min_tokens)
    assert [[n for _, n in g] for g in groups] == expected
    assert [pair for g in groups for pair in g] == chosen  # order kept, nothing lost


def test_chunked_prefill_matches_a_one_pass_reference(engine, model_dir):
    """Prompts longer than the step budget are prefilled over several steps; the tokens must not change."""
    import torch

    from moemesh.model import load_experts, load_gates
    from moemesh.moe import LocalExperts, RoutedMoE

    def in_process(ckpt):
        cfg = ckpt.config
        pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
        cpu = torch.device("cpu")
        experts = LocalExperts(load_experts(ckpt, pairs, torch.float32, cpu))
        return RoutedMoE(load_gates(ckpt, torch.float32, cpu), experts, cfg.num_experts)

    rng = random.Random(1)
    for n in (1, 130):
        prompt = [rng.randrange(VOCAB) for _ in range(n)]
        expected, _ = stepwise_logits(model_dir, in_process, prompt, 6)
        assert generate(engine, prompt, max_new_tokens=6).token_ids == expected


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    first = generate(engine, prompt, max_new_tokens=16, temperature=1.0, seed=1234).token_ids
    second = generate(engine, prompt, max_new_tokens=16, temperature=1.0, seed=1234).token_ids
    other = generate(engine, prompt, max_new_tokens=16, temperature=1.0, seed=4321).token_ids
    assert first == second
    assert first != other
    others = [engine.submit(request([i + 1] * (i + 2), max_new_tokens=16, temperature=1.0, seed=i)) for i in range(5)]
    batched = engine.submit(request(prompt, max_new_tokens=16, temperature=1.0, seed=1234))
    assert collect(batched).token_ids == first
    for s in others:
        collect(s)


def test_tiny_temperature_is_greedy_and_the_engine_survives(engine, model_dir):
    """A valid request (temperature > 0) once made sampling raise, which killed the engine thread."""
    prompt = [11, 12, 13]
    greedy = generate(engine, prompt, max_new_tokens=4).token_ids
    own = start(model_dir)  # its own engine: if this one dies, the other tests' engine does not
    try:
        seq = own.submit(request(prompt, max_new_tokens=4, temperature=1e-40, seed=1))
        assert collect(seq, timeout_s=20).token_ids == greedy
        assert generate(own, prompt, max_new_tokens=4).token_ids == greedy  # still serving
    finally:
        own.stop()


def test_stop_ends_every_sequence(model_dir):
    engine = start(model_dir, max_batch_seqs=1)
    running = engine.submit(request([1, 2, 3], max_new_tokens=400))
    waiting = engine.submit(request([4, 5, 6], max_new_tokens=4))
    outputs = running.outputs()
    next(outputs)
    engine.stop()
    ended = []

    def drain(seq, outs):
        try:
            for _ in outs:
                pass
        except Unavailable as exc:  # what a stopped engine tells every caller
            ended.append((seq, "shutting down" in str(exc)))

    threads = [
        threading.Thread(target=drain, args=a, daemon=True) for a in ((running, outputs), (waiting, waiting.outputs()))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert len(ended) == 2, "callers of outputs() still blocked, or not told UNAVAILABLE, after Engine.stop()"
    assert {seq for seq, _ in ended} == {running, waiting} and all(said for _, said in ended), ended


def test_cancel_a_running_request(engine):
    seq = engine.submit(request([5, 6, 7, 8], max_new_tokens=400))
    outputs = seq.outputs()
    first = next(outputs)
    assert len(first.token_ids) == 1 and not first.finish_reason
    engine.cancel(seq)
    assert wait_until(lambda: not engine.running), "cancelled sequence still running"
    received = 1
    with pytest.raises(Cancelled):
        for out in outputs:
            assert not out.finish_reason
            received += 1
    assert received < 400
    # the engine goes on serving
    assert generate(engine, [1, 2], max_new_tokens=3).finish_reason == "length"


def test_queue_full_then_cancel_waiting(model_dir):
    engine = start(model_dir, max_waiting=2, max_batch_seqs=1)
    try:
        long = engine.submit(request([1, 2, 3], max_new_tokens=400))
        long_outputs = long.outputs()
        next(long_outputs)  # admitted and running: it holds the only batch slot
        waiting = [engine.submit(request([4, 5], max_new_tokens=2)) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="2"):
            engine.submit(request([6, 7], max_new_tokens=2))
        for seq in waiting:
            engine.cancel(seq)
        for seq in waiting:
            with pytest.raises(Cancelled):
                collect(seq)
        # the queue has room again
        after = engine.submit(request([6, 7], max_new_tokens=2))
        engine.cancel(long)
        with pytest.raises(Cancelled):
            for _ in long_outputs:
                pass
        out = collect(after)  # admitted once the long one left the batch
        assert out.finish_reason == "length" and len(out.token_ids) == 2
        assert wait_until(lambda: not engine.running)
    finally:
        engine.stop()


def test_eos_finishes_after_one_token_unless_ignored(model_dir, tmp_path):
    prompt = [10, 20, 30, 40]
    reference = start(model_dir)
    try:
        expected = generate(reference, prompt, max_new_tokens=6).token_ids
        first = expected[0]
    finally:
        reference.stop()
    eos_dir = Path(shutil.copytree(model_dir, tmp_path / "eos-model"))
    config = json.loads((eos_dir / "config.json").read_text())
    config["eos_token_id"] = first
    (eos_dir / "config.json").write_text(json.dumps(config))
    engine = start(eos_dir)
    try:
        out = generate(engine, prompt, max_new_tokens=10)
        assert out.finish_reason == "eos"
        assert out.token_ids == [first]
        assert (out.prompt_tokens, out.completion_tokens) == (4, 1)
        past_eos = generate(engine, prompt, max_new_tokens=6, ignore_eos=True)
        assert (past_eos.finish_reason, past_eos.token_ids) == ("length", expected)
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def text_engine(mixtral_dir):
    """The session's tiny Mixtral with the DeepSeek tokenizer (vocab 129280)."""
    e = start(mixtral_dir)
    yield e
    e.stop()


def test_stop_string_is_honored(text_engine, mixtral_dir):
    codec = TextCodec.from_dir(mixtral_dir)
    prompt = codec.encode("Once upon a time")
    free = generate(text_engine, prompt, max_new_tokens=24)
    assert free.finish_reason == "length"
    assert free.text == codec.decode(free.token_ids)
    full = free.text
    # a stop string made of the text of two consecutive generated tokens, first found where they are
    chosen = None
    for k in range(len(free.token_ids) // 3, len(free.token_ids) - 2):
        before = codec.decode(free.token_ids[:k])
        stop = codec.decode(free.token_ids[: k + 2])[len(before) :]
        if (
            full.startswith(before)
            and "\ufffd" not in before + stop
            and stop.strip()
            and len(codec.decode(free.token_ids[: k + 1])) > len(before)  # the first token adds text
            and len(codec.decode(free.token_ids[: k + 1])) < len(before) + len(stop)  # so does the second
            and full.find(stop) == len(before)
        ):
            chosen = k, stop, before
            break
    assert chosen, f"no usable stop string in {full!r}"
    k, stop, before = chosen
    out = generate(text_engine, prompt, max_new_tokens=24, stop=(stop,))
    assert out.finish_reason == "stop"
    assert out.text == before
    assert stop not in out.text
    assert out.token_ids == free.token_ids[: k + 2]  # stopped on the token that completed it
    assert out.completion_tokens == k + 2


def test_priority_decides_who_is_admitted_when_a_place_frees(model_dir):
    engine = start(model_dir, max_batch_seqs=1)
    try:
        first = engine.submit(request([1, 2, 3], max_new_tokens=40))
        assert wait_until(lambda: first.output_ids)  # holds the only place in the batch
        later = engine.submit(request([4, 5, 6], max_new_tokens=2, priority=5))
        urgent = engine.submit(request([7, 8, 9], max_new_tokens=2, priority=-1))
        collect(first), collect(later), collect(urgent)
        assert urgent.first_token_at < later.first_token_at
    finally:
        engine.stop()


def test_kv_cache_grows_in_blocks_and_keeps_what_it_holds(model_dir):
    from moemesh.model import KV_BLOCK, KVCache

    engine, _ = build_engine(GatewaySettings(model=model_dir, dtype="float32"))
    cache = engine.new_cache(request([1]))
    assert cache.capacity == 0 and cache.nbytes == 0
    keys = torch.randn(KV_BLOCK + 3, *cache.layers[0][0].shape[1:])
    cache.extend(0, keys[:5], keys[:5])
    assert cache.capacity == KV_BLOCK
    cache.length = 5
    cache.extend(0, keys[5:], keys[5:])
    assert cache.capacity == 2 * KV_BLOCK
    assert torch.equal(cache.layers[0][0][: KV_BLOCK + 3], keys)
    assert cache.nbytes == KVCache.bytes_for(engine.model.cfg, torch.float32, KV_BLOCK + 1)


def test_sequences_beyond_the_kv_budget_wait_or_are_preempted_and_keep_their_tokens(model_dir):
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(3)]
    alone = start(model_dir)
    try:
        expected = [generate(alone, p, max_new_tokens=100).token_ids for p in prompts]
        block = alone._kv_bytes(1)
    finally:
        alone.stop()
    # Room for three blocks: each sequence needs two (104 positions), so they cannot all run at once.
    engine = start(model_dir, kv_cache_bytes=3 * block)
    try:
        preempted = metrics.PREEMPTIONS._value.get()
        seqs = [engine.submit(request(p, max_new_tokens=100)) for p in prompts]
        assert [collect(s).token_ids for s in seqs] == expected
        assert metrics.PREEMPTIONS._value.get() > preempted
        with pytest.raises(InvalidArgument, match="KV cache"):
            engine.submit(request([1, 2], max_new_tokens=400))  # could never fit
    finally:
        engine.stop()


def test_small_steps_compute_on_one_thread_and_give_the_same_tokens(engine, model_dir):
    """`one_thread_step_tokens` (set where the experts are remote): a step of at most that many tokens runs on one
    torch thread, a larger one on the engine's threads; the tokens are those of the default engine."""
    small, _ = build_engine(GatewaySettings(model=model_dir, dtype="float32", max_batch_tokens=48))
    small.runner.one_thread_step_tokens = 4
    seen: list[tuple[int, int]] = []  # (tokens, torch threads) at each MoE call
    routed = small.routed

    class Recording:
        def submit(self, layer, hidden, deadline):
            seen.append((hidden.shape[0], torch.get_num_threads()))
            return routed.submit(layer, hidden, deadline)

    small.routed = Recording()
    process_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the engine thread adopts when it starts
    try:
        small.start()
        prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        assert generate(small, prompt, max_new_tokens=3).token_ids == generate(engine, prompt, 3).token_ids
    finally:
        small.stop()
        torch.set_num_threads(process_threads)
    assert {threads for tokens, threads in seen if tokens == 10} == {2}  # the prompt's step
    assert {threads for tokens, threads in seen if tokens == 1} == {1}  # the decodes
