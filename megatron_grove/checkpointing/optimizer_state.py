"""Megatron optimizer state in dist checkpoints that load under another EP/TP/DP layout.

Megatron's optimizers save their per-parameter tensors (Adam moments, fp32 master weights) as
sharded tensors keyed by parameter name, which dist_checkpointing reshards freely. Everything
else (param-group hyperparameters, Adam's step) is saved as plain objects in ``common.pt`` in
the *saving* optimizer's structure, and ``dist_checkpointing.load`` merges that structure into
the loaded state. The structure depends on the layout: Megatron builds one sub-optimizer for
dense and one for expert-parallel parameters only when EP > 1, and marks the groups with
``is_expert_parallel``. Loading an EP=2 checkpoint at EP=1 therefore fails in Megatron's
param-group matching (or silently pairs the wrong groups).

Here the optimizer state handed to Megatron's ``load_state_dict`` is rebuilt in the *current*
optimizer's structure: tensors from the checkpoint, group hyperparameters from the current
optimizer (the learning-rate scheduler, restored right after, sets lr and weight decay from
the saved step count), and Adam's iteration count from the checkpoint, which every
sub-optimizer shares (Megatron keeps them synchronised).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

__all__ = ["sharded_optimizer_state", "saved_distributed_format", "optimizer_skeleton",
           "load_optimizer_state"]


class _Loaded:
    """Marks, in a skeleton, a leaf whose value comes from the checkpoint."""


_LOADED = _Loaded()


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _metadata(optimizer, distributed_format: str) -> dict[str, Any]:
    """``chained_optim_avoid_prefix``: without it Megatron keys optimizer state as
    "chained_<i>.<param>", where i counts the sub-optimizers, whose number depends on the EP
    layout (upstream #1517). Megatron adds that prefix anyway whenever
    ``distrib_optim_sharding_type`` names a format that is not fully reshardable, so the key is
    set only for the distributed optimizer (``distributed_format``: "fully_reshardable", state
    gathered per parameter in model space on save and resliced on load, or "dp_reshardable",
    each rank's flat shard)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    metadata: dict[str, Any] = {"chained_optim_avoid_prefix": True}
    if any(isinstance(opt, DistributedOptimizer) for opt in _sub_optimizers(optimizer)):
        metadata["distrib_optim_sharding_type"] = distributed_format
    return metadata


def _ensure_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state before a load.

    Without TE/Apex, ``DistributedOptimizer.state_dict()`` reads ``step`` from torch Adam's
    per-parameter state, which a fresh optimizer does not have yet; Megatron's own dummy-state
    initialiser (a zero-gradient step, used for its FSDP loads) creates it. The dummy values
    are overwritten by the load."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _sub_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not opt.is_stub_optimizer \
                and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def sharded_optimizer_state(optimizer, model_sharded_state: dict, is_loading: bool,
                            distributed_format: str = "fully_reshardable") -> dict:
    """The optimizer's sharded state dict for ``dist_checkpointing.save``/``load``
    (``distributed_format``: see ``checkpoint.optimizer_format``)."""
    if is_loading:
        _ensure_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_sharded_state, is_loading=is_loading,
                                        metadata=_metadata(optimizer, distributed_format))


def saved_distributed_format(saved: Any) -> str | None:
    """The distributed-optimizer format of a checkpoint's plain optimizer state (None: saved by
    the plain optimizer)."""
    if isinstance(saved, dict):
        if "param_state_sharding_type" in saved:
            return saved["param_state_sharding_type"]
        saved = list(saved.values())
    for value in saved if isinstance(saved, list) else ():
        found = saved_distributed_format(value)
        if found is not None:
            return found
    return None


def optimizer_skeleton(request: Any) -> Any:
    """A copy of the optimizer's sharded state dict ``request`` (taken before
    ``dist_checkpointing.load``, which consumes it) with every sharded leaf replaced by a
    marker and every local object unwrapped: the current layout's structure and plain values."""
    if isinstance(request, dict):
        return {key: optimizer_skeleton(value) for key, value in request.items()}
    if isinstance(request, list):
        return [optimizer_skeleton(value) for value in request]
    if isinstance(request, ShardedBase):
        return _LOADED
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    return request


def _saved_step(saved: Any) -> Any:
    """Adam's iteration count in the saved plain optimizer state: ``common_step`` of the
    plain/mixed-precision optimizers, the param groups' ``step`` of the distributed one. All
    sub-optimizers and groups carry the same count; None if the checkpoint has none."""
    steps: list[Any] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("common_step", "step") and not isinstance(value, (dict, list)):
                    steps.append(value)
                else:
                    collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(saved)
    if len({float(step) for step in steps}) > 1:
        raise RuntimeError(f"the checkpoint's optimizer holds different Adam steps {steps}; "
                           "it was not written by a synchronised Megatron optimizer")
    return steps[0] if steps else None


def _child(loaded: Any, key: Any) -> Any:
    """``loaded[key]``, or None where the saved structure has no such place (plain values)."""
    if isinstance(loaded, dict):
        return loaded.get(key)
    if isinstance(loaded, list) and isinstance(key, int) and key < len(loaded):
        return loaded[key]
    return None


def _fill(skeleton: Any, loaded: Any, step: Any) -> Any:
    """``skeleton`` with its markers replaced by the values at the same place in ``loaded``
    and Adam's step set to ``step`` in every torch/Megatron optimizer state dict in it."""
    if skeleton is _LOADED:
        if loaded is None:
            raise RuntimeError("the checkpoint lacks optimizer tensors this layout needs; "
                               "it is partial or was written by another model")
        return loaded
    if isinstance(skeleton, list):
        return [_fill(value, _child(loaded, i), step) for i, value in enumerate(skeleton)]
    if not isinstance(skeleton, dict):
        return skeleton
    filled = {key: _fill(value, _child(loaded, key), step) for key, value in skeleton.items()}
    if "param_groups" in filled and step is not None:
        if "state" in filled:
            filled["state"]["common_step"] = step
        for group in filled["param_groups"]:
            if "step" in group:
                group["step"] = step
    return filled


def _torch_adam_distributed(optimizer) -> list:
    """The sub-optimizers that are Megatron ``DistributedOptimizer``s over torch's Adam (no
    TE/Apex fused Adam: always so on CPU). They keep Adam's iteration count in each param
    group's ``step`` in checkpoints, while torch Adam keeps it per parameter."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [opt for opt in _sub_optimizers(optimizer)
            if isinstance(opt, distrib_optimizer.DistributedOptimizer)
            and not opt.is_stub_optimizer]


def _restore_adam_steps(optimizer) -> None:
    """Give each parameter of a torch-Adam distributed optimizer its own ``step`` tensor equal
    to its group's (a tensor shared by every parameter would be advanced once per parameter)."""
    for opt in _torch_adam_distributed(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                param_state = opt.optimizer.state.get(param)
                if param_state:
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_optimizer_state(optimizer, skeleton: Any, loaded: Any, saved_common: Any) -> None:
    """Load into ``optimizer`` the tensors ``dist_checkpointing.load`` returned (``loaded``,
    requested with the sharded state dict ``skeleton`` was taken from), whatever layout saved
    them; ``saved_common`` is the checkpoint's plain optimizer state
    (``load_common_state_dict(...)["optimizer"]``), read for Adam's step."""
    state = _fill(skeleton, loaded, _saved_step(saved_common))
    with torch.no_grad():  # the fp32 distributed optimizer copies into views of the params
        optimizer.load_state_dict(state)
    _restore_adam_steps(optimizer)
