"""Session-wide test set-up: CPU tests everywhere, GPU tests where there is a GPU.

* Every test here runs on CPU, also on a GPU host: the in-process and forked-worker tests ask
  for the CPU device, and the helpers hide any GPU from the processes they start (``processes``).
  Triton kernels on CPU tensors need Triton's interpreter, and ``triton.jit`` reads
  ``TRITON_INTERPRET`` when a kernel is *defined* (when :mod:`megatron_grove.kernels` is first
  imported), so it is set here, before any test module imports anything.
* Tests marked ``gpu`` (``tests/test_gpu.py``) run compiled kernels and CUDA layers in a child
  process of their own; they skip, naming the missing GPU, where there is none.
* Order: the files with the most ``e2e`` tests run first (each file's tests together, in
  order), so that the two test workers of ``scripts/test.sh`` do not end on one long file.
* Tiers: ``e2e`` marks end-to-end tests (real torchrun, a real model, whole tools); every other
  CPU test is marked ``unit``: ``pytest -m unit`` is the quick tier.
"""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(items):
    e2e_per_file: dict[str, int] = {}
    for item in items:
        if item.get_closest_marker("e2e") is None and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.unit)
        e2e_per_file.setdefault(item.path, 0)
        e2e_per_file[item.path] += item.get_closest_marker("e2e") is not None
    # Files with the most end-to-end tests first, each file's tests together and in order: the
    # test workers (scripts/test.sh) take the long files early and finish on short ones together.
    order = {path: i for i, path in enumerate(e2e_per_file)}
    items.sort(key=lambda item: (-e2e_per_file[item.path], order[item.path]))
