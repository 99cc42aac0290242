"""Samplers on a Gaussian with an exact denoiser and a closed-form ODE flow map; the student sampler; CFG; the loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fewstep.diffusion import samplers
from fewstep.diffusion.denoiser import CFGDenoiser, Denoiser, guided
from fewstep.diffusion.schedule import DDPMSchedule, EDMSchedule, FlowSchedule, bcast
from fewstep.models import ClassUNet

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
S0 = 0.5

SCHEDULES = {
    "ddpm": DDPMSchedule(),
    "ddpm_zsnr": DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              rescale_zero_terminal_snr=True),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(shift=3.0),
}


class GaussianDenoiser:
    """The exact denoiser of data ``N(mu, s0^2 I)``: ``E[x0 | x_t] = mu + a s0^2 / (a^2 s0^2 + s^2) (x_t - a mu)``."""

    def __init__(self, schedule, mu=MU, s0=S0):
        self.schedule, self.mu, self.s0 = schedule, mu, s0
        self.calls = 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        a, s = self.schedule.alpha_sigma(t)
        a, s = bcast(a, x), bcast(s, x)
        mu = self.mu.to(x.dtype)
        return mu + a * self.s0**2 / (a**2 * self.s0**2 + s**2) * (x - a * mu)

    def flow_map(self, x, t1, t2):
        """The probability-flow ODE from ``t1`` to ``t2``: ``(x - a mu) / sqrt(a^2 s0^2 + s^2)`` is constant."""
        a1, s1 = (v.double() for v in self.schedule.alpha_sigma(torch.as_tensor(t1, dtype=torch.float32)))
        a2, s2 = (v.double() for v in self.schedule.alpha_sigma(torch.as_tensor(t2, dtype=torch.float32)))
        v1, v2 = a1**2 * self.s0**2 + s1**2, a2**2 * self.s0**2 + s2**2
        return a2 * self.mu + (v2 / v1).sqrt() * (x - a1 * self.mu)




def _noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------------
# Distribution: many steps map N(0, I) to N(mu, s0^2 I)
# ------------------------------------------------------------------------------------------------------------------
DISTRIBUTION_CASES = [
    # (schedule, sampler, steps, spacing): Heun on its default rho = 7 grid; DDIM on the schedule's default grid
    # (trailing for DDPM); the zero-SNR schedule also with Heun from alpha = 0 on the trailing grid.
    ("ddpm", "heun", 32, None), ("ddpm", "ddim", 250, None),
    ("ddpm_zsnr", "heun", 32, None), ("ddpm_zsnr", "heun", 100, "trailing"), ("ddpm_zsnr", "ddim", 250, None),
    ("edm", "heun", 32, None), ("edm", "ddim", 250, None),
    ("flow", "heun", 64, None), ("flow", "ddim", 250, None),
]


@pytest.mark.parametrize("name,sampler,steps,spacing", DISTRIBUTION_CASES)
def test_samplers_reach_the_data_distribution(name, sampler, steps, spacing):
    schedule = SCHEDULES[name]
    n = 8000
    z = _noise(n, seed=1)
    x = samplers.sample(GaussianDenoiser(schedule), z, steps, sampler, spacing=spacing)
    assert torch.isfinite(x).all()
    # 4 standard errors of the sample mean / std, plus 0.01 for the discretisation
    se_mean, se_std = S0 / math.sqrt(n), S0 / math.sqrt(2 * n)
    assert_close(x.mean(0), MU, rtol=0, atol=4 * se_mean + 0.01)
    assert_close(x.std(0), torch.full((2,), S0, dtype=torch.float64), rtol=0, atol=4 * se_std + 0.01)
    # one step lands near the mean (the denoiser's output at almost pure noise): far from the right spread
    one = samplers.sample(GaussianDenoiser(schedule), z, 1, sampler, spacing=spacing)
    assert float(one.std(0).max()) < 0.5 * S0


def test_zero_terminal_snr_starts_at_alpha_zero():
    s = SCHEDULES["ddpm_zsnr"]
    ts = samplers.sampling_grid(s, "heun", 10, "trailing")
    a, sig = s.alpha_sigma(ts[:1])
    assert float(a) == 0.0 and float(sig) == 1.0
    for sampler in samplers.SAMPLERS:
        x = samplers.sample(GaussianDenoiser(s), _noise(64), 10, sampler, spacing="trailing")
        assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------------------------------
# Convergence against the exact ODE solution
# ------------------------------------------------------------------------------------------------------------------
def _karras_grid(schedule, n):
    if schedule.kind == "flow":  # rho = 7 in sigma_tilde = t / (1 - t), from 80 down to 0.002
        return torch.cat([schedule.karras(n, 0.002, 80.0).float(), torch.tensor([schedule.t_clean])])
    return schedule.timesteps(n, "karras")


def _ode_error(schedule, sampler, ts, z):
    """Max error of ``sampler`` on ``ts`` against the exact flow map of the probability-flow ODE."""
    den = GaussianDenoiser(schedule)
    x_T = samplers.initial_noise(schedule, z, ts[0])
    fn = {"heun": samplers.sample_heun, "ddim": samplers.sample_ddim, "euler": samplers.sample_euler}[sampler]
    return float((fn(den, x_T, ts) - den.flow_map(x_T, ts[0], ts[-1])).abs().max())


def test_flow_map_closed_form():
    # at t_clean: x0 = mu + s0 (x_T - a_T mu) / sqrt(a_T^2 s0^2 + s_T^2); the map composes; it pushes
    # N(a mu, (a^2 s0^2 + s^2) I) at t to N(mu, s0^2 I)
    s = SCHEDULES["ddpm"]
    den = GaussianDenoiser(s)
    x = _noise(5)
    a, sig = (v.double() for v in s.alpha_sigma(torch.tensor(700.0)))
    assert_close(den.flow_map(x, 700.0, s.t_clean), MU + S0 * (x - a * MU) / (a**2 * S0**2 + sig**2).sqrt())
    assert_close(den.flow_map(den.flow_map(x, 700.0, 300.5), 300.5, s.t_clean), den.flow_map(x, 700.0, s.t_clean))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_heun_is_second_order_and_ddim_first_order(name):
    """On a rho = 7 grid, doubling the steps divides Heun's error by ~4 and DDIM/Euler's by ~2.

    The error is measured at the grid's last noisy time: the final jump to t_clean is one Euler step in both
    samplers (EDM Algorithm 1), whose error does not shrink with the step count on DDPM grids (it is set by
    the smallest noise level the schedule has).
    """
    schedule = SCHEDULES[name]
    z = _noise(256, seed=2)
    grids = [_karras_grid(schedule, n)[:-1] for n in (16, 32, 64)]
    heun = [_ode_error(schedule, "heun", ts, z) for ts in grids]
    ddim = [_ode_error(schedule, "euler", ts, z) for ts in grids]
    for e in (heun, ddim):
        assert e[0] > e[1] > e[2]
    assert 3.4 < heun[0] / heun[1] < 4.6 and 3.4 < heun[1] / heun[2] < 4.6, heun
    assert 1.8 < ddim[0] / ddim[1] < 2.2 and 1.8 < ddim[1] / ddim[2] < 2.2, ddim
    assert heun[2] < ddim[2] / 5  # and Heun is far more accurate at equal steps
    # all the way to t_clean, the error is still small
    assert _ode_error(schedule, "heun", _karras_grid(schedule, 64), z) < 0.02


def test_heun_converges_on_the_flow_grid():
    schedule = SCHEDULES["flow"]
    z = _noise(256, seed=2)
    heun = [_ode_error(schedule, "heun", schedule.timesteps(n), z) for n in (16, 32, 64)]
    assert heun[0] > heun[1] > heun[2]
    assert heun[1] / heun[2] > 2.8, heun


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_ddim_equals_euler_on_the_same_grid(name):
    schedule = SCHEDULES[name]
    z = _noise(128, seed=3)
    ts = samplers.sampling_grid(schedule, "euler", 12)
    x = samplers.initial_noise(schedule, z, ts[0])
    a = samplers.sample_ddim(GaussianDenoiser(schedule), x, ts)
    b = samplers.sample_euler(GaussianDenoiser(schedule), x, ts)
    assert torch.equal(a, b)
    # DDIM's update is the Euler step of the data-form ODE dy/dr = D (y = x / sigma, r = alpha / sigma) ...
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, dtype=torch.float64, generator=g)
    d = torch.randn(4, 2, dtype=torch.float64, generator=g)
    for i in range(len(ts) - 1):
        t, t_next = ts[i].expand(4), ts[i + 1].expand(4)
        ddim = samplers._ddim_update(schedule, x, d, t, t_next)
        assert_close(ddim, samplers._data_form_update(schedule, x, d, t, t_next))
        # ... and of EDM's ODE dx~/dsigma~ = (x~ - D) / sigma~ in x~ = x / alpha, sigma~ = sigma / alpha
        a_, s_ = (bcast(v.double(), x) for v in schedule.alpha_sigma(t))
        a_n, s_n = (bcast(v.double(), x) for v in schedule.alpha_sigma(t_next))
        if float(a_.min()) > 0:
            x_tilde = x / a_ + (s_n / a_n - s_ / a_) * (x / a_ - d) / (s_ / a_)
            assert_close(ddim, a_n * x_tilde)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("sampler,steps", [("heun", 1), ("heun", 7), ("ddim", 7), ("euler", 5)])
def test_nfe_counts_denoiser_calls(name, sampler, steps):
    den = GaussianDenoiser(SCHEDULES[name])
    samplers.sample(den, _noise(4), steps, sampler)
    assert den.calls == samplers.nfe(sampler, steps)
    assert samplers.nfe("heun", steps) == 2 * steps - 1


def test_unknown_sampler_raises():
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.nfe("dpm", 4)
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sample(GaussianDenoiser(EDMSchedule()), _noise(2), 4, "dpm")


def test_ddim_eta_is_stochastic_and_reaches_the_data():
    # eta = 1 on the full 1000-step chain is DDPM's ancestral sampler. (On coarse grids it is under-dispersed with a
    # plug-in x0_hat: its kernel ignores Var[x0 | x_t], Bao et al. 2022; not tested here.)
    schedule = SCHEDULES["ddpm"]
    n = 5000
    z = _noise(n, seed=5)

    def run(steps, seed):
        return samplers.sample(GaussianDenoiser(schedule), z, steps, "ddim", eta=1.0,
                               generator=torch.Generator().manual_seed(seed))

    x1, x2, x3 = run(1000, 0), run(8, 1), run(8, 2)
    assert not torch.allclose(x2, x3)
    se_mean, se_std = S0 / math.sqrt(n), S0 / math.sqrt(2 * n)
    assert_close(x1.mean(0), MU, rtol=0, atol=4 * se_mean + 0.01)
    assert_close(x1.std(0), torch.full((2,), S0, dtype=torch.float64), rtol=0, atol=4 * se_std + 0.01)


# ------------------------------------------------------------------------------------------------------------------
# The k-step student sampler
# ------------------------------------------------------------------------------------------------------------------
def test_student_timesteps():
    assert samplers.student_timesteps(DDPMSchedule(), 4).tolist() == [999, 749, 499, 249]
    assert samplers.student_timesteps(DDPMSchedule(timestep_spacing="leading"), 4).tolist() == [999, 749, 499, 249]
    assert samplers.student_timesteps(DDPMSchedule(), 1).tolist() == [999]
    assert samplers.student_timesteps(EDMSchedule(), 1).tolist() == [80.0]
    ts = samplers.student_timesteps(FlowSchedule(), 3)
    assert ts.shape == (3,) and float(ts[0]) == 1.0 and (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sample_student(name):
    schedule = SCHEDULES[name]
    z = _noise(16, seed=6)
    for k in (1, 2, 4):
        ts = samplers.student_timesteps(schedule, k)
        out1, inputs = samplers.sample_student(
            GaussianDenoiser(schedule), z, ts, generator=torch.Generator().manual_seed(0), return_inputs=True
        )
        out2 = samplers.sample_student(GaussianDenoiser(schedule), z, ts, generator=torch.Generator().manual_seed(1))
        out1b = samplers.sample_student(GaussianDenoiser(schedule), z, ts, generator=torch.Generator().manual_seed(0))
        assert out1.shape == z.shape and len(inputs) == k
        assert all(x.shape == z.shape for x in inputs)
        assert torch.equal(out1, out1b)  # the caller's generator is the only randomness
        assert_close(inputs[0], samplers.initial_noise(schedule, z, ts[0]))
        if k == 1:
            assert torch.equal(out1, out2)
            continue
        assert not torch.allclose(out1, out2)
        # replay: x_{t_{i+1}} = add_noise(G(x_{t_i}, t_i), fresh eps, t_{i+1}) with eps drawn in order
        g = torch.Generator().manual_seed(0)
        den = GaussianDenoiser(schedule)
        for i in range(k - 1):
            x0 = den(inputs[i], ts[i].expand(16))
            eps = torch.randn(z.shape, generator=g, dtype=z.dtype)
            assert_close(inputs[i + 1], schedule.add_noise(x0, eps, ts[i + 1].expand(16)))
        assert_close(out1, den(inputs[-1], ts[-1].expand(16)))


# ------------------------------------------------------------------------------------------------------------------
# CFG and the denoising loss
# ------------------------------------------------------------------------------------------------------------------
def _tiny_unet_denoiser(schedule=None, prediction="epsilon"):
    torch.manual_seed(0)
    net = ClassUNet(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=10)
    with torch.no_grad():  # the output convolutions start at zero; give them weights so the class matters
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.2)
    return Denoiser(net, schedule or DDPMSchedule(), prediction, (1, 8, 8), num_classes=10).eval()


def test_cfg_denoiser():
    den = _tiny_unet_denoiser()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 400.0, 900.0])
    labels = torch.tensor([1, 4, 7])
    null = torch.full_like(labels, 10)
    eps32 = torch.finfo(torch.float32).eps
    with torch.no_grad():
        cond = den(x, t, labels)
        uncond = den(x, t, null)
        assert_close(den(x, t, None), uncond)  # no labels is the null class
        assert (cond - uncond).abs().max() > 1e-3  # the test below is not vacuous
        assert guided(den, 1.0) is den
        assert_close(CFGDenoiser(den, 1.0)(x, t, labels), cond, rtol=0, atol=0)
        # CFGDenoiser runs both branches as one batch of 6. Batching changes only float rounding (other kernels,
        # other summation orders), by delta; x0 from epsilon at t = 900 is large (|x0| ~ 1e2 here), so delta is
        # measured, and bounded as rounding: a few dozen ulps of the output's magnitude (measured: ~6).
        cond_b, uncond_b = den(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        scale = float(torch.maximum(cond.abs().max(), uncond.abs().max()))
        delta = float(torch.maximum((cond_b - cond).abs().max(), (uncond_b - uncond).abs().max()))
        assert delta <= 64 * eps32 * scale
        for w in (0.0, 2.5, 7.0):
            cfg = guided(den, w)
            assert isinstance(cfg, CFGDenoiser) and cfg.schedule is den.schedule
            out = cfg(x, t, labels)
            # the combination itself: three float32 operations on values of size <= (1 + 2|w|) scale
            combine = 4 * eps32 * (1 + 2 * abs(w)) * scale
            assert_close(out, uncond_b + w * (cond_b - uncond_b), rtol=0, atol=combine)
            # against two separate passes: the batching error enters with weight |1 - w| (uncond) and |w| (cond)
            assert_close(out, uncond + w * (cond - uncond), rtol=0, atol=(abs(1 - w) + abs(w)) * delta + combine)
        assert_close(guided(den, 3.0)(x, t, None), uncond)  # nothing to guide towards
        # a scalar time works too (the same batched pass, on one time)
        out = guided(den, 2.0)(x, 400.0, labels)
        both = den(torch.cat([x, x]), torch.full((6,), 400.0), torch.cat([labels, null])).chunk(2)
        assert_close(out[1], (both[1] + 2 * (both[0] - both[1]))[1], rtol=0, atol=4 * eps32 * 5 * scale)


@pytest.mark.parametrize(
    "schedule,prediction",
    [(DDPMSchedule(), "epsilon"), (DDPMSchedule(), "v_prediction"), (DDPMSchedule(), "sample"),
     (FlowSchedule(), "flow"), (EDMSchedule(), "edm")],
)
def test_denoising_loss_zero_at_the_target(schedule, prediction):
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 2, generator=g)
    eps = torch.randn(4, 2, generator=g)
    t = schedule.sample_train_t(4, generator=g)
    target = schedule.target(x0, eps, t, prediction)

    class Oracle(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, x_in, c_noise, cond=None):
            assert_close(c_noise, schedule.c_noise(t))
            assert_close(x_in, bcast(schedule.c_in(t), x0) * schedule.add_noise(x0, eps, t))
            return target + self.offset

    exact = Denoiser(Oracle(0.0), schedule, prediction, (2,))
    loss = exact.denoising_loss(x0, t, eps)
    assert loss.shape == (4,)
    assert_close(loss, torch.zeros(4), rtol=0, atol=1e-10)
    off = Denoiser(Oracle(0.1), schedule, prediction, (2,)).denoising_loss(x0, t, eps)
    # (target + 0.1) - target rounds at a few ulps of |target|, relative to 0.1; squaring doubles the relative error
    rel = 2 * 4 * torch.finfo(torch.float32).eps * (1 + float(target.abs().max()) / 0.1)
    assert_close(off, torch.full((4,), 0.01), rtol=rel, atol=0)
    # and the exact network denoises exactly, up to the rounding of x0 = c1 x_t + c2 F, which the conversion amplifies
    # by |c1|, |c2| <= (1 + sigma) / alpha (epsilon: 1/alpha and sigma/alpha, ~25 at t = 795): 4 ulps of that
    x_t = schedule.add_noise(x0, eps, t)
    a, s = schedule.alpha_sigma(t)
    amp = float(((1 + s) / a).max())
    atol = 4 * torch.finfo(torch.float32).eps * amp * float(x_t.abs().max() + target.abs().max())
    assert_close(exact(x_t, t), x0, rtol=0, atol=atol)


def test_denoiser_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction type"):
        Denoiser(torch.nn.Identity(), DDPMSchedule(), "noise", (2,))
