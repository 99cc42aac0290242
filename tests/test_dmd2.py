"""DMD2: the distribution-matching mathematics against closed-form Gaussian scores, the method's players, update
schedule and backward simulation on tiny networks, and ``fewstep.distill`` end to end on the embedded grid25 teacher.

The mathematics (METHODS.md, DMD2 1.): for generator samples ``x = G_theta(z)`` diffused to ``x_t = a x + sigma eps``,

    d/dtheta KL(p_fake,t || p_real,t) = E[(score_fake - score_real)(x_t) a dx/dtheta]
                                      = E[(a^2 / sigma^2) (D_fake - D_real)(x_t) dx/dtheta]

because ``score(x_t) = -(x_t - a D(x_t)) / sigma^2`` and the score-function term ``E[d/dtheta log p_theta]`` vanishes.
``D_fake - D_real = p_real - p_fake``, which is what :func:`distribution_matching_grad` divides by ``mean|p_real|``.
With Gaussian data ``N(m_r, s_r^2)`` and a Gaussian generator ``x = m_g + s_g z`` both denoisers and the KL are known
in closed form, so every claim is checked against exact values.
"""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from fewstep.config import DMD2Config, LoopConfig
from fewstep.diffusion import samplers
from fewstep.diffusion.denoiser import CFGDenoiser, Denoiser
from fewstep.diffusion.schedule import DDPMSchedule, bcast
from fewstep.errors import UserError
from fewstep.methods.base import Batch
from fewstep.methods.dmd2 import DMD2Method, distribution_matching_grad, distribution_matching_loss
from fewstep.models.discriminators import FeatureHead
from tiny import image_batch, image_teacher, params, point_batch, point_teacher




SCHEDULES = {
    "linear": DDPMSchedule(),
    "linear_zsnr": DDPMSchedule(rescale_zero_terminal_snr=True),
    "cosine": DDPMSchedule(beta_schedule="squaredcos_cap_v2"),
}


# ------------------------------------------------------------------------------------------------------------------
# Closed-form Gaussians
# ------------------------------------------------------------------------------------------------------------------
def gaussian_denoiser(m, s, a, sig, x_t):
    """``E[x0 | x_t]`` for data ``N(m, s^2)`` per dimension: ``m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m)``."""
    return m + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * m)


def gaussian_kl(m_g, s_g, m_r, s_r, a, sig):
    """``KL(N(a m_g, a^2 s_g^2 + sigma^2) || N(a m_r, a^2 s_r^2 + sigma^2))``, summed over dimensions."""
    v_f, v_r = a**2 * s_g**2 + sig**2, a**2 * s_r**2 + sig**2
    return 0.5 * (torch.log(v_r / v_f) + (v_f + a**2 * (m_g - m_r) ** 2) / v_r - 1).sum()


def gaussian_problem(dim):
    """Target ``(m_r, s_r)`` and a generator ``(m_g, s_g)`` away from it (float64 leaf tensors)."""
    k = torch.arange(dim, dtype=torch.float64)
    m_r = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    s_r = torch.linspace(0.5, 1.0, dim, dtype=torch.float64)
    m_g = (m_r + 0.7 * torch.cos(k)).requires_grad_()
    s_g = (1.6 * s_r - 0.1 * torch.sin(k)).requires_grad_()
    return m_r, s_r, m_g, s_g


def alpha_sigma64(schedule, t):
    a, s = schedule.alpha_sigma(torch.tensor(float(t)))
    return a.double(), s.double()


def analytic_kl_grad(m_g, s_g, m_r, s_r, a, sig):
    return torch.cat(torch.autograd.grad(gaussian_kl(m_g, s_g, m_r, s_r, a, sig), (m_g, s_g)))


def moment_matched_normals(n, dim, seed):
    """``n`` draws of ``2 dim`` normals whitened so their sample mean is exactly 0 and sample covariance exactly I.

    The DMD integrand ``(D_fake - D_real)(x_t) dx/dtheta`` is a polynomial of degree 2 in ``(z, eps)`` (the Gaussian
    denoisers are affine), so its average over such samples *equals* its expectation: an exact Monte Carlo check.
    """
    w = torch.randn(n, 2 * dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w - w.mean(0)
    chol = torch.linalg.cholesky(w.T @ w / n)
    w = torch.linalg.solve_triangular(chol, w.T, upper=False).T
    return w[:, :dim], w[:, dim:]


def dm_terms(m_r, s_r, m_g, s_g, a, sig, z, eps):
    """Generator samples, their diffused versions, both exact denoisers, and ``distribution_matching_grad``."""
    x = m_g + s_g * z
    x_t = a * x.detach() + sig * eps
    real_x0 = gaussian_denoiser(m_r, s_r, a, sig, x_t)
    fake_x0 = gaussian_denoiser(m_g.detach(), s_g.detach(), a, sig, x_t)  # the fake score is exact
    grad = distribution_matching_grad(x.detach(), real_x0, fake_x0)
    return x, x_t, real_x0, fake_x0, grad


# ------------------------------------------------------------------------------------------------------------------
# 1. The mathematics
# ------------------------------------------------------------------------------------------------------------------
def test_grad_is_normalised_score_difference_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, generator=g)
    real_x0, fake_x0 = torch.randn(16, 3, 4, generator=g), torch.randn(16, 3, 4, generator=g)
    grad = distribution_matching_grad(x, real_x0, fake_x0)
    weight = (x - real_x0).abs().mean(dim=(1, 2), keepdim=True)
    assert_close(grad, (fake_x0 - real_x0) / weight)
    # the normalisation is per sample: each row is what it would be alone, and scaling one sample's residuals
    # (x, D_real, D_fake all scaled by c) leaves its gradient unchanged
    for i in (0, 7):
        assert_close(grad[i : i + 1], distribution_matching_grad(x[i : i + 1], real_x0[i : i + 1], fake_x0[i : i + 1]))
    scaled = distribution_matching_grad(x * 10, real_x0 * 10, fake_x0 * 10)
    assert_close(scaled, grad)
    # the fake score equal to the real one gives no gradient
    assert torch.equal(distribution_matching_grad(x, real_x0, real_x0.clone()), torch.zeros_like(x))

    # the loss hands exactly grad / numel to x (DMD2 code: mean reduction)
    xr = x.clone().requires_grad_()
    loss = distribution_matching_loss(xr, grad)
    loss.backward()
    assert_close(xr.grad, grad / x.numel())
    assert_close(loss, 0.5 * grad.pow(2).mean())


def test_grad_replaces_non_finite_values():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g)
    real_x0, fake_x0 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    clean = distribution_matching_grad(x, real_x0, fake_x0)
    real_bad, fake_bad, x_bad = real_x0.clone(), fake_x0.clone(), x.clone()
    real_bad[1, 2] = float("nan")
    fake_bad[2, 0] = float("inf")
    fake_bad[3, 4] = float("-inf")
    x_bad[4, 1] = float("nan")
    grad = distribution_matching_grad(x_bad, real_bad, fake_bad)
    assert torch.isfinite(grad).all()
    # rows without a non-finite input are untouched by the others' (per-sample normalisation)
    assert_close(grad[[0, 5]], clean[[0, 5]])
    # x == D_real (p_real = 0): the clamped weight keeps the result finite
    assert torch.isfinite(distribution_matching_grad(x, x.clone(), fake_x0)).all()
    xr = x_bad.clone().requires_grad_()
    distribution_matching_loss(xr, grad).backward()
    assert torch.isfinite(xr.grad[[0, 1, 2, 3, 5]]).all()


