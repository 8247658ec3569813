"""Triton kernels of the fused SPAM and Stable-SPAM steps (imported only by `fused`, and only when triton is).

Every kernel is multi-tensor: one launch covers all tensors of a bucket. A program handles BLOCK entries of one tensor,
found through a block table (int64 rows: tensor index, first entry, tensor length), and reaches the tensor through
pointer tables (int64 addresses, one row per role: parameter, moments, per-tensor statistics; gradients separately).
Addresses are 16-byte aligned and blocks start at multiples of BLOCK, and a block that lies inside its tensor takes
the unmasked branch, so that loads and stores are vectorized; only a tensor's last block is masked.
The gradient reductions (`stats_kernel`, `clipped_rest_kernel`) take rows of a coarse table instead, R blocks per
program (`fused.REDUCE_BLOCKS`), so that a program has enough loads in flight; their per-tensor results (max |g|, the
sum of squares of the clipped gradient) are atomics into a float32 scratch buffer. The kernels compute in float32;
with ROUND (a bfloat16 compute dtype) every operation is rounded to bfloat16 where the foreach path of
`functional.py` rounds it, so both paths agree to the last bit up to float32 ties. A NaN gradient entry propagates
as it does there: Triton's `minimum`/`maximum` drop a NaN operand unless told otherwise, which would turn it into a
finite clipped value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["TL_DTYPES", "adaclip_kernel", "adagn_kernel", "clipped_rest_kernel", "spam_kernel", "stable_kernel",
           "stats_kernel"]

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rne(x, ROUND: tl.constexpr):
    """x rounded to bfloat16 precision (kept as float32) when ROUND, to nearest even, by hand so that every backend
    (the interpreter too) agrees."""
    if ROUND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _block(blocks):
    """(tensor index, first entry, tensor length) of this program's block."""
    row = blocks + 3 * tl.program_id(0).to(tl.int64)
    return tl.load(row), tl.load(row + 1), tl.load(row + 2)


