"""Where a process runs: device choice, CPU workarounds, torch.distributed + Megatron's groups,
and the fast paths (Triton, TransformerEngine, FP8) the device allows.

* :mod:`.distributed` — process groups, one-process worlds for tools, small object
  collectives, collective failures and the failing rank's note to its peers;
* :mod:`.cpu_patches` — every CPU workaround Megatron-Core needs, applied when the run's
  device is CPU;
* :mod:`.acceleration` — ``kernels.backend`` / ``precision.*`` resolved per device.
"""

from megatron_grove.runtime.distributed import (
    ParallelRuntime,
    announce_failure,
    collective_failure,
    current_runtime,
    destroy_parallel,
    disk_full,
    first_failure,
    initialize_parallel,
    object_from_rank0,
    objects_from_all_ranks,
    resolve_device,
    signal_when_parent_dies,
    single_process_world,
)

__all__ = ["ParallelRuntime", "resolve_device", "initialize_parallel", "current_runtime",
           "destroy_parallel", "single_process_world", "collective_failure",
           "objects_from_all_ranks", "object_from_rank0", "announce_failure", "first_failure",
           "disk_full", "signal_when_parent_dies"]
