"""CMoE: carve a dense SwiGLU FFN into shared + routed experts with a training-free router."""

from megatron_grove.cmoe.calibration import activation_markers, activation_rates, ffn_hidden
from megatron_grove.cmoe.carve import CarvedFFN, carve_ffn, pad_neurons
from megatron_grove.cmoe.clustering import balanced_assignment, balanced_clusters
from megatron_grove.cmoe.router_init import representative_neurons, router_rows

__all__ = ["activation_markers", "activation_rates", "ffn_hidden", "CarvedFFN", "carve_ffn",
           "pad_neurons", "balanced_assignment", "balanced_clusters", "representative_neurons",
           "router_rows"]
