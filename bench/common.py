"""What the benchmarks share: processes in their own session, and printing."""

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from moemesh import hardware

START_TIMEOUT_S = 300


class ServiceProcess:
    """A command in a new session; `lines` collects everything it prints."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name, self.argv = name, argv
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name=f"out-{name}", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = START_TIMEOUT_S) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-40:])
                    raise RuntimeError(f"{self.name} printed no line matching {pattern!r}; its output:\n{tail}")
                self._changed.wait(min(left, 1.0))

    def _session_stats(self) -> Iterator[tuple[str, str, list[str]]]:
        """(pid, name, the /proc stat fields after the name) of every process in the session this one leads."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
            if int(fields[3]) == self.proc.pid:
                yield entry.name, stat[stat.index("(") + 1 : stat.rindex(")")], fields

    def session_members(self) -> list[str]:
        """Live processes (not zombies) of the session this process leads: 'pid name' each."""
        return [f"{pid} {name}" for pid, name, fields in self._session_stats() if fields[0] != "Z"]

    def cpu_seconds(self, matching: str = "") -> float:
        """User + system CPU time the session's live processes (those whose command line holds `matching`) have
        used so far."""
        ticks = sum(
            int(fields[11]) + int(fields[12])  # utime, stime
            for pid, _, fields in self._session_stats()
            if not matching or matching in _command_line(pid)
        )
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout_s: float = 60) -> tuple[int | None, list[str]]:
        """SIGTERM, wait; returns the exit code and whatever of the session was still alive (then SIGKILLed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        left: list[str] = []
        deadline = time.monotonic() + 10
        while (left := self.session_members()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left or code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        return code, left

    def stop_line(self) -> str:
        code, left = self.stop()
        line = f"{self.name} stopped with SIGTERM: exit code {code}; processes left: {', '.join(left) or 'none'}"
        return line + (" (killed with SIGKILL)" if left or code is None else "")


def _command_line(pid: str) -> str:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def command_line(module: str) -> str:
    """How this benchmark was run, to print at the top of its output."""
    exe = sys.executable
    rel = os.path.relpath(exe)
    return shlex.join([rel if not rel.startswith("..") else exe, "-m", module, *sys.argv[1:]])


def allocator_as_services(model: Path) -> str:
    """Sets this process's malloc as a gateway serving `model` sets its own (`moemesh.allocator`, unless
    `MOEMESH_RETAIN_FREED_MEMORY=false`), so that the sides run in this process (the in-process gateway,
    `transformers`) run as the services do; says which it is."""
    from moemesh.allocator import retain_freed_memory
    from moemesh.settings import GatewaySettings

    if GatewaySettings(model=model).retain_freed_memory and retain_freed_memory():
        return "malloc: freed memory retained (glibc thresholds fixed, as in moemesh's services)"
    return "malloc: as the environment and C library set it"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_description() -> str:
    """CPU model, usable cores and the SIMD flags that decide which kernels llama.cpp and torch pick."""
    present = hardware.cpu_flags()
    flags = " ".join(f for f in CPU_FLAGS if f in present) or "none of " + " ".join(CPU_FLAGS)
    return f"{hardware.cpu_model()}, {hardware.available_cores()} cores; flags: {flags}"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks, as numpy's default;
    None for no values (a side that produced no timings shows "-" rather than failing the report)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def inter_token_gaps(chunks: Sequence[tuple[float, int]]) -> list[float]:
    """Seconds between consecutive generated tokens of one request, from its streamed messages
    ((seconds since submit, tokens in the message) each). A message of n tokens after a gap g counts as
    n gaps of g / n, so that a side which batches tokens into fewer messages is not credited with
    zero-length gaps; tokens that arrive with the first one (time to first token) are not gaps."""
    gaps: list[float] = []
    for (before, _), (at, count) in zip(chunks, chunks[1:]):
        gaps += [(at - before) / count] * count
    return gaps
