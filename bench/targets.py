"""The throughput ratios `bench.compare` prints for each workload and level, and the targets of issue 12
they are held to (with the open loop's latency ratios from `bench.openloop`)."""

from collections.abc import Sequence
from dataclasses import dataclass

from bench import hf, llamacpp
from bench.throughput import LevelResult

IN_PROCESS = "in-process"
UP = "moemesh up"
# ratio name -> (numerator sides, denominator sides): the best tokens/s among each
RATIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "moemesh up / llama.cpp": ((UP,), (llamacpp.SIDE,)),
    "in-process / llama.cpp": ((IN_PROCESS,), (llamacpp.SIDE,)),
    "moemesh up / best transformers": ((UP,), hf.SIDES),
    "moemesh up / in-process": ((UP,), (IN_PROCESS,)),
}
OPEN_LOOP = "open loop"
Key = tuple[str, int | None]  # (workload, streams; None for a workload with one level)
Reached = dict[Key, dict[str, float | None]]


def best_tokens_per_s(level: dict[str, LevelResult], sides: Sequence[str]) -> float | None:
    speeds = [level[side].tokens_per_s for side in sides if side in level]
    return max(speeds, default=None)


def ratios(level: dict[str, LevelResult]) -> dict[str, float | None]:
    """Each of `RATIOS` over one level's results by side; None where a side did not run."""
    out: dict[str, float | None] = {}
    for name, (numerator, denominator) in RATIOS.items():
        top, bottom = best_tokens_per_s(level, numerator), best_tokens_per_s(level, denominator)
        out[name] = top / bottom if top is not None and bottom else None
    return out


@dataclass(frozen=True)
class Target:
    workload: str
    streams: int | None  # the fixed workload's level; None: the workload's only level
    ratio: str
    limit: float
    at_most: bool = False  # a latency ratio, to stay below the limit

    @property
    def label(self) -> str:
        where = f"{self.workload}, {self.streams} stream{'s' * (self.streams > 1)}" if self.streams else self.workload
        return f"{where}: {self.ratio}"

    def row(self, reached: Reached) -> list[str]:
        """[target, limit, reached, met?]; "not run" when the workload, level or a side is missing."""
        value = reached.get((self.workload, self.streams), {}).get(self.ratio)
        limit = f"{'<=' if self.at_most else '>='} {self.limit:g}"
        if value is None:
            return [self.label, limit, "-", "not run"]
        met = value <= self.limit if self.at_most else value >= self.limit
        return [self.label, limit, f"{value:.2f}", "met" if met else "not met"]


TARGETS = (
    Target("mixed", None, "moemesh up / best transformers", 4.0),
    Target("mixed", None, "moemesh up / llama.cpp", 1.0),
    Target("fixed", 1, "in-process / llama.cpp", 0.8),
    Target("fixed", 1, "moemesh up / in-process", 0.85),
    Target("fixed", 32, "moemesh up / in-process", 0.9),
    Target("fixed", 64, "moemesh up / in-process", 0.9),
    Target(OPEN_LOOP, None, "p99 TTFT / lone request", 3.0, at_most=True),
    Target(OPEN_LOOP, None, "p99 inter-token / lone request", 2.0, at_most=True),
)
TARGET_HEADER = ["target", "wanted", "reached", "met?"]


def target_rows(reached: Reached) -> list[list[str]]:
    return [target.row(reached) for target in TARGETS]
