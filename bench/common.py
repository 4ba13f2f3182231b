"""What the benchmarks share: processes in their own session, and printing."""

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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

    def cpu_seconds(self) -> float:
        """User + system CPU time the session's live processes have used so far."""
        ticks = sum(int(fields[11]) + int(fields[12]) for _, _, fields in self._session_stats())  # utime, stime
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


def command_line(module: str) -> str:
    """How this benchmark was run, to print at the top of its output."""
    exe = sys.executable
    rel = os.path.relpath(exe)
    return shlex.join([rel if not rel.startswith("..") else exe, "-m", module, *sys.argv[1:]])


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
