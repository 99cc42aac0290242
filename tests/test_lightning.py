"""SDXL-Lightning: LoRA merging, the two discriminators, the MSE stage against a closed-form linear-Gaussian teacher,
the phase plan, and ``fewstep.distill`` end to end on the embedded grid25 teacher (weights move, every stage's student
and LoRA is written, and a run interrupted mid-ladder resumes to the same weights as an uninterrupted one).

The linear-Gaussian teacher: for data ``N(m, s^2)`` per dimension the exact denoiser is affine in ``x_t``,
``D(x_t, t) = m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m)``, so the teacher's two DDIM steps are an affine map of
``x_t`` that a student with an affine correction can represent exactly: the MSE stage must find it.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.samplers import sample_ddim
from fewstep.diffusion.schedule import DDPMSchedule
from fewstep.errors import UserError
from fewstep.methods.base import Batch
from fewstep.methods.lightning import (
    LightningConfig,
    LightningDiscriminator,
    LightningMethod,
    LightningStudent,
    add_lora,
    apply_lora,
    ddim_step,
    ddim_x0_target,
    fold_lora,
    lora_layers,
    merged_state,
    save_lora,
)
from fewstep.models import ClassUNet, PointMLP


def tiny_unet_teacher(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = ClassUNet(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=3)
    for p in net.parameters():  # the zero-initialised output layers would hide every difference
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.05)
    return Denoiser(net, DDPMSchedule(rescale_zero_terminal_snr=True), "v_prediction", (1, 8, 8), 3).eval()


def tiny_mlp_teacher(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(PointMLP(dim=2, width=16, depth=2), DDPMSchedule(rescale_zero_terminal_snr=True),
                    "v_prediction", (2,), 0).eval()


def randomise_lora(net: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------------------------
# 1. LoRA: merged == unmerged
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_unet_teacher, tiny_mlp_teacher])
def test_merged_lora_gives_the_same_outputs_as_the_unmerged_one(make):
    teacher = make()
    student = copy.deepcopy(teacher)
    add_lora(student.net, rank=4)
    assert lora_layers(student.net), "no layer was adapted"
    randomise_lora(student.net)
    x = torch.randn(6, *teacher.sample_shape)
    t = torch.tensor([999.0, 800.0, 500.0, 250.0, 10.0, 0.0])
    cond = torch.tensor([0, 1, 2, 0, 1, 3]) if teacher.num_classes else None
    with torch.no_grad():
        unmerged = student(x, t, cond)
        base = teacher(x, t, cond)
        # the LoRA changes the function (else the comparison below would be empty)
        assert (unmerged - base).abs().max() > 1e-3
        # merging changes only rounding: (W + BA) x vs W x + B (A x), a few ulps per layer; v-prediction's x0 =
        # alpha x_t - sigma v has weights <= 1 (no 1/alpha), so a few dozen ulps of the output's magnitude (measured: 1)
        tol = dict(rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(unmerged.abs().max()))
        # (a) a plain network loaded with the merged state dict
        plain = copy.deepcopy(teacher)
        plain.net.load_state_dict(merged_state(student.net))
        assert_close(plain(x, t, cond), unmerged, **tol)
        # (b) PEFT's own merge agrees
        peft_merged = copy.deepcopy(student)
        for layer in lora_layers(peft_merged.net).values():
            layer.merge()
        assert_close(peft_merged(x, t, cond), unmerged, **tol)
        # (c) folding in place: same outputs, and the LoRA restarts at a zero update (B = 0) with the same keys
        keys = set(student.state_dict())
        fold_lora(student.net)
        assert_close(student(x, t, cond), unmerged, **tol)
        assert set(student.state_dict()) == keys
        assert all(p.abs().max() == 0 for n, p in student.net.named_parameters() if ".lora_B." in n)
        assert any(p.abs().max() > 0 for n, p in student.net.named_parameters() if ".lora_A." in n)


def test_lora_file_puts_the_student_on_the_teacher(tmp_path):
    teacher = tiny_unet_teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, t, c = torch.randn(4, 1, 8, 8), torch.full((4,), 600.0), torch.tensor([0, 1, 2, 0])
    # full rank: exact; low rank: an approximation whose error is recorded
    save_lora(tmp_path / "full", student.net, teacher.net, rank=1000)
    rebuilt = apply_lora(teacher, tmp_path / "full")
    assert_close(rebuilt(x, t, c), student(x, t, c).detach(), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "full" / "lora.json").read_text())["relative_error"] < 1e-5
    save_lora(tmp_path / "low", student.net, teacher.net, rank=2)
    info = json.loads((tmp_path / "low" / "lora.json").read_text())
    assert 0.1 < info["relative_error"] < 1.0
    cfg = json.loads((tmp_path / "low" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and "mid1.conv1" in cfg["target_modules"]
    keys = load_file(str(tmp_path / "low" / "adapter_model.safetensors"))
    assert keys["base_model.model.mid1.conv1.lora_A.weight"].shape == (2, 16, 3, 3)
    assert keys["base_model.model.mid1.conv1.lora_B.weight"].shape == (16, 2, 1, 1)
    with pytest.raises(UserError, match="not found"):
        apply_lora(teacher, tmp_path / "missing")


# ------------------------------------------------------------------------------------------------------------------
# 2. The discriminators
# ------------------------------------------------------------------------------------------------------------------
def test_conditional_discriminator_depends_on_x_t_and_the_unconditional_one_does_not():
    teacher = tiny_unet_teacher()
    disc = LightningDiscriminator(teacher, width=16).eval()
    torch.manual_seed(0)
    x_next, x_t1, x_t2 = torch.randn(3, 5, 1, 8, 8)
    t_next, t = torch.full((5,), 499.0), torch.full((5,), 999.0)
    c = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        h1, h2 = disc.features(x_t1, t, c), disc.features(x_t2, t, c)
        cond1 = disc.logits(x_next, t_next, c, True, h1)
        cond2 = disc.logits(x_next, t_next, c, True, h2)
        assert (cond1 - cond2).abs().min() > 1e-6
        unc1 = disc(x_next, x_next.flip(0), t_next, t_next, c, False, x_t1, t)
        unc2 = disc(x_next, x_next.flip(0), t_next, t_next, c, False, x_t2, t)
        for a, b in zip(unc1, unc2):
            assert torch.equal(a, b)
    # and the unconditional logit does not even see x_t: no gradient reaches it
    x_t = x_t1.clone().requires_grad_()
    disc.logits(x_next, t_next, c, False).sum().backward()
    assert x_t.grad is None
    h = disc.features(x_t, t, c)
    disc.logits(x_next, t_next, c, True, h).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    # the backbone is a copy of the teacher's encoder: same features, separate weights
    assert_close(disc.features(x_next, t_next, c), teacher.features(x_next, t_next, c))
    assert not any(p is q for p in disc.parameters() for q in teacher.parameters())


def test_nonsaturating_losses_and_a_few_updates_move_the_logits_apart():
    teacher = tiny_unet_teacher()
    cfg = LightningConfig(ladder=[2, 1], teacher_steps=2, mse_stages=0, lr_discriminator=1e-3,
                          loop={"iterations": 20, "batch_size": 8})
    torch.manual_seed(0)
    m = LightningMethod(teacher, cfg)
    assert [p[1] for p in m.phases] == ["lora_cond", "lora_uncond", "full_uncond"] * 2
    batch = Batch(torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,)))
    opt = m.players["discriminator"].optimizer
    gaps = []
    for it in range(12):
        assert m.updates(it) == ["discriminator", "generator"]
        loss, stats = m.loss("discriminator", batch, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gaps.append(float(stats["real_logit"] - stats["fake_logit"]))
    assert gaps[-1] > gaps[0] and gaps[-1] > 0
    # L_G = -log p_hat = softplus(-logit): in a LoRA phase it reaches the LoRA only (not the base weights, not D),
    # and a step of it raises the fake logit on the same pair
    gen = m.players["generator"]
    for p in m.players["discriminator"].module.parameters():
        p.grad = None
    torch.manual_seed(123)  # the same re-noising draws (1-step stage) before and after the step
    loss, stats = m.loss("generator", batch, 11)
    loss.backward()
    named = dict(gen.module.named_parameters())
    assert all(p.grad is None for n, p in named.items() if ".lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if ".lora_B." in n)
    before = float(stats["fake_logit_g"])
    m.players["discriminator"].optimizer.zero_grad(set_to_none=True)
    for g in gen.optimizer.param_groups:
        g["lr"] = 1e-2
    gen.optimizer.step()
    gen.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    _, after = m.loss("generator", batch, 11)
    assert float(after["fake_logit_g"]) > before


# ------------------------------------------------------------------------------------------------------------------
# 3. The MSE stage on a linear-Gaussian teacher
# ------------------------------------------------------------------------------------------------------------------
class GaussianNet(nn.Module):
    """``x0 = m + a s^2 / (a^2 s^2 + sigma^2) (x - a m) + lin(x)``: the exact denoiser of ``N(m, s^2)`` data while
    ``lin`` is zero (the teacher); a student can learn ``lin``, an affine correction."""

    def __init__(self, schedule, m, s):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("m", m)
        self.register_buffer("s", s)
        self.lin = nn.Linear(len(m), len(m))
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x, c_noise, cond=None):
        a, sig = self.schedule.alpha_sigma(c_noise)
        a, sig = a[:, None], sig[:, None]
        return self.m + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.m) + self.lin(x)

    def features(self, x, c_noise, cond=None):
        return x

    def null_cond(self, cond):
        return cond


def test_ddim_x0_target_inverts_the_ddim_step():
    sch = DDPMSchedule(rescale_zero_terminal_snr=True)
    x_t, x0 = torch.randn(2, 7, 3)
    for t, t_next in ((999.0, 499.0), (749.0, 249.0), (249.0, -1.0)):
        tt, tn = torch.full((7,), t), torch.full((7,), t_next)
        x_next = ddim_step(sch, x_t, x0, tt, tn)
        # inverting divides the step's rounding (a few ulps of |x_t| + |x0|) by alpha' - sigma' alpha / sigma (1/0.28)
        (a, s), (a_n, s_n) = sch.alpha_sigma(tt[:1]), sch.alpha_sigma(tn[:1])
        amp = 1 / float(a_n - s_n * a / s)
        atol = 8 * torch.finfo(torch.float32).eps * amp * float(x_t.abs().max() + x0.abs().max())
        assert_close(ddim_x0_target(sch, x_t, x_next, tt, tn), x0, rtol=0, atol=atol)


def test_mse_stage_reproduces_the_teachers_two_steps_with_one():
    sch = DDPMSchedule(rescale_zero_terminal_snr=False)  # alpha_T > 0: the start x_T still carries the data's mean
    m, s = torch.tensor([0.5, -1.0]), torch.tensor([0.3, 0.8])
    torch.manual_seed(0)
    teacher = Denoiser(GaussianNet(sch, m, s), sch, "sample", (2,), 0).eval()
    cfg = LightningConfig(ladder=[1], steps=1, teacher_steps=2, teacher_sampler="ddim", mse_stages=1,
                          multi_timestep_max_steps=0, lr_mse=0.05, adam_betas=(0.9, 0.99), grad_clip=None,
                          loop={"iterations": 300, "batch_size": 256})
    method = LightningMethod(teacher, cfg)
    opt = method.players["generator"].optimizer
    g = torch.Generator().manual_seed(1)
    for it in range(300):
        assert method.updates(it) == ["generator"]
        batch = Batch(m + s * torch.randn(256, 2, generator=g))
        loss, _ = method.loss("generator", batch, it)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # closed form of the teacher's two DDIM steps 999 -> 499 -> clean (an affine map of x_T)
    z = torch.randn(500, 2, generator=g)
    a0, s0 = (v.item() for v in sch.alpha_sigma(torch.tensor(999.0)))
    a1, s1 = (v.item() for v in sch.alpha_sigma(torch.tensor(499.0)))
    d0 = m + a0 * s**2 / (a0**2 * s**2 + s0**2) * (s0 * z - a0 * m)
    x_mid = a1 * d0 + s1 * (s0 * z - a0 * d0) / s0
    closed = m + a1 * s**2 / (a1**2 * s**2 + s1**2) * (x_mid - a1 * m)
    two = sample_ddim(teacher, s0 * z, torch.tensor([999.0, 499.0, -1.0]))
    assert_close(two, closed, atol=1e-4, rtol=1e-4)
    student = method.student()
    assert isinstance(student, LightningStudent) and student.timesteps.tolist() == [999.0]
    one = student.sample(500, z=z)
    assert_close(one, closed, atol=2e-3, rtol=2e-3)
    # ... where the untrained student (the teacher's one step) is far off
    assert (sample_ddim(teacher, s0 * z, torch.tensor([999.0, -1.0])) - closed).abs().max() > 0.05


# ------------------------------------------------------------------------------------------------------------------
# 4. The plan and the config
# ------------------------------------------------------------------------------------------------------------------
def test_phase_plan_and_config_validation():
    teacher = tiny_mlp_teacher()
    m = LightningMethod(teacher, LightningConfig(loop={"iterations": 100}))
    kinds = [(m.stage_steps[s], k) for s, k, _, _ in m.phases]
    assert kinds[0] == (8, "mse") and kinds[1:4] == [(4, "lora_cond"), (4, "lora_uncond"), (4, "full_uncond")]
    assert kinds[-1] == (1, "full_uncond") and len(kinds) == 10
    assert m.phases[0][2] == 0 and m.phases[-1][3] == 100
    assert all(a < b and b == nxt for (_, _, a, b), (_, _, nxt, _) in zip(m.phases, m.phases[1:]))
    cond = LightningMethod(teacher, LightningConfig(objective="conditional", steps=2, loop={"iterations": 50}))
    assert [k for _, k, _, _ in cond.phases] == ["mse", "lora_cond", "full_cond", "lora_cond", "full_cond"]
    mse = LightningMethod(teacher, LightningConfig(objective="mse_only", loop={"iterations": 50}))
    assert {k for _, k, _, _ in mse.phases} == {"mse"} and mse.updates(49) == ["generator"]
    # the 1-step stage trains from several start times and re-noises clean samples for the discriminator
    assert m._start_times(1).tolist() == [999.0, 749.0, 499.0, 249.0]
    assert m._start_times(4).tolist() == [999.0, 749.0, 499.0, 249.0]
    assert m._start_times(8).tolist()[:2] == [999.0, 874.0]
    assert m._next_time(749.0, 2) == 249.0 and m._next_time(249.0, 2) == -1.0 and m._next_time(749.0, 1) == -1.0
    for bad, match in ((dict(ladder=[4, 3]), "divide"), (dict(ladder=[2, 4]), "decreasing"),
                       (dict(steps=3), "not on the ladder"), (dict(teacher_steps=12), "multiple"),
                       (dict(phase_weights={"gan": 1.0}), "unknown phase")):
        with pytest.raises(Exception, match=match):
            LightningConfig(**bad)
    with pytest.raises(UserError, match="fewer than"):
        LightningMethod(teacher, LightningConfig(loop={"iterations": 5}))
    from fewstep.distillation import make_config

    with pytest.raises(UserError, match="steps"):
        make_config("lightning", steps=3)


# ------------------------------------------------------------------------------------------------------------------
# 5. End to end on the embedded grid25 teacher, with an interrupted and resumed run
# ------------------------------------------------------------------------------------------------------------------
def _state(prefix):
    return load_file(str(prefix.with_suffix(".safetensors")))


def test_distill_end_to_end_and_resume(tmp_path, monkeypatch):
    from fewstep import zoo
    from fewstep.api import load_teacher
    from fewstep.distillation import distill
    from fewstep.methods import lightning
    from fewstep.train import list_checkpoints, load_checkpoint, read_metrics

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    common = dict(teacher="grid25", method="lightning", steps=1, iterations=12, batch_size=16, log_every=1,
                  sample_every=0, progress=False, lora_export_rank=256, teacher_steps=16)
    whole = tmp_path / "whole"
    student = distill(out=whole, checkpoint_every=12, evaluate_n=0, **common)

    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "student.json"):
        assert (whole / name).is_file(), name
    assert isinstance(student, LightningStudent) and student.steps == 1
    assert json.loads((whole / "student.json").read_text())["meta"]["sampler"] == "ode"
    rows = read_metrics(whole / "metrics.jsonl")
    assert [r["generator/stage_steps"] for r in rows][0] == 8.0 and rows[-1]["generator/stage_steps"] == 1.0
    assert "discriminator/d" in rows[-1] and "generator/mse_x0" in rows[0]

    teacher = load_teacher("grid25")
    t_state = teacher.net.state_dict()
    x = torch.randn(64, 2)
    for k in (8, 4, 2, 1):
        prefix = whole / "students" / f"steps_{k}"
        saved = _state(prefix)
        assert saved.keys() == t_state.keys()
        assert any(not torch.equal(saved[n], t_state[n]) for n in saved), f"{k}-step student is the teacher"
        loaded = lightning.load_student(prefix)
        assert isinstance(loaded, LightningStudent) and loaded.steps == k
        from fewstep.api import load_model  # the path `fewstep sample` / `fewstep eval` take: ODE steps too

        assert isinstance(load_model(prefix.with_suffix(".json")), LightningStudent)
        # its LoRA file on the teacher gives the same network (full-rank export here)
        rebuilt = apply_lora(teacher, whole / "students" / f"lora_steps_{k}")
        t = torch.full((64,), 999.0)
        assert_close(rebuilt(x, t), loaded.generator(x, t), atol=1e-4, rtol=1e-4)
    assert torch.equal(_state(whole / "student")["out.weight"], _state(whole / "students" / "steps_1")["out.weight"])
    # consecutive stages differ: each stage trained its own student
    assert not torch.equal(_state(whole / "students" / "steps_2")["out.weight"],
                           _state(whole / "students" / "steps_1")["out.weight"])

    # interrupted after iteration 7 (checkpoint at 6, mid-ladder), then resumed: the same weights as uninterrupted
    broken = tmp_path / "broken"
    real_loss = lightning.LightningMethod.loss

    def crash(self, player, batch, it):
        if it == 7:
            raise RuntimeError("simulated crash")
        return real_loss(self, player, batch, it)

    monkeypatch.setattr(lightning.LightningMethod, "loss", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(out=broken, checkpoint_every=3, evaluate_n=0, **common)
    monkeypatch.setattr(lightning.LightningMethod, "loss", real_loss)
    ckpt = load_checkpoint(list_checkpoints(broken)[-1])
    assert ckpt["iteration"] == 6 and 0 < ckpt["method"]["phase"] < 9 and ckpt["method"]["finished"]
    # a checkpoint names the finished stages' files (written once under <run>/stages/) instead of holding them
    for k, f in ckpt["method"]["finished"].items():
        assert set(f) == {"file", "sha256", "prediction_type"} and (broken / f["file"]).is_file(), k
    distill(out=broken, checkpoint_every=3, evaluate_n=0, resume=True, **common)
    for k in (8, 4, 2, 1):
        a, b = _state(whole / "students" / f"steps_{k}"), _state(broken / "students" / f"steps_{k}")
        assert all(torch.equal(a[n], b[n]) for n in a), f"{k}-step student differs after resume"
    final_a = load_checkpoint(list_checkpoints(whole)[-1])["players"]
    final_b = load_checkpoint(list_checkpoints(broken)[-1])["players"]
    for player in ("generator", "discriminator"):
        sa, sb = final_a[player]["module"], final_b[player]["module"]
        assert all(torch.equal(sa[n], sb[n]) for n in sa), player


def test_one_step_stage_renoises_clean_samples_for_the_discriminator():
    teacher = tiny_mlp_teacher()
    m = LightningMethod(teacher, LightningConfig(ladder=[2, 1], teacher_steps=2, mse_stages=0,
                                                 loop={"iterations": 12}))
    x = torch.randn(400, 2)
    clean = torch.full((400,), -1.0)
    # the 2-step stage shows a clean x0 at t_min, as it is
    out, t = m._disc_inputs(x, clean)
    assert torch.equal(out, x) and set(t.tolist()) == {0.0}
    # and any x_{t'} short of clean as it is
    mid = torch.full((400,), 499.0)
    out, t = m._disc_inputs(x, mid)
    assert torch.equal(out, x) and torch.equal(t, mid)
    # the 1-step stage re-noises clean samples to t* in {10, 250, 500, 750} (x 999/1000, rounded)
    m.updates(11)
    assert m.steps_now == 1
    torch.manual_seed(0)
    out, t = m._disc_inputs(x, clean)
    assert set(t.tolist()) == {10.0, 250.0, 500.0, 749.0}
    a, s = teacher.schedule.alpha_sigma(t)
    eps = (out - a[:, None] * x) / s[:, None]
    assert abs(eps.std().item() - 1.0) < 0.1  # out = alpha x + sigma eps with fresh standard noise


def test_the_restarted_lora_does_not_depend_on_the_global_rng():
    """The loop seeds the global RNG per process; a merge must restart every process's LoRA identically."""
    teacher = tiny_mlp_teacher()
    cfg = LightningConfig(ladder=[2, 1], teacher_steps=2, mse_stages=0, loop={"iterations": 12})
    states = []
    for rank_seed in (1, 2):
        torch.manual_seed(0)
        m = LightningMethod(teacher, cfg)
        randomise_lora(m._gen().denoiser.net)
        torch.manual_seed(rank_seed)  # as the loop reseeds each process differently
        m.updates(11)  # through merges into the 1-step stage
        states.append({k: v.clone() for k, v in m._gen().state_dict().items()})
    a, b = states
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(".lora_A." in k and a[k].abs().max() > 0 for k in a)


