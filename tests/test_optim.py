"""StableAdamW and the warm-up + cosine schedule (anomcli.engine.optim)."""


import pytest
import torch
from torch import nn

from anomcli.engine.optim import StableAdamW, build_scheduler, warmup_cosine_factor

# A threshold the per-tensor RMS cannot reach: clipping never triggers.
NO_CLIP = 1e12


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _batches(n: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 4, generator=gen, dtype=dtype),
            torch.randn(16, 1, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# --- schedule ---------------------------------------------------------------


def test_schedule_key_points():
    kw = dict(total_steps=110, warmup_steps=10, final_factor=0.1)
    assert warmup_cosine_factor(0, **kw) == pytest.approx(1 / 10)
    assert warmup_cosine_factor(4, **kw) == pytest.approx(5 / 10)
    assert warmup_cosine_factor(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, **kw) == pytest.approx((1 + 0.1) / 2)
    assert warmup_cosine_factor(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine_factor(500, **kw) == pytest.approx(0.1)
    factors = [warmup_cosine_factor(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # monotone decay


def test_schedule_without_warmup():
    kw = dict(total_steps=100, warmup_steps=0, final_factor=0.0)
    assert warmup_cosine_factor(0, **kw) == pytest.approx(1.0)
    assert warmup_cosine_factor(50, **kw) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, **kw) == pytest.approx(0.0)


def test_schedule_warmup_longer_than_run_is_halved():
    kw = dict(total_steps=20, warmup_steps=100, final_factor=0.1)
    assert warmup_cosine_factor(0, **kw) == pytest.approx(1 / 10)
    assert warmup_cosine_factor(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine_factor(15, **kw) == pytest.approx(0.55)
    assert warmup_cosine_factor(20, **kw) == pytest.approx(0.1)
    # A one-step run still gets a usable rate.
    assert warmup_cosine_factor(0, total_steps=1, warmup_steps=100) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad", [dict(total_steps=0, warmup_steps=0), dict(total_steps=10, warmup_steps=-1)]
)
def test_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        warmup_cosine_factor(0, **bad)
    with pytest.raises(ValueError):
        build_scheduler(StableAdamW([nn.Parameter(torch.zeros(1))]), **bad)


def test_build_scheduler_drives_lr():
    opt = StableAdamW([nn.Parameter(torch.zeros(3))], lr=1e-2)
    sched = build_scheduler(opt, total_steps=110, warmup_steps=10, final_factor=0.1)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-2)
    assert lrs[60] == pytest.approx(0.55e-2)
    assert lrs[110] == pytest.approx(1e-3)
    assert lrs[119] == pytest.approx(1e-3)


# --- StableAdamW ------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_adamw_when_clipping_never_triggers(amsgrad, dtype, tol):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=amsgrad)
    ref, ours = _model(dtype), _model(dtype)
    ours.load_state_dict(ref.state_dict())
    batches = _batches(8, dtype)
    _train(ref, torch.optim.AdamW(ref.parameters(), foreach=False, **hp), batches)
    _train(ours, StableAdamW(ours.parameters(), clip_threshold=NO_CLIP, **hp), batches)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, rtol=tol, atol=tol)
    # The run moved the weights: the comparison is not trivially equal.
    assert not torch.allclose(next(ours.parameters()), next(_model(dtype).parameters()))


def test_clip_threshold_of_one_never_clips_first_step():
    # On step 1, v_hat == g**2 so RMS == 1: the default threshold leaves it alone.
    ref, ours = _model(), _model()
    batch = _batches(1)
    _train(ref, StableAdamW(ref.parameters(), clip_threshold=NO_CLIP), batch)
    _train(ours, StableAdamW(ours.parameters(), clip_threshold=1.0), batch)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_clipping_scales_down_a_gradient_spike(amsgrad):
    # Five small gradients then a large one: g**2 / v_hat jumps, RMS > 1.
    eps, clip, lr = 1e-8, 1.0, 1e-2
    grads = [torch.full((10,), 1e-3, dtype=torch.float64)] * 5 + [
        torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    ]
    deltas, opts = {}, {}
    for name, threshold in [("clipped", clip), ("free", NO_CLIP)]:
        p = nn.Parameter(torch.ones(10, dtype=torch.float64))
        opt = StableAdamW(
            [p], lr=lr, eps=eps, weight_decay=0.0, amsgrad=amsgrad, clip_threshold=threshold
        )
        for g in grads:
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
        deltas[name], opts[name] = p.detach() - before, opt

    # Expected RMS from the moving average after the spike (same in both runs:
    # the moments depend on the gradients only).
    state = opts["clipped"].state[opts["clipped"].param_groups[0]["params"][0]]
    beta2 = 0.999
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** len(grads))
    rms = torch.sqrt((grads[-1] ** 2 / v_hat.clamp(min=eps**2)).mean()).item()
    assert rms > 2.0  # the spike is large enough to matter

    ratio = deltas["clipped"].norm() / deltas["free"].norm()
    assert ratio.item() == pytest.approx(clip / rms, rel=1e-9)
    # Clipping scales the update, it does not change its direction.
    torch.testing.assert_close(
        deltas["clipped"], deltas["free"] * (clip / rms), rtol=1e-9, atol=0.0
    )


