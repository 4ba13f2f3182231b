"""Hugging Face checkpoint directories: checked against the family's tensor table, read in part.

Every service opens the same directory, checks the whole table of names and shapes against the
config (cheap: headers only), then reads only the tensors it holds: the router the gates, an expert
shard its experts, the gateway the rest. Files are memory-mapped by safetensors.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from moemesh.errors import CheckpointError
from moemesh.families import Shape, TensorMap, load_config, tensor_table


class Checkpoint:
    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.tensors = tensor_table(self.config)
        self._file_of, headers = self._index()
        self._check(headers)
        self.fingerprint = self._fingerprint(headers)

    def load(self, tensors: TensorMap, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Reads the given checkpoint tensors, keyed by our module path, cast to `dtype` on `device` (on the CPU, a
        tensor stored in `dtype` stays memory-mapped)."""
        by_file: dict[Path, list[str]] = {}
        for name in tensors:
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    out[tensors[name][0]] = f.get_tensor(name).to(device, dtype)
        return out

    def _index(self) -> tuple[dict[str, Path], dict[str, tuple[str, Shape]]]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no safetensors files")
        file_of: dict[str, Path] = {}
        headers: dict[str, tuple[str, Shape]] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        file_of[name] = path
                        headers[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # safetensors raises several types for a corrupt header
                raise CheckpointError(f"{path.name}: unreadable safetensors file ({exc})") from None
        return file_of, headers

    def _check(self, headers: dict[str, tuple[str, Shape]]) -> None:
        expected = self.tensors.all()
        missing = sorted(set(expected) - set(headers))
        if missing:
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]}" + _more(missing))
        unexpected = sorted(n for n in set(headers) - set(expected) if not self.tensors.ignored(n))
        if unexpected:
            raise CheckpointError(f"{self.dir}: unexpected tensor {unexpected[0]}" + _more(unexpected))
        for name, (_, shape) in expected.items():
            if headers[name][1] != shape:
                raise CheckpointError(
                    f"{self.dir}: tensor {name} has shape {list(headers[name][1])}, config implies {list(shape)}"
                )

    def _fingerprint(self, headers: dict[str, tuple[str, Shape]]) -> str:
        digest = hashlib.sha256((self.dir / "config.json").read_bytes())
        for name in sorted(headers):
            digest.update(f"{name}:{headers[name]}".encode())
        return digest.hexdigest()[:16]


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
