"""Hugging Face checkpoint directories: checked against the family's tensor table, read in part.

Every service opens the same directory, checks the whole table of names and shapes against the
config (cheap: headers only), then reads only the tensors it holds: the router the gates, an expert
shard its experts, the gateway the rest. Files are memory-mapped by safetensors. A quantized checkpoint's
linears are checked and read in their stored form (`moemesh.quant_formats`).
"""

import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moemesh.errors import CheckpointError
from moemesh.families import Shape, TensorMap, load_config, tensor_table
from moemesh.quant_formats import QuantizedWeight, quant_format


class Checkpoint:
    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.quant = quant_format(json.loads((self.dir / "config.json").read_text()))
        self.tensors = tensor_table(self.config)
        self.quantized: dict[str, Shape] = {}  # linear weights stored quantized: name -> [out, in]
        self._file_of, headers = self._index()
        self._check(headers)
        self.fingerprint = self._fingerprint(headers)

    def load(
        self, tensors: TensorMap, dtype: torch.dtype, device: torch.device, keep_quantized: bool = False
    ) -> dict[str, torch.Tensor | QuantizedWeight]:
        """Reads the given checkpoint tensors, keyed by our module path, cast to `dtype` on `device` (on the CPU, a
        tensor stored in `dtype` stays memory-mapped). A quantized linear weight is dequantized to `dtype`, or
        with `keep_quantized` decoded (`moemesh.quant_formats`) and kept at its stored width."""
        out: dict[str, torch.Tensor | QuantizedWeight] = {}
        with ExitStack() as files:
            opened: dict[Path, Any] = {}

            def get(name: str) -> torch.Tensor:
                path = self._file_of[name]  # KeyError: not stored (an optional tensor of a format)
                if path not in opened:
                    opened[path] = files.enter_context(safe_open(path, framework="pt"))
                return opened[path].get_tensor(name)

            for name, (ours, _) in tensors.items():
                if name in self.quantized:
                    weight = self.quant.decode(get, name.removesuffix(".weight"), *self.quantized[name])
                    out[ours] = weight.to(device) if keep_quantized else weight.dequantize(dtype).to(device)
                else:
                    out[ours] = get(name).to(device, dtype)
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
        stored = {name: shape for name, (_, shape) in self.tensors.all().items()}
        if self.quant is not None:
            for name, shape in list(stored.items()):
                prefix = name.removesuffix(".weight")
                if len(shape) == 2 and name.endswith(".weight") and self.quant.stores(prefix, headers):
                    self.quantized[name] = shape
                    del stored[name]
                    stored |= self.quant.tensors(prefix, *shape, headers)
        missing = sorted(set(stored) - set(headers))
        if missing:
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]}" + _more(missing))
        unexpected = sorted(n for n in set(headers) - set(stored) if not self.tensors.ignored(n))
        if unexpected:
            raise CheckpointError(f"{self.dir}: unexpected tensor {unexpected[0]}" + _more(unexpected))
        for name, shape in stored.items():
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
