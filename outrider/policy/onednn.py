"""oneDNN's fp32 matmul for linear layers on x86 CPUs.

PyTorch sends an fp32 `F.linear` on CPU to its BLAS (MKL in the x86 wheels). On the small-batch shapes of a tiny
model's decoding step (64 rows, hidden 128–256) oneDNN's kernel is 1.2–1.7× faster on this project's AMD EPYC
machine, and more again when the weight is first reordered into oneDNN's blocked layout (`pack`). Same fp32
arithmetic: results differ from BLAS only by summation order (a few ulp).

Both ops are PyTorch's own (`torch.ops.mkldnn`, present in builds with oneDNN); `available()` tries them once,
and every caller falls back to `F.linear` where they are missing or refuse the dtype, or where oneDNN is switched
off (`torch.backends.mkldnn.flags(enabled=False)`). Only on x86-64: Arm builds back these ops with other kernels,
which were not measured.
"""

from __future__ import annotations

import platform
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's packed linear runs here for `dtype`, agrees with `F.linear`, and is switched on."""
    return _runs(dtype) and bool(getattr(torch.backends.mkldnn, "enabled", True))


@lru_cache(maxsize=None)
def _runs(dtype: torch.dtype) -> bool:
    if dtype != torch.float32 or platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        # fixed values, not torch.randn: the check must not move the global RNG
        x = torch.linspace(-1, 1, 24, dtype=torch.float32).view(3, 8)
        w = torch.linspace(-2, 2, 128, dtype=torch.float32).view(16, 8).flip(0)
        b = torch.linspace(0, 1, 16, dtype=torch.float32)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(y, F.linear(x, w, b), atol=1e-5))


def pack(weight: Tensor, batch: int) -> Tensor:
    """`weight` [out, in] reordered for `linear` (a copy: later updates of `weight` do not reach it). `batch`
    is the expected number of input rows, a hint for the layout; any number of rows is accepted."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)


def pays(weight: Tensor, rows: int) -> bool:
    """Whether packing `weight` pays for itself over `rows` input rows in all (summed over the calls). Packing
    costs about 0.2 ms per weight whatever its size (a fixed cost: 128×128 and 128×1024 alike); the packed kernel
    saves a share of the BLAS time that grows with the weight. Below `PACK_MIN_NUMEL` elements it saves nothing
    (BLAS is as fast or faster, per row: its per-call overhead is smaller), so those weights are never packed;
    from there on, the multiply-adds have to reach `PACK_MIN_MACS`."""
    return weight.numel() >= PACK_MIN_NUMEL and rows * weight.numel() >= PACK_MIN_MACS


# multiply-adds from which packing pays: a third of their BLAS time at ~120 GFLOP/s has to exceed the 0.2 ms a
# pack costs (64 rows × 48 positions × a 256×768 weight is 6e8 and pays; 8 rows × 16 positions × 128×1024 is
# 1.7e7 and does not)
PACK_MIN_MACS = 5e7
# the smallest weight worth packing (128×1024): below it the packed kernel saves nothing per row over BLAS
# (the measurements are in docs/benchmarks.md, "What makes outrider faster")
PACK_MIN_NUMEL = 2 ** 17


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ W.T + bias` for `weight` = `pack(W, ...)` through oneDNN, or for a plain `W` through `F.linear`;
    `x` [..., in]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