def test_clipping_with_threshold_below_one_on_first_step():
    # First step: RMS == 1 exactly, so a threshold of 0.25 divides lr by 4.
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    deltas = []
    for threshold in (0.25, NO_CLIP):
        p = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
        opt = StableAdamW([p], lr=1e-2, weight_decay=0.0, clip_threshold=threshold)
        p.grad = g.clone()
        opt.step()
        deltas.append(p.detach().clone())
    torch.testing.assert_close(deltas[0], deltas[1] * 0.25, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_weight_decay_is_decoupled(amsgrad):
    lr, wd = 1e-2, 0.1
    p = nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))
    opt = StableAdamW([p], lr=lr, weight_decay=wd, amsgrad=amsgrad)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    # Zero gradient: only the multiplicative decay acts, and it never enters
    # the moments (coupled L2 would have made exp_avg non-zero).
    expected = torch.full((4,), 3.0 * (1 - lr * wd) ** 3, dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected)
    assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
    assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0


def test_weight_decay_differs_from_coupled_l2():
    # Same gradient, decoupled decay vs. L2 folded into the gradient (Adam):
    # the Adam normalisation makes them differ.
    lr, wd = 1e-2, 0.5
    p_dec = nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))
    p_l2 = nn.Parameter(p_dec.detach().clone())
    opt_dec = StableAdamW([p_dec], lr=lr, weight_decay=wd, clip_threshold=NO_CLIP)
    opt_l2 = StableAdamW([p_l2], lr=lr, weight_decay=0.0, clip_threshold=NO_CLIP)
    g = torch.tensor([0.1, 0.1], dtype=torch.float64)
    p_dec.grad = g.clone()
    p_l2.grad = g + wd * p_l2.detach()
    opt_dec.step()
    opt_l2.step()
    assert not torch.allclose(p_dec, p_l2)
    expected = torch.tensor([2.0, -1.0], dtype=torch.float64) * (1 - lr * wd) - lr * torch.sign(g)
    torch.testing.assert_close(p_dec.detach(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_state_dict_round_trip_resumes_identically(amsgrad, tmp_path):
    hp = dict(lr=1e-2, weight_decay=1e-2, amsgrad=amsgrad, clip_threshold=1.0)
    batches = _batches(6)

    straight = _model()
    _train(straight, StableAdamW(straight.parameters(), **hp), batches)

    first = _model()
    opt = StableAdamW(first.parameters(), **hp)
    _train(first, opt, batches[:3])
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = StableAdamW(resumed.parameters(), **hp)
    opt2.load_state_dict(ckpt["optim"])
    assert all(s["step"] == 3 for s in opt2.state.values())
    _train(resumed, opt2, batches[3:])

    for p_a, p_b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p_b, p_a, rtol=0.0, atol=0.0)


def test_skips_params_without_grad_and_returns_closure_loss():
    used = nn.Parameter(torch.ones(3))
    unused = nn.Parameter(torch.ones(3))
    opt = StableAdamW([used, unused], lr=1e-1)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3.0)
    assert unused not in opt.state
    torch.testing.assert_close(unused.detach(), torch.ones(3))
    assert (used.detach() < 1.0).all()


def test_rejects_sparse_gradients():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = StableAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=-1.0),
        dict(eps=0.0),
        dict(betas=(1.0, 0.9)),
        dict(weight_decay=-1.0),
        dict(clip_threshold=0.0),
    ],
)
def test_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError):
        StableAdamW([nn.Parameter(torch.zeros(1))], **bad)


def test_half_precision_params_step():
    p = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = StableAdamW([p], lr=1e-2)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert torch.isfinite(p).all() and (p < 1.0).all()