def test_fsdp_is_refused_up_front():
    from fewstep.errors import UserError
    from fewstep.methods.dmd2 import DMD2Method
    from fewstep.methods import lightning
    from fewstep.train.loop import check_fsdp_support

    with pytest.raises(UserError, match="cannot train sharded.*DDP"):
        check_fsdp_support(lightning.LightningMethod.__new__(lightning.LightningMethod))
    check_fsdp_support(DMD2Method.__new__(DMD2Method))  # the others shard


def test_a_frozen_discriminator_backbone_has_no_gradients_no_optimizer_state_and_the_training_dtype():
    """lr_discriminator: 0 freezes the backbone for real: it is the teacher itself (no copy), AdamW holds the heads
    only, the loop's bf16 cast reaches it, and the discriminator's state (what checkpoints carry) is the heads'."""
    from fewstep.train.memory import cast_frozen_parameters, modules_of, optimizer_parameters

    teacher = tiny_unet_teacher()
    batch = Batch(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))
    counts = {}
    for lr in (1e-4, 0.0):
        m = LightningMethod(teacher, LightningConfig(ladder=[2, 1], teacher_steps=2, mse_stages=0, lr_discriminator=lr,
                                                     loop={"iterations": 12}))
        disc, opt = m._disc(), m.players["discriminator"].optimizer
        heads = list(disc.cond_head.parameters()) + list(disc.uncond_head.parameters())
        assert m.updates(0) == ["discriminator", "generator"]
        loss, _ = m.loss("discriminator", batch, 0)
        loss.backward()
        opt.step()
        counts[lr] = len(opt.state)
        if lr > 0:
            assert disc.backbone is not m.teacher and len(opt.state) > len(heads)
            continue
        assert disc.backbone is m.teacher and not any(p.requires_grad for p in disc.backbone.parameters())
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in heads}
        # AdamW's state: the conditional head's tensors (this phase's), none of the backbone's
        assert {id(p) for p in opt.state} == {id(p) for p in disc.cond_head.parameters()}
        assert all(p.grad is None for p in disc.backbone.parameters())
        disc.train()
        assert not disc.backbone.training  # the shared teacher stays in eval mode
        state = disc.state_dict()
        assert state and not any(k.startswith("backbone.") for k in state)
        disc.load_state_dict(state)  # strict: the heads round-trip
        # the loop's mixed-precision cast: the frozen backbone in bf16, the trained heads in float32
        restore = cast_frozen_parameters(modules_of(m), torch.bfloat16,
                                         keep=optimizer_parameters(p.optimizer for p in m.players.values()))
        assert all(p.dtype == torch.bfloat16 for p in disc.backbone.parameters())
        assert all(p.dtype == torch.float32 for p in heads)
        m.updates(11)  # into the 1-step stage: its teacher (the finished 2-step student) is held in bf16 too
        assert all(p.dtype == torch.bfloat16 for p in m._stage_teacher.parameters())
        assert set(m.finished) == {2} and all(v.device.type == "cpu" for v in m.finished[2]["state"].values())
        restore()
    assert counts[0.0] < counts[1e-4]
