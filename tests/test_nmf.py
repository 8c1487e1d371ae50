"""NMF layer: properties that fail when the solver, the gradient truncation or the FLOP count is wrong."""

import pytest
import torch

import factorizer_cli as ft
from factorizer_cli.errors import ConfigError
from factorizer_cli.nn.factorization import relative_error


def _lowrank_plus_noise(batch=6, m=8, n=64, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, h = torch.rand(batch, m, rank, generator=g), torch.rand(batch, rank, n, generator=g)
    return w @ h + 0.05 * torch.rand(batch, m, n, generator=g)


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("rank", [1, 3])
def test_error_decreases_with_iterations_and_factors_stay_nonnegative(solver, rank):
    x = _lowrank_plus_noise()
    torch.manual_seed(0)
    nmf = ft.NMF((8, 64), rank=rank, solver=solver)
    errors = []
    for iters in (1, 2, 5, 20):
        nmf.num_iters = iters
        u, v = nmf.decompose(x)
        assert (u >= 0).all() and (v >= 0).all()
        errors.append(relative_error(x, u @ v.mT).mean().item())
    # Monotone (block coordinate descent never increases the error) and really improving.
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] - 1e-4, errors
    assert errors[-1] < 0.2


def test_rank_from_compression_matches_upstream_rule():
    assert ft.NMF((8, 512), compression=10).rank == 1  # ceil(4096 / (10 * 520)) = 1
    assert ft.NMF((64, 64), compression=2).rank == 16  # ceil(4096 / (2 * 128)) = 16
    assert ft.NMF((8, 512), rank=2).compression == pytest.approx(4096 / (2 * 520))


def test_flops_match_the_seed_readme_and_follow_num_iters():
    nmf = ft.NMF(size=(8, 512), rank=2, num_iters=5, init="uniform", solver="mu")
    assert nmf.flops == {"init": 0, "decompose": 226240, "reconstruct": 16384}
    nmf.num_iters = 1
    assert nmf.flops["decompose"] == 226240 // 5
    hals = ft.NMF(size=(8, 512), rank=1, num_iters=5, solver="hals")
    # 2R(MN + NR + MR + M) for U plus the same with M, N swapped for V.
    assert hals.flops["decompose"] == 5 * (2 * (4096 + 512 + 8 + 8) + 2 * (4096 + 8 + 512 + 512))


def test_initial_factors_are_buffers_saved_with_the_weights():
    nmf = ft.NMF((8, 32), rank=2)
    state = nmf.state_dict()
    assert set(state) == {"init.u0", "init.v0"}
    assert state["init.u0"].shape == (8, 2) and state["init.v0"].shape == (32, 2)
    assert not any(True for _ in nmf.parameters())


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_gradients_flow_to_the_input(solver):
    x = _lowrank_plus_noise().requires_grad_()
    y = ft.NMF((8, 64), rank=2, solver=solver)(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("steps", [1, 2])
def test_only_the_last_num_grad_steps_iterations_are_tracked(solver, steps):
    x = _lowrank_plus_noise(rank=1).requires_grad_()
    nmf = ft.NMF((8, 64), rank=2, num_iters=5, num_grad_steps=steps, solver=solver)
    nmf(x).sum().backward()
    truncated = x.grad.clone()

    # Reference: run the untracked iterations by hand, then the tracked ones.
    x_ref = x.detach().clone().requires_grad_()
    with torch.no_grad():
        u, v = nmf.init(x_ref)
        for _ in range(5 - steps):
            u = nmf.solver.update(x_ref, u, v)
            v = nmf.solver.update(x_ref.mT, v, u)
    for _ in range(steps):
        u = nmf.solver.update(x_ref, u, v)
        v = nmf.solver.update(x_ref.mT, v, u)
    (u @ v.mT).sum().backward()
    torch.testing.assert_close(truncated, x_ref.grad)

    x.grad = None
    ft.NMF((8, 64), rank=2, num_iters=5, solver=solver)(x).sum().backward()
    assert not torch.allclose(truncated, x.grad), "full backprop should differ from truncated"


def test_no_grad_steps_means_no_graph():
    x = _lowrank_plus_noise().requires_grad_()
    assert not ft.NMF((8, 64), rank=1, num_grad_steps=0)(x).requires_grad


@pytest.mark.parametrize("num_iters", [1, 2, 5, 9])
def test_rank1_hals_gram_path_equals_the_direct_iteration(num_iters):
    x = _lowrank_plus_noise(batch=4, m=8, n=512, rank=1, seed=num_iters).view(2, 2, 8, 512)
    nmf = ft.NMF((8, 512), rank=1, num_iters=num_iters, solver="hals")
    with torch.no_grad():
        direct = nmf(x)  # input_is_nonnegative is False: the textbook iteration
        nmf.input_is_nonnegative = True
        assert nmf._gram_path_applies(x)
        fast = nmf(x)
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-6)


def test_unknown_solver_or_init_names_the_choices():
    with pytest.raises(ConfigError, match="hals"):
        ft.NMF((8, 8), rank=1, solver="svd")
    with pytest.raises(ConfigError, match="uniform"):
        ft.NMF((8, 8), rank=1, init="nndsvd")
