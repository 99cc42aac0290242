"""Export round trips: diffusers' own pipelines load what ``fewstep export`` writes and sample what our sampler does.

Students are distilled for two iterations from tiny pipelines (``hf_tiny``); the images of diffusers'
``DiffusionPipeline.from_pretrained(out)(..., num_inference_steps=k)`` are compared with our k-step student sampler
on the same initial noise and the same re-noising draws. Tolerance: 8 ulps of |x_T| times the x0 conversion's
amplification, on images in [0, 1] (float32; only the order of operations differs, see ``_atol``). Our sampler
starts from ``sigma_{t_1} z``, diffusers from ``z``: we pass ``z / sigma_{t_1}`` to ours.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import hf_tiny
from fewstep import Student, UserError, distill, export, load_model, load_teacher
from fewstep.diffusion.samplers import sample_student
from fewstep.export import lora_from_difference

pytestmark = pytest.mark.filterwarnings("ignore")  # diffusers/transformers deprecation chatter


def _atol(student, z: torch.Tensor) -> float:
    """Images in [0, 1] from diffusers and from our sampler differ only by the order of float32 operations: a few ulps
    of |x_t| in each step's x0 = c1 x_t + c2 F, amplified by |c1| + |c2| (epsilon at t = 999: 2/alpha, ~300) and
    halved by the [-1, 1] -> [0, 1] map; 8 ulps of the largest such term (measured: <= 1, also after a VAE)."""
    den, t = student.generator, student.timesteps
    ones, zeros = torch.ones(len(t), 1), torch.zeros(len(t), 1)
    c1, c2 = (den.schedule.to_x0(p, x, t, den.prediction_type).abs() for p, x in ((zeros, ones), (ones, zeros)))
    return 8 * torch.finfo(torch.float32).eps * float((c1 + c2).max()) * max(1.0, float(z.abs().max())) / 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-iteration DMD2 students of a pixel UNet (2 steps), an SD-like text-to-image pipeline (2 steps, full
    weights and LoRA), SD3 and SDXL (2 steps), DiT (1 step), and a Lightning student of the UNet (2 ODE steps), distilled once."""
    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    hf_tiny.unet2d(folder=root / "unet")
    hf_tiny.sd_pipeline(root / "sd")
    hf_tiny.sd3_pipeline(root / "sd3")
    hf_tiny.sdxl_pipeline(root / "sdxl")
    hf_tiny.dit_pipeline(root / "dit")
    images = hf_tiny.captioned_images(root / "images", 6, caption="a picture of {i}", prefix="")
    common = dict(data=str(images), method="dmd2", iterations=2, batch_size=2, sample_every=0, checkpoint_every=100,
                  progress=False, evaluate_n=0)
    for name, steps in (("unet", 2), ("sd", 2), ("sd3", 2), ("sdxl", 2), ("dit", 1)):
        distill(teacher=str(root / name), steps=steps, out=root / f"run_{name}", **common)
    distill(teacher=str(root / "sd"), steps=2, out=root / "run_sd_lora", lora_rank=2, **common)  # a LoRA student
    lightning = {**common, "method": "lightning", "iterations": 4}  # ODE steps
    distill(teacher=str(root / "unet"), steps=2, ladder=[2], teacher_steps=2, out=root / "run_unet_lightning",
            **lightning)
    yield root
    mp.undo()


def _to_unit(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def ours(student, z, cond, seed):
    """Our student sampler from diffusers' initial latents ``z``, re-noising with a generator seeded ``seed``."""
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    gen = torch.Generator().manual_seed(seed)
    x = sample_student(student.generator, z / s0, student.timesteps, cond, generator=gen)
    return _to_unit(student.generator.decode(x))


def _pipe(folder, **kw):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), **kw)


SD3_KW = {"text_encoder_3": None, "tokenizer_3": None}  # the tiny SD3 pipeline has no T5


