"""Analytic all-to-all volume of an MoE layer under uniform routing
(docs/design.md, "Performance model").

A token picks ``k`` distinct experts of ``E`` uniformly at random. Experts are split into
``ep`` contiguous blocks of ``E/ep`` (one per expert-parallel rank) and into ``G`` contiguous
groups of ``E/G`` (one adjugate each). The number of distinct blocks of size ``E/n`` hit by
the ``k`` choices has expectation

    hits(E, k, n) = n * (1 - C(E - E/n, k) / C(E, k))

(each block is missed with probability C(E - E/n, k) / C(E, k)). Copies of a token the
dispatcher sends (local copies included; a share (ep - 1)/ep of them crosses the wire):

* ``alltoall`` (Megatron's ``MoEAlltoAllTokenDispatcher``), plain MoE: ``k``, one per
  (token, expert);
* ``alltoall`` with Grove adjugates as virtual experts (what :class:`GroveMoELayer` does with
  Megatron's dispatcher): ``k + hits(E, k, G)``, one more copy per group hit;
* ``grove_alltoall`` (group-aware, once per destination rank; adjugates live with their
  group, so they cost nothing): ``hits(E, k, ep)``; ``grove_hierarchical`` on one node too
  (across nodes: ``hits(E, k, nodes)`` rows, then forwarded inside the nodes);
* ``allgather``: every token reaches every EP rank, ``ep`` copies.

Each strategy states its figures beside its class
(:meth:`~megatron_grove.moe.dispatchers.base.GroveDispatcher.expected_copies`); this module
reads them from the registry.

E=128, k=8: ``hits`` over EP ranks is 1.99 / 3.63 / 5.34 / 6.60 at EP = 2 / 4 / 8 / 16, and
groups hit is 7.78 at G = 64, 6.60 at G = 16.
"""

from __future__ import annotations

import dataclasses

from megatron_grove.moe.dispatchers import GROVE_DISPATCHERS
from megatron_grove.moe.dispatchers.base import expected_blocks_hit

__all__ = ["expected_blocks_hit", "copies_per_token", "DispatchVolume", "dispatch_volume"]


def copies_per_token(dispatcher: str, num_experts: int, topk: int, ep: int,
                     num_groups: int = 0) -> float:
    """Expected copies of one token the dispatcher sends per MoE layer (local ones included),
    from the strategy's own table entry (:meth:`GroveDispatcher.expected_copies`), the EP group
    on one node."""
    try:
        strategy = GROVE_DISPATCHERS[dispatcher]
    except KeyError:
        raise ValueError(f"unknown dispatcher {dispatcher!r}: {', '.join(GROVE_DISPATCHERS)}"
                         ) from None
    return strategy.expected_copies(num_experts, topk, num_groups, ep).copies


@dataclasses.dataclass(frozen=True)
class DispatchVolume:
    """Per rank and per training step, all MoE layers, forward and backward."""

    dispatcher: str
    expert_parallel_size: int
    copies_per_token: float  # per MoE layer, local copies included
    tokens_per_rank: int  # tokens entering each MoE layer on one rank per step
    bytes_per_copy: int  # hidden_size x bytes per activation element
    collectives_per_layer: int  # dispatch + combine, forward and backward = 4 (6 with full recompute)
    bytes_per_step: float  # sent by one rank, local copies included
    off_rank_bytes_per_step: float  # the share that crosses the wire: (ep - 1) / ep

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def dispatch_volume(dispatcher: str, num_experts: int, topk: int, ep: int, num_groups: int,
                    moe_layers: int, tokens_per_rank: int, hidden_size: int,
                    bytes_per_element: int, recompute_forward: bool = False) -> DispatchVolume:
    """All-to-all bytes one rank sends per step: ``tokens_per_rank x copies x hidden x bytes``
    per collective; each MoE layer runs four (dispatch and combine, each in forward and
    again, transposed, in backward), six when full recompute runs its forward twice."""
    copies = copies_per_token(dispatcher, num_experts, topk, ep, num_groups)
    per_copy = hidden_size * bytes_per_element
    collectives = 6 if recompute_forward else 4
    total = collectives * moe_layers * tokens_per_rank * copies * per_copy
    return DispatchVolume(
        dispatcher=dispatcher, expert_parallel_size=ep, copies_per_token=copies,
        tokens_per_rank=tokens_per_rank, bytes_per_copy=per_copy, collectives_per_layer=collectives,
        bytes_per_step=total, off_rank_bytes_per_step=total * (ep - 1) / ep)
