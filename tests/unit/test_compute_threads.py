"""`in_passing_thread`: the work's result or exception, from a thread that is gone when it returns; and the
threads that compute (passing ones, gRPC handlers) on the configured number of OpenMP threads."""

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from moemesh.compute_threads import adopt_torch_threads, in_passing_thread
from moemesh.rpc import Service

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


def _openmp_threads_of_this_thread() -> int:
    """OpenMP's thread count for the calling thread, read from torch's libgomp itself: asking torch
    (`torch.get_num_threads`) would set it first. Other libraries may load a libgomp of their own
    (`sentencepiece` does), so the one in torch's directory is read where there is one."""
    loaded = sorted({name for name in Path("/proc/self/maps").read_text().split() if "/libgomp" in name})
    torch_dir = str(Path(torch.__file__).parent)
    libgomp = next((name for name in loaded if name.startswith(torch_dir)), loaded[0])
    return ctypes.CDLL(libgomp).omp_get_max_threads()


def _in_new_thread(work: Callable[[], int]) -> int:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def configured_below_openmp_default() -> int:
    """torch configured for one thread (the unit tests' conftest), on a machine where a new thread's OpenMP
    default is more: the case where a thread that does not adopt the setting computes on too many."""
    assert torch.get_num_threads() == 1
    if _in_new_thread(_openmp_threads_of_this_thread) < 2:
        pytest.skip("OpenMP's default here is one thread already (one CPU, or OMP_NUM_THREADS=1)")
    return 1


def test_a_thread_that_adopts_runs_on_the_configured_threads(configured_below_openmp_default):
    def adopted() -> int:
        adopt_torch_threads()
        return _openmp_threads_of_this_thread()

    assert _in_new_thread(adopted) == configured_below_openmp_default


def test_passing_threads_and_grpc_handlers_adopt_the_configured_threads(configured_below_openmp_default):
    assert in_passing_thread(_openmp_threads_of_this_thread) == configured_below_openmp_default

    service = Service("probe", "127.0.0.1", 0)
    answer = grpc.unary_unary_rpc_method_handler(lambda request, context: bytes([_openmp_threads_of_this_thread()]))
    service.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("probe", {"Threads": answer})])
    service.start(ready=False)
    try:
        with grpc.insecure_channel(service.address) as channel:
            [threads] = channel.unary_unary("/probe/Threads")(b"", timeout=10)
    finally:
        service.server.stop(None)
    assert threads == configured_below_openmp_default
