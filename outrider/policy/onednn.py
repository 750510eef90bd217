"""oneDNN's fp32 matmul for linear layers on x86 CPUs.

PyTorch sends an fp32 `F.linear` on CPU to its BLAS (MKL in the x86 wheels). On the small-batch shapes of a tiny
model's decoding step (64 rows, hidden 128–256) oneDNN's kernel is 1.2–1.7× faster on this project's AMD EPYC
machine, and more again when the weight is first reordered into oneDNN's blocked layout (`pack`), which is what
inductor's CPU freezing pass does for inference graphs. Same fp32 arithmetic: results differ from BLAS only by
summation order (a few ulp).

Both ops are PyTorch's own (`torch.ops.mkldnn`, present in builds with oneDNN); `available()` tries them once,
and every caller falls back to `F.linear` where they are missing or refuse the dtype.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=None)
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's packed linear runs here for `dtype` and agrees with `F.linear`."""
    if dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))


def pack(weight: Tensor, batch: int) -> Tensor:
    """`weight` [out, in] reordered for `linear` (a copy: later updates of `weight` do not reach it). `batch`
    is the expected number of input rows, a hint for the layout; any number of rows is accepted."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ W.T + bias` with `packed` = `pack(W, ...)`; `x` [..., in]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
