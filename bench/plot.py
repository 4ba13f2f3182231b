"""The fixed workload as a picture: useful tokens/s and p99 TTFT against concurrent streams, a line per side."""

from pathlib import Path

from bench.common import percentile
from bench.throughput import LevelResult, latencies


def plot(by_side: dict[str, list[LevelResult]], path: Path, title: str) -> Path:
    """Writes a PNG of two panels to `path` (Agg, no display needed) and returns it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    speed, ttft = figure.subplots(1, 2)
    streams = sorted({level.concurrency for levels in by_side.values() for level in levels})
    for side, levels in by_side.items():
        x = [level.concurrency for level in levels]
        speed.plot(x, [level.tokens_per_s for level in levels], marker="o", label=side)
        p99 = [percentile(latencies(level)["TTFT"], 99) for level in levels]
        ttft.plot(x, [1000 * value if value is not None else float("nan") for value in p99], marker="o", label=side)
    for axis, what in ((speed, "useful tokens/s"), (ttft, "p99 time to first token, ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(streams, [str(s) for s in streams])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(what)
        axis.grid(True, alpha=0.3)
    speed.legend()
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