@pytest.mark.parametrize("schedule_name", ["linear", "linear_zsnr", "cosine"])
@pytest.mark.parametrize("t", [100, 500, 900])
def test_unnormalised_direction_is_the_kl_gradient(schedule_name, t):
    """``(a^2/sigma^2) E[(grad * mean|p_real|) dx/dtheta] = dKL_t/dtheta`` for ``theta = (m_g, s_g)``."""
    schedule = SCHEDULES[schedule_name]
    dim = 3
    m_r, s_r, m_g, s_g = gaussian_problem(dim)
    a, sig = alpha_sigma64(schedule, t)
    analytic = analytic_kl_grad(m_g, s_g, m_r, s_r, a, sig)
    assert analytic.abs().max() > 0

    def estimate(z, eps):
        x, _, real_x0, _, grad = dm_terms(m_r, s_r, m_g, s_g, a, sig, z, eps)
        weight = (x.detach() - real_x0).abs().mean(1, keepdim=True)
        integrand_m = (a**2 / sig**2) * grad * weight  # dx/dm_g = 1
        integrand_s = integrand_m * z  # dx/ds_g = z
        return torch.cat([integrand_m, integrand_s], 1)

    # exact: moment-matched samples integrate the degree-2 polynomial integrand exactly
    z, eps = moment_matched_normals(4096, dim, seed=t)
    assert_close(estimate(z, eps).mean(0), analytic, rtol=1e-7, atol=1e-12 * float(analytic.abs().max()))

    # plain Monte Carlo with a fixed seed: within 4 standard errors
    g = torch.Generator().manual_seed(t + 1)
    n = 40000
    z, eps = (torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(2))
    values = estimate(z, eps)
    se = values.std(0) / math.sqrt(n)
    assert ((values.mean(0) - analytic).abs() <= 4 * se + 1e-12).all()


@pytest.mark.parametrize("schedule_name", ["linear", "linear_zsnr", "cosine"])
@pytest.mark.parametrize("t", [100, 500, 900])
def test_normalised_gradient_is_a_descent_direction_of_the_kl(schedule_name, t):
    """Backpropagating ``distribution_matching_loss`` into ``(m_g, s_g)`` points along ``dKL/dtheta``.

    The per-sample weight ``1 / mean|p_real|`` averages over the dimensions of a sample, so in many dimensions it is
    nearly constant and the direction is the KL gradient's (cosine > 0.99); in one dimension the weight varies with
    ``z`` and tilts the direction (cosine ~0.75-0.99 here), but it still descends the KL.
    """
    schedule = SCHEDULES[schedule_name]
    a, sig = alpha_sigma64(schedule, t)
    for dim, min_cosine in ((32, 0.99), (1, 0.5)):
        m_r, s_r, m_g, s_g = gaussian_problem(dim)
        analytic = analytic_kl_grad(m_g, s_g, m_r, s_r, a, sig)
        g = torch.Generator().manual_seed(t + dim)
        z = torch.randn(8192, dim, generator=g, dtype=torch.float64)
        eps = torch.randn(8192, dim, generator=g, dtype=torch.float64)
        x, _, _, _, grad = dm_terms(m_r, s_r, m_g, s_g, a, sig, z, eps)
        got = torch.cat(torch.autograd.grad(distribution_matching_loss(x, grad), (m_g, s_g)))
        cosine = float(torch.dot(got, analytic) / (got.norm() * analytic.norm()))
        assert cosine > min_cosine, (dim, cosine)
        # a small step along -got lowers the KL
        with torch.no_grad():
            step = 1e-3 / float(got.norm())
            before = gaussian_kl(m_g, s_g, m_r, s_r, a, sig)
            after = gaussian_kl(m_g - step * got[:dim], s_g - step * got[dim:], m_r, s_r, a, sig)
        assert after < before


def _train_gaussian_generator(teacher_only: bool, steps: int = 300, n: int = 256, seed: int = 0):
    """Adam on ``distribution_matching_loss`` with the method's own DM-time draw (2%..98%, rounded)."""
    schedule = DDPMSchedule(rescale_zero_terminal_snr=True)
    t_dm = types.SimpleNamespace(cfg=DMD2Config(), schedule=schedule)  # what DMD2Method._t_dm reads
    torch.manual_seed(seed)
    m_r, s_r = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.8])
    m_g = torch.tensor([-2.0, 2.0], requires_grad=True)  # far from the target, one scale too wide, one too narrow
    s_g = torch.tensor([2.0, 0.2], requires_grad=True)
    opt = torch.optim.Adam([m_g, s_g], lr=0.05)
    lr_drop = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.6 * steps)], gamma=0.2)
    seen_t = []
    for _ in range(steps):
        z = torch.randn(n, 2)
        x = m_g + s_g * z
        t = DMD2Method._t_dm(t_dm, n, "cpu")
        seen_t.append(t)
        x_t = schedule.add_noise(x.detach(), torch.randn(n, 2), t)
        a, sig = (bcast(v, x_t) for v in schedule.alpha_sigma(t))
        real_x0 = gaussian_denoiser(m_r, s_r, a, sig, x_t)
        fake_x0 = x.detach() if teacher_only else gaussian_denoiser(m_g.detach(), s_g.detach(), a, sig, x_t)
        loss = distribution_matching_loss(x, distribution_matching_grad(x.detach(), real_x0, fake_x0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_drop.step()
    return (m_r, s_r), (m_g.detach(), s_g.detach()), torch.cat(seen_t)


def test_training_a_gaussian_generator_matches_mean_and_scale():
    (m_r, s_r), (m_g, s_g), seen_t = _train_gaussian_generator(teacher_only=False)
    # the DM times are whole timesteps in 2%..98% of [0, 999]
    assert torch.equal(seen_t, seen_t.round())
    assert seen_t.min() >= round(0.02 * 999) and seen_t.max() <= round(0.98 * 999)
    assert seen_t.min() < 60 and seen_t.max() > 940
    assert_close(m_g, m_r, rtol=0, atol=0.05)
    assert_close(s_g, s_r, rtol=0, atol=0.05)


def test_teacher_alone_collapses_the_scale():
    """Without the fake score (``D_fake(x_t) = x``) the gradient pulls each sample to the teacher's denoised estimate:
    the mean is found but the scale collapses (mode seeking), so the fake term is what keeps the spread."""
    (m_r, s_r), (m_g, s_g), _ = _train_gaussian_generator(teacher_only=True)
    assert_close(m_g, m_r, rtol=0, atol=0.05)
    assert (s_g.abs() < 0.2 * s_r).all()


# ------------------------------------------------------------------------------------------------------------------
# 2. DMD2Method on tiny networks
# ------------------------------------------------------------------------------------------------------------------
def dmd2(teacher: Denoiser, seed: int = 0, **cfg) -> DMD2Method:
    torch.manual_seed(seed)
    return DMD2Method(teacher, DMD2Config(**cfg))


def grads(module):
    return [p.grad for p in module.parameters()]


def test_updates_follow_ttur():
    teacher = point_teacher()
    m5 = dmd2(teacher, ttur=5, gan=False)
    for it in range(23):
        expected = ["generator", "guidance"] if it % 5 == 0 else ["guidance"]
        assert m5.updates(it) == expected, it
    m1 = dmd2(teacher, ttur=1, gan=False)
    assert all(m1.updates(it) == ["generator", "guidance"] for it in range(7))


def test_players_share_no_parameters_with_the_teacher():
    teacher = point_teacher()
    m = dmd2(teacher)
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    gen, guidance = m.players["generator"].module, m.players["guidance"].module
    for module in (gen, guidance):
        assert all(p.requires_grad for p in module.parameters())
        assert not teacher_ptrs & {p.data_ptr() for p in module.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # both start as copies of the teacher
    assert_close(params(gen.denoiser), params(teacher))
    assert_close(params(guidance.fake), params(teacher))
    # the optimizers hold exactly their own player's parameters
    for name in ("generator", "guidance"):
        p = m.players[name]
        in_opt = {id(q) for group in p.optimizer.param_groups for q in group["params"]}
        assert in_opt == {id(q) for q in p.module.parameters()}


def test_dm_loss_is_zero_while_fake_equals_teacher():
    """At initialisation the fake score is the teacher, so the distribution-matching gradient is exactly zero; once the
    fake score has been trained on generator samples it is not."""
    teacher = point_teacher()
    m = dmd2(teacher, gan=False, ttur=1)
    batch = point_batch()
    loss, stats = m.loss("generator", batch, 0)
    assert float(stats["dm"]) == 0.0 and float(stats["score_mismatch"]) == 0.0
    loss.backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads(m.players["generator"].module))

    guidance = m.players["guidance"]
    for it in range(3):
        guidance.optimizer.zero_grad()
        g_loss, _ = m.loss("guidance", batch, it)
        g_loss.backward()
        guidance.optimizer.step()
    m.players["generator"].optimizer.zero_grad()
    loss, stats = m.loss("generator", batch, 0)
    assert float(stats["dm"]) > 0 and float(stats["score_mismatch"]) > 0
    loss.backward()
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads(m.players["generator"].module))


@pytest.mark.parametrize("kind", ["points", "images"])
def test_gradients_reach_only_the_intended_players(kind):
    teacher = point_teacher() if kind == "points" else image_teacher()
    batch = point_batch() if kind == "points" else image_batch()
    m = dmd2(teacher, gan=True, ttur=1)
    gen = m.players["generator"].module
    guidance = m.players["guidance"].module
    # move the fake score off the teacher so that the DM term is not zero
    with torch.no_grad():
        for p in guidance.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))

    loss, stats = m.loss("generator", batch, 0)
    assert {"dm", "score_mismatch", "gan_g"} <= set(stats)
    loss.backward()
    assert all(g is not None for g in grads(gen)) and any(torch.count_nonzero(g) > 0 for g in grads(gen))
    assert all(p.grad is None for p in teacher.parameters())
    # the fake score's denoiser output is used without gradient; only the GAN term reaches the guidance player
    # (through the head and the fake network's encoder), and the loop zeroes those before the guidance update
    assert any(g is not None for g in grads(guidance.head))
    for p in gen.parameters():
        p.grad = None
    for p in guidance.parameters():
        p.grad = None

    no_gan_g = dmd2(teacher, gan=True, gan_generator_weight=0.0, ttur=1)
    loss, stats = no_gan_g.loss("generator", batch, 0)
    assert "gan_g" not in stats
    loss.backward()
    assert all(g is None for g in grads(no_gan_g.players["guidance"].module))

    loss, stats = m.loss("guidance", batch, 0)
    assert {"denoise", "gan_d", "real_logit", "fake_logit"} <= set(stats)
    assert math.isfinite(float(stats["gan_d"])) and float(stats["gan_d"]) > 0
    loss.backward()
    assert all(g is None for g in grads(gen))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(g is not None for g in grads(guidance.head)) and any(torch.count_nonzero(g) > 0 for g in grads(guidance.head))
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads(guidance.fake))


