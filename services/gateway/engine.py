"""The engine: continuous batching of every live sequence over the dense model and the routed experts.

Requests join and leave the running batch between steps. Each step packs decode tokens first, then
prefill chunks within `max_batch_tokens`, and runs one forward pass, which makes one routed-experts
call per MoE layer for all of them. A sequence whose client deadline has passed leaves before the
next step, so it never holds up or fails the others. A step that fails is run once more (its cache
writes are idempotent: a cache's length advances only after a step succeeds) before its sequences
fail.
"""

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moemesh import tracing
from moemesh.compute_threads import adopt_torch_threads
from moemesh.errors import Cancelled, DeadlineExceeded, InvalidArgument, MoemeshError, ResourceExhausted, Unavailable
from moemesh.model import DenseModel, KVCache, RoutedExperts, SequenceSlice, StepBatch
from services.gateway import metrics
from services.gateway.content.output_guard import OutputGuard
from services.gateway.request_trace import RequestTrace
from services.gateway.requests import GenerationRequest, StepOutput
from services.gateway.sampling import sample
from services.gateway.scheduler import StepCost, next_to_admit, prefill_order
from services.gateway.text import TextCodec, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_seqs: int
    max_batch_tokens: int
    max_waiting: int
    max_decode_stall_s: float = 0.0  # inter-token budget that caps prefill chunks beside decodes; 0: none
    kv_cache_bytes: int = 0  # KV memory of the running sequences; 0: no limit
    micro_batches: int = 1  # a step's sequences split into up to this many micro-batches run in ping-pong
    micro_batch_min_tokens: int = 8  # fewest tokens of one micro-batch: smaller steps are not split
    one_thread_step_tokens: int = 0  # a step of at most this many tokens computes on one torch thread; 0: never


