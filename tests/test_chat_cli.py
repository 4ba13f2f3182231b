"""`moemesh chat` against the `moemesh up` cluster: driven through a pseudo-terminal (pexpect) like a person
at a terminal, and through a pipe like a script; and its message when no gateway answers."""

import re
import subprocess
import sys

import pexpect
import pytest

pytestmark = pytest.mark.integration

CHAT = [sys.executable, "-m", "moemesh.cli", "chat", "--max-new-tokens", "4"]
PROMPT = "> "


def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(CHAT[0], [*CHAT[1:], *args], encoding="utf-8", timeout=60, dimensions=(40, 200))


def say(chat: pexpect.spawn, line: str) -> str:
    """Sends a line; what was printed before the next prompt."""
    chat.sendline(line)
    chat.expect_exact(PROMPT)
    return chat.before


@pytest.mark.timeout(120)
def test_two_turns_session_and_new_in_a_terminal(cluster):
    chat = spawn("--address", cluster.address)
    try:
        chat.expect(r"moemesh chat with \S+ at ")
        chat.expect_exact(PROMPT)
        first = say(chat, "Hello there")
        assert first.strip() and "Traceback" not in first
        say(chat, "Tell me more")
        session = say(chat, "/session")
        match = re.search(r"session (\w+): 2 turns, \d+ tokens", session)
        assert match, session
        assert "(new session)" in say(chat, "/new")
        assert "no session yet" in say(chat, "/session")
        again = say(chat, "Hello there")  # a new session: the same first reply (greedy)
        assert _reply(again) == _reply(first)
        assert re.search(r"session (\w+): 1 turns", say(chat, "/session")).group(1) != match.group(1)
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


def _reply(output: str) -> str:
    """The reply in what the terminal showed: the echoed input line and spinner frames left out."""
    return output.splitlines()[-1].replace("\r", "").strip()


@pytest.mark.timeout(60)
def test_gateway_down_is_one_readable_line(cluster):
    with_port_closed = "127.0.0.1:1"
    chat = spawn("--address", with_port_closed)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 1
    assert "moemesh chat: cannot reach the gateway at 127.0.0.1:1 (UNAVAILABLE:" in chat.before
    assert "Traceback" not in chat.before


@pytest.mark.timeout(120)
def test_piped_lines_get_one_reply_each(cluster):
    result = subprocess.run(
        [*CHAT, "--address", cluster.address], input="Hello there\n/session\nTell me more\n",
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and re.fullmatch(r"session \w+: 1 turns, \d+ tokens", lines[1]), lines
    assert lines[0] and lines[2] and "moemesh chat with" not in result.stdout  # no banner, no prompts
