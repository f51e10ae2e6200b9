"""Whether this machine has an sm_90 (Hopper) GPU: the Gluon kernels' tests need one."""
import pytest

from benchmarks.common import is_sm90

requires_sm90 = pytest.mark.skipif(not is_sm90(), reason="needs an sm_90 GPU")