# ------------------------------------------------------------------------------------------------------------------
# diffusers format
# ------------------------------------------------------------------------------------------------------------------
def test_pixel_unet_pipeline_round_trip(runs, tmp_path):
    from diffusers import LCMScheduler

    out = export(str(runs / "run_unet"), "diffusers", tmp_path / "out")
    student = load_model(runs / "run_unet")
    pipe = _pipe(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == student.timesteps.long().tolist() == [999, 499]
    gen = torch.Generator().manual_seed(3)
    got = pipe(batch_size=2, num_inference_steps=2, generator=gen, output_type="np").images
    gen = torch.Generator().manual_seed(3)
    z = torch.randn((2, 3, 8, 8), generator=gen)  # what DDPMPipeline draws first; the re-noising draws follow
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    x = sample_student(student.generator, z / s0, student.timesteps, None, generator=gen)
    np.testing.assert_allclose(got, _to_unit(x), atol=_atol(student, z))
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["steps"] == 2 and info["scheduler"] == "LCMScheduler" and "pass_timesteps" not in info


def test_lightning_ode_student_round_trip(runs, tmp_path):
    from diffusers import DDIMScheduler

    out = export(str(runs / "run_unet_lightning"), "diffusers", tmp_path / "out")
    student = load_model(runs / "run_unet_lightning")
    pipe = _pipe(out)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    gen = torch.Generator().manual_seed(2)
    got = pipe(batch_size=2, num_inference_steps=2, generator=gen, output_type="np").images
    z = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    from fewstep.diffusion.samplers import initial_noise, sample_ddim

    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    ts = torch.cat([student.timesteps, torch.tensor([student.schedule.t_clean])])
    x = sample_ddim(student.generator, initial_noise(student.schedule, z / s0, ts[0]), ts)
    np.testing.assert_allclose(got, _to_unit(x), atol=_atol(student, z))
    assert json.loads((out / "fewstep_export.json").read_text())["sampler"] == "ode"


def test_text_to_image_pipeline_round_trip(runs, tmp_path):
    out = export(str(runs / "run_sd"), "diffusers", tmp_path / "out")
    student = load_model(runs / "run_sd")
    pipe = _pipe(out)
    prompt = ["a picture of 3", "something else"]
    gen = torch.Generator().manual_seed(5)
    got = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=gen, height=16, width=16,
               output_type="np").images
    gen = torch.Generator().manual_seed(5)
    z = torch.randn((2, 4, 8, 8), generator=gen)
    cond = student.generator.encode_prompts(prompt)
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    x = sample_student(student.generator, z / s0, student.timesteps, cond, generator=gen)
    np.testing.assert_allclose(got, _to_unit(student.generator.decode(x)), atol=_atol(student, z))


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A two-iteration, 2-step DMD2 student of the shipped shapes teacher (a pixel-space StableDiffusionPipeline
    without VAE on all-MiniLM-L6-v2's tokens), distilled once."""
    out = tmp_path_factory.mktemp("export_shapes") / "run"
    distill("shapes", "dmd2", steps=2, out=out, iterations=2, batch_size=4, sample_every=0, checkpoint_every=100,
            progress=False, evaluate_n=0)
    return out


def test_shapes_text_student_round_trip(shapes_run, tmp_path):
    """diffusers' StableDiffusionPipeline, loaded as the export's README says (no VAE: its latents are the images),
    samples what fewstep samples for the same prompts on the same noise, and the attribute classifier reads both
    alike."""
    from diffusers import StableDiffusionPipeline

    from fewstep.data.shapes import heldout_prompts, seen_prompts
    from fewstep.eval.adherence import load_attribute_classifier
    from fewstep.models.hf import generate_images

    out = export(str(shapes_run), "diffusers", tmp_path / "out")
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["load_kwargs"] == {"vae": None}
    assert info["output_type"] == "latent" and "vae=None" in (out / "README.md").read_text()
    pipe = _pipe(out, **info["load_kwargs"])
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.vae is None
    prompts = seen_prompts()[::24] + heldout_prompts()[::8]  # 4 seen and 4 held-out compositions
    got = pipe(prompts, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(7),
               output_type="latent").images
    student = load_model(shapes_run)
    # fewstep's prompt sampling draws the same z first, then the same re-noising; zero terminal SNR: sigma_999 = 1,
    # so both start from z itself
    want = generate_images(student, prompts, seed=7)
    z = torch.randn((len(prompts), *student.sample_shape), generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(_to_unit(got), _to_unit(want), atol=_atol(student, z))
    _, read_got = load_attribute_classifier().predict(got.clamp(-1, 1))
    _, read_want = load_attribute_classifier().predict(want)
    np.testing.assert_array_equal(read_got, read_want)


def test_sdxl_pipeline_and_lora_round_trip(runs, tmp_path):
    from diffusers import LCMScheduler

    student = load_model(runs / "run_sdxl")
    prompt = ["a picture of 5"]
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    torch.randn((1, 4, 8, 8), generator=gen)
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    x = sample_student(student.generator, z / s0, student.timesteps, student.generator.encode_prompts(prompt),
                       generator=gen)
    want = _to_unit(student.generator.decode(x))
    pipe = _pipe(export(str(runs / "run_sdxl"), "diffusers", tmp_path / "out"))
    got = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(9),
               height=16, width=16, output_type="np").images
    np.testing.assert_allclose(got, want, atol=_atol(student, z))
    lora = export(str(runs / "run_sdxl"), "lora", tmp_path / "lora", rank=64)  # SVD: close, not exact (norms)
    teacher = _pipe(runs / "sdxl")
    teacher.load_lora_weights(str(lora))
    teacher.scheduler = LCMScheduler.from_pretrained(str(lora), subfolder="scheduler")
    via_lora = teacher(prompt, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(9),
                       height=16, width=16, output_type="np").images
    assert np.isfinite(via_lora).all() and json.loads((lora / "fewstep_export.json").read_text())["lora_residual"] < 1


def test_class_conditional_dit_pipeline_round_trip(runs, tmp_path):
    out = export(str(runs / "run_dit"), "diffusers", tmp_path / "out")
    student = load_model(runs / "run_dit")
    pipe = _pipe(out)
    got = pipe(class_labels=[0, 2], num_inference_steps=1, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(1), output_type="np").images
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(got, ours(student, z, torch.tensor([0, 2]), 0), atol=_atol(student, z))


def test_flow_pipeline_round_trip(runs, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = export(str(runs / "run_sd3"), "diffusers", tmp_path / "out")
    student = load_model(runs / "run_sd3")
    pipe = _pipe(out, **SD3_KW)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["pass_sigmas"] == [1.0, 0.5]  # SD3's own 2-step grid ends at sigma_min: the student's is trailing
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)  # SD3's pipeline does not hand its generator to the scheduler: re-noising uses the global RNG
    got = pipe("a picture of 1", num_inference_steps=2, sigmas=info["pass_sigmas"], guidance_scale=1.0,
               generator=gen, height=16, width=16, output_type="np").images
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(got, ours(student, z, student.generator.encode_prompts(["a picture of 1"]), 0),
                               atol=_atol(student, z))


# ------------------------------------------------------------------------------------------------------------------
# LoRA format
# ------------------------------------------------------------------------------------------------------------------
def _sd_lora_images(teacher_folder, lora_dir, prompt, seed, steps):
    from diffusers import LCMScheduler

    pipe = _pipe(teacher_folder)
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = LCMScheduler.from_pretrained(str(lora_dir), subfolder="scheduler")
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, generator=gen, height=16, width=16,
                output_type="np").images