@triton.jit
def _ptr(table, row, n_tensors, t, offs, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The addresses of entries `offs` (a block) of tensor t in row `row` of a pointer table; tensors are 16-byte
    aligned (`fused` sends only such tensors) and blocks start at multiples of BLOCK, which the hints say."""
    base = tl.load(table + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    return tl.max_contiguous(tl.multiple_of(base + offs, 16), BLOCK)


@triton.jit
def _load(ptrs, mask, FULL: tl.constexpr):
    """float32 values; FULL (a block inside its tensor) loads without a mask, so that the loads are vectorized."""
    if FULL:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store(ptrs, x, mask, FULL: tl.constexpr, ROUNDED: tl.constexpr):
    """x stored in the pointers' dtype, rounded to nearest even; ROUNDED: x already holds values of that dtype (a
    moment that `_rne` rounded in a bfloat16 state), so the conversion is exact and the rounding is skipped."""
    if not ROUNDED:
        x = _rne(x, ptrs.dtype.element_ty == tl.bfloat16)
    if FULL:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _moments(m_ptr, v_ptr, mask, ZERO: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """The moments in float32: zeros on a reset step (ZERO), else loaded."""
    if ZERO:
        m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        m = _load(m_ptr, mask, FULL)
        v = _load(v_ptr, mask, FULL)
    return m, v


@triton.jit
def _adam_moments(m, v, g, w1, beta2, w2, ROUND: tl.constexpr):
    # m <- lerp(m, g, w1) and v <- beta2 * v + w2 * g^2 as torch computes them (w1 = 1 - beta1, w2 = 1 - beta2).
    m = _rne(tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1)), ROUND)
    v = _rne(_rne(v * beta2, ROUND) + w2 * g * g, ROUND)
    return m, v


@triton.jit
def _positive_or_one(x):
    return tl.where(x > 0, x, tl.where(x == 0, 1.0, x))


# --- Stable-SPAM -----------------------------------------------------------------------------------------------------


@triton.jit
def _floor(states, n_tensors, t, gamma3, bc3, S: tl.constexpr, ROUND: tl.constexpr):
    """A lower bound of this step's T_hat before max |g| is known: `adaclip_kernel`'s T_hat with M = 0 (T_hat grows
    with M >= 0 and every rounding is monotone)."""
    thr = tl.load(tl.load(states + 3 * n_tensors + t).to(tl.pointer_type(S))).to(tl.float32)
    return _rne(tl.div_rn(_rne(thr * gamma3, ROUND), bc3), ROUND)


@triton.jit
def _reduce_part(g, peak, sq, above, lo, t_hat, ratio, ROUND: tl.constexpr, MAX: tl.constexpr, SQ: tl.constexpr,
                 SPLIT: tl.constexpr, FIX: tl.constexpr):
    """Accumulate one sub-block: max |g| (MAX); sum of g^2 (SQ), with SPLIT only over |g| <= lo, marking the rest in
    `above`; with FIX the sum of the AdaClip-clipped g^2 over exactly the entries SPLIT left out."""
    a = tl.abs(g)
    if FIX:
        c = tl.where(a > t_hat, _rne(g * ratio, ROUND), g)
        sq += tl.where(a <= lo, 0.0, c * c)
    else:
        if MAX:
            peak = tl.maximum(peak, a, propagate_nan=tl.PropagateNan.ALL)
        if SQ:
            if SPLIT:
                low = a <= lo
                sq += tl.where(low, g * g, 0.0)
                above = above | (~low).to(tl.int32)
            else:
                sq += g * g
    return peak, sq, above


@triton.jit
def _reduce_rows(g_base, start, n, lo, t_hat, ratio, ROUND: tl.constexpr, MAX: tl.constexpr, SQ: tl.constexpr,
                 SPLIT: tl.constexpr, FIX: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr):
    """`_reduce_part` over the R sub-blocks of BLOCK entries from `start` (one row of the coarse table): unrolled and
    unmasked when all lie inside the tensor, so that their loads are in flight together; else one by one, the last
    masked."""
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    if start + R * BLOCK <= n:
        for i in tl.static_range(R):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(tl.max_contiguous(tl.multiple_of(g_base + offs, 16), BLOCK)).to(tl.float32)
            peak, sq, above = _reduce_part(g, peak, sq, above, lo, t_hat, ratio, ROUND, MAX, SQ, SPLIT, FIX)
    else:
        for i in range(R):
            first = start + i * BLOCK
            offs = first + tl.arange(0, BLOCK)
            ptrs = tl.max_contiguous(tl.multiple_of(g_base + offs, 16), BLOCK)
            if first + BLOCK <= n:
                g = _load(ptrs, offs < n, True)
                peak, sq, above = _reduce_part(g, peak, sq, above, lo, t_hat, ratio, ROUND, MAX, SQ, SPLIT, FIX)
            elif first < n:
                g = _load(ptrs, offs < n, False)
                peak, sq, above = _reduce_part(g, peak, sq, above, lo, t_hat, ratio, ROUND, MAX, SQ, SPLIT, FIX)
    # max |g| over int32 bits (their order is that of floats >= 0, and a NaN's bits exceed every other's): a NaN
    # entry gives a NaN peak, as torch's norm(g, inf) does
    peak = tl.max(peak.to(tl.int32, bitcast=True), axis=0).to(tl.float32, bitcast=True)
    return peak, tl.sum(sq, axis=0), tl.max(above, axis=0)


@triton.jit
def stats_kernel(grads, rows, n_tensors, states, scratch, peak_bits, flags, gamma3, bc3, G: tl.constexpr,
                 S: tl.constexpr, ROUND: tl.constexpr, MAX: tl.constexpr, SQ: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK: tl.constexpr, R: tl.constexpr):
    """One read of the gradient for every per-tensor statistic, per row of the coarse table (R * BLOCK entries):
    peak_bits (scratch row 0 as int32; int32 order is float order for x >= 0) <- max |g| (MAX); scratch row 1 += sum of
    g^2 (SQ). With SPLIT (AdaClip before AdaGN) the sum takes only the entries that AdaClip cannot clip, |g| <= lo
    (`_floor`, kept in scratch row 5), and flags[row] says whether others are left for `clipped_rest_kernel`."""
    t, start, n = _block(rows)
    g_base = tl.load(grads + t).to(tl.pointer_type(G))
    lo = 0.0
    if SPLIT:
        lo = _floor(states, n_tensors, t, gamma3, bc3, S, ROUND)
        if start == 0:
            tl.store(scratch + 5 * n_tensors + t, lo)
    peak, sq, above = _reduce_rows(g_base, start, n, lo, 0.0, 0.0, ROUND, MAX, SQ, SPLIT, False, BLOCK, R)
    if MAX:
        tl.atomic_max(peak_bits + t, peak.to(tl.int32, bitcast=True))
    if SQ:
        tl.atomic_add(scratch + n_tensors + t, sq)
    if SPLIT:
        tl.store(flags + tl.program_id(0), above)


@triton.jit
def clipped_rest_kernel(grads, rows, n_tensors, scratch, flags, G: tl.constexpr, ROUND: tl.constexpr,
                        BLOCK: tl.constexpr, R: tl.constexpr):
    """scratch row 1 [t] += sum of the AdaClip-clipped g^2 over the entries `stats_kernel` left out (|g| > lo), only
    in the rows it flagged: the norm of the clipped gradient without a second full read of the gradient."""
    if tl.load(flags + tl.program_id(0)) != 0:
        t, start, n = _block(rows)
        g_base = tl.load(grads + t).to(tl.pointer_type(G))
        lo = tl.load(scratch + 5 * n_tensors + t)
        t_hat = tl.load(scratch + 2 * n_tensors + t)
        ratio = tl.load(scratch + 3 * n_tensors + t)
        _, sq, _ = _reduce_rows(g_base, start, n, lo, t_hat, ratio, ROUND, False, True, True, True, BLOCK, R)
        tl.atomic_add(scratch + n_tensors + t, sq)


@triton.jit
def adaclip_kernel(states, n_tensors, scratch, gamma3, w3, bc3, S: tl.constexpr, ROUND: tl.constexpr,
                   SBLOCK: tl.constexpr):
    """Per tensor: T <- gamma3 T + (1 - gamma3) M; T_hat = T / bc3; ratio = min(T_hat, M) / (M or 1), as
    `functional.adaclip_` (scratch rows: 0 M, 2 T_hat, 3 ratio)."""
    i = tl.program_id(0) * SBLOCK + tl.arange(0, SBLOCK)
    mask = i < n_tensors
    peak = tl.load(scratch + i, mask=mask, other=0.0)
    thr_ptr = tl.load(states + 3 * n_tensors + i, mask=mask, other=0).to(tl.pointer_type(S))
    thr = _load(thr_ptr, mask, False)
    thr = _rne(_rne(thr * gamma3, ROUND) + w3 * peak, ROUND)
    t_hat = _rne(tl.div_rn(thr, bc3), ROUND)
    ratio = _rne(tl.div_rn(tl.minimum(t_hat, peak, propagate_nan=tl.PropagateNan.ALL), _positive_or_one(peak)), ROUND)
    _store(thr_ptr, thr, mask, False, False)
    tl.store(scratch + 2 * n_tensors + i, t_hat, mask=mask)
    tl.store(scratch + 3 * n_tensors + i, ratio, mask=mask)


@triton.jit
def _clip(g, t, n_tensors, scratch, ROUND: tl.constexpr, ADACLIP: tl.constexpr):
    """AdaClip with this step's T_hat and ratio (g unchanged without ADACLIP)."""
    if ADACLIP:
        t_hat = tl.load(scratch + 2 * n_tensors + t)
        ratio = tl.load(scratch + 3 * n_tensors + t)
        g = tl.where(tl.abs(g) > t_hat, _rne(g * ratio, ROUND), g)
    return g


