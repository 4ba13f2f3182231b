"""`retain_freed_memory`: fixed glibc thresholds, so that freed large buffers are reused instead of faulted in
afresh; the environment's own allocator settings win."""

import platform
import subprocess
import sys

import pytest

from moemesh.allocator import configured_by_user

pytestmark = pytest.mark.timeout(60)

# Allocates and touches buffers of a few MiB that live at once, then frees them all, as a step does with its
# activations, and prints the minor page faults of the last rounds (the first rounds warm the heap either way).
CHURN = """
import resource, sys
from moemesh.allocator import retain_freed_memory
print(retain_freed_memory() if sys.argv[1] == "retain" else None)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
mib = 1024 * 1024
for rounds in (5, 20):
    before = faults()
    for _ in range(rounds):
        live = [bytearray(2 * mib) for _ in range(8)]
        del live
print(faults() - before)
"""


def churn_faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default_said, default_faults = churn_faults("default")
    retain_said, retain_faults = churn_faults("retain")
    assert (default_said, retain_said) == ("None", "True")
    assert retain_faults < default_faults / 4, (retain_faults, default_faults)


def test_the_environment_s_allocator_settings_win():
    assert not configured_by_user({"PATH": "/bin"})
    assert configured_by_user({"MALLOC_TRIM_THRESHOLD_": "1"})
    assert configured_by_user({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert not configured_by_user({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"})
    said, _ = churn_faults("retain", env={"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert said == "False"
