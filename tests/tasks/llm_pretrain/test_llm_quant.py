"""Fake quantization: grids, error bounds, outliers, idempotence, ragged groups, the STE, and the patched LLaMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tasks.llm_pretrain.model import build_llama, llama_config
from tasks.llm_pretrain.quant import (
    PROJECTIONS,
    QuantLinear,
    QuantSpec,
    quantize_absmax,
    quantize_activation,
    quantize_minmax,
    quantize_model,
    quantize_weight,
)

FORMATS = ["int4", "int8", "fp4", "fp4_e2m1"]
# Distinct values a symmetric group can take besides its 2 exact outliers.
SYMMETRIC_LEVELS = {"int4": 15, "int8": 255, "fp4": 9, "fp4_e2m1": 15}


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(*shape, generator=g).pow(4).mul(20).add(1)


def groups(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.reshape(-1, size)


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_levels_and_half_step_error(bits: int) -> None:
    w = heavy_tailed(16, 512)
    q = quantize_minmax(w, bits, 256)
    wg, qg = groups(w, 256), groups(q, 256)
    for row_w, row_q in zip(wg, qg, strict=True):
        assert row_q.unique().numel() <= 2**bits
        step = (row_w.max() - row_w.min()) / (2**bits - 1)
        assert (row_q - row_w).abs().max() <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_symmetric_levels_and_exact_outliers(fmt: str) -> None:
    x = heavy_tailed(2, 8, 512, seed=1)
    q = quantize_absmax(x, fmt, 256, topk=2, bits=8 if fmt == "int8" else 4)
    for row_x, row_q in zip(groups(x, 256), groups(q, 256), strict=True):
        top = row_x.abs().topk(2).indices
        assert torch.equal(row_q[top], row_x[top]), "the 2 largest magnitudes must be kept exact"
        rest = torch.ones(256, dtype=torch.bool)
        rest[top] = False
        assert row_q[rest].unique().numel() <= SYMMETRIC_LEVELS[fmt]
        absmax = row_x[rest].abs().max()
        assert row_q[rest].abs().max() <= absmax * (1 + 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_activation_error_within_half_step(bits: int) -> None:
    x = heavy_tailed(4, 1024, seed=2)
    q = quantize_absmax(x, f"int{bits}", 256, topk=2, bits=bits)
    for row_x, row_q in zip(groups(x, 256), groups(q, 256), strict=True):
        rest = torch.ones(256, dtype=torch.bool)
        rest[row_x.abs().topk(2).indices] = False
        step = row_x[rest].abs().max() / (2 ** (bits - 1) - 1)
        assert (row_q - row_x).abs().max() <= step / 2 * (1 + 1e-5)


def public_fp4(x: torch.Tensor, e: int = 1, m: int = 2, b: int = 1, topk: int = 2) -> torch.Tensor:
    """The public code's `fp4_fake_quantize` (groups of 256), transcribed as a reference."""
    x = x.clone().view(-1, 256)
    idx = x.abs().topk(topk, dim=-1).indices
    kept = torch.gather(x, 1, idx)
    x[torch.arange(x.size(0))[:, None].expand(-1, topk), idx] = 0
    alpha = x.abs().max(dim=-1).values.clamp(min=1e-6)
    xc = torch.clamp(x, -alpha[:, None], alpha[:, None])
    alpha_hat = alpha * 2 ** (-b)
    b_hat = 2**e - torch.log2(alpha) + torch.log2(torch.tensor(2 - 2 ** (-m))) - 1
    log_v = torch.floor(torch.log2(xc.abs() + 1e-8) + b_hat[:, None])
    v = torch.pow(2, torch.clamp(log_v - m, min=1 - m))
    out = alpha_hat[:, None] * v * torch.round(xc / (alpha_hat[:, None] * v) + 1e-12)
    out[torch.arange(x.size(0))[:, None].expand(-1, topk), idx] = kept
    return out