@triton.jit
def adagn_kernel(states, n_tensors, scratch, gamma1, w1, gamma2, w2, bc1, bc2, eps, S: tl.constexpr,
                 ROUND: tl.constexpr, SBLOCK: tl.constexpr):
    """Per tensor: n = ||g||; mu, nu updated; factor = mu_hat / (sqrt(nu_hat) + eps) / (n or 1), as
    `functional.adagn_` (scratch rows: 1 sum of squares in, 4 factor out)."""
    i = tl.program_id(0) * SBLOCK + tl.arange(0, SBLOCK)
    mask = i < n_tensors
    norm = _rne(tl.sqrt_rn(tl.load(scratch + n_tensors + i, mask=mask, other=0.0)), ROUND)
    mu_ptr = tl.load(states + 4 * n_tensors + i, mask=mask, other=0).to(tl.pointer_type(S))
    nu_ptr = tl.load(states + 5 * n_tensors + i, mask=mask, other=0).to(tl.pointer_type(S))
    mu = _load(mu_ptr, mask, False)
    nu = _load(nu_ptr, mask, False)
    mu = _rne(_rne(mu * gamma1, ROUND) + w1 * norm, ROUND)
    nu = _rne(_rne(nu * gamma2, ROUND) + w2 * _rne(norm * norm, ROUND), ROUND)
    mu_hat = _rne(tl.div_rn(mu, bc1), ROUND)
    denom = _rne(_rne(tl.sqrt_rn(_rne(tl.div_rn(nu, bc2), ROUND)), ROUND) + eps, ROUND)
    factor = _rne(tl.div_rn(_rne(tl.div_rn(mu_hat, denom), ROUND), _positive_or_one(norm)), ROUND)
    _store(mu_ptr, mu, mask, False, False)
    _store(nu_ptr, nu, mask, False, False)
    tl.store(scratch + 4 * n_tensors + i, factor, mask=mask)