def test_gan_head_sits_on_the_fake_scores_features():
    # image teacher: a convolutional head on the UNet's bottleneck map (8x8 -> 4x4 with channel_mult (1, 2))
    teacher = image_teacher()
    m = dmd2(teacher, gan=True)
    guidance = m.players["guidance"].module
    feats = guidance.fake.features(torch.zeros(2, 1, 8, 8), torch.full((2,), 999.0), torch.tensor([0, 1]))
    assert isinstance(guidance.head, FeatureHead)
    assert guidance.head.config["channels"] == feats.shape[1] == 16
    assert guidance.head.config["spatial"] == feats.shape[-1] == 4
    logits = guidance.logits(torch.randn(3, 1, 8, 8), torch.full((3,), 500.0), torch.tensor([1, 2, 3]))
    assert logits.shape == (3,)
    # points: a vector head of the MLP's width
    mp = dmd2(point_teacher(), gan=True)
    assert mp.players["guidance"].module.head.config["channels"] == 32
    assert mp.players["guidance"].module.head.config["spatial"] == 0
    # gan=False: no head, no GAN losses on either side
    m0 = dmd2(point_teacher(), gan=False)
    assert m0.players["guidance"].module.head is None
    _, stats = m0.loss("guidance", point_batch(), 0)
    assert set(stats) == {"denoise"}
    _, stats = m0.loss("generator", point_batch(), 0)
    assert "gan_g" not in stats and "regression" not in stats


def test_real_score_uses_cfg():
    teacher = image_teacher()
    batch = image_batch()
    plain = dmd2(teacher, gan=False, guidance_scale=1.0)
    assert plain.real is teacher
    _, stats = plain.loss("generator", batch, 0)
    assert float(stats["score_mismatch"]) == 0.0
    guided_m = dmd2(teacher, gan=False, guidance_scale=3.0)
    assert isinstance(guided_m.real, CFGDenoiser) and guided_m.real.scale == 3.0
    # the fake score is unguided, so with w != 1 the two differ already at initialisation
    _, stats = guided_m.loss("generator", batch, 0)
    assert float(stats["score_mismatch"]) > 0