def test_fp4_is_the_public_code_grid_a_uniform_9_level_grid() -> None:
    x = heavy_tailed(8, 512, seed=3)
    q = quantize_absmax(x, "fp4", 256, topk=2)
    torch.testing.assert_close(groups(q, 256), public_fp4(x), rtol=1e-6, atol=1e-7)
    for row_x, row_q in zip(groups(x, 256), groups(q, 256), strict=True):
        rest = torch.ones(256, dtype=torch.bool)
        rest[row_x.abs().topk(2).indices] = False
        units = row_q[rest] / row_x[rest].abs().max() * 4
        torch.testing.assert_close(units, units.round(), rtol=0, atol=1e-5)
        assert set(units.round().int().tolist()) <= set(range(-4, 5))


def test_e2m1_values_lie_on_the_e2m1_grid() -> None:
    x = heavy_tailed(8, 512, seed=4)
    q = quantize_absmax(x, "fp4_e2m1", 256, topk=2)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    for row_x, row_q in zip(groups(x, 256), groups(q, 256), strict=True):
        rest = torch.ones(256, dtype=torch.bool)
        rest[row_x.abs().topk(2).indices] = False
        units = row_q[rest].abs() / (row_x[rest].abs().max() / 6)
        assert (units[:, None] - grid).abs().min(dim=1).values.max() < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizing_twice_equals_once(fmt: str) -> None:
    spec = QuantSpec(fmt, 256)  # type: ignore[arg-type]
    w, x = heavy_tailed(8, 512, seed=5), heavy_tailed(3, 4, 512, seed=6)
    for fn, t in ((quantize_weight, w), (quantize_activation, x)):
        once = fn(t, spec)
        torch.testing.assert_close(fn(once, spec), once, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dimension_not_a_multiple_of_the_group(fmt: str) -> None:
    """The last, shorter group of each row is quantized on its own (as if it were a group of its length)."""
    spec = QuantSpec(fmt, 256)  # type: ignore[arg-type]
    w, x = heavy_tailed(6, 300, seed=7), heavy_tailed(2, 5, 300, seed=8)
    for fn, t in ((quantize_weight, w), (quantize_activation, x)):
        q = fn(t, spec)
        assert q.shape == t.shape
        torch.testing.assert_close(q[..., :256], fn(t[..., :256].contiguous(), spec))
        tail_spec = QuantSpec(fmt, 44)  # type: ignore[arg-type]
        torch.testing.assert_close(q[..., 256:], fn(t[..., 256:].contiguous(), tail_spec))


@pytest.mark.parametrize("fmt", FORMATS)
def test_straight_through_estimator(fmt: str) -> None:
    """d sum(QuantLinear(x)) / dW equals d sum(F.linear(Qa(x), Wq)) / dWq, and likewise for the input x."""
    spec = QuantSpec(fmt, 32)  # type: ignore[arg-type]
    layer = QuantLinear(96, 40, spec)
    nn.init.normal_(layer.weight)
    x = heavy_tailed(3, 7, 96, seed=9).requires_grad_(True)
    layer(x).sum().backward()

    wq = quantize_weight(layer.weight.detach(), spec).requires_grad_(True)
    xq = quantize_activation(x.detach(), spec).requires_grad_(True)
    F.linear(xq, wq).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(x.grad, xq.grad)
    # and the forward pass is the plain linear layer of the quantized operands, to the bit
    assert torch.equal(layer(x), F.linear(xq, wq))


def test_patched_llama_has_seven_quantized_projections_per_block() -> None:
    torch.manual_seed(0)
    model = build_llama(llama_config("tiny", vocab_size=256))
    keys = set(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    assert quantize_model(model, QuantSpec("int4", 64)) == 7 * model.config.num_hidden_layers
    for block in model.model.layers:
        quantized = [n for n, m in block.named_modules() if isinstance(m, QuantLinear)]
        assert sorted(n.split(".")[-1] for n in quantized) == sorted(PROJECTIONS)
    assert not isinstance(model.lm_head, QuantLinear)
    assert type(model.model.embed_tokens) is nn.Embedding
    assert set(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    logits = model(input_ids=torch.randint(0, 256, (2, 16))).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def topk_absmax(x: torch.Tensor, fmt: str, group_size: int, topk: int, bits: int) -> torch.Tensor:
    """The absmax quantizer written with topk, gather and scatter (its first form), as a reference for the
    compile-friendly one."""
    from tasks.llm_pretrain.quant import grid_fn

    g = x.float().reshape(-1, group_size)
    idx = g.abs().topk(topk, dim=1).indices
    kept = g.gather(1, idx)
    g = g.scatter(1, idx, 0.0)
    scale = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
    q = grid_fn(fmt, bits)(g / scale) * scale  # type: ignore[arg-type]
    return q.scatter(1, idx, kept).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absmax_equals_the_topk_form_bit_for_bit(fmt: str, dtype: torch.dtype) -> None:
    x = heavy_tailed(4, 8, 512, seed=10).to(dtype)
    ties = x.reshape(-1, 64)[:8]  # groups of 64 with tied magnitudes, of both signs, at the top and below it
    ties[:, :4] = torch.tensor([3.0, -3.0, 3.0, -2.0], dtype=dtype)
    ties[4:, :] = 1.0
    bits = 8 if fmt == "int8" else 4
    for group_size, topk in ((256, 2), (64, 2), (64, 3), (64, 0)):
        got = quantize_absmax(x, fmt, group_size, topk=topk, bits=bits)  # type: ignore[arg-type]
        assert torch.equal(got, topk_absmax(x, fmt, group_size, topk, bits))


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp4", "fp4_e2m1"])
def test_quantizers_compile_without_graph_breaks(fmt) -> None:
    """The quantizers, and a quantized layer, trace into one graph: a break (e.g. reading a tensor's values inside
    the forward) splits every block's compiled code and, measured on the GPU, more than halves compiled FP4
    training's throughput."""
    spec = QuantSpec(fmt, 64)
    x = heavy_tailed(2, 3, 128, seed=11)
    explanation = torch._dynamo.explain(quantize_activation)(x, spec)
    assert explanation.graph_break_count == 0
    assert torch._dynamo.explain(quantize_weight)(x[0], spec).graph_break_count == 0
    torch._dynamo.reset()
    explained = torch._dynamo.explain(QuantLinear(128, 32, spec))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_quantized_layer_compiles_to_a_cacheable_graph(tmp_path, monkeypatch) -> None:
    """torch.compile keeps the compiled forward and backward of a quantized layer in its cache (AOTAutograd bypasses
    graphs with a custom autograd.Function), so a later trial loads them instead of compiling again."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    counters.clear()
    layer = QuantLinear(64, 32, QuantSpec("fp4", 32))
    x = torch.randn(4, 64, requires_grad=True)
    torch.compile(layer)(x).sum().backward()
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert counters["aot_autograd"]["autograd_cache_saved"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("fmt", ["fp4", "fp4_e2m1"])
def test_table_grids_round_to_nearest_with_ties_to_the_smaller_magnitude(fmt) -> None:
    """The select chain equals a search of the midpoints (torch.bucketize) to the bit: random values, every grid
    point and midpoint, and the float32 neighbours of each midpoint."""
    from tasks.llm_pretrain.quant import E2M1_GRID, FP4_PUBLIC_GRID, grid_fn

    table = torch.tensor(FP4_PUBLIC_GRID if fmt == "fp4" else tuple(v / 6.0 for v in E2M1_GRID))
    mids = (table[1:] + table[:-1]) / 2
    special = torch.cat([table, mids, torch.nextafter(mids, table[1:]), torch.nextafter(mids, table[:-1])])
    u = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2, special, -special])
    expected = torch.sign(u) * table[torch.bucketize(u.abs(), mids)]
    assert torch.equal(grid_fn(fmt, 4)(u), expected)  # type: ignore[arg-type]