@triton.jit
def _stable_update(p_ptr, g_ptr, m_ptr, v_ptr, mask, t, n_tensors, scratch, decay, w1, beta2, w2, step_size,
                   bc2_sqrt, eps, ROUND: tl.constexpr, ADACLIP: tl.constexpr, ADAGN: tl.constexpr,
                   ZERO_BEFORE: tl.constexpr, ZERO_AFTER: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
    g = _load(g_ptr, mask, FULL)
    p = _load(p_ptr, mask, FULL)
    m, v = _moments(m_ptr, v_ptr, mask, ZERO_BEFORE, FULL, BLOCK)
    g = _clip(g, t, n_tensors, scratch, ROUND, ADACLIP)
    if ADAGN:
        g = _rne(g * tl.load(scratch + 4 * n_tensors + t), ROUND)
    p = _rne(p * decay, ROUND)
    m, v = _adam_moments(m, v, g, w1, beta2, w2, ROUND)
    denom = _rne(_rne(tl.div_rn(_rne(tl.sqrt_rn(v), ROUND), bc2_sqrt), ROUND) + eps, ROUND)
    p = p + step_size * tl.div_rn(m, denom)
    _store(p_ptr, p, mask, FULL, False)
    if ZERO_AFTER:
        m = tl.zeros([BLOCK], dtype=tl.float32)
        v = tl.zeros([BLOCK], dtype=tl.float32)
    _store(m_ptr, m, mask, FULL, True)
    _store(v_ptr, v, mask, FULL, True)


@triton.jit
def stable_kernel(states, grads, blocks, n_tensors, scratch, decay, w1, beta2, w2, step_size, bc2_sqrt, eps,
                  P: tl.constexpr, S: tl.constexpr, ROUND: tl.constexpr, ADACLIP: tl.constexpr, ADAGN: tl.constexpr,
                  ZERO_BEFORE: tl.constexpr, ZERO_AFTER: tl.constexpr, BLOCK: tl.constexpr):
    """AdaClip (ADACLIP), AdaGN's scale (ADAGN), decoupled weight decay and Adam (torch form) on one block; moments
    zeroed before the update (ZERO_BEFORE, moret mode "clean") or stored as zeros after it (ZERO_AFTER, mode
    "stable_spam")."""
    t, start, n = _block(blocks)
    offs = start + tl.arange(0, BLOCK)
    p_ptr = _ptr(states, 0, n_tensors, t, offs, P, BLOCK)
    g_ptr = _ptr(grads, 0, 0, t, offs, P, BLOCK)
    m_ptr = _ptr(states, 1, n_tensors, t, offs, S, BLOCK)
    v_ptr = _ptr(states, 2, n_tensors, t, offs, S, BLOCK)
    if start + BLOCK <= n:
        _stable_update(p_ptr, g_ptr, m_ptr, v_ptr, offs < n, t, n_tensors, scratch, decay, w1, beta2, w2, step_size,
                       bc2_sqrt, eps, ROUND, ADACLIP, ADAGN, ZERO_BEFORE, ZERO_AFTER, True, BLOCK)
    else:
        _stable_update(p_ptr, g_ptr, m_ptr, v_ptr, offs < n, t, n_tensors, scratch, decay, w1, beta2, w2, step_size,
                       bc2_sqrt, eps, ROUND, ADACLIP, ADAGN, ZERO_BEFORE, ZERO_AFTER, False, BLOCK)


# --- SPAM ------------------------------------------------------------------------------------------------------------


@triton.jit
def _spam_update(p_ptr, g_ptr, m_ptr, v_ptr, mask, w1, beta2, w2, eps, step_size, decay, threshold,
                 ROUND: tl.constexpr, CLIP: tl.constexpr, ZERO: tl.constexpr, FULL: tl.constexpr,
                 BLOCK: tl.constexpr):
    g = _load(g_ptr, mask, FULL)
    p = _load(p_ptr, mask, FULL)
    m, v = _moments(m_ptr, v_ptr, mask, ZERO, FULL, BLOCK)
    if CLIP:
        bound = _rne(tl.sqrt_rn(_rne(v * threshold, ROUND)), ROUND)
        g = tl.minimum(g, bound, propagate_nan=tl.PropagateNan.ALL)  # a NaN stays NaN, as with torch.minimum
        g = tl.maximum(g, -bound, propagate_nan=tl.PropagateNan.ALL)
    m, v = _adam_moments(m, v, g, w1, beta2, w2, ROUND)
    denom = _rne(_rne(tl.sqrt_rn(v), ROUND) + eps, ROUND)
    p = _rne(p + step_size * tl.div_rn(m, denom), ROUND)
    _store(p_ptr, p * decay, mask, FULL, False)
    _store(m_ptr, m, mask, FULL, True)
    _store(v_ptr, v, mask, FULL, True)


@triton.jit
def spam_kernel(states, grads, blocks, n_tensors, w1, beta2, w2, eps, step_size, decay, threshold,
                P: tl.constexpr, S: tl.constexpr, ROUND: tl.constexpr, CLIP: tl.constexpr, ZERO: tl.constexpr,
                BLOCK: tl.constexpr):
    """SPAM on one block: moments zeroed on the reset step (ZERO), spike clip against v (CLIP), Adam in SPAM's form,
    then decoupled weight decay."""
    t, start, n = _block(blocks)
    offs = start + tl.arange(0, BLOCK)
    p_ptr = _ptr(states, 0, n_tensors, t, offs, P, BLOCK)
    g_ptr = _ptr(grads, 0, 0, t, offs, P, BLOCK)
    m_ptr = _ptr(states, 1, n_tensors, t, offs, S, BLOCK)
    v_ptr = _ptr(states, 2, n_tensors, t, offs, S, BLOCK)
    if start + BLOCK <= n:
        _spam_update(p_ptr, g_ptr, m_ptr, v_ptr, offs < n, w1, beta2, w2, eps, step_size, decay, threshold, ROUND,
                     CLIP, ZERO, True, BLOCK)
    else:
        _spam_update(p_ptr, g_ptr, m_ptr, v_ptr, offs < n, w1, beta2, w2, eps, step_size, decay, threshold, ROUND,
                     CLIP, ZERO, False, BLOCK)
