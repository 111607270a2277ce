"""Where a process runs: device choice, CPU workarounds, torch.distributed + Megatron's groups,
and the fast paths (Triton, TransformerEngine, FP8) the device allows.

* :mod:`.distributed` — process groups, one-process worlds for tools, collective failures;
* :mod:`.cpu_patches` — every CPU workaround Megatron-Core needs, applied when the run's
  device is CPU;
* :mod:`.acceleration` — ``kernels.backend`` / ``precision.*`` resolved per device.
"""

from megatron_grove.runtime.distributed import (
                                                ParallelRuntime,
                                                collective_failure,
                                                current_runtime,
                                                destroy_parallel,
                                                initialize_parallel,
                                                resolve_device,
                                                single_process_world,
)

__all__ = ["ParallelRuntime", "resolve_device", "initialize_parallel", "current_runtime",
           "destroy_parallel", "single_process_world", "collective_failure"]
