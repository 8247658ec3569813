"""Fake quantization for the papers' low-bit (4-bit / 8-bit) pre-training runs.

The 7 linear projections of every LLaMA block (q, k, v, o, gate, up, down) are replaced by `QuantLinear`, which
computes `F.linear(Qa(x), Qw(W))` in the forward pass; embeddings, norms and the LM head are untouched. A
straight-through estimator passes gradients unchanged to the master weight and to the input: the weight gradient is
`grad_out^T @ Qa(x)` and the input gradient `grad_out @ Qw(W)`, exactly those of a plain linear layer applied to the
quantized operands. Gradients themselves are not quantized. Rounding is round-to-nearest (no stochastic rounding).

Formats (`quant` config field):
- `int4` / `int8`: weights asymmetric min-max per group (2^b levels, zero point rounded to an integer); input
  activations symmetric absmax per group, levels -(2^(b-1)-1) .. 2^(b-1)-1, with the 2 largest magnitudes of each
  group kept exact and left out of the absmax (as in the public SPAM code). b is 4 or 8, or `QuantSpec.int_bits`
  (the `quant_bits` config field) for other widths: INT2 and INT3 are `int4` with `int_bits` 2 and 3.
- `fp4`: the grid of the public code ("1 exponent bit, 2 mantissa bits, bias 1"), used there for weights and
  activations alike, each symmetric absmax per group with the top-2 magnitudes kept exact. With a = absmax of the
  group, its exponent is floor(log2(3.5|x|/a)) - 2 <= -1 and is then clamped to at least 1 - m = -1, so every value
  gets the same step a/4: the grid is the uniform 9-level grid {0, +-1/4, +-1/2, +-3/4, +-1} * a, i.e. a symmetric
  int4-like grid with 9 of 16 codes used, not a floating-point grid.
- `fp4_e2m1`: a true FP4 (E2M1) grid, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6} * a/6, same grouping and outliers.

Groups are `group_size` consecutive entries along the last dimension (the input dimension of a weight, the feature
dimension of an activation). When that dimension is not a multiple of the group size, the last group of each row is
shorter: it is padded for the computation (min-max: with a copy of the row's last entry, which changes neither min
nor max; absmax: with zeros) and the padding is dropped afterwards. The public code instead flattens the tensor and
cuts it into groups of 256 across rows (and asserts divisibility).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

QuantFormat = Literal["none", "int4", "int8", "fp4", "fp4_e2m1"]
INT_FORMATS: tuple[QuantFormat, ...] = ("int4", "int8")  # the integer min-max formats, whose width `int_bits` sets

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FP4_PUBLIC_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # magnitudes, in units of the group absmax
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes, in units of absmax / 6


@dataclass(frozen=True)
class QuantSpec:
    """How `QuantLinear` quantizes its weight and input activations."""

    format: QuantFormat = "int4"
    group_size: int = 256
    topk: int = 2  # largest-magnitude entries per activation group kept exact
    int_bits: int | None = None  # bit width of the int formats (None: 4 for int4, 8 for int8)

    def __post_init__(self) -> None:
        if self.int_bits is not None and (self.format not in INT_FORMATS or not 2 <= self.int_bits <= 8):
            raise ValueError(f"int_bits must be 2..8 with an int format, got {self.int_bits!r} with {self.format!r}")

    @property
    def bits(self) -> int:
        if self.int_bits is not None:
            return self.int_bits
        return 8 if self.format == "int8" else 4

    @property
    def weight_topk(self) -> int:
        """Outliers kept exact in weight groups: none for the integer min-max path, as for activations otherwise."""
        return 0 if self.format in INT_FORMATS else self.topk


def _grouped(x: torch.Tensor, group_size: int, pad: Literal["zeros", "replicate"]) -> tuple[torch.Tensor, int]:
    """View `x` (fp32) as rows of `group_size` along the last dim, padding the last group; returns (groups, pad)."""
    d = x.shape[-1]
    n_pad = (-d) % group_size
    if n_pad:
        fill = x[..., -1:].expand(*x.shape[:-1], n_pad) if pad == "replicate" else x.new_zeros(*x.shape[:-1], n_pad)
        x = torch.cat([x, fill], dim=-1)
    return x.reshape(-1, group_size), n_pad


def _ungrouped(g: torch.Tensor, shape: torch.Size, n_pad: int) -> torch.Tensor:
    g = g.reshape(*shape[:-1], shape[-1] + n_pad)
    return g[..., : shape[-1]] if n_pad else g


def quantize_minmax(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min-max fake quantization per group (the public code's weight quantizer)."""
    g, n_pad = _grouped(x.float(), group_size, pad="replicate")
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    qmax = 2**bits - 1
    scale = (hi - lo).clamp(min=1e-5) / qmax
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    q = (torch.clamp(torch.round(g / scale) + zero, 0, qmax) - zero) * scale
    return _ungrouped(q, x.shape, n_pad).to(x.dtype)


