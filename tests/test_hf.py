"""Diffusers teachers: folders, schedule mapping, the denoiser adapter, captions, and every method end to end.

Tiny random models are built from diffusers/transformers configs in the test (``hf_tiny``), saved with
``save_pretrained`` and loaded back through ``fewstep.load_teacher`` / ``fewstep.distill``, the path a user takes.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import hf_tiny
from fewstep import UserError, distill, load_model, load_teacher
from fewstep.data import load_data
from fewstep.models.hf import DiffusersDenoiser, flux_shift, prepare_training_data, schedule_from_scheduler_config

pytestmark = pytest.mark.filterwarnings("ignore")  # diffusers/transformers deprecation chatter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Pipelines (pixel UNet, SD-like text-to-image, DiT, SD3, SDXL-like) and a captioned image folder, built once."""
    root = tmp_path_factory.mktemp("hf")
    hf_tiny.unet2d(folder=root / "unet")
    hf_tiny.sd_pipeline(root / "sd")
    hf_tiny.dit_pipeline(root / "dit")
    hf_tiny.sd3_pipeline(root / "sd3")
    hf_tiny.sdxl_pipeline(root / "sdxl")
    hf_tiny.captioned_images(root / "images", 8)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------------------------
# 1. Scheduler configs map onto our schedules
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    ("DDPMScheduler", {"beta_schedule": "linear"}),
    ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                       "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}),
])
def test_ddpm_family_configs_map_to_the_same_alphas(cls, kwargs):
    import diffusers

    sched = getattr(diffusers, cls)(**kwargs)
    config = {**sched.config, "_class_name": cls}
    ours, prediction = schedule_from_scheduler_config(config, "unet", (3, 8, 8))
    assert prediction == kwargs.get("prediction_type", "epsilon")
    a, s = ours.alpha_sigma(torch.arange(1000).float())
    ac = sched.alphas_cumprod
    torch.testing.assert_close(a.double() ** 2, ac.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.double() ** 2, 1 - ac.double(), atol=1e-6, rtol=0)
    assert ours.timestep_spacing == sched.config.get("timestep_spacing", "leading")


def test_flow_match_config_maps_shift_and_dynamic_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours, prediction = schedule_from_scheduler_config({**sched.config, "_class_name": type(sched).__name__}, "sd3",
                                                      (16, 128, 128))
    assert prediction == "flow" and ours.shift == 3.0
    sched.set_timesteps(4)
    torch.testing.assert_close(ours.timesteps(4)[:-1], sched.sigmas[:-1].float(), atol=1e-5, rtol=0)
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    flux, _ = schedule_from_scheduler_config({**dyn.config, "_class_name": "FlowMatchEulerDiscreteScheduler"},
                                             "flux", (16, 64, 64))
    mu = 0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256)  # diffusers' calculate_shift for 32x32 packed tokens
    assert flux.shift == pytest.approx(np.exp(mu)) == pytest.approx(flux_shift(dyn.config, 1024))
    dyn.set_timesteps(3, mu=mu)  # dynamic shifting shifts linspace(1, 1/T) once (a static shift is applied twice)
    torch.testing.assert_close(flux.shift_t(torch.linspace(1, 1e-3, 3)), dyn.sigmas[:-1].float(), atol=1e-5, rtol=0)


