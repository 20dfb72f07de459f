"""LD loss and sigmoid KD against float64 references written from the definitions."""

import math

import pytest
import torch

from distill.losses import ld_loss, sigmoid_kd_loss


def _reference_ld(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(zt/tau) || softmax(zs/tau)) * tau^2, one row at a time in float64."""
    out = []
    for s, t in zip(zs.double(), zt.double(), strict=True):
        p_t = torch.exp(t / tau) / torch.exp(t / tau).sum()
        p_s = torch.exp(s / tau) / torch.exp(s / tau).sum()
        out.append(sum(float(pt) * math.log(float(pt) / float(ps)) for pt, ps in zip(p_t, p_s, strict=True)))
    return torch.tensor(out, dtype=torch.float64) * tau**2


def _reference_kd(zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_c KL(Bern(sigmoid(zt/tau)) || Bern(sigmoid(zs/tau))) * tau^2 in float64."""
    q = torch.sigmoid(zt.double() / tau)
    p = torch.sigmoid(zs.double() / tau)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    return kl.sum(-1) * tau**2


@pytest.mark.parametrize("tau", [1.0, 2.0, 10.0])
def test_ld_loss_matches_float64_reference(tau):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(64, 17, generator=g) * 4
    zt = torch.randn(64, 17, generator=g) * 4
    got = ld_loss(zs, zt, tau)
    assert got.shape == (64,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference_ld(zs, zt, tau), rtol=1e-4, atol=1e-6)
    assert (got > 0).all()


def test_ld_loss_is_a_sum_over_bins_not_a_mean():
    # Two bins, teacher certain of bin 0, student uniform: KL = log 2 exactly at tau = 1.
    zt = torch.tensor([[30.0, -30.0]])
    zs = torch.zeros(1, 2)
    assert ld_loss(zs, zt, 1.0).item() == pytest.approx(math.log(2), rel=1e-5)


def test_ld_loss_zero_when_logits_match_and_gradient_only_to_student():
    g = torch.Generator().manual_seed(1)
    zt = (torch.randn(10, 17, generator=g) * 3).requires_grad_()
    zs = zt.detach().clone().requires_grad_()
    loss = ld_loss(zs, zt, 10.0)
    assert torch.equal(loss, torch.zeros(10))
    moved = (zs + torch.randn(10, 17, generator=g)).detach().requires_grad_()
    ld_loss(moved, zt, 10.0).sum().backward()
    assert zt.grad is None
    assert moved.grad is not None and moved.grad.abs().sum() > 0


def test_ld_loss_gradient_matches_reference():
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(8, 17, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(8, 17, generator=g, dtype=torch.float64)
    ld_loss(zs, zt, 10.0).sum().backward()
    # d/dz_s of tau^2 KL = tau * (softmax(zs/tau) - softmax(zt/tau)).
    expected = 10.0 * (torch.softmax(zs.detach() / 10, -1) - torch.softmax(zt / 10, -1))
    torch.testing.assert_close(zs.grad, expected, rtol=1e-4, atol=1e-6)  # loss runs in float32


@pytest.mark.parametrize("num_classes", [1, 10])
def test_sigmoid_kd_matches_bernoulli_reference(num_classes):
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(32, num_classes, generator=g) * 3
    zt = torch.randn(32, num_classes, generator=g) * 3
    got = sigmoid_kd_loss(zs, zt, 2.0)
    assert got.shape == (32,)
    torch.testing.assert_close(got.double(), _reference_kd(zs, zt, 2.0), rtol=1e-4, atol=1e-6)
    assert (got > 0).all()  # a single class still carries a signal (a softmax over one class would not)


def test_sigmoid_kd_zero_when_match_and_teacher_detached():
    zt = torch.randn(5, 3).requires_grad_()
    assert torch.equal(sigmoid_kd_loss(zt.detach().clone(), zt, 2.0), torch.zeros(5))
    zs = torch.randn(5, 3, requires_grad=True)
    sigmoid_kd_loss(zs, zt, 2.0).sum().backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_sigmoid_kd_stable_for_extreme_logits():
    zs = torch.tensor([[-80.0, 80.0]])
    zt = torch.tensor([[80.0, -80.0]])
    got = sigmoid_kd_loss(zs, zt, 1.0)
    assert torch.isfinite(got).all() and got.item() > 100