def _int_grid(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Symmetric integer grid on [-1, 1] (input already divided by the absmax)."""
    qmax = 2 ** (bits - 1) - 1
    return lambda u: torch.round(u * qmax).clamp(-qmax - 1, qmax) / qmax


def _table_grid(magnitudes: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round-to-nearest onto a symmetric table of magnitudes on [0, 1] (input divided by the absmax); a tie goes to
    the smaller magnitude. A chain of selects against the midpoints (float32 constants, computed here once: inside a
    compiled function, reading a tensor's values would break the graph), which torch.compile fuses into the
    quantizer's kernel; compiled on the CPU, the FP4 quantizer of a 16384 x 768 activation takes 68 ms this way and
    188 ms as a `bucketize` and a gather from the table (results/perf/README.md)."""
    table = torch.tensor(magnitudes, dtype=torch.float32)  # the quantizers compute in float32
    mids = ((table[1:] + table[:-1]) / 2).tolist()
    values = table[1:].tolist()  # table[0] is 0

    def fn(u: torch.Tensor) -> torch.Tensor:
        a = u.abs()
        q = torch.zeros_like(a)
        for mid, value in zip(mids, values, strict=True):
            q = torch.where(a > mid, value, q)
        return torch.sign(u) * q

    return fn


TABLE_GRIDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "fp4": _table_grid(FP4_PUBLIC_GRID),
    "fp4_e2m1": _table_grid(tuple(v / 6.0 for v in E2M1_GRID)),
}


def grid_fn(fmt: QuantFormat, bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rounding function of a symmetric format, acting on values normalised to [-1, 1]."""
    if fmt in INT_FORMATS:
        return _int_grid(bits)
    if fmt in TABLE_GRIDS:
        return TABLE_GRIDS[fmt]
    raise ValueError(f"no symmetric grid for quant format {fmt!r}")


def largest_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the `k` largest entries of each row of `a`: k rounds of argmax, which keep shapes static (no
    topk, gather or scatter), so that torch.compile fuses the whole quantizer. Among equal entries the first is taken,
    where topk may take another; the quantized group is the same either way (an equal entry left behind is the new
    absmax, which every grid represents exactly)."""
    cols = torch.arange(a.shape[-1], device=a.device)
    keep = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    for _ in range(k):
        hit = cols == a.masked_fill(keep, -1.0).argmax(dim=-1, keepdim=True)
        keep = keep | hit
    return keep


def quantize_absmax(x: torch.Tensor, fmt: QuantFormat, group_size: int, topk: int = 2, bits: int = 4) -> torch.Tensor:
    """Symmetric absmax fake quantization per group; the `topk` largest magnitudes of a group are kept exact."""
    g, n_pad = _grouped(x.float(), group_size, pad="zeros")
    magnitude = g.abs()
    k = min(topk, group_size)
    keep = largest_mask(magnitude, k) if k > 0 else None
    if keep is not None:
        magnitude = magnitude.masked_fill(keep, 0.0)
    scale = magnitude.amax(dim=1, keepdim=True).clamp(min=1e-6)
    q = grid_fn(fmt, bits)(g / scale) * scale
    if keep is not None:
        q = torch.where(keep, g, q)
    return _ungrouped(q, x.shape, n_pad).to(x.dtype)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.format in INT_FORMATS:
        return quantize_minmax(w, spec.bits, spec.group_size)
    return quantize_absmax(w, spec.format, spec.group_size, spec.weight_topk, spec.bits)


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize_absmax(x, spec.format, spec.group_size, spec.topk, spec.bits)


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`q` in the forward pass, the identity to `x` in the backward (straight-through estimator). x - x is exactly 0
    for finite x, so the value is q to the bit. Plain tensor ops rather than a custom autograd.Function, whose graphs
    torch.compile does not cache across processes (AOTAutograd bypasses them), so every trial would recompile."""
    return (x - x.detach()) + q.detach()


class QuantLinear(nn.Linear):
    """An `nn.Linear` whose weight and input are fake-quantized in the forward pass (STE in the backward)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False, **kw) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, quantize_weight(self.weight.detach(), self.spec))
        x = straight_through(x, quantize_activation(x.detach(), self.spec))
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        bits = f", bits={self.spec.bits}" if self.spec.int_bits is not None else ""
        return f"{super().extra_repr()}, quant={self.spec.format}{bits}, group_size={self.spec.group_size}"


def quantize_model(model: nn.Module, spec: QuantSpec) -> int:
    """Replace the block projections of a LLaMA in place by `QuantLinear` (same parameters); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in PROJECTIONS and type(child) is nn.Linear:
                q = QuantLinear(child.in_features, child.out_features, spec, bias=child.bias is not None, device="meta")
                q.weight = child.weight
                if child.bias is not None:
                    q.bias = child.bias
                setattr(parent, name, q)
                count += 1
    return count
