"""Small C kernels for the lean decoder's CPU steps, compiled on first use with the machine's C compiler and loaded
through ctypes.

Built once per machine (about a second) into ``$XDG_CACHE_HOME/outrider/native`` (default ``~/.cache``), under a
name that hashes the sources, the compiler's version, the flags and the CPU's features, so an edit, another
compiler or another CPU rebuilds. OpenMP regions run on the OpenMP runtime PyTorch has already loaded (its Linux
wheels bundle libgomp under the system's soname), so the kernels share PyTorch's threads instead of starting
their own.

Everything here is optional: with no compiler, a failed build, a non-x86 machine or ``OUTRIDER_NATIVE=0``,
`kernels()` returns None and callers keep their PyTorch path. Set ``OUTRIDER_NATIVE=1`` to have a failed build
raise instead of falling back silently.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from outrider.errors import OutriderError

log = logging.getLogger(__name__)

SOURCES = ("attention.c", "draw.c", "residual.c")
HEADERS = ("vector_math.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")
# tried in order: with glibc's vector math library, then without it (scalar expf)
LINK_VARIANTS = (("-lmvec", "-lm"), ("-DOUTRIDER_NO_MVEC", "-lm"))

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "").split()
    for name in ([cc[0]] if cc else []) + ["cc", "gcc", "clang"]:
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outrider" / "native"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), part of the build's name: the library is built for this CPU
    (-march=native), and a cache directory shared with an older CPU must not hand it over."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    here = Path(__file__).parent
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for part in [version, platform.machine(), _cpu_flags(), *FLAGS, *(here / s for s in SOURCES + HEADERS)]:
        digest.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    target = _cache_dir() / f"outrider_kernels_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build under a temporary name and rename: concurrent processes never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for variant in LINK_VARIANTS:
            result = subprocess.run([cc, *FLAGS, *(str(here / s) for s in SOURCES), "-o", tmp, *variant],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.attention.argtypes = [p, p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, f, i]
    lib.attention.restype = i
    lib.draw.argtypes = [p, ctypes.c_int64, i, i, f, p, p, p, p, i]
    lib.draw.restype = None
    lib.add_rms.argtypes = [p, p, p, i, i, f, i]
    lib.add_rms.restype = None
    lib.silu_mul.argtypes = [p, p, i, i, i]
    lib.silu_mul.restype = None
    return lib


def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are unavailable or switched off (see the module's docstring)."""
    setting = os.environ.get("OUTRIDER_NATIVE", "auto").lower()
    if setting in {"0", "false", "off", "no"} or platform.machine().lower() not in {"x86_64", "amd64"}:
        return None
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"] = None
            cc = _compiler()
            try:
                if cc is None:
                    raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
                _loaded["lib"] = _bind(ctypes.CDLL(str(_build(cc))))
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                if setting in {"1", "true", "on", "yes"}:
                    raise OutriderError(f"OUTRIDER_NATIVE=1: building the native kernels failed ({e})") from e
                log.info("native kernels unavailable (%s); using the PyTorch path", e)
        return _loaded["lib"]


def attention(lib: ctypes.CDLL, qkv: Tensor, cos_table: Tensor, sin_table: Tensor, positions: Tensor,
              keys: Tensor, values: Tensor, bias: Tensor | None, start: int, first: int, heads: int,
              scale: float) -> Tensor:
    """`attention.c`'s fused causal attention (layouts there) for `qkv` [B, S, ·] at slots start .. start+S-1 of
    `keys`/`values` [B, KV, L, D], which it writes; returns the outputs of new positions first .. S-1,
    [B, S - first, heads·D]. Every operand must be float32 and C-contiguous (`bias` [B, L] rows: batch stride L)."""
    B, S = qkv.shape[:2]
    kv_heads, L, D = keys.shape[1:]
    floats = (qkv, cos_table, sin_table, keys, values) + (() if bias is None else (bias,))
    if not (all(x.is_contiguous() for x in floats[:5] + (positions,)) and positions.dtype == torch.int64
            and all(x.dtype == torch.float32 and x.is_cpu for x in floats)
            and (bias is None or bias.stride() == (L, 1))):
        raise ValueError("native.attention: operands must be float32 CPU tensors, contiguous (bias: [B, L] rows), "
                         "positions int64")
    out = torch.empty(B, S - first, heads * D, dtype=qkv.dtype, device=qkv.device)
    failed = lib.attention(qkv.data_ptr(), cos_table.data_ptr(), sin_table.data_ptr(), positions.data_ptr(),
                           keys.data_ptr(), values.data_ptr(), 0 if bias is None else bias.data_ptr(),
                           out.data_ptr(), B, S, heads, kv_heads, D, L, start, first, scale,
                           torch.get_num_threads())
    if failed:
        raise MemoryError("native.attention: no memory for the attention scores")
    return out


def draw(lib: ctypes.CDLL, logits: Tensor, temperature: float, uniform: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`draw.c`'s fused draw: token [B] (int64), its log-prob and the entropy [B] at `temperature` > 0, from
    float32 `logits` [B, V] (rows contiguous) and `uniform` [B, 1] in [0, 1)."""
    B, V = logits.shape
    if not (logits.dtype == uniform.dtype == torch.float32 and logits.is_cpu and uniform.is_cpu
            and logits.stride(1) == 1 and uniform.is_contiguous()):
        raise ValueError("native.draw: logits and uniform must be float32 CPU tensors, logits with contiguous rows")
    token = torch.empty(B, dtype=torch.int64)
    logprob, entropy = torch.empty(B), torch.empty(B)
    lib.draw(logits.data_ptr(), logits.stride(0), B, V, temperature, uniform.data_ptr(), token.data_ptr(),
             logprob.data_ptr(), entropy.data_ptr(), torch.get_num_threads())
    return token, logprob, entropy


def add_rms(lib: ctypes.CDLL, h: Tensor, y: Tensor | None, eps2: float) -> Tensor:
    """`h += y` in place (y None: no add), then h / sqrt(Σh² + eps2) per row: the unit RMSNorm of a decoder
    that folded the norm's weight and √H into the next projection (eps2 = H·ε). `h`, `y` [..., H] contiguous."""
    if not (h.is_contiguous() and h.dtype == torch.float32 and h.is_cpu
            and (y is None or (y.is_contiguous() and y.shape == h.shape and y.dtype == h.dtype))):
        raise ValueError("native.add_rms: h and y must be contiguous float32 CPU tensors of one shape")
    out = torch.empty_like(h)
    lib.add_rms(h.data_ptr(), 0 if y is None else y.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1],
                h.shape[-1], eps2, torch.get_num_threads())
    return out


def silu_mul(lib: ctypes.CDLL, gate_up: Tensor) -> Tensor:
    """silu(gate) · up for `gate_up` = [gate | up] along the last axis (contiguous): [..., I]."""
    if not (gate_up.is_contiguous() and gate_up.dtype == torch.float32 and gate_up.is_cpu):
        raise ValueError("native.silu_mul: gate_up must be a contiguous float32 CPU tensor")
    inner = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inner)
    lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], inner,
                 torch.get_num_threads())
    return out