class CallRecorder:
    """A forward hook on the generator player: the time, the input, the output and the grad mode of every call."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        x, t = args[0], args[1]
        self.calls.append(dict(t=t.detach().clone(), x=x.detach().clone(), out=output.detach().clone(),
                               grad=torch.is_grad_enabled(), out_requires_grad=output.requires_grad,
                               x_requires_grad=x.requires_grad))


def test_backward_simulation_trains_on_the_generators_own_samples():
    teacher = point_teacher()
    m = dmd2(teacher, steps=4, gan=False, ttur=1, fake_score="shared")  # DMD2's one step per batch
    ts = m.timesteps
    assert ts.tolist() == [999.0, 749.0, 499.0, 249.0]
    schedule = m.schedule
    # an output offset makes the generator's predictions (x0 ~ -3 near pure noise) unlike data or zero, so that
    # re-noising them is told apart from re-noising anything else
    with torch.no_grad():
        m.players["generator"].module.denoiser.net.out.bias.add_(3.0)
    recorder = CallRecorder(m.players["generator"].module)
    batch = point_batch(128)
    trained_steps = []
    residuals = []
    torch.manual_seed(0)
    for _ in range(40):
        recorder.calls.clear()
        m.loss("generator", batch, 0)
        calls = recorder.calls
        i = len(calls) - 1
        trained_steps.append(i)
        assert 0 <= i < 4
        for j, c in enumerate(calls):
            # each call sees one student time for the whole batch, the times in sampling order
            assert torch.equal(c["t"], torch.full((128,), float(ts[j])))
            # gradient only through the last call: earlier steps run without it, and the input is detached
            assert c["grad"] == (j == i) and c["out_requires_grad"] == (j == i)
            assert not c["x_requires_grad"]
        # the first input is pure noise at t = 999 (zero terminal SNR: sigma = 1)
        assert calls[0]["x"].std() > 0.8 and calls[0]["x"].std() < 1.2
        # every later input is the previous output re-noised: (x_j - a_j x0_{j-1}) / sigma_j is fresh N(0, 1) noise
        for j in range(1, len(calls)):
            assert float(calls[j - 1]["out"].mean()) < -1.0
            a, s = schedule.alpha_sigma(ts[j])
            residuals.append((calls[j]["x"] - a * calls[j - 1]["out"]) / s)
    assert set(trained_steps) == {0, 1, 2, 3}
    r = torch.cat(residuals).flatten()
    assert r.numel() > 5000
    assert abs(float(r.mean())) < 0.05 and abs(float(r.std()) - 1) < 0.05

    # the guidance player's samples come from the same simulation, entirely without gradient
    recorder.calls.clear()
    for _ in range(8):
        m.loss("guidance", batch, 0)
    assert recorder.calls and not any(c["grad"] or c["out_requires_grad"] for c in recorder.calls)
    assert {float(c["t"][0]) for c in recorder.calls} <= set(ts.tolist())
    recorder.handle.remove()


def test_dm_term_diffuses_the_trained_sample_to_dm_times():
    """The real and fake scores are evaluated at ``x_t = a_t x + sigma_t eps`` for the generator's (last) output ``x``,
    with whole timesteps ``t`` from 2%..98% of the grid; the fake score sees the same ``(x_t, t)`` as the teacher."""
    teacher = point_teacher()
    m = dmd2(teacher, steps=2, gan=False, ttur=1, fake_score="shared")
    with torch.no_grad():
        m.players["generator"].module.denoiser.net.out.bias.add_(3.0)
    gen_calls = CallRecorder(m.players["generator"].module)
    real_calls = CallRecorder(teacher)
    fake_calls = CallRecorder(m.players["guidance"].module.fake)
    ts, residuals = [], []
    torch.manual_seed(1)
    for _ in range(10):
        for rec in (gen_calls, real_calls, fake_calls):
            rec.calls.clear()
        m.loss("generator", point_batch(256), 0)
        assert len(real_calls.calls) == len(fake_calls.calls) == 1
        real, fake = real_calls.calls[0], fake_calls.calls[0]
        assert torch.equal(real["x"], fake["x"]) and torch.equal(real["t"], fake["t"])
        assert not real["grad"] and not fake["grad"]
        x, t = gen_calls.calls[-1]["out"], real["t"]
        a, s = (bcast(v, x) for v in m.schedule.alpha_sigma(t))
        residuals.append((real["x"] - a * x) / s)
        ts.append(t)
    for rec in (gen_calls, real_calls, fake_calls):
        rec.handle.remove()
    t = torch.cat(ts)
    assert torch.equal(t, t.round()) and t.min() >= 20 and t.max() <= 979 and len(t.unique()) > 500
    r = torch.cat(residuals)
    assert abs(float(r.mean())) < 0.05 and abs(float(r.std()) - 1) < 0.05


def test_gan_losses_push_the_logits_the_right_way():
    """Head side: ``softplus(-h(real)) + softplus(h(fake))`` raises real logits and lowers fake ones (both calls get
    gradient); generator side: ``softplus(-h(fake))`` raises the fake logits."""
    m = dmd2(image_teacher(), gan=True, ttur=1)
    head = m.players["guidance"].module.head
    seen = []

    def hook(module, args, output):
        entry = {}
        seen.append(entry)
        output.register_hook(lambda g: entry.__setitem__("grad", g.clone()))

    handle = head.register_forward_hook(hook)
    loss, _ = m.loss("guidance", image_batch(), 0)
    loss.backward()
    assert len(seen) == 2 and all("grad" in e for e in seen)
    real_grad, fake_grad = seen[0]["grad"], seen[1]["grad"]
    assert (real_grad < 0).all() and (fake_grad > 0).all()
    seen.clear()
    for p in m.players["generator"].module.parameters():
        p.grad = None
    loss, stats = m.loss("generator", image_batch(), 0)
    loss.backward()
    assert len(seen) == 1 and (seen[0]["grad"] < 0).all()
    handle.remove()
    # the fake score is still the teacher, so the DM term is zero: the generator's gradient is the GAN term's, and
    # it reaches the generator through the diffused sample
    assert float(stats["dm"]) == 0.0
    assert_close(loss.detach(), m.cfg.gan_generator_weight * stats["gan_g"])
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in m.players["generator"].module.parameters())


def test_one_step_generator_starts_from_pure_noise():
    m = dmd2(point_teacher(), steps=1, gan=False)
    assert m.timesteps.tolist() == [999.0]
    recorder = CallRecorder(m.players["generator"].module)
    for _ in range(5):
        recorder.calls.clear()
        m.loss("generator", point_batch(256), 0)
        assert len(recorder.calls) == 1
        c = recorder.calls[0]
        assert torch.equal(c["t"], torch.full((256,), 999.0)) and c["grad"]
        assert abs(float(c["x"].mean())) < 0.2 and abs(float(c["x"].std()) - 1) < 0.15
    recorder.handle.remove()


def test_regression_pairs_are_teacher_ode_samples():
    teacher = point_teacher()
    m = dmd2(teacher, regression=True, regression_pairs=24, regression_teacher_steps=3, gan=False, ttur=1)
    z, y, labels = m.pairs
    assert z.shape == (24, 2) and y.shape == (24, 2) and labels is None
    assert_close(y, samplers.sample(teacher, z, 3, "heun", spacing="trailing"))
    loss, stats = m.loss("generator", point_batch(), 0)
    assert "regression" in stats and float(stats["regression"]) > 0
    # at initialisation the DM term is zero (fake == teacher), so the loss is the weighted regression alone
    assert float(stats["dm"]) == 0.0
    assert_close(loss.detach(), m.cfg.regression_weight * stats["regression"])
    loss.backward()
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads(m.players["generator"].module))
    # class-conditional teacher: the pairs carry labels
    mi = dmd2(image_teacher(), regression=True, regression_pairs=6, regression_teacher_steps=2, gan=False)
    z, y, labels = mi.pairs
    assert z.shape == y.shape == (6, 1, 8, 8) and labels.shape == (6,)
    assert int(labels.min()) >= 0 and int(labels.max()) < 10
    # without regression: no pairs, no stat
    m0 = dmd2(teacher, gan=False)
    assert m0.pairs is None
    assert "regression" not in m0.loss("generator", point_batch(), 0)[1]


class PointData:
    kind = "points"
    sample_shape = (2,)

    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=g) * 0.5 + 0.3
        self.labels = None


def test_loop_keeps_the_teacher_frozen_and_follows_ttur(tmp_path):
    from fewstep.train import train

    teacher = point_teacher()
    before = params(teacher)
    loop = LoopConfig(iterations=7, batch_size=32, checkpoint_every=100, log_every=7, sample_every=0, progress=False)
    cfg = DMD2Config(ttur=5, gan=True, warmup_iterations=0, lr_generator=1e-3, lr_fake=1e-3, loop=loop)
    torch.manual_seed(0)
    m = DMD2Method(teacher, cfg)
    gen_before = params(m.players["generator"].module)
    guid_before = params(m.players["guidance"].module)
    row = train(m, PointData(), loop, tmp_path / "run", config=cfg)
    # the teacher is bit-identical and still frozen; both players moved
    after = params(teacher)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in teacher.parameters())
    gen_after, guid_after = params(m.players["generator"].module), params(m.players["guidance"].module)
    assert any(not torch.equal(gen_before[k], gen_after[k]) for k in gen_before)
    assert any(not torch.equal(guid_before[k], guid_after[k]) for k in guid_before)
    # TTUR 5 over 7 iterations: the generator stepped at it = 0 and 5, the guidance player every iteration
    for name, expected in (("generator", 2), ("guidance", 7)):
        opt = m.players[name].optimizer
        steps = {int(opt.state[p]["step"]) for group in opt.param_groups for p in group["params"] if p in opt.state}
        assert steps == {expected}, name
    assert {"generator/dm", "guidance/denoise", "guidance/gan_d", "generator/gan_g"} <= set(row)
    assert row["nonfinite_skipped"] == 0


# ------------------------------------------------------------------------------------------------------------------
# Schedules and LoRA options of the GPU recipes (warm-up unit, GAN start, lora_alpha, lora_players)
# ------------------------------------------------------------------------------------------------------------------
def _lrs(m: DMD2Method, name: str, updates: int) -> list[float]:
    """The learning rate of each of a player's first ``updates`` updates (its scheduler stepped after each)."""
    import warnings

    player, out = m.players[name], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no optimizer step here
        for _ in range(updates):
            out.append(player.optimizer.param_groups[0]["lr"])
            player.lr_scheduler.step()
    return out


