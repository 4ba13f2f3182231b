"""Keeping freed memory in the process, so that large buffers are not faulted in afresh on every use.

glibc's malloc serves a block of 128 KiB or more with a fresh `mmap` (a threshold it raises by itself, up to
32 MiB, only as such blocks are freed) and gives memory at the top of its heaps back to the kernel once 128 KiB
are free there. A service frees and allocates the same large buffers over and over: a step's activations, and
on the wire a MoE layer's hidden states (512 KiB for 256 tokens of a 1024-wide bf16 model), copied several
times per hop. Each new mapping is faulted in and zeroed page by page by the kernel. Fixed thresholds keep
such blocks in the heap for reuse, as the tcmalloc or jemalloc that TorchServe and vLLM's CPU backend preload
would. On the 2-core test machine a round trip of 256-512 tokens' hidden states between two services took
0.56-0.70x the time (`python -m bench.wire`); whole steps of `moemesh up` moved within the machine's noise
(docs/benchmarks.md).

Where the allocator is configured from the environment already (`MALLOC_*_` variables, `GLIBC_TUNABLES`), or
the C library is not glibc, nothing is changed.
"""

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger(__name__)

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024  # free memory each heap may keep at its top

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def configured_by_user(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether glibc's own variables set malloc's thresholds (they are the C library's settings, read by it at
    start, so they are looked for here and not in moemesh's settings)."""
    return any(name in environ for name in _USER_SETTINGS) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def retain_freed_memory() -> bool:
    """Fixes glibc's mmap and trim thresholds for this process; False where it left the allocator as it was."""
    if configured_by_user() or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.warning("mallopt refused the thresholds; large buffers are mapped afresh on every use")
    return done