def test_unsupported_scheduler_configs_are_user_errors():
    with pytest.raises(UserError, match="trained_betas"):
        schedule_from_scheduler_config({"_class_name": "DDPMScheduler", "trained_betas": [0.1] * 10}, "unet", (3, 8, 8))
    with pytest.raises(UserError, match="beta_schedule"):
        schedule_from_scheduler_config({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "unet", (3, 8, 8))
    with pytest.raises(UserError, match="FlowMatch"):
        schedule_from_scheduler_config({"_class_name": "DDIMScheduler"}, "sd3", (4, 8, 8))


# ------------------------------------------------------------------------------------------------------------------
# 2. Loading every family: shapes, features, null conditions, agreement with diffusers' own call
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,prediction,classes,text", [
    ("unet", "ddpm", "epsilon", 0, False),
    ("sd", "ddpm", "epsilon", 0, True),
    ("dit", "ddpm", "epsilon", 3, False),
    ("sd3", "flow", "flow", 0, True),
    ("sdxl", "ddpm", "epsilon", 0, True),
])
def test_load_each_family(folders, name, kind, prediction, classes, text):
    den = load_teacher(str(folders / name))
    assert isinstance(den, DiffusersDenoiser)
    assert den.schedule.kind == kind and den.prediction_type == prediction and den.num_classes == classes
    assert den.text_conditional == text and not any(p.requires_grad for p in den.parameters())
    x = torch.randn(2, *den.sample_shape)
    t = den.schedule.from_fraction(torch.tensor([0.3, 0.9]))
    cond = torch.tensor([0, 2]) if classes else den.encode_prompts(["a cat", "a dog"]) if text else None
    x0 = den(x, t, cond)
    feats = den.features(x, t, cond)
    assert x0.shape == x.shape and torch.isfinite(x0).all() and feats.ndim == 4 and torch.isfinite(feats).all()
    if cond is not None:
        null = den.null_cond(cond)
        assert not torch.equal(den(x, t, null), x0)
        torch.testing.assert_close(den(x, t, None), den(x, t, null))  # no condition = the null one
    if name == "sd":  # the empty prompt is diffusers' own CFG negative
        ref = den.components.pipe.encode_prompt([""] * 2, "cpu", 1, False)[0]
        torch.testing.assert_close(den.null_cond(cond)["encoder_hidden_states"], ref)
    if name == "sdxl":  # SDXL's negative for an empty prompt is zeros (force_zeros_for_empty_prompt)
        assert set(cond) == {"encoder_hidden_states", "text_embeds"}
        assert all(float(v.abs().sum()) == 0 for v in den.null_cond(cond).values())


def test_raw_output_is_the_diffusers_model_call(folders):
    den = load_teacher(str(folders / "dit"))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
    ref = den.net.model(x, timestep=t, class_labels=c).sample[:, :4]  # learned sigma: the eps half
    torch.testing.assert_close(den.raw(x, t, c), ref)
    xl = load_teacher(str(folders / "sdxl"))
    pipe, emb, x = xl.components.pipe, xl.encode_prompts(["hello"]), torch.randn(1, 4, 8, 8)
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    ref = xl.net.model(x, 250, encoder_hidden_states=emb["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": emb["text_embeds"], "time_ids": ids}).sample
    torch.testing.assert_close(xl.raw(x, torch.tensor([250.0]), emb), ref)
    sd = load_teacher(str(folders / "sd"))
    emb = sd.encode_prompts(["hello"])
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sd.raw(x, torch.tensor([250.0]), emb),
                               sd.net.model(x, 250, encoder_hidden_states=emb["encoder_hidden_states"]).sample)


def test_resolution_and_dtype_options(folders):
    den = load_teacher(str(folders / "sd"), resolution=32, dtype=torch.bfloat16)
    assert den.sample_shape == (4, 16, 16) and den.data_resolution == 32
    assert next(den.parameters()).dtype == torch.bfloat16
    x0 = den(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), den.encode_prompts(["a"]))  # float32 latents in
    assert x0.shape == (1, 4, 16, 16) and x0.dtype == torch.float32 and torch.isfinite(x0).all()
    assert den.features(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), None).dtype == torch.float32
    with pytest.raises(UserError, match="multiple of 4"):
        load_teacher(str(folders / "sd"), resolution=30)
    with pytest.raises(UserError, match="diffusers teachers"):
        load_teacher("digits", resolution=16)