@pytest.mark.parametrize("unit", ["updates", "iterations"])
def test_warmup_counts_player_updates_or_loop_iterations(unit):
    lr, w, ttur = 1e-3, 40, 10
    m = dmd2(point_teacher(), gan=False, ttur=ttur, warmup_iterations=w, warmup_unit=unit, lr_generator=lr, lr_fake=lr)
    gen, guid = _lrs(m, "generator", 6), _lrs(m, "guidance", 45)
    # the guidance player updates every iteration: both units are the same for it
    assert guid == pytest.approx([lr * min(1.0, (k + 1) / w) for k in range(45)], rel=1e-12)
    # the generator's k-th update happens at iteration k * ttur
    count = [k * ttur if unit == "iterations" else k for k in range(6)]
    assert gen == pytest.approx([lr * min(1.0, (c + 1) / w) for c in count], rel=1e-12)
    if unit == "iterations":  # warmed up by iteration 40, its 5th update (the 'updates' unit would take 400 iterations)
        assert gen[4] == pytest.approx(lr) and gen[3] < lr
    else:
        assert gen[5] < lr / 6


def test_gan_starts_at_its_iteration_with_its_own_learning_rate():
    lr, stage_lr, start, ttur = 1e-3, 5e-5, 20, 5
    m = dmd2(point_teacher(), gan=True, ttur=ttur, warmup_iterations=0, gan_start_iteration=start,
             gan_stage_lr=stage_lr, lr_generator=lr, lr_fake=lr)
    assert not m.gan_on(start - 1) and m.gan_on(start)
    # before the start: no GAN terms on either side, and the head receives no gradient (AdamW leaves it alone)
    head = m.players["guidance"].module.head
    for it, on in ((start - 1, False), (start, True)):
        for p in head.parameters():
            p.grad = None
        g_loss, g_stats = m.loss("generator", point_batch(), it)
        d_loss, d_stats = m.loss("guidance", point_batch(), it)
        assert ("gan_g" in g_stats) == on and ("gan_d" in d_stats) == on
        d_loss.backward()
        assert all((p.grad is not None) == on for p in head.parameters())
    # the stage's learning rate from iteration `start` on: the generator's update 4 is at iteration 20
    assert _lrs(m, "generator", 6) == pytest.approx([lr] * 4 + [stage_lr] * 2, rel=1e-12)
    assert _lrs(m, "guidance", 22) == pytest.approx([lr] * start + [stage_lr] * 2, rel=1e-12)
    # gan_start_iteration 0 (the default) keeps the GAN on from the first iteration
    assert dmd2(point_teacher(), gan=True).gan_on(0) and not dmd2(point_teacher(), gan=False).gan_on(10**6)


def test_lora_alpha_and_players():
    teacher = image_teacher()
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    # default: both players are LoRA with alpha = rank (scale 1), as before these options existed
    both = dmd2(teacher, lora_rank=4, gan=False)
    for module in (both.players["generator"].module, both.players["guidance"].module.fake):
        layers = [mod for mod in module.modules() if hasattr(mod, "scaling") and "default" in mod.scaling]
        assert layers and all(mod.scaling["default"] == 1.0 for mod in layers)
    # DMD2's SDXL LoRA run: the generator only, rank 64 / alpha 8 (here 4 / 0.5: the same 1/8 scale)
    m = dmd2(teacher, lora_rank=4, lora_alpha=0.5, lora_players=["generator"], gan=True)
    gen = m.players["generator"].module
    fake = m.players["guidance"].module.fake
    layers = [mod for mod in gen.modules() if hasattr(mod, "scaling") and "default" in mod.scaling]
    assert layers and all(mod.scaling["default"] == 0.125 for mod in layers)
    assert not any(".lora_" in n for n, _ in fake.named_parameters())
    assert all(p.requires_grad for p in fake.parameters())  # a full fake score, a copy of its own
    assert not teacher_ptrs & {p.data_ptr() for p in fake.parameters()}
    frozen = [p for p in gen.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in teacher_ptrs for p in frozen)  # the generator's base is the teacher's
    # the adapter's output is scaled by alpha / rank: y = W x + b + (alpha / r) B A x
    lin = next(mod for mod in layers if isinstance(mod.base_layer, torch.nn.Linear))
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        x = torch.randn(3, lin.base_layer.in_features)
        a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        assert_close(lin(x), lin.base_layer(x) + 0.125 * x @ a.T @ b.T)
    # the optimizers: the generator's adapters; every fake-score weight and the head
    in_opt = {id(q) for g in m.players["generator"].optimizer.param_groups for q in g["params"]}
    assert in_opt == {id(q) for q in gen.parameters() if q.requires_grad}
    n_guid = sum(q.numel() for g in m.players["guidance"].optimizer.param_groups for q in g["params"])
    assert n_guid == sum(q.numel() for q in m.players["guidance"].module.parameters())
    with pytest.raises(Exception, match="lora_players"):
        DMD2Config(lora_players=[])
    with pytest.raises(Exception, match="lora_players"):
        DMD2Config(lora_players=["discriminator"])


def test_a_lora_student_with_alpha_exports_its_scale_in_b():
    """diffusers loads a LoRA file at scale 1 (no alphas stored), so the exported B carries alpha / r."""
    from fewstep.export import lora_of_student
    from fewstep.models.lora import apply_lora

    den = apply_lora(image_teacher(), 4, alpha=0.5)
    layers = {name: mod for name, mod in den.net.named_modules() if hasattr(mod, "scaling") and "default" in
              getattr(mod, "scaling", {})}
    with torch.no_grad():
        for mod in layers.values():
            mod.lora_B["default"].weight.normal_()
    state = lora_of_student(den)
    assert len(state) == 2 * len(layers)
    for name, mod in layers.items():
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        a_out, b_out = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        # the change each layer's adapter makes, scale included, is the exported pair's at scale 1
        assert_close(b_out.flatten(1) @ a_out.flatten(1), 0.125 * b.flatten(1) @ a.flatten(1))


# ------------------------------------------------------------------------------------------------------------------
# 3. End to end: fewstep.distill on the embedded grid25 teacher
# ------------------------------------------------------------------------------------------------------------------
def _file_state(prefix: Path) -> dict:
    return load_file(str(prefix.with_suffix(".safetensors")))


