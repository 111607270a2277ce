"""Session-wide test set-up.

Without a GPU, Triton kernels run only under Triton's interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is *defined* (when :mod:`kernels` is first imported), so it
is set here, before any test module imports anything. Subprocesses (torchrun tests) inherit it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