def test_bare_model_folder(folders, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(folders / "unet" / "unet", bare)
    with pytest.raises(UserError, match="scheduler_config.json"):
        load_teacher(str(bare))
    shutil.copy(folders / "unet" / "scheduler" / "scheduler_config.json", bare)
    den = load_teacher(str(bare))
    assert den.sample_shape == (3, 8, 8) and not den.latent
    text = tmp_path / "text"
    shutil.copytree(folders / "sd" / "unet", text)
    with pytest.raises(UserError, match="pipeline folder"):
        load_teacher(str(text))


def test_unets_with_conditions_we_do_not_supply_are_refused(folders, tmp_path):
    from diffusers import UNet2DConditionModel

    inpaint = tmp_path / "inpaint"
    shutil.copytree(folders / "sd", inpaint)
    unet = UNet2DConditionModel.from_pretrained(str(folders / "sd" / "unet"))
    config = dict(unet.config)
    config["in_channels"] = 9
    UNet2DConditionModel.from_config(config).save_pretrained(str(inpaint / "unet"))
    with pytest.raises(UserError, match="inpainting"):
        load_teacher(str(inpaint))


def test_missing_files_are_one_line_user_errors(folders, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(folders / "sd", broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(UserError, match="text_encoder") as e:
        load_teacher(str(broken))
    assert "\n" not in str(e.value)
    (broken / "text_encoder").mkdir()
    (broken / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        load_teacher(str(broken))
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(UserError, match="scheduler"):
        load_teacher(str(broken))


# ------------------------------------------------------------------------------------------------------------------
# 3. Captions and the prompt bank
# ------------------------------------------------------------------------------------------------------------------
def _images(folder, n=3):
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 25 * i, dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("style", ["sidecar", "metadata", "listing"])
def test_captions_next_to_images(tmp_path, style):
    folder = tmp_path / "img"
    _images(folder, 10)
    names = [f"{i}.png" for i in range(10)]
    if style == "sidecar":
        for i in range(10):
            (folder / f"{i}.txt").write_text(f" caption {i}\n")
    elif style == "metadata":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"caption {n[:-4]}"}) + "\n"
                                                       for n in names))
    else:
        (folder / "captions.txt").write_text("".join(f"{n}\tcaption {n[:-4]}\n" for n in names))
    train, test = load_data(str(folder), "train", 8), load_data(str(folder), "test", 8)
    assert len(train.captions) == len(train) and len(test.captions) == len(test)
    assert sorted(train.captions + test.captions) == sorted(f"caption {i}" for i in range(10))
    for x, c in zip(train.x, train.captions):  # aligned with the images: image i is grey 25 i
        assert round((float(x.mean()) + 1) * 127.5) == 25 * int(c.split()[1])
    (folder / "0.txt").unlink(missing_ok=True)
    if style == "sidecar":
        with pytest.raises(UserError, match="0.png has no caption"):
            load_data(str(folder), "train", 8)


def test_prompts_are_encoded_once_and_cached(folders, cache, monkeypatch):
    den = load_teacher(str(folders / "sd"))
    data = load_data(str(folders / "images"), "train", den.data_resolution)
    calls = []
    real = den.components.encode_prompts
    monkeypatch.setattr(den.components, "encode_prompts", lambda p: calls.append(len(p)) or real(p))
    first = prepare_training_data(den, data)
    assert calls == [len(data)] and first.x.shape[1:] == den.sample_shape
    table = den.components.prompts.table["encoder_hidden_states"].clone()
    again = prepare_training_data(den, data)
    assert calls == [len(data)]  # the second time from the on-disk cache
    torch.testing.assert_close(den.components.prompts.table["encoder_hidden_states"], table)
    torch.testing.assert_close(again.x, first.x)
    emb = den.prompt_lookup(torch.tensor([1]))["encoder_hidden_states"]
    torch.testing.assert_close(emb, den.encode_prompts([data.captions[1]])["encoder_hidden_states"])
    assert sorted(p.name.split("_")[0] for p in (cache / "fewstep" / "diffusers").iterdir()) == ["latents", "prompts"]


def test_folders_are_encoded_in_chunks_as_in_memory(folders, cache, monkeypatch):
    from fewstep.models.hf import prepare_training_folder

    den = load_teacher(str(folders / "sd"))
    whole = prepare_training_data(den, load_data(str(folders / "images"), "train", den.data_resolution))
    streamed = prepare_training_folder(den, folders / "images", chunk=3)
    torch.testing.assert_close(streamed.x, whole.x)
    assert streamed.labels.tolist() == list(range(len(whole))) and len(den.components.prompts) == len(whole)
    monkeypatch.setattr(den.components, "encode_images", lambda x: pytest.fail("not from the cache"))
    torch.testing.assert_close(prepare_training_folder(den, folders / "images").x, whole.x)


