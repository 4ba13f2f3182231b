"""moemesh/v1 must hold exactly what `make protos` writes from the current protos."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from gen_protos import PACKAGE, generate  # noqa: E402


@pytest.mark.timeout(60)
def test_generated_code_is_fresh(tmp_path: Path) -> None:
    package_dir = REPO_ROOT / PACKAGE
    assert package_dir.is_dir(), f"{package_dir} is missing: run `make protos`"
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    current = {p.name: p.read_bytes() for p in package_dir.iterdir() if p.is_file()}
    assert sorted(current) == sorted(fresh), f"{package_dir} has the wrong files: run `make protos`"
    stale = sorted(name for name in fresh if current[name] != fresh[name])
    assert not stale, f"stale or hand-edited files in {package_dir}: {stale}; run `make protos`"
