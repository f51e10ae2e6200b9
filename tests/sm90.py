"""Whether this machine has an sm_90 (Hopper) GPU: the Gluon kernels' tests need one."""
import pytest
import torch


def is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


requires_sm90 = pytest.mark.skipif(not is_sm90(), reason="needs an sm_90 GPU")
