"""Copy checkpoint tensors into a model's parameters — at load time and for live updates alike.

Parameters are allocated once and never replaced: every write is `copy_` into the existing
storage, so CUDA graphs and anything else holding their addresses stay valid across updates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from open_autoglm.errors import ModelLoadError
from open_autoglm.layers.linear import MergedLinear

# Keys some checkpoints carry that hold no weights of ours (derived buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightTarget:
    """Where one checkpoint tensor lands: a parameter, or a row range of a packed parameter."""

    def __init__(self, covers: list[str], param: torch.Tensor, view: torch.Tensor) -> None:
        self.covers = covers  # names in WeightMap.expected_names() this tensor fills
        self.param = param
        self.view = view


class WeightMap:
    """Maps checkpoint keys (Hugging Face names) onto the model's parameter storage."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())  # tied weights appear once
        self.packed = getattr(model, "packed_modules_mapping", {})
        self.tied = getattr(model.config, "tie_word_embeddings", False)

    def target(self, key: str) -> WeightTarget | None:
        """None for keys that are expected but hold nothing for us (tied head, derived buffers)."""
        if key.endswith(IGNORED_SUFFIXES) or (self.tied and key == "lm_head.weight"):
            return None
        for part, (fused, shard_id) in self.packed.items():
            if f".{part}." in key:
                name = key.replace(f".{part}.", f".{fused}.")
                param = self.params.get(name)
                if param is None:
                    break
                module = self.model.get_submodule(name.rsplit(".", 1)[0])
                assert isinstance(module, MergedLinear)
                return WeightTarget([f"{name}[{shard_id}]"], param, module.shard_view(param, shard_id))
        param = self.params.get(key)
        if param is None:
            raise KeyError(key)
        return WeightTarget(self._names_of(key), param, param.data)

    def _names_of(self, param_name: str) -> list[str]:
        """A packed parameter stored whole in the checkpoint (GLM-4's gate_up_proj) fills every shard."""
        module = self.model.get_submodule(param_name.rsplit(".", 1)[0])
        if isinstance(module, MergedLinear):
            return [f"{param_name}[{shard_id}]" for shard_id in module.shards]
        return [param_name]

    def expected_names(self) -> set[str]:
        """Every target name a complete checkpoint must fill."""
        return {n for name in self.params for n in self._names_of(name)}


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Strict load: every parameter filled, every key used; problems listed by name."""
    weight_map = WeightMap(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for key, tensor in tensors:
        place(weight_map, key, tensor, loaded, unexpected)
    missing = sorted(weight_map.expected_names() - loaded)
    if missing or unexpected:
        raise ModelLoadError(
            "checkpoint does not match the model: "
            + (f"missing keys {_short(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {_short(unexpected)}" if unexpected else "")
        )


def place(weight_map: WeightMap, key: str, tensor: torch.Tensor, loaded: set[str], unexpected: list[str],
          copy=None) -> None:
    """Copy one checkpoint tensor into its storage, recording what it filled (or that nothing
    wanted it). `copy(target, key, tensor)` does the checked copy (default: copy_checked)."""
    try:
        target = weight_map.target(key)
    except KeyError:
        unexpected.append(key)
        return
    if target is None:
        return
    (copy or copy_checked)(target, key, tensor)
    loaded.update(target.covers)


def copy_checked(target: WeightTarget, key: str, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.view.shape):
        raise ModelLoadError(
            f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.view.shape)}"
        )
    target.view.copy_(tensor)


def _short(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