def test_the_data_cache_is_written_atomically_and_reused(folders, cache, monkeypatch):
    import fewstep.io as fio
    from fewstep.models.hf import prepare_training_folder

    den = load_teacher(str(folders / "sd"))
    comps, calls = den.components, {"images": 0, "prompts": 0}
    encode_images, encode_prompts = comps.encode_images, comps.encode_prompts

    def count(kind, fn):
        def wrapped(x):
            calls[kind] += 1
            return fn(x)
        return wrapped

    monkeypatch.setattr(comps, "encode_images", count("images", encode_images))
    monkeypatch.setattr(comps, "encode_prompts", count("prompts", encode_prompts))
    folder = cache / "fewstep" / "diffusers"
    # a crash between writing and renaming leaves neither a cache file nor a temporary one behind
    with monkeypatch.context() as m:
        m.setattr(fio.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(UserError, match="cannot write .*disk full"):  # one line naming the file
            prepare_training_folder(den, folders / "images")
    assert list(folder.iterdir()) == []
    first = prepare_training_folder(den, folders / "images")
    encoded = dict(calls)
    assert encoded["images"] > 0 and encoded["prompts"] > 0
    assert sorted(p.name.split("_")[0] for p in folder.iterdir()) == ["data", "prompts"]  # no .tmp files
    again = prepare_training_folder(den, folders / "images")
    assert calls == encoded  # the second preparation read both caches: nothing encoded again
    torch.testing.assert_close(again.x, first.x)


def test_text_teacher_needs_captions(folders, tmp_path):
    plain = tmp_path / "plain"
    _images(plain)
    with pytest.raises(UserError, match="captions"):
        distill(teacher=str(folders / "sd"), data=str(plain), method="dmd2", steps=1, out=tmp_path / "r",
                iterations=1, evaluate_n=0, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# 4. Every method, unchanged, on every family: fewstep.distill(teacher=folder, ...)
# ------------------------------------------------------------------------------------------------------------------
COMMON = dict(iterations=2, batch_size=2, log_every=1, sample_every=0, checkpoint_every=100, progress=False,
              evaluate_n=0)
CASES = [
    ("unet", "dmd2", {"steps": 2}),
    ("sd", "dmd2", {"steps": 1, "guidance_scale": 2.0}),
    ("dit", "dmd2", {"steps": 1, "guidance_scale": 2.0}),
    ("sd3", "dmd2", {"steps": 2}),
    ("sdxl", "dmd2", {"steps": 2, "guidance_scale": 2.0}),  # 2 steps: per-step fake scores with prompt dicts
    ("unet", "add", {"steps": 1}),
    ("sd", "add", {"steps": 1, "weighting": "nfsd", "guidance_scale": 2.0}),
    ("dit", "add", {"steps": 2}),
    ("sd", "disback", {"steps": 1, "record_checkpoints": 2, "record_every": 1, "switch_every": 1}),
    ("sd3", "disback", {"steps": 1, "record_checkpoints": 2, "record_every": 1, "switch_every": 1, "base": "add"}),
    ("sd", "lightning", {"steps": 1, "ladder": [2, 1], "teacher_steps": 2, "iterations": 4, "guidance_scale": 2.0}),
    ("dit", "lightning", {"steps": 2, "ladder": [2], "teacher_steps": 4, "iterations": 3}),
    ("sdxl", "add", {"steps": 1}),
    ("sd3", "lightning", {"steps": 1, "ladder": [1], "teacher_steps": 2, "iterations": 3}),
]


@pytest.mark.parametrize("name,method,options", CASES, ids=[f"{m}-{n}" for n, m, _ in CASES])
def test_every_method_runs_on_diffusers_teachers(folders, tmp_path, name, method, options):
    folder = str(folders / name)
    out = tmp_path / "run"
    student = distill(teacher=folder, data=str(folders / "images"), method=method, out=out, **{**COMMON, **options})
    teacher = load_teacher(folder)
    assert isinstance(student.generator, DiffusersDenoiser) and student.steps == options["steps"]
    changed = [not torch.equal(p, q) for p, q in zip(student.generator.net.model.state_dict().values(),
                                                     teacher.net.model.state_dict().values())]
    assert any(changed)
    x = student.sample(2, seed=0)
    assert x.shape == (2, *teacher.sample_shape) and torch.isfinite(x).all()
    assert (out / "student.json").is_file() and sorted((out / "samples").glob("*.png"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(v) for r in rows for k, v in r.items() if k.endswith("/loss"))
    if name == "unet" and method == "dmd2":  # the saved student loads back (its architecture from the teacher folder)
        again = load_model(out)
        torch.testing.assert_close(again.sample(2, seed=0), x)


# ------------------------------------------------------------------------------------------------------------------
# 5. Flux: packed latents, dynamic shift, guidance embedding; distilled and exported through the user's path
# ------------------------------------------------------------------------------------------------------------------
def test_flux(folders, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from fewstep import export

    import functools

    init = FluxPipeline.__init__

    @functools.wraps(init)
    def small(self, *args, **kwargs):  # 8x8 latents (16 px) instead of FluxPipeline's 128x128
        init(self, *args, **kwargs)
        self.default_sample_size = 8

    monkeypatch.setattr(FluxPipeline, "__init__", small)
    folder = tmp_path / "flux"
    hf_tiny.flux_pipeline(folder)
    den = load_teacher(str(folder))
    pipe = den.components.pipe
    assert den.sample_shape == (4, 8, 8) and den.schedule.kind == "flow" and den.prediction_type == "flow"
    assert den.schedule.shift == pytest.approx(flux_shift(pipe.scheduler.config, 16))  # 4x4 packed tokens
    emb = den.encode_prompts(["a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.6])
    packed = FluxPipeline._pack_latents(x, 1, 4, 8, 8)
    ref = pipe.transformer(hidden_states=packed, timestep=t, guidance=torch.tensor([3.5]),
                           pooled_projections=emb["pooled_projections"], encoder_hidden_states=emb["encoder_hidden_states"],
                           txt_ids=torch.zeros(emb["encoder_hidden_states"].shape[1], 3),
                           img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)).sample
    torch.testing.assert_close(den.raw(x, t, emb), FluxPipeline._unpack_latents(ref, 16, 16, 2))
    assert den.features(x, t, emb).shape == (1, 16, 4, 4)

    out = tmp_path / "run"
    student = distill(teacher=str(folder), data=str(folders / "images"), method="dmd2", steps=1, out=out,
                      **{**COMMON, "iterations": 2})
    assert any(not torch.equal(p, q) for p, q in zip(student.generator.net.model.parameters(),
                                                     den.net.model.parameters()))
    exported = export(str(out), "diffusers", tmp_path / "export")
    flux = FluxPipeline.from_pretrained(str(exported))
    got = flux("a photo of thing 1", num_inference_steps=1, generator=torch.Generator().manual_seed(0), height=16,
               width=16, output_type="np").images
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # Flux draws latents, then packs them
    saved = load_model(out)
    x0 = saved.generator(z, torch.ones(1), saved.generator.encode_prompts(["a photo of thing 1"]))
    # the same float32 operations in another order: flow's x0 = x_1 - u doubles a few ulps of |z|, [0, 1] halves them
    atol = 8 * torch.finfo(torch.float32).eps * 2 * max(1.0, float(z.abs().max())) / 2
    np.testing.assert_allclose(got, ((saved.generator.decode(x0) + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=atol)


def test_cli_distill_from_a_diffusers_folder(folders, tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "run"
    assert main(["distill", "--method", "dmd2", "--teacher", str(folders / "sd"), "--data", str(folders / "images"),
                 "--steps", "1", "--out", str(out), "--iterations", "1", "--batch-size", "2"]) == 0
    assert (out / "student.json").is_file() and f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert main(["distill", "--teacher", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "diffusers folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 6. Every run directory has report.html: FID when a feature network is there, else a note naming what is missing
# ------------------------------------------------------------------------------------------------------------------
def test_distill_on_a_diffusers_teacher_writes_a_report(folders, tmp_path, monkeypatch):
    import fewstep.eval.inception as inc
    from fewstep.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):  # a held-out split of a few images for FID
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = dict(teacher=str(folders / "unet"), data=str(images), method="dmd2", steps=1,
                  **{**COMMON, "evaluate_n": 4})
    out = tmp_path / "run"
    distill(out=out, **common)
    html = (out / "report.html").read_text()
    assert "FID: not measured" in html and WEIGHTS_FILE in html and "--inception-weights" in html
    # the grids and the loss curves are there, embedded (no NFE curve: no quality metric without the weights)
    assert "<figcaption>step 00000" in html and "<figcaption>generator/" in html and "against NFE" not in html
    assert html.count('<img src="data:image/png;base64,') == len(list(out.glob("samples/*.png"))) + len(
        list(out.glob("curves/*.png")))
    rows = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["student", "teacher (ddim)", "teacher (heun)"]
    assert [r["nfe"] for r in rows] == [1, 1, 63] and all(r["seconds_per_1000"] > 0 for r in rows)

    # with Inception weights (a tiny conv extractor stands in for Inception-v3): Inception FID in the table
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))

    pytest.importorskip("torchmetrics")
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"")
    real_fid = inc.inception_fid
    monkeypatch.setattr(inc, "inception_fid",
                        lambda r, f, **kw: real_fid(r, f, **{**kw, "weights_path": None, "feature_extractor": Tiny()}))
    with pytest.raises(UserError, match="nope.pth"):  # a wrong path fails before training
        distill(out=tmp_path / "bad", inception_weights=tmp_path / "nope.pth", **common)
    distill(out=tmp_path / "run2", inception_weights=weights, **common)
    rows = json.loads((tmp_path / "run2" / "eval.json").read_text())
    assert all(np.isfinite(r["inception_fid"]) for r in rows)
    html = (tmp_path / "run2" / "report.html").read_text()
    assert "inception_fid" in html and "not measured" not in html
    assert "inception_fid against NFE" in html and (tmp_path / "run2" / "nfe_curve.png").is_file()


def test_distill_on_an_image_folder_teacher_writes_a_report(tmp_path, monkeypatch, capsys):
    """fewstep's own ClassUNet trained on a folder of colour images (no domain classifier for them)."""
    from PIL import Image

    from fewstep.cli import main
    from fewstep.eval.inception import WEIGHTS_ENV

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    teacher = tmp_path / "teacher"
    assert main(["teacher", "train", "--data", str(images), "--iterations", "2", "--batch-size", "4",
                 "--resolution", "8", "--out", str(teacher)]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--iterations", "2", "--batch-size", "4", "--out",
                 str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert "FID: not measured" in html and "(3, 8, 8)" in html and "--inception-weights" in html


def test_distill_at_another_resolution(folders, tmp_path, capsys):
    import yaml

    from fewstep.cli import main

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(folders / "sd"), "--data", str(folders / "images"), "--steps", "1",
                 "--iterations", "1", "--batch-size", "2", "--resolution", "32", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["resolution"] == 32
    student = load_model(out)
    assert student.sample_shape == (4, 16, 16)  # 32 px through the tiny VAE's factor 2
    assert student.sample(1, seed=0).shape == (1, 4, 16, 16)
    # DisBack keeps it in its DMD2 block, ADD and Lightning have it too; fewstep's own networks refuse it
    from fewstep.distillation import config_resolution, make_config

    cfg = make_config("disback", teacher=str(folders / "sd"), resolution=32)
    assert cfg.dmd2.resolution == 32 and config_resolution(cfg) == 32
    for method in ("add", "lightning"):
        assert make_config(method, teacher=str(folders / "sd"), resolution=32).resolution == 32
    with pytest.raises(UserError, match="options of diffusers teachers"):
        distill(teacher="digits", resolution=16, out=tmp_path / "r3", iterations=1, evaluate_n=0, progress=False)
    with pytest.raises(UserError, match="not a multiple of 4"):
        distill(teacher=str(folders / "sd"), data=str(folders / "images"), resolution=30, out=tmp_path / "r4",
                iterations=1, evaluate_n=0, progress=False)


def test_pixel_feature_networks_read_decoded_latents(folders):
    """ADD on a latent teacher: 'digits'/'timm' wrap into DecodedFeatures, which decodes with gradient through the
    teacher's frozen VAE (the adversarial loss must reach the student's latents) and reads images of the VAE's shape."""
    from fewstep.models.features import DecodedFeatures, FeatureNetwork

    teacher = load_teacher(str(folders / "sd"))
    comp = teacher.components

    class Inner(FeatureNetwork):  # a tiny pixel feature network: one conv layer and its spatial mean
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.freeze()

        def forward(self, x):
            h = self.conv(x)
            return [h], h.mean((2, 3))

    from fewstep.models.hf import image_shape

    inner = Inner()
    feats = DecodedFeatures(inner, comp, image_shape(teacher))
    layers, pooled = feats.shapes(teacher.sample_shape)
    assert layers == [(5, *image_shape(teacher)[1:])] and pooled == 5
    z = (0.3 * torch.randn(2, *teacher.sample_shape)).requires_grad_(True)
    out_layers, out_pooled = feats(z)
    with torch.no_grad():
        images = comp.decode_with_grad(z)
        torch.testing.assert_close(images.clamp(-1, 1), comp.decode(z.detach()), atol=1e-5, rtol=0)
        torch.testing.assert_close(out_pooled, inner(images)[1])
    out_pooled.square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # through the decoder into the latents
    assert all(p.grad is None for p in comp.vae.parameters())  # the VAE stays frozen
