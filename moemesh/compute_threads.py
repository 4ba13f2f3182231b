"""Keeping one OpenMP pool per process, so that torch's CPU threads spin between ops instead of sleeping.

torch's CPU kernels run on libgomp, which gives every thread that starts a parallel region a pool of worker
threads of its own, kept until that thread exits. libgomp counts the workers of all pools against the CPUs, and
once they outnumber them it stops spinning between regions (`GOMP_SPINCOUNT` no longer applies): every worker
sleeps on a futex after each op and is woken for the next. A gateway that loaded its model on the main thread
and then steps on the engine thread has two pools; a 1.2 B decode step then made 229 voluntary context switches
against 1-8 and took ~30% longer (docs/benchmarks.md). So work that runs parallel ops before the engine starts
(loading and packing weights) runs in a passing thread, whose pool ends with it.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(work: Callable[[], T], name: str = "load") -> T:
    """`work()` run in a new thread that has exited when this returns (its result, or its exception)."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        future = pool.submit(work)
    return future.result()