def _perturbed_student(runs, lora: bool):
    """A 2-step student of the SD pipeline whose Linear/Conv2d weights (only) differ from the teacher's: by a random
    full-rank change (a LoRA of full rank captures it exactly), or by PEFT adapters (a LoRA-trained student)."""
    teacher = load_teacher(str(runs / "sd"))
    den = copy.deepcopy(teacher)
    torch.manual_seed(0)
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        targets = [n for n, m in den.net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets), den.net)
        with torch.no_grad():
            for n, p in den.net.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)
    else:
        with torch.no_grad():
            for m in den.net.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    m.weight.add_(0.05 * torch.randn_like(m.weight))
    return Student(den, torch.tensor([999.0, 499.0]))


@pytest.mark.parametrize("lora", [False, True], ids=["svd", "adapters"])
def test_lora_round_trip_is_exact_when_the_change_is_low_rank_representable(runs, tmp_path, lora):
    student = _perturbed_student(runs, lora)
    out = export(student, "lora", tmp_path / "lora", rank=64)
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["lora_source"] == ("adapters" if lora else "svd") and info["lora_residual"] < 1e-6
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    prompt = ["a picture of 2"]
    got = _sd_lora_images(runs / "sd", out, prompt, 11, 2)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    torch.randn((1, 4, 8, 8), generator=gen)  # the initial draw; the re-noising draws follow in the pipeline
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    x = sample_student(student.generator, z / s0, student.timesteps, student.generator.encode_prompts(prompt),
                       generator=gen)
    np.testing.assert_allclose(got, _to_unit(student.generator.decode(x)), atol=_atol(student, z))


def test_lora_of_a_lora_trained_student_is_its_adapters(runs, tmp_path):
    student = load_model(runs / "run_sd_lora")
    out = export(str(runs / "run_sd_lora"), "lora", tmp_path / "lora")
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["lora_source"] == "adapters" and info["lora_residual"] == 0.0
    prompt = ["a picture of 0"]
    got = _sd_lora_images(runs / "sd", out, prompt, 4, 2)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn((1, 4, 8, 8), generator=gen)
    _, s0 = student.schedule.alpha_sigma(student.timesteps[:1])
    x = sample_student(student.generator, z / s0, student.timesteps, student.generator.encode_prompts(prompt),
                       generator=gen)
    np.testing.assert_allclose(got, _to_unit(student.generator.decode(x)), atol=_atol(student, z))
    merged = export(str(runs / "run_sd_lora"), "diffusers", tmp_path / "merged")  # adapters merged into the UNet
    assert not any("lora" in k for k in json.loads((merged / "unet" / "config.json").read_text()))


