"""The low-rank spectrum against a dense SVD: random, rank-deficient and rsLoRA-scaled updates."""

from __future__ import annotations

import math

import pytest
import torch

from lora_doctor.probes.spectrum import lowrank_singular_values


def _dense(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    k = min(b.shape[-1], b.shape[-2], a.shape[-1])
    return torch.linalg.svdvals((scaling * b @ a).double())[..., :k].float()


def _deficient(d_out: int, d_in: int, r: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B and A of inner size r whose product has rank ``rank`` (< r)."""
    b = torch.randn(d_out, rank) @ torch.randn(rank, r)
    return b, torch.randn(r, d_in)


@pytest.mark.parametrize(
    ("d_out", "d_in", "r", "scaling"),
    [(64, 32, 4, 2.0), (32, 96, 8, 0.5), (48, 48, 16, 16 / math.sqrt(16)), (6, 40, 8, 1.0)],
    ids=["tall", "wide", "rslora-scaling", "r-above-d_out"],
)
def test_matches_dense_svd(d_out: int, d_in: int, r: int, scaling: float) -> None:
    torch.manual_seed(0)
    b, a = torch.randn(d_out, r), torch.randn(r, d_in)
    got = lowrank_singular_values(b, a, scaling)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _dense(b, a, scaling), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 1, 3], ids=["zero-B", "rank-1", "rank-3-of-8"])
def test_rank_deficient_update_has_zero_tail(rank: int) -> None:
    torch.manual_seed(1)
    b, a = _deficient(64, 48, 8, rank) if rank else (torch.zeros(64, 8), torch.randn(8, 48))
    got = lowrank_singular_values(b, a, 2.0)
    want = _dense(b, a, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * float(want.max() + 1))
    assert float(got[rank:].abs().max()) <= 1e-4 * float(got.max() + 1)
    if rank:
        assert float(got[rank - 1]) > 1e-2 * float(got[0])


def test_batched_layers_match_one_by_one() -> None:
    torch.manual_seed(2)
    b, a = torch.randn(3, 40, 4), torch.randn(3, 4, 24)
    got = lowrank_singular_values(b, a, 1.5)
    for i in range(3):
        torch.testing.assert_close(got[i], _dense(b[i], a[i], 1.5), rtol=1e-4, atol=1e-4)


def test_half_precision_factors_are_read_in_float32() -> None:
    torch.manual_seed(3)
    b, a = torch.randn(32, 4).to(torch.bfloat16), torch.randn(4, 16).to(torch.bfloat16)
    got = lowrank_singular_values(b, a, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _dense(b.float(), a.float(), 1.0), rtol=1e-4, atol=1e-4)
