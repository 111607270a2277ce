"""Planning a run without allocating it: parameters, per-rank memory (:mod:`.plan`) and the
analytic all-to-all volume of each dispatch strategy (:mod:`.dispatch_volume`)."""

from megatron_grove.planner.plan import (
                                         MemoryPlan,
                                         ParamPlan,
                                         activation_bytes_per_layer,
                                         format_plan,
                                         micro_batches_in_flight,
                                         plan_memory,
                                         plan_parameters,
                                         stage_layers,
)

__all__ = ["ParamPlan", "MemoryPlan", "plan_parameters", "plan_memory",
           "activation_bytes_per_layer", "format_plan", "stage_layers", "micro_batches_in_flight"]
