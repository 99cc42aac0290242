"""Noise schedules against diffusers' schedulers (DDPM, DDIM, FlowMatchEuler, EDMEuler) and the papers' formulas."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from torch.testing import assert_close

from fewstep.diffusion import samplers
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.schedule import DDPMSchedule, EDMSchedule, FlowSchedule, bcast, schedule_from_config

# float32 values of size ~1-20 computed in another order, with no amplification: 1e-5 is ~80 ulps of 1 (measured <= 4)
TOL = dict(rtol=1e-5, atol=1e-5)
BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
# scaled_linear with Stable Diffusion's end points, the others with diffusers' defaults
BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def _pair(beta_schedule: str, zsnr: bool, spacing: str = "trailing", steps_offset: int = 0, prediction="epsilon"):
    b0, b1 = BETA_RANGE[beta_schedule]
    ours = DDPMSchedule(
        beta_schedule=beta_schedule, beta_start=b0, beta_end=b1, rescale_zero_terminal_snr=zsnr,
        timestep_spacing=spacing, steps_offset=steps_offset,
    )
    theirs = DDIMScheduler(
        beta_schedule=beta_schedule, beta_start=b0, beta_end=b1, rescale_betas_zero_snr=zsnr,
        timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=True, clip_sample=False,
        thresholding=False, prediction_type=prediction,
    )
    return ours, theirs


# ------------------------------------------------------------------------------------------------------------------
# DDPM: tables, alpha/sigma, spacings
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zsnr", [False, True])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_ddpm_alphas_match_diffusers(beta_schedule, zsnr):
    ours, ddim = _pair(beta_schedule, zsnr)
    b0, b1 = BETA_RANGE[beta_schedule]
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, beta_start=b0, beta_end=b1, rescale_betas_zero_snr=zsnr)
    assert_close(ours.alphas_cumprod, ddpm.alphas_cumprod, **TOL)
    assert_close(ours.alphas_cumprod, ddim.alphas_cumprod, **TOL)
    assert_close(ours.betas, ddpm.betas, **TOL)
    t = torch.arange(1000)
    a, s = ours.alpha_sigma(t)
    assert_close(a, ddpm.alphas_cumprod.sqrt(), **TOL)
    assert_close(s, (1 - ddpm.alphas_cumprod).sqrt(), **TOL)
    if zsnr:  # zero terminal SNR: pure noise at the last step
        assert float(a[-1]) == 0.0 and float(s[-1]) == 1.0
    else:
        assert float(a[-1]) > 0
    # float times that happen to be integers read the table too
    a_f, s_f = ours.alpha_sigma(t.float())
    assert_close(a_f, a, rtol=0, atol=0)
    assert_close(s_f, s, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 4, 10, 50])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_ddpm_timesteps_match_ddim_set_timesteps(spacing, offset, n):
    ours, theirs = _pair("scaled_linear", False, spacing, offset)
    theirs.set_timesteps(n)
    ts = ours.timesteps(n)
    assert ts.shape == (n + 1,)
    assert float(ts[-1]) == ours.t_clean
    assert ts[:-1].tolist() == theirs.timesteps.float().tolist()
    # the schedule's default spacing can be overridden per call
    other = "leading" if spacing != "leading" else "trailing"
    ours_other, theirs_other = _pair("scaled_linear", False, other, offset)
    theirs_other.set_timesteps(n)
    assert ours.timesteps(n, other)[:-1].tolist() == theirs_other.timesteps.float().tolist()


def test_ddpm_known_grids():
    s = DDPMSchedule()
    assert s.timesteps(4, "trailing").tolist() == [999, 749, 499, 249, -1]
    assert s.timesteps(4, "leading").tolist() == [750, 500, 250, 0, -1]
    assert s.timesteps(1, "trailing").tolist() == [999, -1]


@pytest.mark.parametrize("schedule", [DDPMSchedule(), DDPMSchedule(rescale_zero_terminal_snr=True)])
def test_ddpm_add_noise_and_velocity_match_diffusers(schedule):
    ddpm = DDPMScheduler(rescale_betas_zero_snr=schedule.rescale_zero_snr)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert_close(schedule.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), **TOL)
    assert_close(schedule.target(x0, eps, t, "v_prediction"), ddpm.get_velocity(x0, eps, t), **TOL)
    assert_close(schedule.target(x0, eps, t, "epsilon"), eps, rtol=0, atol=0)
    assert_close(schedule.target(x0, eps, t, "sample"), x0, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Conversions: to_x0(target(x0, eps)) == x0
# ------------------------------------------------------------------------------------------------------------------
ROUND_TRIPS = [
    (DDPMSchedule(), "epsilon", torch.tensor([0.0, 10.0, 500.0, 900.0, 123.4])),
    (DDPMSchedule(), "v_prediction", torch.tensor([0.0, 10.0, 500.0, 999.0, 123.4])),
    (DDPMSchedule(), "sample", torch.tensor([0.0, 10.0, 500.0, 999.0, 123.4])),
    (DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True),
     "v_prediction", torch.tensor([0.0, 10.0, 500.0, 999.0, 998.5])),
    (FlowSchedule(shift=3.0), "flow", torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])),
    (FlowSchedule(), "v_prediction", torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])),
    (FlowSchedule(), "epsilon", torch.tensor([0.001, 0.1, 0.5, 0.9, 0.99])),
    (FlowSchedule(), "sample", torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])),
    (EDMSchedule(), "edm", torch.tensor([0.002, 0.1, 0.5, 5.0, 80.0])),
    (EDMSchedule(), "epsilon", torch.tensor([0.002, 0.1, 0.5, 5.0, 80.0])),
    (EDMSchedule(), "sample", torch.tensor([0.002, 0.1, 0.5, 5.0, 80.0])),
]


@pytest.mark.parametrize("schedule,prediction,t", ROUND_TRIPS, ids=lambda v: getattr(v, "kind", None))
def test_round_trip(schedule, prediction, t):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(5, 2, 3, dtype=torch.float64, generator=g)
    t = t.double()
    x_t = schedule.add_noise(x0, eps, t)
    pred = schedule.target(x0, eps, t, prediction)
    assert_close(schedule.to_x0(pred, x_t, t, prediction), x0, rtol=1e-6, atol=1e-6)
    # and eps is recovered from x0 wherever sigma > 0
    assert_close(schedule.eps_from_x0(x0, x_t, t), eps, rtol=1e-6, atol=1e-6)


def test_unknown_prediction_type_raises():
    s = DDPMSchedule()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="prediction type"):
        s.to_x0(x, x, torch.zeros(2), "noise")
    with pytest.raises(ValueError, match="prediction type"):
        s.target(x, x, torch.zeros(2), "noise")


def test_score_of_gaussian():
    # For x0 = 0 deterministically, p_t = N(0, sigma^2): score = -x / sigma^2 with x0_hat = 0.
    s = DDPMSchedule()
    t = torch.tensor([100.0, 700.0])
    x = torch.randn(2, 4)
    _, sig = s.alpha_sigma(t)
    assert_close(s.score(torch.zeros_like(x), x, t), -x / sig[:, None] ** 2)


# ------------------------------------------------------------------------------------------------------------------
# DDIM steps against DDIMScheduler.step
# ------------------------------------------------------------------------------------------------------------------
STEP_CASES = [
    ("linear", False, "leading", 1, "epsilon", 10),
    ("scaled_linear", False, "leading", 1, "v_prediction", 10),
    ("squaredcos_cap_v2", False, "trailing", 0, "sample", 10),
    ("scaled_linear", False, "trailing", 0, "epsilon", 4),
    ("scaled_linear", True, "trailing", 0, "v_prediction", 10),
    ("scaled_linear", True, "trailing", 0, "sample", 4),
    ("linear", True, "leading", 0, "epsilon", 5),  # leading never visits the zero-SNR step
]


def _step_atol(schedule, x, x0, t, t_next, noise=None):
    """Ours and diffusers' DDIM step x_n = a_n x0 + s_n (x - a x0) / s (+ std z) are float32 in another order: 8 ulps of
    its terms, where a_n x0 is large at high noise (x0 = (x - s F) / a, 1/a ~ 150 at t = 999 of the linear betas)."""
    a, s = (bcast(v, x) for v in schedule.alpha_sigma(t))
    a_n, s_n = (bcast(v, x) for v in schedule.alpha_sigma(t_next))
    terms = (a_n * x0).abs() + (s_n / s) * (x.abs() + (a * x0).abs()) + (0 if noise is None else s_n * noise.abs())
    return 8 * torch.finfo(torch.float32).eps * float(terms.max())


class _Fixed:
    """A 'denoiser' that turns a fixed raw model output into x0_hat with the schedule's conversion."""

    def __init__(self, schedule, out, prediction):
        self.schedule, self.out, self.prediction = schedule, out, prediction

    def __call__(self, x, t, cond=None):
        return self.schedule.to_x0(self.out, x, t, self.prediction)


