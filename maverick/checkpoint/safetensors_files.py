"""Lazy access to the tensors of a (possibly sharded) safetensors checkpoint. Never unpickles."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError


class SafetensorsFiles:
    """name -> tensor, opened lazily (mmap) from model.safetensors or an index of shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files: dict[str, Path] = {}
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e!r}); expected a 'weight_map'") from None
            for name, fname in weight_map.items():
                self.files[name] = self.path / fname
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
                hint = f" (found pickled {pickled}; convert to safetensors: pickles are never loaded)" if pickled else ""
                raise CheckpointError(f"{self.path}: no *.safetensors weights found{hint}")
            for shard in shards:
                for name in self._open(shard).keys():
                    self.files[name] = shard
        self._handles: dict[Path, object] = {}

    def _open(self, file: Path):
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index does not exist")
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor '{name}' ({e})") from None
