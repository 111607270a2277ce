"""What every carving shape shares: the router choice and the expert slots.

Both methods (:mod:`.cmoe`, :mod:`.grove`) size their experts from ``N`` CMoE-sized slots of
``m = ceil(d_ffn / N)`` neurons, ``S`` of which form the shared expert, and fit one of the two
training-free routers (:class:`Router`). The router choice is validated here and only here.
"""

from __future__ import annotations

import enum

__all__ = ["Router", "check_slots", "slot_neurons", "default_activation_topk"]


class Router(str, enum.Enum):
    """The carving's training-free router (``--router``); its value is the CLI word, its
    :attr:`router_type` the ``moe.router_type`` the carved model is trained with
    (:mod:`megatron_grove.moe.cmoe_router`)."""

    LINEAR = "linear"  # ridge fit of the experts' activation mass (router_fit.linear_router)
    PAPER = "paper"  # CMoE's representative neuron per expert (router_fit.representative_neurons)

    @classmethod
    def _missing_(cls, value: object) -> "Router":
        raise ValueError(f"--router {value}: allowed {', '.join(r.value for r in cls)}")

    @property
    def router_type(self) -> str:
        """``moe.router_type`` of the carved model: ``cmoe_linear`` or ``cmoe`` (paper)."""
        return "cmoe" if self is Router.PAPER else "cmoe_linear"

    def __str__(self) -> str:
        return self.value


def check_slots(shared: int, experts: int, active: int, routed: int, routed_help: str) -> None:
    """The checks both shapes need: ``0 <= S < N`` and ``1 <= k <= routed`` experts
    (``routed_help`` says how the routed experts are counted, for the message)."""
    if not 0 <= shared < experts:
        raise ValueError(f"--shared {shared}: allowed 0..{experts - 1} "
                         f"(fewer than --experts {experts})")
    if not 1 <= active <= routed:
        raise ValueError(f"--active {active}: allowed 1..{routed} ({routed_help})")


def slot_neurons(d_ffn: int, experts: int) -> int:
    """m = ceil(d_ffn / N): the neurons of one CMoE-sized slot."""
    return -(-d_ffn // experts)


def default_activation_topk(activation_topk: int | None, d_ffn: int) -> int:
    """K_a: ``activation_topk``, by default ``d_ffn // 10`` (at least 1; the paper: 1000 of
    11008)."""
    return activation_topk or max(1, d_ffn // 10)
