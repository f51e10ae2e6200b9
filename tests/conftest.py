"""Test setup: Triton kernels run in its CPU interpreter when there is no GPU.

The variable must be set before triton is imported anywhere, hence here and not in a test.
"""
import os

try:  # a plain `import torch` is fine here; it does not import triton.
    import torch

    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_gpu = False

if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _has_gpu:
            item.add_marker(skip_gpu)

try:  # CI replays the same hypothesis examples every run; local runs keep exploring new ones
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
