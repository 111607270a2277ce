"""Packed expert tensors read as per-expert ones.

``transformers`` 5 holds the experts of a Qwen3-MoE layer as two stacked tensors, and
checkpoints may be saved that way::

    model.layers.{i}.mlp.experts.gate_up_proj   [E, 2I, H]   rows [:I] gate, [I:] up
    model.layers.{i}.mlp.experts.down_proj      [E, H, I]

(likewise ``mlp.chunk_experts.{gate_up_proj,down_proj}`` ``[G, 2Fa, H]`` / ``[G, H, Fa]`` for
GroveMoE's adjugates; a ``.weight`` suffix is accepted). :class:`PerExpertView` shows such a
checkpoint under the per-expert names the converter maps (``mlp.experts.{e}.gate_proj.weight``
``[I, H]``, ...), slicing each expert out of the packed tensor on access, so packed and
per-expert checkpoints convert alike and bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Optional

import torch

__all__ = ["PerExpertView", "PACKED_NAME"]

PACKED_NAME = re.compile(r"^(?P<bank>.+\.mlp\.(?:experts|chunk_experts))\."
                         r"(?P<kind>gate_up_proj|down_proj)(?:\.weight)?$")


class PerExpertView(Mapping[str, torch.Tensor]):
    """The tensors of ``source`` (a mapping with ``shapes``, e.g.
    :class:`~megatron_grove.hf_conversion.safetensors_io.HFTensors`) with every packed expert
    tensor replaced by its per-expert slices (module docstring); other tensors pass through."""

    def __init__(self, source: Mapping[str, torch.Tensor]) -> None:
        self._source = source
        # name -> (source name, index into it or None)
        self._parts: dict[str, tuple[str, Optional[tuple]]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        shapes = getattr(source, "shapes", None) or {n: tuple(t.shape) for n, t in source.items()}
        for name, shape in shapes.items():
            match = PACKED_NAME.match(name)
            if match is None or len(shape) != 3:
                self._parts[name], self._shapes[name] = (name, None), tuple(shape)
                continue
            bank, (count, rows, cols) = match["bank"], shape
            if match["kind"] == "down_proj":
                for x in range(count):
                    self._add(f"{bank}.{x}.down_proj.weight", name, (x,), (rows, cols))
                continue
            half = rows // 2
            for x in range(count):
                self._add(f"{bank}.{x}.gate_proj.weight", name, (x, slice(0, half)), (half, cols))
                self._add(f"{bank}.{x}.up_proj.weight", name, (x, slice(half, rows)), (half, cols))

    def _add(self, name: str, source: str, index: tuple, shape: tuple[int, ...]) -> None:
        self._parts[name], self._shapes[name] = (source, index), shape

    @property
    def packed(self) -> bool:
        """Whether any tensor of the source is packed."""
        return any(index is not None for _, index in self._parts.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        source, index = self._parts[name]
        if index is None:
            return self._source[source]
        part = getattr(self._source, "part", None)
        tensor = part(source, index) if part else self._source[source][index]
        return tensor.contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)