def test_distill_end_to_end(tmp_path):
    from fewstep import zoo
    from fewstep.api import load_model, load_teacher
    from fewstep.distillation import distill
    from fewstep.student import Student
    from fewstep.train import list_checkpoints, load_checkpoint, read_metrics

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    out = tmp_path / "run"
    common = dict(teacher="grid25", method="dmd2", out=out, iterations=30, batch_size=64, log_every=5,
                  sample_every=10, checkpoint_every=10, progress=False)
    student = distill(steps=1, evaluate_n=200, **common)

    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "student.json", "eval.json", "report.html"):
        assert (out / name).is_file(), name
    assert [p.name for p in list_checkpoints(out)] == [f"step_{s:08d}.pt" for s in (10, 20, 30)]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"step_{s:08d}.png" for s in (10, 20, 30)]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["it"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all("guidance/denoise" in r for r in rows)
    assert "generator/dm" in rows[0]  # it = 0 is a generator iteration
    evals = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in evals][0] == "student" and all(r["n"] == 200 for r in evals)
    assert "fewstep" in (out / "report.html").read_text()

    # the student is the trained generator, not the teacher
    teacher = load_teacher("grid25")
    saved = _file_state(out / "student")
    teacher_state = teacher.net.state_dict()
    assert saved.keys() == teacher_state.keys()
    assert any(not torch.equal(saved[k], teacher_state[k]) for k in saved)
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    gen_state = ckpt["players"]["generator"]["module"]
    assert all(torch.equal(saved[k], gen_state[f"denoiser.net.{k}"]) for k in saved)

    loaded = load_model(out)
    assert isinstance(loaded, Student)
    assert loaded.timesteps.tolist() == [999.0] and loaded.steps == 1
    x = loaded.sample(50, seed=3)
    assert x.shape == (50, 2) and torch.isfinite(x).all()
    assert_close(x, student.sample(50, seed=3))

    # resuming a finished run changes nothing
    metrics_text = (out / "metrics.jsonl").read_text()
    resumed = distill(steps=1, evaluate_n=0, resume=True, **common)
    again = _file_state(out / "student")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert (out / "metrics.jsonl").read_text() == metrics_text
    assert_close(resumed.sample(20, seed=0), loaded.sample(20, seed=0))

    # a finished run directory is never overwritten
    with pytest.raises(UserError, match="exists"):
        distill(steps=1, evaluate_n=0, **common)
    assert all(torch.equal(saved[k], v) for k, v in _file_state(out / "student").items())


def test_distill_two_step_student(tmp_path):
    from fewstep import zoo
    from fewstep.api import load_model
    from fewstep.distillation import distill

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    out = tmp_path / "two"
    student = distill(teacher="grid25", steps=2, out=out, iterations=6, batch_size=32, log_every=3, sample_every=0,
                      checkpoint_every=6, progress=False, evaluate_n=0)
    assert student.timesteps.tolist() == [999.0, 499.0]
    loaded = load_model(out)
    assert loaded.steps == 2 and json.loads((out / "student.json").read_text())["meta"]["steps"] == 2
    x = loaded.sample(40, seed=0)
    assert x.shape == (40, 2) and torch.isfinite(x).all()
    assert not (out / "eval.json").exists()


def test_distill_student_samples_in_eval_mode(tmp_path):
    from fewstep import zoo
    from fewstep.distillation import distill

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    student = distill(teacher="grid25", steps=1, out=tmp_path / "run", iterations=1, batch_size=16, sample_every=0,
                      progress=False, evaluate_n=0)
    assert not student.generator.training


# ------------------------------------------------------------------------------------------------------------------
# 4. The per-step fake score (fake_score: per_step; issue 16)
# ------------------------------------------------------------------------------------------------------------------
class AffineNet(torch.nn.Module):
    """``x0_hat = W x_t + b`` (prediction type ``sample``, ``c_in`` = 1 on DDPM): at one fixed time this is *exactly* the
    denoiser of Gaussian data ``N(m, s^2)``, ``W = diag(c)``, ``b = (1 - c a) m`` with ``c = a s^2 / (a^2 s^2 +
    sigma^2)`` (see :func:`gaussian_denoiser`); its features are its output."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x, c_noise, cond=None):
        return self.lin(x)

    def features(self, x, c_noise, cond=None):
        return self.lin(x)


def _gaussian_affine(lin, m, s, a, sig):
    c = a * s**2 / (a**2 * s**2 + sig**2)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(c).float())
        lin.bias.copy_(((1 - c * a) * m).float())
    return c


def test_per_step_dm_gradient_uses_each_steps_own_fake_score():
    """k = 2, per-step fake scores that are different exact Gaussian denoisers at the DM time (trunk N(m0, s0^2); step
    i's adapter changes the scale to s_i with the same bias, so fake_i is the denoiser of N(m_i, s_i^2)): the gradient
    the generator's loss hands to each step-i output is distribution_matching_grad against fake_i's closed form, not
    against the other step's."""
    schedule = DDPMSchedule(rescale_zero_terminal_snr=True)
    teacher = Denoiser(AffineNet(), schedule, "sample", (2,))
    t_dm = 500.0
    a, sig = alpha_sigma64(schedule, t_dm)
    m_r, s_r = torch.tensor([0.5, -0.3], dtype=torch.float64), torch.tensor([0.6, 0.9], dtype=torch.float64)
    _gaussian_affine(teacher.net.lin, m_r, s_r, a, sig)
    m = dmd2(teacher, steps=2, gan=False, ttur=1, fake_step_rank=2, dm_t_range=(0.5, 0.5))
    assert m.per_step and m.cfg.fake_score == "per_step"
    fake = m.players["guidance"].module.fake
    m0, s0 = torch.tensor([-0.4, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.7], dtype=torch.float64)
    c0 = _gaussian_affine(fake.net.lin.base_layer, m0, s0, a, sig)
    b = (1 - c0 * a) * m0
    gaussians = []
    for i, s_i in enumerate((torch.tensor([0.3, 1.5], dtype=torch.float64), torch.tensor([2.0, 0.4],
                                                                                       dtype=torch.float64))):
        c_i = a * s_i**2 / (a**2 * s_i**2 + sig**2)
        gaussians.append((b / (1 - c_i * a), s_i))  # the same bias: only W differs, which the adapter changes
        with torch.no_grad():  # rank 2, scale 1: W + B A with A = I, B = diag(c_i - c0)
            fake.net.lin.lora_A[f"step{i + 1}"].weight.copy_(torch.eye(2))
            fake.net.lin.lora_B[f"step{i + 1}"].weight.copy_(torch.diag(c_i - c0).float())
    real_calls = CallRecorder(teacher)
    outputs = []

    def keep(module, args, output):
        if output.requires_grad:
            output.retain_grad()
            outputs.append((float(args[1][0]), output))

    handle = m.players["generator"].module.register_forward_hook(keep)
    torch.manual_seed(0)
    loss, _ = m.loss("generator", Batch(torch.zeros(64, 2)), 0)
    loss.backward()
    handle.remove()
    real_calls.handle.remove()
    # the batch is split over the steps: samples 0..31 are step 1's outputs (at t_1 = 999), 32..63 step 2's (t_2 = 499)
    assert [t for t, _ in outputs] == [999.0, 499.0] and [o.shape[0] for _, o in outputs] == [32, 32]
    x = torch.cat([o.detach() for _, o in outputs]).double()
    got = torch.cat([o.grad for _, o in outputs]).double() * x.numel()
    x_t, t = real_calls.calls[0]["x"].double(), real_calls.calls[0]["t"]
    assert torch.equal(t, torch.full((64,), t_dm))
    real_x0 = gaussian_denoiser(m_r, s_r, a, sig, x_t)
    expected, wrong = [], []
    for i, sl in enumerate((slice(0, 32), slice(32, 64))):
        own, other = gaussians[i], gaussians[1 - i]
        expected.append(distribution_matching_grad(x[sl], real_x0[sl], gaussian_denoiser(*own, a, sig, x_t[sl])))
        wrong.append(distribution_matching_grad(x[sl], real_x0[sl], gaussian_denoiser(*other, a, sig, x_t[sl])))
    expected, wrong = torch.cat(expected), torch.cat(wrong)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)  # float32 network, float64 closed form
    assert (got - wrong).abs().max() > 100 * 1e-4 * expected.abs().max()  # the steps' fake scores differ


