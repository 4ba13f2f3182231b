"""Benchmarks that print side-by-side ratios (run from the repo root: `python -m bench.<name>`).

Every benchmark's OpenMP thread pools (torch's here, llama-server's as a child) sleep while idle unless the
environment says otherwise, as `moemesh up` makes its services' do: on a machine other jobs share, spinning
pools collapse (a 128-row bf16 matmul measured 3-9 GFLOP/s spinning against 180 passive, at load 5). It is
set here because it only takes effect if set before torch loads OpenMP, which any bench module may do.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
