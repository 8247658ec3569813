"""Triton kernels of the fused SPAM and Stable-SPAM steps (imported only by `fused`, and only when triton is).

Every kernel works on one contiguous tensor, in blocks of BLOCK entries, and computes in float32 whatever the storage
dtype; the math is that of `functional.py` (see `fused` for how the steps use the kernels).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["clipped_sq_norm_kernel", "spam_kernel", "stable_kernel"]


@triton.jit
def _store(ptrs, x, mask):
    # float32 -> bfloat16 rounded to nearest even by hand, so that every backend (the interpreter too) agrees.
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _load_moments(m_ptr, v_ptr, offs, mask, ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """The moments in float32: zeros on a reset step (ZERO), else loaded."""
    if ZERO:
        m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return m, v


@triton.jit
def spam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, w1, beta2, w2, eps, step_size, decay, threshold,
                CLIP: tl.constexpr, ZERO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = _load_moments(m_ptr, v_ptr, offs, mask, ZERO, BLOCK)
    if CLIP:
        bound = tl.sqrt_rn(v * threshold)
        g = tl.maximum(tl.minimum(g, bound), -bound)
    # m <- lerp(m, g, w1) and v <- beta2 * v + w2 * g^2 as torch computes them (w1 = 1 - beta1, w2 = 1 - beta2).
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    v = v * beta2 + w2 * g * g
    denom = tl.sqrt_rn(v) + eps
    p = p + step_size * tl.div_rn(m, denom)
    p = p * decay
    _store(p_ptr + offs, p, mask)
    _store(m_ptr + offs, m, mask)
    _store(v_ptr + offs, v, mask)


@triton.jit
def clipped_sq_norm_kernel(g_ptr, n, t_hat_ptr, ratio_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t_hat = tl.load(t_hat_ptr).to(tl.float32)
    ratio = tl.load(ratio_ptr).to(tl.float32)
    g = tl.where(tl.abs(g) > t_hat, g * ratio, g)
    tl.atomic_add(out_ptr, tl.sum(g * g, axis=0))


@triton.jit
def stable_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, t_hat_ptr, ratio_ptr, factor_ptr, decay, w1, beta2, w2,
                  step_size, bc2_sqrt, eps, ZERO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v = _load_moments(m_ptr, v_ptr, offs, mask, ZERO, BLOCK)
    t_hat = tl.load(t_hat_ptr).to(tl.float32)
    ratio = tl.load(ratio_ptr).to(tl.float32)
    factor = tl.load(factor_ptr).to(tl.float32)
    g = tl.where(tl.abs(g) > t_hat, g * ratio, g)
    g = g * factor
    p = p * decay
    # m <- lerp(m, g, w1) and v <- beta2 * v + w2 * g^2 as torch computes them (w1 = 1 - beta1, w2 = 1 - beta2).
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    v = v * beta2 + w2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)
    _store(p_ptr + offs, p, mask)
    _store(m_ptr + offs, m, mask)
    _store(v_ptr + offs, v, mask)
