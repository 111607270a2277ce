"""What the scripts in ``benchmarks/`` measure, as library functions (the scripts are thin
command lines over them): :mod:`.dispatch` (copies, bytes and time of the dispatch
strategies), :mod:`.kernels` (Triton kernels vs eager torch and ``torch.compile``, GPU) and
:mod:`.cmoe` (carved vs dense perplexity and carving time on SmolLM2)."""
