"""The CMoE carving method (docs/design.md, "CMoE"): its shape :class:`CarveSpec` (SxAyEz) and
the carving of one dense SwiGLU FFN (:func:`carve_ffn`).

``y = W_d (silu(W_g x) * (W_u x))`` with ``W_g, W_u`` ``[d_h, H]`` and ``W_d`` ``[H, d_h]``
becomes ``S`` shared experts (kept together as one FFN of ``S * m`` neurons) and ``N - S``
routed experts of ``m = ceil(d_h / N)`` neurons each. When ``N`` does not divide ``d_h``,
``N * m - d_h`` zero neurons (zero gate, up and down weights, so they add exactly nothing) are
appended first: no neuron of the dense FFN is dropped. Shared experts take the ``S * m``
neurons of highest activation rate; the rest are clustered into equal routed experts; the
router is fitted from the calibration data (:class:`~.spec.Router`):

* ``linear`` (default): ``s = x W^T + c`` fitted in closed form (ridge regression) to each
  expert's true activation mass ``sum_{j in e} |h_j|`` on the calibration tokens
  (:func:`~.router_fit.linear_router`);
* ``paper``: CMoE's representative neuron per expert
  (:func:`~.router_fit.representative_neurons`).

Invariant: shared + every routed expert at weight 1 == the dense FFN, whatever the router.

The carved model routes with ``moe.router_type: cmoe_linear`` (``cmoe`` for the paper's router);
its ``moe`` config is :meth:`CarveSpec.moe_config`, its Hugging Face-style export
:func:`~.export.write_hf_export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_grove.carving.clustering import balanced_clusters
from megatron_grove.carving.neurons import (
    activation_markers,
    activation_rates,
    by_rate,
    pad_neurons,
    padded_hidden,
)
from megatron_grove.carving.router_fit import (
    expert_activation_scores,
    linear_router,
    representative_neurons,
    router_rows,
)
from megatron_grove.carving.spec import Router, check_slots, default_activation_topk, slot_neurons
from megatron_grove.carving.weights import carved_ffn_to_hf, carved_ffn_to_megatron
from megatron_grove.config import MoEConfig
from megatron_grove.hf_conversion.safetensors_io import write_hf_checkpoint

__all__ = ["CarveSpec", "CarvedFFN", "carve_ffn", "split_ffn", "write_hf_export"]


_ROUTER_SCORES = {  # config.json cmoe.router_scores: how the export's router tensors route
    Router.LINEAR: "softmax over weight x + score_bias, top-k of scores + expert_bias, "
                   "weight 1 + score * expert_scale",
    Router.PAPER: "softmax over |silu(gate_rows x) * (up_rows x)|, top-k of scores + "
                  "expert_bias, weight 1 + score * expert_scale"}


@dataclass(frozen=True)
class CarveSpec:
    """SxAyEz: ``shared`` S, ``active`` A routed experts per token, ``experts`` N in total; a
    :class:`~.pipeline.CarvingMethod`."""

    shared: int
    active: int
    experts: int
    activation_topk: int | None = None  # K_a; None = d_ffn // 10
    router: Router = Router.LINEAR

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", Router(self.router))
        check_slots(self.shared, self.experts, self.active, self.experts - self.shared,
                    "the routed experts, --experts minus --shared")

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    def active_neurons(self, d_ffn: int) -> int:
        """K_a: ``activation_topk``, by default ``d_ffn // 10`` (at least 1)."""
        return default_activation_topk(self.activation_topk, d_ffn)

    def neurons_per_expert(self, d_ffn: int) -> int:
        """m = ceil(d_ffn / N): the last ``N * m - d_ffn`` slots are zero neurons."""
        return slot_neurons(d_ffn, self.experts)

    def describe(self, d_ffn: int) -> dict:
        """The shape's fields of the carving record."""
        return {"activation_topk": self.active_neurons(d_ffn),
                "neurons_per_expert": self.neurons_per_expert(d_ffn)}

    def carve_layer(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    inputs: torch.Tensor, hidden: torch.Tensor | None) -> CarvedFFN:
        """One FFN (:func:`carve_ffn`)."""
        return carve_ffn(w_gate, w_up, w_down, inputs, self.shared, self.experts,
                         self.active_neurons(w_gate.shape[0]), router=self.router, hidden=hidden)

    def layer_to_megatron(self, carved: CarvedFFN, prefix: str) -> dict[str, torch.Tensor]:
        return carved_ffn_to_megatron(carved, prefix)

    def moe_config(self, d_ffn: int) -> MoEConfig:
        """The carved model's ``moe`` section: ``N - S`` routed experts of ``m`` neurons, the
        shared expert of ``S * m``, a CMoE router."""
        m = self.neurons_per_expert(d_ffn)
        return MoEConfig(num_experts=self.experts - self.shared, router_topk=self.active,
                         ffn_hidden_size=m, router_type=self.router.router_type,
                         num_expert_groups=0,
                         shared_expert_ffn_hidden_size=self.shared * m if self.shared else None,
                         router_score_function="softmax", bias_update_rule="paper")

    def write_extras(self, folder: Path, hf_config: dict, hf_state: dict[str, torch.Tensor],
                     carved: list[CarvedFFN], tokenizer_dir: Path) -> None:
        """``folder/hf``: the Hugging Face-style export (:func:`write_hf_export`)."""
        write_hf_export(tokenizer_dir, hf_config, hf_state, carved, self, folder / "hf")


