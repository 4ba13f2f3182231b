"""Choosing among replicas of a peer service, and calls that survive a slow, hung or dead replica.

Each `Peer` (a router seen from the gateway, an expert replica seen from the router) keeps its
recent answer times and its calls in flight. Its cost is the time it is expected to take for one
more call: (calls in flight + 1) x its EWMA latency, or x the age of its oldest unanswered call when
that is longer (a hung peer's cost grows by itself). A call goes to a peer drawn with weight
1 / cost^3, so equally fast replicas share the load and one 3x slower gets under 4% of it; and
`EXPLORE` of the calls go to any idle peer, so a peer that looked slow (a cold start, a recovered
one) keeps being measured and wins its traffic back within seconds. A peer that failed is
skipped for a backoff that doubles with each consecutive failure.

`HedgedCall` sends a call's parts, resends the parts of a peer that is unreachable (its stream broke)
to another peer, and hedges the parts of a peer that has not answered within its budget (3 x its
recent p99, with a floor) to another peer, taking whichever answer comes first. An error a peer
answered with (a per-call status) is the call's answer and is not resent. When every peer of a part
was unreachable, they are all tried again after short pauses: a restarted peer takes a moment to be
reached again.
"""

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

from moemesh.errors import DeadlineExceeded, PeerUnreachable, Unavailable
from moemesh.rpc import StreamClient

log = logging.getLogger(__name__)

COST_POWER = 3  # how sharply a slower peer loses calls
EXPLORE = 0.01  # share of calls sent to a random idle peer, to keep measuring the slow ones
MIN_COST_S = 1e-4  # a peer not measured yet costs this little, so it gets calls and is measured
BACKOFF_S = 1.0  # skip a failed peer this long, doubled per consecutive failure, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
BUDGET_P99_FACTOR = 3.0
ROWS_PER_UNIT = 32  # latencies are kept per (1 + rows / ROWS_PER_UNIT), so big calls get longer budgets
MIN_SAMPLES = 8  # until then, a call's budget is `initial_budget_s`
RETRY_PAUSES_S = (0.25, 0.5, 1.0)  # before trying every peer of a part again, once all were unreachable


class LatencyStats:
    """Recent answer times of one peer, normalized by call size: an EWMA ranks peers, the p99 bounds calls."""

    def __init__(self, floor_s: float, initial_budget_s: float, alpha: float = 0.2, window: int = 64):
        self.floor_s, self.initial_budget_s, self.alpha = floor_s, initial_budget_s, alpha
        self.ewma = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    @staticmethod
    def _units(rows: int) -> float:
        return 1 + rows / ROWS_PER_UNIT

    def observe(self, seconds: float, rows: int) -> None:
        sample = seconds / self._units(rows)
        self.ewma = sample if not self._recent else self.ewma + self.alpha * (sample - self.ewma)
        self._recent.append(sample)

    def expected(self) -> float:
        return self.ewma

    def budget(self, rows: int) -> float:
        """How long a call of `rows` may take before the peer counts as failed for it."""
        if len(self._recent) < MIN_SAMPLES:
            return max(self.floor_s, self.initial_budget_s)
        ordered = sorted(self._recent)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return max(self.floor_s, BUDGET_P99_FACTOR * p99 * self._units(rows))


class Peer:
    """One replica: its stream, latency, calls in flight and failures."""

    def __init__(self, client: StreamClient, floor_s: float, initial_budget_s: float):
        self.client = client
        self.latency = LatencyStats(floor_s, initial_budget_s)
        self.in_flight: dict[futures.Future, float] = {}  # calls neither answered nor failed: start times
        self.failures = 0  # consecutive
        self.failed_at = -math.inf
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self.client.target

    def healthy(self, now: float) -> bool:
        return now - self.failed_at > min(BACKOFF_MAX_S, BACKOFF_S * 2 ** max(0, self.failures - 1))

    @property
    def outstanding(self) -> int:
        return len(self.in_flight)

    def cost(self, now: float) -> float:
        """Expected time to answer one more call."""
        with self._lock:
            oldest = min(self.in_flight.values(), default=now)
            waiting = len(self.in_flight)
        return max(MIN_COST_S, (waiting + 1) * max(self.latency.expected(), now - oldest))

    def mark_failed(self) -> None:
        with self._lock:
            self.failures += 1
            self.failed_at = time.monotonic()

    def call(self, request: Any, rows: int, parts: list[int]) -> "Attempt":
        """Sends `request`; the attempt's future resolves with the response or the call's error."""
        started = time.monotonic()
        future = self.client.submit(request)
        with self._lock:
            self.in_flight[future] = started
        future.add_done_callback(lambda f: self._finished(f, started, rows))
        return Attempt(self, parts, started + self.latency.budget(rows), future)

    def observe(self, seconds: float, error: BaseException | None) -> None:
        """Called as each call ends (answered or failed); subclasses export metrics here."""

    def _finished(self, future: futures.Future, started: float, rows: int) -> None:
        error = future.exception()
        self.observe(time.monotonic() - started, error)
        with self._lock:
            self.in_flight.pop(future, None)
            if error is None:
                self.latency.observe(time.monotonic() - started, rows)
                self.failures = 0
            elif isinstance(error, PeerUnreachable):
                self.failures += 1
                self.failed_at = time.monotonic()


