"""FX lowering passes and the `xyserve::*` custom ops they target."""
from lowering import ops  # noqa: F401  (defines the torch.ops.xyserve namespace)
