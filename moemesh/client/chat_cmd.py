"""`moemesh chat`: a multi-turn conversation with a gateway in the terminal, on the Chat RPC.

On a terminal it prompts with line editing and history (readline: arrow keys, Ctrl-R), shows a spinner until
the first token, streams the reply, and takes commands; with stdin not a terminal (a pipe, a file) it reads
one user message per line and prints each reply on its own, so it scripts well. A gateway that cannot be
reached, or any refusal, is one line naming the gRPC code, never a traceback.
"""

import itertools
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from moemesh.client.retry import RetryPolicy
from moemesh.client.sync import Client
from moemesh.client.types import Message
from moemesh.errors import MoemeshError, Unavailable

HELP = "commands: /new (new session), /session (its id and turns), /system TEXT (new session with it), /quit"
# A few quick tries at start: a gateway that is down is reported in about a second, not after a minute.
CONNECT_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.2, max_backoff_s=0.5)


@dataclass
class ChatOptions:
    address: str
    api_key: str | None
    tls_ca: Path | None
    max_new_tokens: int
    temperature: float
    system: str
    session_id: str


class Spinner:
    """Frames on stderr until `stop()` (the first token came, or the call failed), then the line is cleared."""

    FRAMES = "|/-\\"

    def __init__(self, out: TextIO):
        self._out, self._stopped = out, threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            self._out.write(f"\r{frame} ")
            self._out.flush()
            if self._stopped.wait(0.1):
                break
        self._out.write("\r  \r")
        self._out.flush()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._thread.join()


class ChatSession:
    """The conversation's state: the session to continue (empty: the next turn starts one) and the system
    prompt that starts each new one."""

    def __init__(self, client: Client, options: ChatOptions, interactive: bool):
        self.client, self.options, self.interactive = client, options, interactive
        self.session_id, self.system = options.session_id, options.system

    def command(self, line: str) -> bool:
        """Runs a /command; False for /quit."""
        name, _, argument = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/new":
            self.session_id = ""
            print("(new session)")
        elif name == "/system":
            self.system, self.session_id = argument.strip(), ""
            print("(new session with that system prompt)" if self.system else "(new session, no system prompt)")
        elif name == "/session":
            self._describe()
        else:
            print(HELP)
        return True

    def turn(self, text: str) -> None:
        """Sends one user message and streams the reply; Ctrl-C stops the reply (the session keeps what the
        gateway saved)."""
        messages = [Message("user", text)]
        if not self.session_id and self.system:
            messages.insert(0, Message("system", self.system))
        spinner = Spinner(sys.stderr) if self.interactive else None
        stream = self.client.chat(
            messages, session_id=self.session_id, max_new_tokens=self.options.max_new_tokens,
            temperature=self.options.temperature,
        )  # fmt: skip
        try:
            for chunk in stream:
                if spinner is not None:
                    spinner.stop()
                print(chunk.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            stream.close()
            print("\n(interrupted)")
        finally:
            if spinner is not None:
                spinner.stop()
        self.session_id = stream.session_id or self.session_id

    def _describe(self) -> None:
        if not self.session_id:
            print("(no session yet: the next message starts one)")
            return
        session = self.client.get_session(self.session_id)
        print(f"session {session.session_id}: {session.turns} turns, {session.token_count} tokens")


def run_chat(options: ChatOptions) -> int:
    interactive = sys.stdin.isatty()
    with Client(options.address, api_key=options.api_key, tls_ca=options.tls_ca, retry=CONNECT_RETRY) as client:
        try:
            info = client.model_info(timeout_s=10)
        except MoemeshError as exc:
            print(_error_line(options.address, exc), file=sys.stderr)
            return 1
        if interactive:
            _enable_history()
            print(f"moemesh chat with {info.model_name} at {options.address}; {HELP}")
        chat = ChatSession(client, options, interactive)
        for line in _lines(interactive):
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if not chat.command(line):
                        break
                except MoemeshError as exc:
                    print(_error_line(options.address, exc), file=sys.stderr)
                continue
            try:
                chat.turn(line)
            except MoemeshError as exc:
                print(_error_line(options.address, exc), file=sys.stderr)
                if not interactive:
                    return 1
    return 0


def _lines(interactive: bool):
    """User input: prompted lines until EOF or Ctrl-C on a terminal, else stdin's lines."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return


def _enable_history() -> None:
    """Arrow keys and history for input() (readline is missing on some platforms: plain input then)."""
    try:
        import readline  # noqa: F401 - importing it is what hooks it into input()
    except ImportError:
        pass


def _error_line(address: str, exc: MoemeshError) -> str:
    if isinstance(exc, Unavailable):
        return f"moemesh chat: cannot reach the gateway at {address} ({exc.code.name}: {exc})"
    return f"moemesh chat: {exc.code.name}: {exc}"
