"""Evaluation for real teachers: patch FID (SDXL-Lightning's detail measure) and CLIP score, with tiny random feature
networks built in the test (a conv extractor; a 32-wide CLIPModel with a character-level tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewstep.errors import UserError
from fewstep.eval.clip import CLIP_ENV, CLIP_HUB_ID, clip_score, load_clip
from fewstep.eval.inception import center_crop, inception_fid, patch_fid
from tiny import TinyExtractor


# ------------------------------------------------------------------------------------------------------ patch FID
def test_center_crop_takes_the_middle_at_full_resolution() -> None:
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    c = center_crop(x, 4)
    assert c.shape == (2, 3, 4, 4) and torch.equal(c, x[..., 1:5, 2:6])
    with pytest.raises(UserError, match="full-resolution") as e:
        center_crop(torch.zeros(2, 3, 64, 64), 299)
    assert "64x64" in str(e.value) and "\n" not in str(e.value)


def test_patch_fid_is_inception_fid_on_centre_crops_and_sees_detail() -> None:
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    net = TinyExtractor(square=True)
    # smooth images (8x8 noise upsampled to 32x32) vs the same plus fine-grained detail
    real = F.interpolate(torch.rand(120, 1, 8, 8, generator=g) * 2 - 1, size=32, mode="bilinear")
    detail = (real + 0.5 * (torch.rand(120, 1, 32, 32, generator=g) * 2 - 1)).clamp(-1, 1)
    fid = patch_fid(real, detail, patch=16, feature_extractor=net)
    assert fid == pytest.approx(inception_fid(real[..., 8:24, 8:24], detail[..., 8:24, 8:24], feature_extractor=net),
                                rel=1e-6)
    assert patch_fid(real, real.clone(), patch=16, feature_extractor=net) < 1e-4 < fid


def test_patch_fid_missing_weights_names_the_file(tmp_path: Path) -> None:
    x = torch.zeros(4, 3, 320, 320)
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        patch_fid(x, x, weights_path=tmp_path / "nope.pth")


# ----------------------------------------------------------------------------------------------------- CLIP score
def _write_tiny_clip(folder: Path, image_size: int = 30) -> Path:
    """A random 32-wide CLIPModel and a character-level CLIP tokenizer, saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [",", "."]
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tok.save_pretrained(str(folder))
    n = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1),
        vision_config=dict(image_size=image_size, patch_size=6, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 30, 30, generator=g) * 2 - 1
    prompts = ["a cat", "a dog, sitting", "the sea", "a red car", "two birds."]
    clip = load_clip(tiny_clip)
    per = clip_score(images, prompts, clip, per_image=True, batch_size=2)
    assert per.shape == (5,) and ((per >= 0) & (per <= 100)).all()
    # by hand: CLIP's own embeddings of the normalised images and the tokenised prompts
    with torch.no_grad():
        pix = (((images + 1) / 2) - clip.mean) / clip.std
        img = clip.model.get_image_features(pixel_values=pix)
        tok = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = clip.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img, txt = (o if torch.is_tensor(o) else o.pooler_output for o in (img, txt))
    expected = 100 * F.cosine_similarity(img, txt).clamp_min(0)
    # batches of 2 vs 5 change only rounding: a cosine of unit vectors rounds at a few ulps of 1 whatever its value,
    # and the score is 100 times it: 100 x 8 ulps (measured: < 1)
    atol = 100 * 8 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(per, expected, rtol=0, atol=atol)
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(float(expected.mean()), rel=0, abs=atol)


def test_clip_score_preprocessing(tiny_clip: Path) -> None:
    clip = load_clip(tiny_clip)
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(3, 1, 30, 30, generator=g) * 2 - 1
    prompts = ["a", "b", "c"]
    # one channel is read as gray RGB; a larger image is resized (short side) and centre-cropped to 30x30
    assert clip_score(gray, prompts, clip) == pytest.approx(clip_score(gray.expand(-1, 3, -1, -1), prompts, clip))
    big = F.interpolate(gray, size=(60, 90), mode="nearest")
    assert clip.preprocess(big).shape == (3, 3, 30, 30)
    with pytest.raises(UserError, match="one prompt per image"):
        clip_score(gray, ["a"], clip)
    with pytest.raises(UserError, match="shape"):
        clip_score(torch.zeros(2, 30, 30), ["a", "b"], clip)


