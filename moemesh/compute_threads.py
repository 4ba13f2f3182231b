"""Keeping one OpenMP pool per process, so that torch's CPU threads spin between ops instead of sleeping.

torch's CPU kernels run on libgomp, which gives every thread that starts a parallel region a pool of worker
threads of its own, kept until that thread exits. libgomp counts the workers of all pools against the CPUs, and
once they outnumber them it stops spinning between regions (`GOMP_SPINCOUNT` no longer applies): every worker
sleeps on a futex after each op and is woken for the next. A gateway that loaded its model on the main thread
and then steps on the engine thread has two pools; a 1.2 B decode step then made 229 voluntary context switches
against 1-8 and took ~30% longer (docs/benchmarks.md). So work that runs parallel ops before the engine starts
(loading and packing weights) runs in a passing thread, whose pool ends with it.

Every thread that computes also adopts the configured thread count (`adopt_torch_threads`): OpenMP's count is
a per-thread setting, and a new thread starts from OpenMP's default (every CPU the process may run on), not
from `torch.set_num_threads`.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def adopt_torch_threads() -> None:
    """Gives the calling thread the thread count `torch.set_num_threads` set for the process.

    torch applies its count to a new thread only when one of its own parallel kernels first runs there; oneDNN's
    matmuls and linears open their OpenMP regions directly, so in a thread that started with them (a gRPC handler
    whose first ops are a decode, a view and a linear) they ran on OpenMP's default, every CPU. An expert shard
    given one core then computed on two: on the 2-core machine its CPU time was twice its compute time, and two
    shards took four threads' turns on two cores (docs/benchmarks.md). Run it first in every thread that computes.
    """
    import torch  # here: `moemesh.rpc`, which clients import too, stays free of torch

    torch.set_num_threads(torch.get_num_threads())


def in_passing_thread(work: Callable[[], T], name: str = "load") -> T:
    """`work()` run in a new thread that has exited when this returns (its result, or its exception)."""
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=adopt_torch_threads) as pool:
        future = pool.submit(work)
    return future.result()
