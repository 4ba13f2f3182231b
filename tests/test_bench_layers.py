"""`bench.layers` on a real `moemesh up`: each case timed in-process and over the router (or, with `--routers 0`,
routed by the bench's own process), and the waits nest (a shard's compute within the router's call to it, within
what the gateway waits for the layer); the router called alone, per size."""

import pytest

from bench import layers

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("routers", [1, 0])
def test_cases_are_timed_on_both_sides_and_the_waits_nest(mixtral_dir, capsys, routers):
    argv = ["--model", str(mixtral_dir), "--decode-steps", "4", "--prefill", "8", "--routers", str(routers)]
    assert layers.main(argv + ["--markdown"]) == 0
    rows, alone = {}, {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] in ("decode, 1 token", "prefill, 8 tokens"):
            rows[cells[0]] = [float(c) for c in cells[1:7]] + [cells[7]]
        if len(cells) == 5 and cells[0] in ("1 token", "8 tokens"):
            alone[cells[0]] = [float(c) for c in cells[1:4]] + [float(ms) for ms in cells[4].split("/")]
    assert set(rows) == {"decode, 1 token", "prefill, 8 tokens"}
    for name, (local_step, local_moe, step, moe, router_call, shard, cpu) in rows.items():
        assert 0 < local_moe < local_step, name
        assert 0 < shard <= router_call <= moe < step, name
        gateway_cpu, router_cpu, shards_cpu = (float(ms) for ms in cpu.split("/"))  # /proc counts in 10 ms ticks
        assert gateway_cpu > 0 and router_cpu >= 0 and shards_cpu >= 0, name
        assert routers or router_cpu == 0, name  # no router process: this one routed
    assert set(alone) == {"1 token", "8 tokens"}
    for name, (call, router_call, shard, caller_cpu, router_cpu, shards_cpu) in alone.items():
        assert call > 0 and 0 < shard <= router_call, name
        assert caller_cpu > 0 and router_cpu >= 0 and shards_cpu >= 0, name
