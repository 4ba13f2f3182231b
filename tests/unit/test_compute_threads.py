"""`in_passing_thread`: the work's result or exception, from a thread that is gone when it returns."""

import threading

import pytest

from moemesh.compute_threads import in_passing_thread

pytestmark = pytest.mark.timeout(30)


def test_returns_the_result_from_another_thread_that_has_exited():
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert in_passing_thread(work, "probe") == 42
    [thread] = seen
    assert thread is not threading.current_thread() and thread.name.startswith("probe")
    assert not thread.is_alive()


def test_raises_the_work_s_exception():
    def work() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        in_passing_thread(work)