@pytest.mark.parametrize("beta_schedule,zsnr,spacing,offset,prediction,n", STEP_CASES)
def test_ddim_step_matches_diffusers(beta_schedule, zsnr, spacing, offset, prediction, n):
    ours, theirs = _pair(beta_schedule, zsnr, spacing, offset, prediction)
    theirs.set_timesteps(n)
    ts = ours.timesteps(n)
    assert ts[:-1].tolist() == theirs.timesteps.float().tolist()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g)
    for i, t_int in enumerate(theirs.timesteps):
        out = torch.randn(x.shape, generator=g)
        ref = theirs.step(out, t_int, x, eta=0.0).prev_sample
        t, t_next = ts[i].expand(3), ts[i + 1].expand(3)
        x0 = ours.to_x0(out, x, t, prediction)
        mine = samplers._ddim_update(ours, x, x0, t, t_next)
        assert torch.isfinite(mine).all()
        tol = dict(rtol=0, atol=_step_atol(ours, x, x0, t, t_next))
        assert_close(mine, ref, **tol)
        # the sampler function takes the same step
        assert_close(samplers.sample_ddim(_Fixed(ours, out, prediction), x, ts[i : i + 2]), ref, **tol)
        x = ref
    assert float(ts[-1]) == ours.t_clean  # the last step above went to t_clean: x is the prediction itself
    if prediction == "sample":
        assert_close(x, out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("zsnr,prediction", [(False, "epsilon"), (True, "v_prediction")])
def test_ddim_eta_matches_diffusers_variance(zsnr, prediction):
    eta = 0.7
    ours, theirs = _pair("scaled_linear", zsnr, "trailing", 0, prediction)
    n = 5
    theirs.set_timesteps(n)
    ts = ours.timesteps(n)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for i, t_int in enumerate(theirs.timesteps):
        out = torch.randn(x.shape, generator=g)
        seed = 100 + i
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        ref = theirs.step(out, t_int, x, eta=eta, variance_noise=noise).prev_sample
        mine = samplers.sample_ddim(
            _Fixed(ours, out, prediction), x, ts[i : i + 2], eta=eta, generator=torch.Generator().manual_seed(seed)
        )
        t, t_next = ts[i].expand(2), ts[i + 1].expand(2)
        atol = _step_atol(ours, x, ours.to_x0(out, x, t, prediction), t, t_next, noise)
        assert_close(mine, ref, rtol=0, atol=atol)
        # the noise really entered (except on the final step to t_clean, where diffusers' variance is 0 too)
        prev = int(t_int) - 1000 // n
        var = float(theirs._get_variance(int(t_int), prev))
        det = samplers.sample_ddim(_Fixed(ours, out, prediction), x, ts[i : i + 2])
        if prev >= 0:
            assert var > 0
            assert (mine - det).abs().max() > 1e-3
        else:
            assert var == 0
            assert_close(mine, det, rtol=0, atol=0)
        x = ref


# ------------------------------------------------------------------------------------------------------------------
# DDPM fractional times, karras spacing, inversion, validation
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zsnr", [False, True])
def test_ddpm_fractional_times(zsnr):
    s = DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=zsnr)
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    a, sig = s.alpha_sigma(t)
    assert torch.isfinite(a).all() and torch.isfinite(sig).all()
    assert_close(a**2 + sig**2, torch.ones_like(a), rtol=0, atol=1e-6)
    assert (sig[1:] >= sig[:-1]).all() and (a[1:] <= a[:-1]).all()
    assert (sig[1:] > sig[:-1]).sum() > 3900  # strictly increasing apart from the flat zero-SNR tail
    # fractional times lie between their integer neighbours
    a_lo, _ = s.alpha_sigma(torch.tensor([100.0]))
    a_mid, _ = s.alpha_sigma(torch.tensor([100.5]))
    a_hi, _ = s.alpha_sigma(torch.tensor([101.0]))
    assert a_hi < a_mid < a_lo
    # t_clean and anything below it is clean
    a_c, s_c = s.alpha_sigma(torch.tensor([-1.0, s.t_clean]))
    assert a_c.tolist() == [1.0, 1.0] and s_c.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("zsnr", [False, True])