P = TypeVar("P", bound=Peer)


class Chooser:
    """Draws a peer with weight 1 / cost^3 among those not backing off, or now and then any idle one (see the
    module docstring)."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, peers: list[P]) -> P:
        now = time.monotonic()
        live = [p for p in peers if p.healthy(now)] or peers  # every holder failed lately: try them anyway
        idle = [p for p in live if not p.in_flight]
        if len(idle) > 1 and self._random.random() < EXPLORE:
            return self._random.choice(idle)
        return self._random.choices(live, [p.cost(now) ** -COST_POWER for p in live])[0]


@dataclass(eq=False)
class Attempt:
    """Some parts of a call, sent to one peer."""

    peer: Peer
    parts: list[int]
    hedge_at: float  # monotonic time after which the parts are also sent elsewhere
    future: futures.Future
    hedged: bool = False


Send = Callable[[list[int], dict[int, set[Peer]]], list[Attempt]]


class HedgedCall:
    """Runs a call of `num_parts` parts to completion across peers.

    `send(parts, tried)` sends the given parts, each to a peer not in `tried[part]` (and adds it
    there), grouped into attempts; it raises `Unavailable`, having sent nothing, when a part has no
    such peer left.
    """

    def __init__(self, num_parts: int, send: Send, deadline: float, what: str):
        self.send, self.deadline, self.what = send, deadline, what
        self.todo = set(range(num_parts))
        self.tried: dict[int, set[Peer]] = {i: set() for i in range(num_parts)}
        self.pending = {a.future: a for a in send(sorted(self.todo), self.tried)}  # in flight from here on
        self._pauses = list(RETRY_PAUSES_S)  # this call's rounds of trying every peer again

    def answers(self) -> Iterator[tuple[Attempt, Any, set[int]]]:
        """Yields (attempt, response, parts it answered first) until every part has an answer."""
        while self.todo:
            now = time.monotonic()
            if now >= self.deadline:
                raise DeadlineExceeded(f"{self.what}: no answer within the deadline")
            hedges = [a.hedge_at for a in self.pending.values() if not a.hedged]
            wake = min([self.deadline, *hedges])
            done, _ = futures.wait(list(self.pending), timeout=max(0.0, wake - now), return_when="FIRST_COMPLETED")
            for future in done:
                attempt = self.pending.pop(future)
                try:
                    response = future.result()
                except PeerUnreachable as exc:
                    log.warning("%s: %s unreachable (%s); resending", self.what, attempt.peer.address, exc)
                    self._resend(self._uncovered(attempt.parts), cause=exc)
                    continue
                fresh = self.todo.intersection(attempt.parts)
                self.todo -= fresh
                if fresh:
                    yield attempt, response, fresh
            self._hedge_overdue()

    def _hedge_overdue(self) -> None:
        now = time.monotonic()
        for attempt in list(self.pending.values()):
            if not attempt.hedged and now >= attempt.hedge_at:
                attempt.hedged = True
                attempt.peer.mark_failed()  # slow or hung: treated as failed for new calls a while
                log.warning("%s: %s did not answer in time; hedging", self.what, attempt.peer.address)
                self._hedge([i for i in attempt.parts if i in self.todo])

    def _uncovered(self, parts: list[int]) -> list[int]:
        """Parts still without an answer and not in flight on another attempt."""
        in_flight = {i for a in self.pending.values() for i in a.parts}
        return [i for i in parts if i in self.todo and i not in in_flight]

    def _hedge(self, parts: list[int]) -> None:
        """Also sends `parts` to peers that have not had them, if there are any."""
        try:
            self.pending |= {a.future: a for a in self.send(parts, self.tried)}
        except Unavailable:
            pass  # no other peer: wait for the one we have

    def _resend(self, parts: list[int], cause: PeerUnreachable) -> None:
        """Sends `parts`, whose peer is unreachable, to peers that have not had them; when there are none,
        to every peer again after a pause; UNAVAILABLE (naming `cause`) when that fails too."""
        if not parts:
            return
        while True:
            try:
                self.pending |= {a.future: a for a in self.send(parts, self.tried)}
                return
            except Unavailable as exc:
                if not self._pauses or time.monotonic() + self._pauses[0] >= self.deadline:
                    raise Unavailable(f"{exc} (last failure: {cause})") from None
            time.sleep(self._pauses.pop(0))
            self.tried.update({i: set() for i in parts})
