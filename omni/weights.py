"""Strict loading of Qwen2.5-Omni safetensors checkpoints into our modules.

Modules are built with their parameters on the meta device (`empty_params()`), then each
checkpoint tensor is read once, cast, moved and assigned, so a 7B checkpoint is never
materialised twice. Buffers that are computed rather than stored (rotary frequencies,
filters) are created normally during construction. Loading is strict: a missing,
unexpected or mis-shaped tensor raises `CheckpointError` naming the key.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class CheckpointError(ValueError):
    pass


class Checkpoint:
    """Index of the tensors in a checkpoint directory: single file or shards."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            self.files = {k: self.dir / f for k, f in weight_map.items()}
        elif single.exists():
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        for f in set(self.files.values()):
            if not f.exists():
                raise CheckpointError(f"{self.dir}: shard {f.name} named in the index is missing")

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.files if k.startswith(prefix))

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.files)

    def read(self, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(f, "pt", device=str(device)) as h:
                for k in ks:
                    out[k] = h.get_tensor(k)
        return out


@contextlib.contextmanager
def empty_params():
    """Build modules with parameters on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_module(
    module: nn.Module,
    ckpt: Checkpoint | str | Path,
    prefix: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load every tensor under `prefix` into `module`, strictly; returns the module in eval mode.

    A submodule with `checkpoint_parts()` (stacked MoE experts) names, for each of its parameters, the
    checkpoint tensors of each index along the first dimension, concatenated along their rows; those are
    read one parameter at a time and copied into it, so the stacked weights are never held twice.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    expected = module.state_dict(keep_vars=True)
    parts: dict[str, list[tuple[str, ...]]] = {}
    for mname, mod in module.named_modules():
        if hasattr(mod, "checkpoint_parts"):
            for pname, per_index in mod.checkpoint_parts().items():
                parts[f"{mname}.{pname}".lstrip(".")] = [tuple(f"{mname}.{k}".lstrip(".") for k in keys)
                                                         for keys in per_index]
    wanted = (set(expected) - set(parts)) | {k for per in parts.values() for keys in per for k in keys}
    present = {k[len(prefix):]: k for k in ckpt.keys(prefix)}
    # Buffers we compute (rotary frequencies, resampling filters) are accepted if a checkpoint
    # happens to store them too, and ignored: the computed values are the ones that are right.
    computed = {f"{m}.{b}".lstrip(".") for m, mod in module.named_modules() for b in mod._non_persistent_buffers_set}
    present = {k: v for k, v in present.items() if k not in computed}
    missing = sorted(wanted - set(present))
    unexpected = sorted(set(present) - wanted)
    if missing:
        raise CheckpointError(
            f"{ckpt.dir}: missing tensor{'s' if len(missing) > 1 else ''} "
            + ", ".join(prefix + k for k in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(
            f"{ckpt.dir}: unexpected tensor{'s' if len(unexpected) > 1 else ''} "
            + ", ".join(prefix + k for k in unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    single = {k: v for k, v in present.items() if k in expected and k not in parts}
    tensors = ckpt.read(list(single.values()))
    state = {}
    for name, full in single.items():
        t = tensors.pop(full)
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{ckpt.dir}: tensor {full} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.is_floating_point():
            t = t.to(dtype or want.dtype)
        state[name] = t.to(device)
    for name, per_index in parts.items():
        state[name] = _stack(ckpt, prefix, name, per_index, expected[name], dtype, device)
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device)  # computed buffers
    for name, p in module.named_parameters():
        if p.is_meta:  # tied or shared parameters not in the state dict
            raise CheckpointError(f"{ckpt.dir}: parameter {prefix}{name} was not loaded")
    return module.eval()


def _stack(ckpt: Checkpoint, prefix: str, name: str, per_index: list[tuple[str, ...]], want: torch.Tensor,
           dtype: torch.dtype | None, device) -> torch.Tensor:
    """Parameter `name` (n, rows, ...) filled from each index's checkpoint tensors, shape-checked."""
    out = torch.empty(want.shape, dtype=dtype or want.dtype, device=device)
    tensors = ckpt.read([prefix + k for keys in per_index for k in keys])
    for i, keys in enumerate(per_index):
        row = 0
        for k in keys:
            t = tensors.pop(prefix + k)
            if t.dim() != want.dim() - 1 or tuple(t.shape[1:]) != tuple(want.shape[2:]) \
                    or row + t.shape[0] > want.shape[1]:
                raise CheckpointError(f"{ckpt.dir}: tensor {prefix}{k} has shape {tuple(t.shape)}, expected "
                                      f"({want.shape[1] // len(keys)}, {', '.join(map(str, want.shape[2:]))})"
                                      f" (part of {prefix}{name})")
            out[i, row:row + t.shape[0]] = t
            row += t.shape[0]
        if row != want.shape[1]:
            raise CheckpointError(f"{ckpt.dir}: tensors {', '.join(prefix + k for k in keys)} give {row} rows of "
                                  f"{prefix}{name}[{i}], expected {want.shape[1]}")
    return out