def test_training_chain_is_the_inference_sampler():
    """The backward simulation that makes step-i training samples is the student sampler's first i steps: for the
    same noise z and the same re-noising draws, sample b of step i equals ``sample_student(G, z, ts[:i + 1])[b]``."""
    from fewstep.methods.dmd2 import backward_simulation, split_steps

    teacher = point_teacher(out_std=0.3)
    m = dmd2(teacher, steps=4, gan=False)
    gen = m.players["generator"].module.denoiser
    ts = m.timesteps
    z = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    steps = split_steps(40, 4)
    assert steps == sorted(steps) and [steps.count(i) for i in range(4)] == [10] * 4
    x = backward_simulation(gen, m.schedule, z, ts, steps, generator=torch.Generator().manual_seed(7))
    for i in range(4):
        ref = samplers.sample_student(gen, z, ts[: i + 1], generator=torch.Generator().manual_seed(7))
        rows = [b for b in range(40) if steps[b] == i]
        assert_close(x[rows], ref[rows], rtol=1e-6, atol=1e-6)
    # and the student a user samples runs the same chain: its output is step k's
    from fewstep.student import Student

    student = Student(gen, ts)
    x_user = student.sample(40, z=z, generator=torch.Generator().manual_seed(7))
    assert_close(x_user, samplers.sample_student(gen, z, ts, generator=torch.Generator().manual_seed(7)))


def test_per_step_guidance_trains_each_fake_on_its_steps_outputs_only():
    """The guidance loss calls fake_i (trunk + adapter i, the GAN head on its features) on step i's samples only, and
    every adapter gets a gradient from its own samples alone; the shared fake score has no adapters."""
    from fewstep.models.lora import active_adapter_names

    m = dmd2(image_teacher(), steps=2, gan=True, ttur=1)
    guidance = m.players["guidance"].module
    seen = []
    net = guidance.fake.net
    handle = net.register_forward_pre_hook(lambda mod, args: seen.append((active_adapter_names(mod), args[0].shape[0])))
    features = net.features
    net.features = lambda x, *a: seen.append((active_adapter_names(net), x.shape[0])) or features(x, *a)
    loss, stats = m.loss("guidance", image_batch(8), 0)
    loss.backward()
    handle.remove()
    del net.features
    # denoising, then the head on real and on fake samples: each time step 1's four samples, then step 2's
    assert seen == [(["step1"], 4), (["step2"], 4)] * 3
    for i in (1, 2):
        grads_i = [p.grad for n, p in guidance.fake.named_parameters() if f"lora_B.step{i}." in n]
        assert grads_i and any(g is not None and torch.count_nonzero(g) > 0 for g in grads_i)
    # the trunk trains too (a full fake score: the shared part of every step's score)
    assert any(p.grad is not None for n, p in guidance.fake.named_parameters() if ".lora_" not in n)
    shared = dmd2(image_teacher(), steps=2, gan=True, ttur=1, fake_score="shared")
    assert not any(".lora_" in n for n, _ in shared.players["guidance"].module.named_parameters())
    one = dmd2(image_teacher(), steps=1, gan=True)  # k = 1: per_step is the shared fake score
    assert not one.per_step and not any(".lora_" in n for n, _ in one.players["guidance"].module.named_parameters())


def test_per_step_adapters_sit_on_a_lora_fake_score():
    """fake_score in lora_players: the per-step adapters sit beside the fake score's own LoRA on the teacher's shared,
    frozen base; each step's call applies its own adapter and the shared one."""
    from fewstep.models.lora import active_adapter_names

    teacher = image_teacher()
    m = dmd2(teacher, steps=2, gan=False, lora_rank=4, fake_step_rank=2)
    guidance = m.players["guidance"].module
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    frozen = [p for p in guidance.fake.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in teacher_ptrs for p in frozen)
    assert guidance.trunk_adapters == ["default"]
    seen = []
    handle = guidance.fake.net.register_forward_pre_hook(lambda mod, args: seen.append(active_adapter_names(mod)))
    m.loss("guidance", image_batch(8), 0)
    handle.remove()
    assert seen == [["default", "step1"], ["default", "step2"]]
    assert active_adapter_names(guidance.fake.net) == ["default"]  # outside a call: the trunk


@pytest.mark.parametrize("fake_score", ["per_step", "shared"])
def test_k_step_run_logs_each_step_and_resumes_exactly(tmp_path, fake_score):
    """A 2-step run logs every step's quality at its log rows (grid25: sliced W, modes, score mismatch, the pooled
    value and the last step's gap), and a run stopped and resumed equals the uninterrupted one bit for bit."""
    from fewstep import zoo
    from fewstep.distillation import distill
    from fewstep.train import read_metrics

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    common = dict(teacher="grid25", steps=2, batch_size=32, log_every=2, sample_every=0, checkpoint_every=2,
                  progress=False, evaluate_n=0, ttur=2, fake_score=fake_score)
    whole = distill(out=tmp_path / "whole", iterations=4, **common)
    distill(out=tmp_path / "part", iterations=2, **common)
    resumed = distill(out=tmp_path / "part", iterations=4, resume=True, **common)
    a, b = whole.generator.state_dict(), resumed.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from fewstep.train import list_checkpoints, load_checkpoint

    fa = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])["players"]["guidance"]["module"]
    fb = load_checkpoint(list_checkpoints(tmp_path / "part")[-1])["players"]["guidance"]["module"]
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert any(".lora_B.step2." in k for k in fa) == (fake_score == "per_step")
    rows_a, rows_b = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["it"] for r in rows_a] == [r["it"] for r in rows_b] == [2, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("guidance/step1/sliced_w", "guidance/step2/sliced_w", "guidance/step2/modes_covered",
                    "guidance/step1/score_mismatch", "guidance/pooled/sliced_w", "guidance/last_gap/sliced_w"):
            assert key in ra and ra[key] == rb[key], key
        assert ra["guidance/last_gap/sliced_w"] == pytest.approx(ra["guidance/step2/sliced_w"]
                                                                 - ra["guidance/pooled/sliced_w"])


def test_the_report_plots_each_step_on_one_figure_per_metric():
    """The per-step keys are left out of the one-curve-per-key plots and grouped: one figure per metric, its lines the
    steps in order, then the pooled value (the last step's gap stays a curve of its own)."""
    from fewstep.report import _loss_keys, _per_step_keys

    rows = [{"it": 5, "guidance/denoise": 1.0, "guidance/step10/sliced_w": 0.1, "guidance/step2/sliced_w": 0.2,
             "guidance/pooled/sliced_w": 0.3, "guidance/step2/score_mismatch": 0.5,
             "guidance/last_gap/sliced_w": 0.1, "guidance/lr": 1e-4}]
    assert _loss_keys(rows) == ["guidance/denoise", "guidance/last_gap/sliced_w"]
    assert _per_step_keys(rows) == {
        "guidance/sliced_w": ["guidance/step2/sliced_w", "guidance/step10/sliced_w", "guidance/pooled/sliced_w"],
        "guidance/score_mismatch": ["guidance/step2/score_mismatch"]}


@pytest.mark.parametrize("player", ["guidance", "generator"])
def test_per_step_fake_scores_under_gradient_checkpointing(player):
    """Gradient checkpointing recomputes each step's fake-score call in backward, after the call's adapter selection
    has ended: every call's gradient hook selects its adapters again, so the gradients are those of a run without
    checkpointing (the same arithmetic: equal to float32 rounding, in practice bit for bit)."""
    from fewstep.models.checkpointing import enable_gradient_checkpointing

    def gradients(checkpointing: bool) -> dict:
        m = dmd2(image_teacher(), steps=2, gan=True, ttur=1)
        guidance = m.players["guidance"].module
        with torch.no_grad():  # adapters that differ, as after training
            for name, p in guidance.fake.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.5)
        if checkpointing:
            assert enable_gradient_checkpointing(guidance) and enable_gradient_checkpointing(
                m.players["generator"].module)
        torch.manual_seed(1)
        loss, _ = m.loss(player, image_batch(8), 0)
        loss.backward()
        module = m.players[player].module
        return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(".lora_B.step2." in k for k in plain) == (player == "guidance")
    for k in plain:
        assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# The fake score's noise levels (fake_t_distribution) and the guidance update's samples (issue 13)