def split_micro_batches(
    chosen: list[tuple["Sequence", int]], parts: int, min_tokens: int
) -> list[list[tuple["Sequence", int]]]:
    """The step's (sequence, tokens) in up to `parts` consecutive groups of about equal tokens, each of at
    least `min_tokens` (a sequence is never split): the micro-batches `DenseModel.forward` runs in ping-pong.
    Splitting pays each layer's fixed costs once per micro-batch, so small steps stay whole."""
    if parts <= 1:  # the default: one batch, nothing to split (this runs every step)
        return [chosen]
    total = sum(n for _, n in chosen)
    parts = max(1, min(parts, len(chosen), total // max(1, min_tokens)))
    groups: list[list[tuple[Sequence, int]]] = [[]]
    taken = 0
    for seq, n in chosen:
        if taken >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append((seq, n))
        taken += n
    if len(groups) > 1 and sum(n for _, n in groups[-1]) < min_tokens:  # a large sequence came last but one
        last = groups.pop()
        groups[-1] += last
    return groups


class Sequence:
    """One request's state in the engine; the caller reads its outputs with `outputs()`."""

    def __init__(
        self,
        request: GenerationRequest,
        text: TextStream,
        cache: KVCache | None,
        deadline: float | None,
        device: torch.device,
    ):
        """`device`: the model's, where its logits are sampled (with this sequence's generator)."""
        self.prompt_ids = request.prompt_ids
        self.sampling = request.sampling
        self.priority = request.priority
        self.text = text
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.sent = 0  # output tokens already sent (see `TextStream.released`)
        self.cache = cache
        self.cached = cache.length if cache else 0  # prompt tokens whose keys/values came precomputed
        self.computed = self.cached  # tokens whose keys/values are in the cache
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.cancelled = False
        self.deadline = deadline  # the client's, as time.monotonic(); None: none
        self.submitted_at = time.monotonic()  # metrics: queue time, TTFT, inter-token latency, end to end
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.trace: RequestTrace | None = None  # its phase spans while tracing is on
        self.preempted = False  # its cache was freed for others' once; it recomputes when admitted again
        self._events: queue.SimpleQueue[StepOutput | MoemeshError] = queue.SimpleQueue()

    @property
    def pending(self) -> int:
        """Tokens not yet run through the model (the prompt's rest, or the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) - self.computed

    def token_ids(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + output, without copying the whole prompt each step."""
        prompt = len(self.prompt_ids)
        if start >= prompt:  # decode: only generated tokens
            return self.output_ids[start - prompt : start - prompt + count]
        return (self.prompt_ids[start : start + count] + self.output_ids)[:count]

    def cancel(self) -> None:
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def outputs(self) -> Iterator[StepOutput]:
        """Blocks for each step's output until the last one; raises the error that ended the sequence."""
        while True:
            event = self._events.get()
            if isinstance(event, MoemeshError):
                raise event
            yield event
            if event.finish_reason:
                return

    def emit(self, event: StepOutput | MoemeshError) -> None:
        if self.trace is not None:  # tracing: the request's last event ends its spans
            if isinstance(event, MoemeshError):
                self.trace.ended(len(self.output_ids), error=event)
            elif event.finish_reason:
                self.trace.ended(len(self.output_ids), event.finish_reason)
        self._events.put(event)


class Engine:
    def __init__(
        self,
        model: DenseModel,
        routed: RoutedExperts,
        config: EngineConfig,
        text: TextCodec | None,
        eos_ids: tuple[int, ...],
        guard: OutputGuard | None = None,
    ):
        """`guard`: the output rules every generation's text is checked against while it streams."""
        self.model, self.routed, self.config, self.text, self.guard = model, routed, config, text, guard
        self.eos_ids = set(eos_ids)
        self.dtype, self.device = model.norm.weight.dtype, model.norm.weight.device
        self.running: list[Sequence] = []
        self._waiting: list[Sequence] = []
        self.cost = StepCost()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._crash = False  # `inject_crash`
        self._threads = 1  # the engine thread's torch threads, read when it starts
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (the gateway's readiness)."""
        return self._thread.is_alive()

    def inject_crash(self) -> None:
        """The test suite's hook (`moemesh.faults`): the engine thread dies with an exception at its next turn,
        as a bug would kill it."""
        with self._wakeup:
            self._crash = True
            self._wakeup.notify()

    def stop(self) -> None:
        """Stops stepping; every sequence still running or waiting ends with UNAVAILABLE."""
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join()
        left = [*self.running, *self._waiting]
        self.running, self._waiting = [], []
        for seq in left:
            seq.emit(Unavailable("the gateway is shutting down; retry on another replica"))

    def new_cache(self, request: GenerationRequest) -> KVCache:
        """An empty cache (it grows as the sequence does)."""
        return KVCache(self.model.cfg, self.dtype, self.device)

    def _kv_bytes(self, positions: int) -> int:
        return KVCache.bytes_for(self.model.cfg, self.dtype, positions)

    def submit(
        self, request: GenerationRequest, cache: KVCache | None = None, deadline: float | None = None
    ) -> Sequence:
        """Queues a request; `cache` (from `new_cache`) may hold keys/values of a prompt prefix already;
        `deadline` (time.monotonic()) is the client's, which the internal calls of its steps inherit."""
        needed = self._kv_bytes(len(request.prompt_ids) + request.sampling.max_new_tokens)
        if self.config.kv_cache_bytes and needed > self.config.kv_cache_bytes:
            raise InvalidArgument(
                f"sampling.max_new_tokens: prompt + max_new_tokens need {needed:,} bytes of KV cache, more than the "
                f"gateway's {self.config.kv_cache_bytes:,} (--kv-cache-bytes)"
            )
        seq = Sequence(request, TextStream(self.text, request.sampling.stop, self.guard), cache, deadline, self.device)
        with self._wakeup:
            if self._thread.ident is not None and not self._thread.is_alive() and not self._stopped:
                raise Unavailable("the gateway's engine is not running; retry on another replica")
            if len(self._waiting) >= self.config.max_waiting:
                raise ResourceExhausted(f"waiting queue is full ({self.config.max_waiting} requests); retry later")
            seq.trace = RequestTrace.begin(len(seq.prompt_ids), seq.cached)
            self._waiting.append(seq)
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        adopt_torch_threads()
        self._threads = torch.get_num_threads()
        try:
            self._run()
        except BaseException:
            # A bug killed the engine: its sequences end with UNAVAILABLE rather than hang (a client retries on
            # another replica), and the thread dies, so that readiness turns NOT_SERVING.
            with self._wakeup:
                left = [*self.running, *self._waiting]
                self.running, self._waiting = [], []
            for seq in left:
                seq.emit(Unavailable("the gateway's engine stopped; retry on another replica"))
            raise

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while True:
                    self._drop_finished_by_client()
                    self._admit()
                    metrics.RUNNING.set(len(self.running))
                    metrics.WAITING.set(len(self._waiting))
                    metrics.KV_CACHE_BYTES.set(self._kv_held())
                    if self._stopped:
                        return
                    if self._crash:
                        raise RuntimeError("fault injection: the engine thread crashed")
                    if self.running:
                        break
                    self._wakeup.wait()
            self._step()

    def _drop_finished_by_client(self) -> None:
        """Sequences whose client cancelled or whose deadline passed leave the batch and the queue."""
        now = time.monotonic()
        for seq in [s for s in (*self.running, *self._waiting) if s.cancelled or s.expired(now)]:
            (self.running if seq in self.running else self._waiting).remove(seq)
            seq.emit(Cancelled("request cancelled") if seq.cancelled else DeadlineExceeded("deadline exceeded"))

    def _admit(self) -> None:
        """Waiting sequences join the batch, by `next_to_admit`, while there are places and KV memory for
        their prompts (the first one always joins an empty batch: `submit` checked that it fits alone)."""
        while self._waiting and len(self.running) < self.config.max_batch_seqs:
            index = next_to_admit(self._waiting)
            seq = self._waiting[index]
            if self.running and self.config.kv_cache_bytes:
                held = seq.cache.nbytes if seq.cache is not None else 0
                needed = self._kv_bytes(seq.pending + seq.computed + 1) - held
                if self._kv_held() + needed > self.config.kv_cache_bytes:
                    return
            del self._waiting[index]
            if seq.cache is None:
                seq.cache = self.new_cache(GenerationRequest(seq.prompt_ids, seq.sampling))
            self.running.append(seq)
            if not seq.preempted:
                metrics.REQUEST_QUEUE.observe(time.monotonic() - seq.submitted_at)
                if seq.trace is not None:
                    seq.trace.admitted(len(self.running))

    def _kv_held(self) -> int:
        return sum(s.cache.nbytes for s in self.running if s.cache is not None)

    def _make_room(self, chosen: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Preempts the latest-admitted sequences while the step's KV growth would pass the budget (as vLLM
        does): each frees its cache and waits to be admitted again, then recomputes its prompt and output so
        far in one prefill, so its tokens are those it would have had."""
        if not self.config.kv_cache_bytes:
            return chosen
        while len(chosen) > 1:
            growth = sum(
                self._kv_bytes(seq.computed + n) - seq.cache.nbytes
                for seq, n in chosen
                if seq.computed + n > seq.cache.capacity
            )
            if self._kv_held() + growth <= self.config.kv_cache_bytes:
                break
            victim = self.running[-1]
            with self._wakeup:
                self.running.remove(victim)
                victim.cache, victim.computed, victim.preempted = None, 0, True
                self._waiting.append(victim)
            metrics.PREEMPTIONS.inc()
            chosen = [(seq, n) for seq, n in chosen if seq is not victim]
        return chosen

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Decode tokens first (one each), then prefill chunks (see `scheduler`) while the budget lasts."""
        budget = self.config.max_batch_tokens
        chosen = [(s, 1) for s in self.running if s.pending == 1][:budget]
        budget -= len(chosen)
        if chosen and (room := self.cost.prefill_room(self.config.max_decode_stall_s)) is not None:
            budget = min(budget, room)
        for seq in prefill_order([s for s in self.running if s.pending > 1], time.monotonic()):
            if budget <= 0:
                break
            take = min(seq.pending, budget)
            chosen.append((seq, take))
            budget -= take
        return chosen

    def _step(self) -> None:
        chosen = self._make_room(self._schedule())
        groups = split_micro_batches(chosen, self.config.micro_batches, self.config.micro_batch_min_tokens)
        batches = [self._pack(group) for group in groups]
        sampled = [seq for group in groups for seq, n in group if n == seq.pending]  # the logit rows, in order
        num_tokens = sum(n for _, n in chosen)
        if self.config.one_thread_step_tokens:  # set only where the experts are remote (the gateway waits on them)
            torch.set_num_threads(1 if num_tokens <= self.config.one_thread_step_tokens else self._threads)
        try:
            traced = [seq.trace.phase for seq, _ in chosen if seq.trace is not None]
            attributes = {"moemesh.sequences": len(chosen), "moemesh.tokens": num_tokens}
            with tracing.step("gateway.step", traced, attributes | {"moemesh.micro_batches": len(batches)}):
                started = time.monotonic()
                logits = self._forward(batches)
                chunks = [n for _, n in chosen if n > 1]
                self.cost.observe(len(chosen) - len(chunks), sum(chunks), time.monotonic() - started)
            for seq, n in chosen:
                seq.computed += n
                seq.cache.length += n
            tokens, logprobs = sample(logits, [s.sampling for s in sampled], [s.generator for s in sampled])
            metrics.GENERATED_TOKENS.inc(len(tokens))
            for seq, token, logprob in zip(sampled, tokens, logprobs):
                self._advance(seq, token, logprob)
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the engine goes on
            trace = not isinstance(exc, MoemeshError)
            log.warning("step failed for %d sequences: %s", len(chosen), exc, exc_info=trace)
            error = exc if isinstance(exc, MoemeshError) else MoemeshError(f"internal error: {type(exc).__name__}")
            self._fail([seq for seq, _ in chosen if seq in self.running], error)

    def _pack(self, chosen: list[tuple[Sequence, int]]) -> StepBatch:
        """One batch of the chosen sequences' next tokens: n of each, with a logit row where its chunk ends
        the known tokens."""
        ids: list[int] = []
        positions: list[int] = []
        slices, logit_rows = [], []
        for seq, n in chosen:
            start = len(ids)
            ids += seq.token_ids(seq.computed, n)
            positions += range(seq.computed, seq.computed + n)
            slices.append(SequenceSlice(start, n, seq.cache))
            if n == seq.pending:  # this chunk ends the known tokens: the next one is due
                logit_rows.append(len(ids) - 1)
        device = self.device
        rows = torch.tensor(logit_rows, dtype=torch.long, device=device)  # may be empty: prefill chunks only
        deadlines = [seq.deadline for seq, _ in chosen]
        latest = None if None in deadlines else max(deadlines)  # the step is useful until its last client gives up
        token_ids, positions = torch.tensor(ids, device=device), torch.tensor(positions, device=device)
        return StepBatch(token_ids, positions, slices, rows, latest)

    def _forward(self, batches: list[StepBatch]) -> torch.Tensor:
        """The step's forward pass, run once more if it fails for a reason a rerun may not meet again."""
        deadlines = [b.deadline for b in batches]
        deadline = None if None in deadlines else max(deadlines)
        for attempt in (1, 2):
            try:
                with metrics.STEP_SECONDS.time():
                    return self.model(batches, self.routed)
            except InvalidArgument:
                raise  # the same input fails the same way
            except Exception as exc:  # noqa: BLE001
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if attempt == 2 or out_of_time:
                    raise
                log.warning("step failed (%s); running it once more", exc)
        raise AssertionError("unreachable")

    def _advance(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            metrics.TIME_TO_FIRST_TOKEN.observe(now - seq.submitted_at)
        else:
            metrics.INTER_TOKEN_LATENCY.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.trace is not None:
            seq.trace.sampled(len(seq.output_ids))
        out = StepOutput()
        if token in self.eos_ids and not seq.sampling.ignore_eos:
            out.text, filtered = seq.text.flush(eos=token)
            out.finish_reason = filtered or "eos"
        else:
            out.text, out.finish_reason = seq.text.add(token)
            if not out.finish_reason and len(seq.output_ids) >= seq.sampling.max_new_tokens:
                rest, filtered = seq.text.flush()
                out.text += rest
                out.finish_reason = filtered or "length"
        released = seq.text.released  # tokens whose text has been sent (all of them without output rules)
        out.token_ids = seq.output_ids[seq.sent : released]
        if seq.sampling.return_logprobs:
            out.logprobs = seq.logprobs[seq.sent : released]
        seq.sent = released
        if out.finish_reason:
            out.prompt_tokens, out.completion_tokens = len(seq.prompt_ids), len(seq.output_ids)
            out.cached_tokens = seq.cached
            metrics.E2E_REQUEST_LATENCY.observe(now - seq.submitted_at)
            metrics.PROMPT_TOKENS.inc(len(seq.prompt_ids))
            with self._wakeup:
                self.running.remove(seq)  # its cache stays with the caller, which may store it for the session
        elif not out.token_ids and not out.text:
            return  # everything new is held back by the output rules
        seq.emit(out)

    def _fail(self, seqs: list[Sequence], error: MoemeshError) -> None:
        with self._wakeup:
            for seq in seqs:
                self.running.remove(seq)
        for seq in seqs:
            seq.cache = None
            seq.emit(error)
