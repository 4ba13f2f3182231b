"""The engine: continuous batching of every live sequence over the dense model and the routed experts.

Requests join and leave the running batch between steps. Each step is planned by the `Scheduler` (decode
tokens first, then prefill chunks within `max_batch_tokens`; admission and preemption), executed by the
`ModelRunner` (one forward pass, which makes one routed-experts call per MoE layer for all of them, then
sampling), and its tokens turned into outputs by the `OutputProcessor`: data flows one way, and the engine's
thread only drives the three. A sequence whose client deadline has passed leaves before the next step, so it
never holds up or fails the others. A step that fails is run once more (its cache writes are idempotent: a
cache's length advances only after a step succeeds) before its sequences fail.
"""

import logging
import threading
import time
from dataclasses import dataclass

import torch

from moemesh import tracing
from moemesh.compute_threads import adopt_torch_threads
from moemesh.errors import Cancelled, DeadlineExceeded, InvalidArgument, MoemeshError, Unavailable
from moemesh.model import DenseModel, KVCache, RoutedExperts
from services.gateway import metrics
from services.gateway.content.output_guard import OutputGuard
from services.gateway.output import OutputProcessor
from services.gateway.request_trace import RequestTrace
from services.gateway.requests import GenerationRequest
from services.gateway.runner import ModelRunner
from services.gateway.scheduler import Scheduler, StepPlan
from services.gateway.sequence import RequestStatus, Sequence
from services.gateway.text import TextCodec, TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_batch_seqs: int
    max_batch_tokens: int
    max_waiting: int
    max_decode_stall_s: float = 0.0  # inter-token budget that caps prefill chunks beside decodes; 0: none
    kv_cache_bytes: int = 0  # KV memory of the running sequences; 0: no limit
    micro_batches: int = 1  # a step's sequences split into up to this many micro-batches run in ping-pong
    micro_batch_min_tokens: int = 8  # fewest tokens of one micro-batch: smaller steps are not split
    one_thread_step_tokens: int = 0  # a step of at most this many tokens computes on one torch thread; 0: never


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
        self.model, self.config, self.text, self.guard = model, config, text, guard
        self.dtype, self.device = model.norm.weight.dtype, model.norm.weight.device
        self.scheduler = Scheduler(
            max_batch_seqs=config.max_batch_seqs,
            max_batch_tokens=config.max_batch_tokens,
            max_waiting=config.max_waiting,
            max_decode_stall_s=config.max_decode_stall_s,
            kv_cache_bytes=config.kv_cache_bytes,
            kv_bytes=self._kv_bytes,
            new_cache=lambda: KVCache(self.model.cfg, self.dtype, self.device),
        )
        self.runner = ModelRunner(
            model,
            routed,
            micro_batches=config.micro_batches,
            micro_batch_min_tokens=config.micro_batch_min_tokens,
            one_thread_step_tokens=config.one_thread_step_tokens,
        )
        self.output = OutputProcessor(eos_ids)
        self._wakeup = threading.Condition()  # guards the scheduler's lists; wakes the engine thread
        self._stopped = False
        self._crash = False  # `inject_crash`
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    @property
    def routed(self) -> RoutedExperts:
        return self.runner.routed

    @routed.setter
    def routed(self, routed: RoutedExperts) -> None:
        self.runner.routed = routed

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

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
        for seq in self.scheduler.take_all():
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
            self.scheduler.add(seq)
            seq.trace = RequestTrace.begin(len(seq.prompt_ids), seq.cached)
            self._wakeup.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        adopt_torch_threads()
        self.runner.threads = torch.get_num_threads()
        try:
            self._run()
        except BaseException:
            # A bug killed the engine: its sequences end with UNAVAILABLE rather than hang (a client retries on
            # another replica), and the thread dies, so that readiness turns NOT_SERVING.
            with self._wakeup:
                left = self.scheduler.take_all()
            for seq in left:
                seq.emit(Unavailable("the gateway's engine stopped; retry on another replica"))
            raise

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while True:
                    self._drop_finished_by_client()
                    self._admit()
                    metrics.RUNNING.set(len(self.scheduler.running))
                    metrics.WAITING.set(len(self.scheduler.waiting))
                    metrics.KV_CACHE_BYTES.set(self.scheduler.kv_held())
                    if self._stopped:
                        return
                    if self._crash:
                        raise RuntimeError("fault injection: the engine thread crashed")
                    if self.scheduler.running:
                        break
                    self._wakeup.wait()
                plan = self.scheduler.schedule(time.monotonic())
            metrics.PREEMPTIONS.inc(len(plan.preempted))
            self._step(plan)

    def _drop_finished_by_client(self) -> None:
        for seq in self.scheduler.drop_finished_by_client(time.monotonic()):
            seq.emit(Cancelled("request cancelled") if seq.cancelled else DeadlineExceeded("deadline exceeded"))

    def _admit(self) -> None:
        for seq in self.scheduler.admit():
            if not seq.preempted:
                metrics.REQUEST_QUEUE.observe(time.monotonic() - seq.submitted_at)
                if seq.trace is not None:
                    seq.trace.admitted(len(self.scheduler.running))

    def _step(self, plan: StepPlan) -> None:
        chosen = plan.chosen
        try:
            traced = [seq.trace.phase for seq, _ in chosen if seq.trace is not None]
            attributes = {"moemesh.sequences": len(chosen), "moemesh.tokens": plan.num_tokens}
            with tracing.step("gateway.step", traced, attributes):
                started = time.monotonic()
                sampled = self.runner.run(plan)
                chunks = plan.prefill_chunks
                self.scheduler.cost.observe(len(chosen) - len(chunks), sum(chunks), time.monotonic() - started)
            for seq, token, logprob in sampled:
                out = self.output.process(seq, token, logprob)
                if out is not None and out.finish_reason:
                    with self._wakeup:
                        self.scheduler.finish(seq)  # its cache stays with the caller, which may store it
                if out is not None:
                    seq.emit(out)
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the engine goes on
            trace = not isinstance(exc, MoemeshError)
            log.warning("step failed for %d sequences: %s", len(chosen), exc, exc_info=trace)
            error = exc if isinstance(exc, MoemeshError) else MoemeshError(f"internal error: {type(exc).__name__}")
            self._fail([seq for seq, _ in chosen if seq in self.scheduler.running], error)

    def _fail(self, seqs: list[Sequence], error: MoemeshError) -> None:
        with self._wakeup:
            for seq in seqs:
                self.scheduler.finish(seq, RequestStatus.ABORTED)
        for seq in seqs:
            seq.cache = None
            seq.emit(error)
