"""Evaluation for real teachers: patch FID (SDXL-Lightning's detail measure) and CLIP score, with tiny random feature
networks built in the test (a conv extractor; a 32-wide CLIPModel with a character-level tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import UserError
from fewstep.eval.clip import CLIP_ENV, CLIP_HUB_ID, clip_score, load_clip
from fewstep.eval.inception import center_crop, inception_fid, patch_fid


class _TinyExtractor(nn.Module):
    """uint8 RGB (B, 3, H, W) -> (B, 6): a fixed random conv, squared (local energy: sees detail), average-pooled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).pow(2).mean(dim=(2, 3))


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
    net = _TinyExtractor()
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
    torch.testing.assert_close(per, expected, rtol=1e-4, atol=1e-4)
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(float(expected.mean()), abs=1e-4)


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