@dataclass
class CarvedFFN:
    """One carved FFN. ``E = N - S`` routed experts of ``m`` neurons, hidden size ``H``.

    Router: ``linear`` has ``router_weight`` W and ``router_bias`` c (``router_up`` None);
    ``paper`` has the representative neurons' L2-normalised gate rows in ``router_weight`` and
    up rows in ``router_up`` (``router_bias`` None)."""

    shared_gate: torch.Tensor  # [S*m, H]
    shared_up: torch.Tensor  # [S*m, H]
    shared_down: torch.Tensor  # [H, S*m]
    expert_gate: torch.Tensor  # [E, m, H]
    expert_up: torch.Tensor  # [E, m, H]
    expert_down: torch.Tensor  # [E, H, m]
    router_weight: torch.Tensor  # [E, H]
    neuron_order: torch.Tensor  # [N*m]: padded-neuron index of each carved slot (shared first,
    #                             then expert 0's m neurons, ...); indices >= d_h are zero padding
    router_up: Optional[torch.Tensor] = None  # [E, H], paper router only
    router_bias: Optional[torch.Tensor] = None  # [E], linear router only

    @property
    def num_routed(self) -> int:
        return self.expert_gate.shape[0]

    @property
    def router(self) -> Router:
        return Router.PAPER if self.router_up is not None else Router.LINEAR


def split_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              shared: torch.Tensor, members: torch.Tensor,
              router: tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]
              ) -> CarvedFFN:
    """The (padded) FFN ``w_gate``/``w_up`` ``[d, H]``, ``w_down`` ``[H, d]`` cut into the
    shared expert of neurons ``shared`` ``[S*m]`` and routed experts ``members`` ``[E, m]``;
    ``router`` = (weight ``[E, H]``, up rows ``[E, H]`` or None, bias ``[E]`` or None)."""
    router_weight, router_up, router_bias = router
    return CarvedFFN(
        shared_gate=w_gate[shared], shared_up=w_up[shared], shared_down=w_down[:, shared],
        expert_gate=w_gate[members], expert_up=w_up[members],
        expert_down=w_down[:, members].permute(1, 0, 2).contiguous(),
        router_weight=router_weight, router_up=router_up, router_bias=router_bias,
        neuron_order=torch.cat([shared, members.flatten()]))


@torch.no_grad()
def carve_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              calibration_inputs: torch.Tensor, num_shared: int, num_experts: int,
              activation_topk: int, router: Router | str = Router.LINEAR,
              hidden: Optional[torch.Tensor] = None) -> CarvedFFN:
    """Carve one FFN (deterministic: the same inputs give bitwise the same result).

    Args:
        w_gate, w_up: ``[d_h, H]``; w_down: ``[H, d_h]`` (fp32 recommended).
        calibration_inputs: ``[T, H]`` inputs of this FFN on calibration text.
        num_shared: S (>= 0); num_experts: N (> S), shared included.
        activation_topk: K_a, neurons each calibration token marks as active.
        router: a :class:`~.spec.Router` (or its value).
        hidden: ``[T, d_h]`` ``silu(x W_g^T) * (x W_u^T)`` if already computed (e.g. during
            the calibration forward); None computes it.
    """
    router = Router(router)
    check_slots(num_shared, num_experts, 1, num_experts - num_shared, "")
    d_h = w_gate.shape[0]
    m = slot_neurons(d_h, num_experts)
    x = calibration_inputs.float()
    hidden = padded_hidden(x, w_gate.float(), w_up.float(), num_experts * m, hidden)
    w_gate, w_up, w_down = pad_neurons(w_gate.float(), w_up.float(), w_down.float(),
                                       num_experts * m)
    markers = activation_markers(hidden, min(activation_topk, d_h))
    order = by_rate(activation_rates(markers), torch.arange(num_experts * m))
    shared = order[:num_shared * m].sort().values
    routed = order[num_shared * m:].sort().values
    num_routed = num_experts - num_shared
    assignment = balanced_clusters(markers[:, routed], num_routed)
    members = torch.stack([routed[assignment == e] for e in range(num_routed)])  # [E, m]
    if router is Router.PAPER:
        reps = representative_neurons(markers[:, routed], assignment, num_routed,
                                      eligible=routed < d_h)
        fitted = (*router_rows(w_gate, w_up, routed[reps]), None)
    else:
        weight, bias = linear_router(x, expert_activation_scores(hidden, members))
        fitted = (weight, None, bias)
    return split_ffn(w_gate, w_up, w_down, shared, members, fitted)


def write_hf_export(tokenizer_dir: Path, hf_config: dict, hf_state: dict,
                    carved: list[CarvedFFN], spec: CarveSpec, folder: Path) -> None:
    """The Hugging Face-style export: dense tensors as in ``hf_state``, FFNs as CMoE experts,
    the tokenizer files of ``tokenizer_dir``."""
    tensors = {k: v for k, v in hf_state.items() if ".mlp." not in k}
    for i, ffn in enumerate(carved):
        tensors.update(carved_ffn_to_hf(ffn, f"model.layers.{i}.mlp."))
    m = spec.neurons_per_expert(hf_config["intermediate_size"])
    config = dict(hf_config, cmoe={
        "num_shared_experts": spec.shared, "num_routed_experts": spec.experts - spec.shared,
        "num_experts_per_tok": spec.active, "expert_intermediate_size": m,
        "dense_intermediate_size": hf_config["intermediate_size"],
        "router": spec.router.value, "router_scores": _ROUTER_SCORES[spec.router]})
    write_hf_checkpoint(folder, config, tensors, tokenizer_dir=tokenizer_dir)
