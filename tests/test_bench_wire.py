"""`bench.wire`: both sides measured in their own client and echo-server processes, and tabled side by side."""

import platform

import pytest

from bench import wire

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the retained side needs glibc's malloc"),
]


def test_each_token_count_is_timed_on_both_sides(capsys):
    assert wire.main(["--tokens", "1,64", "--repeats", "3", "--rounds", "1", "--hidden", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0].isdigit()}
    assert set(rows) == {"1", "64"}
    assert rows["64"][1] == "8"  # 64 tokens x 64 wide x 2 bytes = 8 KiB
    for row in rows.values():
        default_ms, retained_ms, ratio = float(row[2]), float(row[3]), float(row[4])
        assert default_ms > 0 and retained_ms > 0
        # The times are printed to 0.01 ms and the ratio (of the unrounded means) to 0.01.
        low, high = (retained_ms - 0.005) / (default_ms + 0.005), (retained_ms + 0.005) / (default_ms - 0.005)
        assert low - 0.005 <= ratio <= high + 0.005