def test_clip_score_missing_weights_names_what_to_provide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 3, 30, 30)
    with pytest.raises(UserError) as e:
        clip_score(x, ["a"], tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg and CLIP_ENV in msg and CLIP_HUB_ID in msg and "config.json" in msg
    monkeypatch.setenv(CLIP_ENV, str(tmp_path / "from-env"))
    with pytest.raises(UserError, match="from-env"):
        clip_score(x, ["a"])
    monkeypatch.delenv(CLIP_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"\.cache/fewstep/clip-vit-large-patch14"):
        clip_score(x, ["a"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a complete transformers CLIP folder"):
        clip_score(x, ["a"], broken)


# -------------------------------------------------- fewstep.evaluate / fewstep eval: --patch-fid, --clip, --prompts
@pytest.fixture(scope="module")
def sd_and_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny text-to-image latent pipeline (16 px images) and a captioned image folder."""
    import numpy as np
    from PIL import Image

    import hf_tiny

    root = tmp_path_factory.mktemp("sd")
    hf_tiny.sd_pipeline(root / "sd")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):  # the held-out split gets a few
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(f"a photo of thing {i}")
    return root / "sd", images


@pytest.mark.filterwarnings("ignore")
def test_evaluate_adds_patch_fid_and_clip_score(sd_and_images, tiny_clip: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    from fewstep import evaluate, load_teacher
    from fewstep.models.hf import generate_images

    sd, images = sd_and_images
    teacher = load_teacher(sd)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\nthe sea\n")
    net = TinyExtractor(square=True)
    out = evaluate(teacher, data=str(images), n=4, steps=2, sampler="ddim", inception=True, patch_fid=True,
                   patch_size=8, clip_model=tiny_clip, prompts=prompts, feature_extractor=net)
    assert out["fid"] is None and out["nfe"] == 2
    # the same images by hand: one per prompt, in order, repeated to n
    ps = ["a cat", "a dog", "the sea", "a cat"]
    x = torch.cat([generate_images(teacher, ps, seed=0, steps=2, sampler="ddim")])
    from fewstep.data import load_data

    real = load_data(str(images), "test", resolution=16, channels=3).x
    assert out["clip_score"] == pytest.approx(clip_score(x, ps, tiny_clip), abs=1e-4)
    assert out["inception_fid"] == pytest.approx(inception_fid(real, x, feature_extractor=net), rel=1e-5)
    assert out["patch_fid"] == pytest.approx(patch_fid(real, x, patch=8, feature_extractor=net), rel=1e-5)
    # bad combinations are one-line errors before any sampling
    for kwargs, needle in (({"clip_model": tiny_clip}, "--prompts"),
                           ({"patch_fid": True, "feature_extractor": net}, "--patch-size"),
                           ({"prompts": tmp_path / "none.txt"}, "none.txt")):
        with pytest.raises(UserError, match=needle) as e:
            evaluate(teacher, data=str(images), n=2, steps=1, **kwargs)
        assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore")
def test_cli_eval_patch_fid_and_clip(sd_and_images, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("torchmetrics")
    import fewstep.eval.inception as inc
    from fewstep.cli import main

    sd, images = sd_and_images
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    weights = tmp_path / inc.WEIGHTS_FILE
    base = ["eval", "--model", str(sd), "--data", str(images), "--n", "3", "--steps", "1", "--sampler", "ddim"]
    # absent weights: one line naming them, before sampling
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("FEWSTEP_CLIP_MODEL", raising=False)
    assert main([*base, "--patch-fid", "--patch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (diffusers' loading bars come before it)
    assert err.startswith("fewstep: error:") and inc.WEIGHTS_FILE in err
    assert main([*base, "--clip", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fewstep: error:") and "clip-vit-large-patch14" in err
    assert main([*base, "--clip", str(tiny_clip)]) == 2
    assert "--prompts" in capsys.readouterr().err
    # with weights (the tiny extractor stands in for Inception) and the tiny CLIP
    weights.write_bytes(b"")
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(weights))
    real_fid = inc.inception_fid
    monkeypatch.setattr(inc, "inception_fid", lambda r, f, **kw: real_fid(r, f, **{**kw, "weights_path": None,
                                                                              "feature_extractor": TinyExtractor(square=True)}))
    assert main([*base, "--patch-fid", "--patch-size", "8", "--clip",
                 str(tiny_clip), "--prompts", str(prompts), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["patch_fid"] >= 0 and 0 <= result["clip_score"] <= 100 and result["nfe"] == 1
    assert "inception_fid" not in result  # not asked for (--inception or --inception-weights adds it)