def test_lora_of_a_distilled_full_weight_student(runs, tmp_path):
    out = export(str(runs / "run_sd"), "lora", tmp_path / "lora", rank=2)
    info = json.loads((out / "fewstep_export.json").read_text())
    assert info["lora_source"] == "svd" and info["rank"] == 2 and 0 < info["lora_residual"] < 1
    images = _sd_lora_images(runs / "sd", out, ["a picture of 4"], 1, 2)
    assert np.isfinite(images).all() and images.shape == (1, 16, 16, 3)


def test_svd_extraction_by_hand():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(5, 4, 3))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight += torch.randn(5, 1) @ torch.randn(1, 6)  # rank 1
        student[1].weight += torch.randn_like(student[1].weight)
        student[1].bias += 1.0  # a bias change: not a LoRA's to carry
    state, residual = lora_from_difference(student, teacher, rank=1)
    a, b = state["0.lora_A.weight"], state["0.lora_B.weight"]
    torch.testing.assert_close(teacher[0].weight + b @ a, student[0].weight, atol=1e-5, rtol=0)
    assert state["1.lora_A.weight"].shape == (1, 5, 3, 3) and state["1.lora_B.weight"].shape == (4, 1, 1, 1)
    assert 0 < residual < 1
    full, res_full = lora_from_difference(student, teacher, rank=100)
    assert full["1.lora_A.weight"].shape[0] == 4  # capped at the layer's rank
    assert res_full == pytest.approx(2.0 / float(((student[1].weight - teacher[1].weight) ** 2).sum()
                                                 + 4 + ((student[0].weight - teacher[0].weight) ** 2).sum()) ** 0.5,
                                     rel=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Errors and the CLI
# ------------------------------------------------------------------------------------------------------------------
def test_embedded_students_and_bad_input_are_user_errors(runs, tmp_path):
    embedded = Student(load_teacher("digits"), torch.tensor([999.0]))
    with pytest.raises(UserError, match="diffusers teacher"):
        export(embedded, "diffusers", tmp_path / "a")
    with pytest.raises(UserError, match="format"):
        export(str(runs / "run_unet"), "onnx", tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export(str(runs / "run_unet"), "diffusers", tmp_path / "c")
    with pytest.raises(UserError, match="LoRA loader"):  # DDPMPipeline cannot load_lora_weights
        export(str(runs / "run_unet"), "lora", tmp_path / "d")
    with pytest.raises(UserError, match="teacher, not a student"):
        export(str(runs / "unet"), "diffusers", tmp_path / "e")


def test_prompts_sample_students_and_teachers(runs, tmp_path):
    from fewstep.cli import main
    from fewstep.models.hf import generate_images

    student = load_model(runs / "run_sd")
    images = generate_images(student, ["a picture of 1", "a picture of 2"], seed=3)
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    torch.randn((2, 4, 8, 8), generator=gen)
    x = sample_student(student.generator, z, student.timesteps,
                       student.generator.encode_prompts(["a picture of 1", "a picture of 2"]), generator=gen)
    torch.testing.assert_close(images, student.generator.decode(x))
    assert main(["sample", "--student", str(runs / "run_sd"), "--prompt", "a", "--prompt", "b", "--out",
                 str(tmp_path / "s.png")]) == 0 and (tmp_path / "s.png").is_file()
    assert main(["teacher", "sample", "--teacher", str(runs / "sd"), "--prompt", "a", "--steps", "2", "--cfg-scale",
                 "3", "--out", str(tmp_path / "t.png")]) == 0 and (tmp_path / "t.png").is_file()
    assert main(["sample", "--student", str(runs / "run_unet"), "--prompt", "a", "--out", str(tmp_path / "u.png")]) == 2


def test_cli_export(runs, tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--student", str(runs / "run_unet"), "--format", "diffusers", "--out", str(out)]) in (0, None)
    assert (out / "model_index.json").is_file() and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", "--student", str(runs / "run_unet"), "--format", "diffusers", "--out", str(out)])
    assert e.value.code == 2


def test_evaluate_measures_decoded_images(runs, monkeypatch):
    import fewstep.eval.evaluate as ev
    from fewstep import evaluate

    seen = {}

    def fake(x, test, labels=None, **kwargs):  # the reference split and options as evaluate_against passes them
        seen.update(x=tuple(x.shape), test=tuple(test.x.shape[1:]), lo=float(x.min()), hi=float(x.max()))
        return {"fid": 0.0}

    monkeypatch.setattr(ev, "evaluate_samples", fake)
    out = evaluate(load_model(runs / "run_sd"), data=str(runs / "images"), n=3)
    assert out["fid"] == 0.0 and seen["x"] == (3, 3, 16, 16) == (3, *seen["test"]) and -1 <= seen["lo"] <= seen["hi"] <= 1
