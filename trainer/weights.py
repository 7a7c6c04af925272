"""Copying a state dict into a model, also when ZeRO-3 has partitioned its parameters.

Every weight that enters a model (a stage's ``init_from``, a pretrained tower, a released checkpoint)
goes through ``load_into``: names and shapes are checked first (a partitioned parameter reports its
full shape as ``ds_shape``), so a mismatch is one error naming what differs, never a half-loaded model.
Under ``deepspeed.zero.Init`` a module's parameters are gathered one module at a time and rank 0's
values are written back to every rank's partition, so no rank ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class WeightsMismatch(ValueError):
    """A state dict that does not fit the model it is loaded into; the message lists what differs."""


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape, or the whole shape of a ZeRO-3 partitioned parameter."""
    return tuple(getattr(t, "ds_shape", t.shape))


def is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def persistent_names(module: nn.Module) -> set[str]:
    """The names ``module.state_dict()`` holds (parameters and persistent buffers), without building it:
    a partitioned model's state dict is empty tensors, and non-persistent buffers (rotary ``inv_freq``)
    are never in a checkpoint."""
    names = {n for n, _ in module.named_parameters()}
    for prefix, sub in module.named_modules():
        for n, b in sub.named_buffers(recurse=False):
            if b is not None and n not in sub._non_persistent_buffers_set:
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def check_fits(
    module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, what: str = "weights"
) -> None:
    """Raise ``WeightsMismatch`` listing missing, unexpected (``strict``) and wrongly shaped names."""
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    persistent = persistent_names(module)
    missing = sorted(k for k in own if k in persistent and k not in state) if strict else []
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} vs model {full_shape(own[k])}"
        for k in state
        if k in own and tuple(state[k].shape) != full_shape(own[k])
    )
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected if strict else []), ("shape", shapes)):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            problems.append(f"{label}: {', '.join(names[:5])}{more}")
    if problems:
        raise WeightsMismatch(f"{what} do not fit the model: " + "; ".join(problems))


@torch.no_grad()
def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True, what: str = "weights") -> None:
    """Copy ``state`` into ``module`` (dtypes follow the model); ``strict=False`` loads a subset."""
    check_fits(module, state, strict, what)
    if not is_partitioned(module):
        own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
        return
    import deepspeed
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for prefix, sub in module.named_modules():
        params = dict(sub.named_parameters(recurse=False))
        names = {n: f"{prefix}.{n}" if prefix else n for n in params}
        todo = [n for n in params if names[n] in state]
        if not todo:
            continue
        with deepspeed.zero.GatheredParameters([params[n] for n in todo], modifier_rank=0):
            if rank0:
                for n in todo:
                    params[n].copy_(state[names[n]].to(params[n].dtype))
    for name, buf in module.named_buffers():
        if name in state:
            buf.copy_(state[name].to(buf.dtype))