def test_ddpm_t_from_sigma_tilde_inverts(zsnr):
    s = DDPMSchedule(rescale_zero_terminal_snr=zsnr)
    t = torch.tensor([0.0, 0.25, 1.0, 17.3, 250.0, 500.5, 900.0, 997.9], dtype=torch.float64)
    st = s.sigma_tilde(t)
    assert_close(s.t_from_sigma_tilde(st), t, rtol=0, atol=1e-6)
    # and the other way round
    st2 = torch.tensor([0.02, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    assert_close(s.sigma_tilde(s.t_from_sigma_tilde(st2)), st2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 2, 5, 18])
@pytest.mark.parametrize("zsnr", [False, True])
def test_ddpm_karras_spacing(n, zsnr):
    s = DDPMSchedule(rescale_zero_terminal_snr=zsnr)
    ts = s.timesteps(n, "karras")
    assert ts.shape == (n + 1,) and float(ts[-1]) == s.t_clean
    assert (ts[1:] < ts[:-1]).all()  # noisiest first
    _, sig = s.alpha_sigma(ts)
    assert (sig[1:] < sig[:-1]).all()
    st = s.sigma_tilde(ts[:-1].double())
    # EDM's rho = 7 grid in sigma_tilde, from min(largest finite sigma_tilde, 80) down to the smallest one
    finite = s.sigma_tilde(torch.arange(1000, dtype=torch.float64))
    finite = finite[torch.isfinite(finite)]
    s_max, s_min = min(float(finite[-1]), 80.0), float(finite[0])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    expected = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    assert_close(st, expected, rtol=1e-5, atol=0)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDPMSchedule(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDPMSchedule(num_train_timesteps=1)
    for sched in (DDPMSchedule(), EDMSchedule(), FlowSchedule()):
        with pytest.raises(ValueError, match="at least 1"):
            sched.timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        DDPMSchedule().timesteps(4, "uniform")
    with pytest.raises(ValueError, match="cannot take"):
        DDPMSchedule(num_train_timesteps=10).timesteps(11)
    with pytest.raises(ValueError, match="sigma_min"):
        EDMSchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="kind"):
        schedule_from_config({"kind": "vp"})


# ------------------------------------------------------------------------------------------------------------------
# Flow matching
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_timesteps_match_diffusers(shift, n):
    ours = FlowSchedule(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(n)
    ts = ours.timesteps(n)
    assert_close(ts, theirs.sigmas, **TOL)
    # the timesteps are 1000 sigma: a few ulps of a sigma <= 1, times 1000 (measured: 1)
    assert_close(ours.c_noise(ts[:-1]), theirs.timesteps, rtol=0, atol=1000 * 8 * torch.finfo(torch.float32).eps)
    assert float(ts[-1]) == ours.t_clean == 0.0
    a, s = ours.alpha_sigma(ts)
    assert_close(a + s, torch.ones_like(a), rtol=0, atol=0)
    assert_close(ours.t_min, float(theirs.sigma_min), **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_and_add_noise(shift):
    ours = FlowSchedule(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    t = torch.rand(100, dtype=torch.float64)
    # SD3's shift: t' = shift t / (1 + (shift - 1) t), a bijection of [0, 1] fixing 0 and 1
    assert_close(ours.shift_t(t), shift * t / (1 + (shift - 1) * t))
    assert float(ours.shift_t(torch.tensor(0.0))) == 0.0 and float(ours.shift_t(torch.tensor(1.0))) == 1.0
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    theirs.set_timesteps(10)
    t = theirs.timesteps[[0, 4, 9]]
    ref = theirs.scale_noise(x0, t, eps)  # (1 - sigma) x0 + sigma eps
    assert_close(ours.add_noise(x0, eps, t / 1000), ref, **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_step_matches_diffusers(shift):
    n = 8
    ours = FlowSchedule(shift=shift)
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(n)
    ts = ours.timesteps(n)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=g)
    for i, t_diff in enumerate(theirs.timesteps):
        u = torch.randn(x.shape, generator=g)
        ref = theirs.step(u, t_diff, x).prev_sample
        t, t_next = ts[i].expand(2), ts[i + 1].expand(2)
        mine = samplers._ddim_update(ours, x, ours.to_x0(u, x, t, "flow"), t, t_next)
        assert_close(mine, ref, **TOL)
        # the flow Euler step itself: x + (t_next - t) u
        assert_close(mine, x + (ts[i + 1] - ts[i]) * u, **TOL)
        x = ref


def test_flow_train_times_and_fraction():
    s = FlowSchedule(shift=3.0)
    t = s.sample_train_t(2000, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    assert float(t.median()) > 0.6  # shift 3 moves the logit-normal's median 0.5 to 0.75
    u = torch.linspace(0, 1, 11)
    tf = s.from_fraction(u)
    assert (tf[1:] > tf[:-1]).all()
    assert_close(float(tf[0]), s.t_min) and assert_close(float(tf[-1]), s.t_max)


# ------------------------------------------------------------------------------------------------------------------
# EDM
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 5, 18, 40])
def test_edm_karras_grid(n):
    s = EDMSchedule()
    ts = s.timesteps(n)
    i = torch.arange(n, dtype=torch.float64)
    # Karras et al. 2022, eq. 5
    expected = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert_close(ts[:-1].double(), expected, rtol=1e-6, atol=0)
    assert float(ts[-1]) == 0.0
    theirs = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    theirs.set_timesteps(n)
    assert_close(ts, theirs.sigmas, rtol=1e-5, atol=1e-6)
    assert EDMSchedule().timesteps(1).tolist() == [80.0, 0.0]


def test_edm_preconditioning_table1():
    s = EDMSchedule(sigma_data=0.5)
    theirs = EDMEulerScheduler(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0])
    sd = 0.5
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    F = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    # Karras et al. 2022, Table 1
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    c_noise = sigma.log() / 4
    assert_close(s.c_in(sigma), c_in)
    assert_close(s.c_noise(sigma), c_noise)
    assert_close(s.c_noise(sigma), theirs.precondition_noise(sigma))
    b = lambda v: v[:, None, None, None]  # noqa: E731
    assert_close(s.to_x0(F, x, sigma, "edm"), b(c_skip) * x + b(c_out) * F)
    assert_close(s.to_x0(F, x, sigma, "edm"), theirs.precondition_outputs(x, F, b(sigma)))

    # the Denoiser applies c_in and c_noise before the network and c_skip/c_out after it
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x_in, cn, cond):
            seen["x_in"], seen["c_noise"] = x_in, cn
            return F

    den = Denoiser(Net(), s, "edm", (1, 2, 2))
    out = den(x, sigma)
    assert_close(seen["x_in"], b(c_in) * x)
    assert_close(seen["x_in"], theirs.precondition_inputs(x, b(sigma)))
    assert_close(seen["c_noise"], c_noise)
    assert_close(out, b(c_skip) * x + b(c_out) * F)


def test_edm_train_and_fraction():
    s = EDMSchedule()
    t = s.sample_train_t(20000, generator=torch.Generator().manual_seed(0))
    assert abs(float(t.log().mean()) + 1.2) < 0.05 and abs(float(t.log().std()) - 1.2) < 0.05
    tf = s.from_fraction(torch.tensor([0.0, 0.5, 1.0]))
    assert_close(tf[[0, 2]], torch.tensor([0.002, 80.0]))
    assert 0.002 < float(tf[1]) < 80.0


# ------------------------------------------------------------------------------------------------------------------
# Config round trip
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [
        DDPMSchedule(),
        DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True,
                     timestep_spacing="leading", steps_offset=1),
        DDPMSchedule(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", timestep_spacing="karras"),
        EDMSchedule(sigma_min=0.01, sigma_max=40.0, sigma_data=1.0, rho=5.0),
        FlowSchedule(shift=3.0),
    ],
    ids=repr,
)
def test_schedule_from_config_round_trip(schedule):
    import json

    config = json.loads(json.dumps(schedule.to_config()))  # JSON-able
    back = schedule_from_config(config)
    assert back == schedule and type(back) is type(schedule)
    assert back.timesteps(7).tolist() == schedule.timesteps(7).tolist()
    t = torch.tensor([schedule.t_min, schedule.t_max])
    for u, v in zip(back.alpha_sigma(t), schedule.alpha_sigma(t)):
        assert u.tolist() == v.tolist()
    assert schedule != (EDMSchedule() if schedule.kind != "edm" else FlowSchedule())


def test_generic_helpers():
    s = DDPMSchedule()
    t = torch.tensor([10.0, 500.0])
    a, sig = s.alpha_sigma(t)
    assert_close(s.snr(t), a**2 / sig**2)
    assert_close(s.sigma_tilde(t), sig / a)
    assert math.isinf(float(DDPMSchedule(rescale_zero_terminal_snr=True).sigma_tilde(torch.tensor(999.0))))
