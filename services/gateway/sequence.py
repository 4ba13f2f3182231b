"""One request's life in the engine: its tokens, its cache, its status, and the events its caller reads."""

import enum
import queue
import random
import time
from collections.abc import Iterator

import torch

from moemesh.errors import MoemeshError
from moemesh.model import KVCache
from services.gateway.request_trace import RequestTrace
from services.gateway.requests import GenerationRequest, StepOutput
from services.gateway.text import TextStream


class RequestStatus(enum.Enum):
    """Where a sequence is: queued for admission (again, after a preemption), in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # its last output was emitted
    ABORTED = "aborted"  # cancelled, past its deadline, failed, or the engine stopped


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
        self.status = RequestStatus.WAITING
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
