"""The optimizer: AdamW with update clipping against torch's AdamW and against a step computed
by hand, its state through a checkpoint, and its flag."""

from __future__ import annotations

import math

import pytest
import torch

from npt.errors import NPTError
from npt.optim import ClippedAdamW, OptimArguments, build_optimizer, reset_moments


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def test_below_the_threshold_it_is_torch_adamw():
    ours, theirs = _pair()
    mine = ClippedAdamW(ours, lr=1e-2, weight_decay=0.1, threshold=1e9)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for i in range(20):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p) * (1 + i)
            q.grad = p.grad.clone()
        mine.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)
    assert float(mine.pop_clipped_fraction()) == 0.0


def test_a_gradient_spike_is_clipped_to_the_hand_computed_step():
    p = torch.nn.Parameter(torch.zeros(4))
    q = torch.nn.Parameter(torch.zeros(4))  # not spiking: its own tensor, its own clipping
    opt = ClippedAdamW([p, q], lr=0.1, betas=(0.9, 0.999), eps=0.0, threshold=1.0)
    p.grad, q.grad = torch.full((4,), 0.1), torch.full((4,), 0.1)
    opt.step()  # step 1: m^ = g, v^ = g^2, rms = 1, not clipped: each element moves by lr
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1))
    p.grad, q.grad = torch.full((4,), 10.0), torch.full((4,), 0.1)
    opt.step()
    m = 0.9 * (0.1 * 0.1) + 0.1 * 10.0          # 1.009
    v = 0.999 * (0.001 * 0.01) + 0.001 * 100.0  # 0.10000999
    m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
    rms = math.sqrt(100.0 / v_hat)               # 1.414: the spike is 1.4x its running scale
    step = 0.1 * (m_hat / math.sqrt(v_hat)) / rms
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1 - step), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.detach(), torch.full((4,), -0.2), atol=1e-6, rtol=0)  # plain AdamW's step
    assert step < 0.1 * m_hat / math.sqrt(v_hat) * 0.71  # AdamW would have moved it 1.41x as far
    assert float(opt.pop_clipped_fraction()) == pytest.approx(1 / 4)  # 1 of the 4 updates
    assert float(opt.pop_clipped_fraction()) == 0.0


def test_state_resumes_exactly_and_resets_like_adamw():
    ours, copy = _pair(1)
    a, b = ClippedAdamW(ours, lr=1e-2, threshold=1.0), ClippedAdamW(copy, lr=1e-2, threshold=1.0)
    torch.manual_seed(2)
    grads = [[torch.randn_like(p) * 10 ** (i % 3) for p in ours] for i in range(6)]
    for g in grads[:3]:
        for p, q, x in zip(ours, copy, g):
            p.grad, q.grad = x.clone(), x.clone()
        a.step(), b.step()
    saved = b.state_dict()
    b = ClippedAdamW(copy, lr=1e-2, threshold=1.0)
    b.load_state_dict(saved)
    for g in grads[3:]:
        for p, q, x in zip(ours, copy, g):
            p.grad, q.grad = x.clone(), x.clone()
        a.step(), b.step()
    for p, q in zip(ours, copy):
        assert torch.equal(p, q)
    assert set(a.state[ours[0]]) == {"step", "exp_avg", "exp_avg_sq"} and float(a.state[ours[0]]["step"]) == 6
    reset_moments(a)
    assert not a.state


def test_the_flag_picks_the_optimizer_and_refuses_a_negative_threshold():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(build_optimizer(OptimArguments(), params, None)) is torch.optim.AdamW
    clipped = build_optimizer(OptimArguments(update_clipping=1.0, adam_beta2=0.99), params, None)
    assert isinstance(clipped, ClippedAdamW) and clipped.param_groups[0]["betas"] == (0.9, 0.99)
    assert clipped.param_groups[0]["threshold"] == 1.0
    with pytest.raises(NPTError, match="--update_clipping"):
        OptimArguments(update_clipping=-1.0)