# ------------------------------------------------------------------------------------------------------------------
def edm_point_teacher() -> Denoiser:
    from fewstep.diffusion.schedule import EDMSchedule
    from fewstep.models import PointMLP

    torch.manual_seed(0)
    net = PointMLP(width=32, depth=2)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    return Denoiser(net, EDMSchedule(), "edm", (2,))


def _karras_share_above(sigma: float, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> float:
    """The share of a uniform ramp u in [0, 1] whose Karras sigma (hi^(1/rho) + u (lo^(1/rho) - hi^(1/rho)))^rho
    exceeds ``sigma`` (the continuous limit of the 1,000-sigma grid)."""
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    return (a - sigma ** (1 / rho)) / (a - b)


def test_fake_t_distributions_match_the_issue_and_the_dmd2_edm_code():
    """On an EDM teacher: 'teacher' is EDM's log-normal (median e^-1.2 = 0.30, 0.96% above sigma 5); 'uniform_index'
    a uniform index over 1,000 Karras sigmas (median ((80^(1/7) + 0.002^(1/7)) / 2)^7 = 2.52, 41.9% above 5)."""
    n = 200_000
    teacher = edm_point_teacher()
    torch.manual_seed(0)
    t_teacher = dmd2(teacher, gan=False)._t_fake(n, "cpu")
    m = dmd2(teacher, gan=False, fake_t_distribution="uniform_index")
    torch.manual_seed(0)
    t_index = m._t_fake(n, "cpu")
    # the grid: 1,000 Karras sigmas from 80 down to 0.002, and every draw is one of them
    assert len(m.fake_times) == 1000
    assert_close(m.fake_times[[0, -1]], torch.tensor([80.0, 0.002]))
    assert torch.isin(t_index, m.fake_times).all()
    # tolerances: 5 binomial std of a share over n draws; the median of n draws within 2% (its std: 0.4%)
    share = (1 - torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor((math.log(5) + 1.2) / 1.2))).item()
    assert abs(share - 0.0096) < 1e-4
    for t, median, above in ((t_teacher, math.exp(-1.2), share),
                             (t_index, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, _karras_share_above(5.0))):
        tol = 5 * math.sqrt(above * (1 - above) / n) + 1e-3  # + the grid's discreteness (1 / 1000)
        assert abs(float((t > 5).double().mean()) - above) < tol
        assert abs(float(t.median()) / median - 1) < 0.02
    assert abs(_karras_share_above(5.0) - 0.42) < 0.005 and abs(float(t_index.median()) - 2.5) < 0.1


def test_uniform_index_on_a_ddpm_teacher_takes_the_nearest_timestep():
    from fewstep.methods.dmd2 import karras_index_times

    schedule = DDPMSchedule(rescale_zero_terminal_snr=True)
    sigmas = (80 ** (1 / 7) + torch.linspace(0, 1, 1000, dtype=torch.float64)
              * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = karras_index_times(schedule)
    assert torch.equal(t, t.round()) and t.min() == 0 and t.max() < 999
    # each Karras sigma's exact (fractional) time is within half a timestep; sigmas below t = 0's level go to 0
    exact = schedule.t_from_sigma_tilde(sigmas)
    assert (t.double() - exact).abs().max() <= 0.5
    floor = float(schedule.sigma_tilde(torch.tensor(0.0)))
    inside = sigmas >= floor
    assert_close(schedule.sigma_tilde(exact[inside].float()).double(), sigmas[inside], rtol=1e-4, atol=0)
    assert (t[~inside] == 0).all()
    # the distribution survives the mapping: 42% of the levels above sigma 5, median about 2.5
    st = schedule.sigma_tilde(t)
    assert abs(float((st > 5).double().mean()) - _karras_share_above(5.0)) < 0.005
    assert abs(float(st.median()) - 2.5) < 0.1


def test_edm_weighted_x0_loss_is_each_families_own_loss_reweighted():
    """lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 on the x0 error: on an EDM denoiser exactly its F-MSE
    (lambda c_out^2 = 1); on a v-prediction VP denoiser (x0 error = sigma_t * v error) (alpha^2 + 4 sigma^2) times its
    v-MSE."""
    from fewstep.methods.dmd2 import edm_weight, x0_denoising_loss

    s = torch.tensor([0.01, 0.5, 3.0, 80.0])
    assert_close(edm_weight(s, 0.5), (s**2 + 0.25) / (s * 0.5) ** 2)
    g = torch.Generator().manual_seed(0)
    edm = edm_point_teacher()
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = (torch.randn(64, generator=g) * 1.2 - 1.2).exp()
    with torch.no_grad():
        assert_close(x0_denoising_loss(edm, x0, t, eps, None, 0.5), edm.denoising_loss(x0, t, eps), rtol=1e-4,
                     atol=1e-6)
        vp = point_teacher(out_std=0.1)
        t = torch.randint(0, 1000, (64,), generator=g).float()
        a, sig = vp.schedule.alpha_sigma(t)
        assert_close(x0_denoising_loss(vp, x0, t, eps, None, 0.5), (a**2 + 4 * sig**2) * vp.denoising_loss(x0, t, eps),
                     rtol=1e-4, atol=1e-6)


def test_the_guidance_loss_uses_the_uniform_index_and_its_weight():
    teacher = point_teacher(out_std=0.1)
    m = dmd2(teacher, gan=False, fake_t_distribution="uniform_index")
    guidance = m.players["guidance"].module
    seen = []
    guidance.fake.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    torch.manual_seed(1)
    loss, _ = m.loss("guidance", point_batch(), 1)
    # one fake-score call, at timesteps of the grid
    assert len(seen) == 1 and torch.isin(seen[0], m.fake_times).all()
    # and the same draws give the x0 loss with EDM's weight (alpha^2 + 4 sigma^2 on the v-MSE)
    torch.manual_seed(1)
    gen = m.players["generator"].module
    with torch.no_grad():
        x, _ = m._generate(gen, 64, None, "cpu")
        t = m._t_fake(64, "cpu")
        eps = torch.randn_like(x)
        a, sig = teacher.schedule.alpha_sigma(t)
        expected = ((a**2 + 4 * sig**2) * guidance.fake.denoising_loss(x, t, eps)).mean()
    assert_close(loss, expected, rtol=1e-4, atol=1e-7)


def test_the_guidance_update_reuses_the_generators_samples_on_its_iterations():
    """TTUR: on a generator iteration the guidance loss takes the generator loss's samples (detached; the DMD2 code),
    so the generator runs once that iteration; on the other iterations, once without gradient."""
    teacher = point_teacher(out_std=0.1)
    m = dmd2(teacher, gan=False, ttur=5)
    gen, guidance = m.players["generator"].module, m.players["guidance"].module
    outputs, inputs = [], []
    gen.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    guidance.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
    batch = point_batch()
    m.loss("generator", batch, 0)
    m.loss("guidance", batch, 0)
    assert len(outputs) == 1 and torch.equal(inputs[0], outputs[0])
    m.loss("guidance", batch, 1)  # a guidance-only iteration: its own draw
    assert len(outputs) == 2 and torch.equal(inputs[1], outputs[1]) and not torch.equal(outputs[1], outputs[0])
    # the samples serve only the iteration (and batch) that drew them
    m.loss("generator", batch, 5)
    m.loss("guidance", point_batch(seed=1), 5)
    m.loss("guidance", batch, 5)
    assert len(outputs) == 5
