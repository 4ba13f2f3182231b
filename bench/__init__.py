"""Benchmarks that print side-by-side ratios (run from the repo root: `python -m bench.<name>`).

Every benchmark's OpenMP thread pools (torch's here, llama-server's as a child) sleep while idle unless the
environment says otherwise, as `moemesh up` makes its services' do: on a machine other jobs share, spinning
pools collapse (a 128-row bf16 matmul measured 3-9 GFLOP/s spinning against 180 passive, at load 5). Before
sleeping they spin briefly, as `moemesh up`'s gateway does (`moemesh.launcher.GATEWAY_ENV`): the in-process
engine's step is a gateway's, and waking a sleeping pool for each of its small ops made a demo-model decode
step 14.2 ms against 8.6 ms. `moemesh up` started from a bench passes both to all its services, where
they made no difference (its shards and routers have one thread each). They are set here because they only
take effect if set before torch loads OpenMP, which any bench module may do.
"""

import os

# `moemesh.launcher.GATEWAY_ENV` (a test checks they agree), not imported from there: that would load torch.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}
for name, value in OPENMP_ENV.items():
    os.environ.setdefault(name, value)
