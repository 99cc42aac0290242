"""The embedded text-to-image path: the captioned shapes data, the MiniLM text encoder, the diffusers teacher trained
by ``fewstep teacher train``, and prompt adherence (tiny networks; the real all-MiniLM-L6-v2 from its package)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.data import load_data
from fewstep.data.shapes import (COLOURS, HELDOUT_PAIRS, NUM_CLASSES, SHAPES, decode_labels, draw, encode_labels,
                                 is_heldout, parse_prompt, shapes_arrays)
from fewstep.errors import UserError

TINY = {"type": "unet2d_condition", "block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": 2}


def test_shapes_splits_are_fixed_and_hold_out_compositions():
    train, test = load_data("shapes", "train"), load_data("shapes", "test")
    assert train.x.shape == (8192, 3, 16, 16) and test.x.shape == (2048, 3, 16, 16)
    assert float(train.x.min()) >= -1 and float(train.x.max()) <= 1
    again = shapes_arrays("train")
    assert torch.equal(again[0], train.x) and again[2] == train.captions
    train_attrs, test_attrs = decode_labels(train.labels), decode_labels(test.labels)
    assert not is_heldout(train_attrs).any()  # held-out compositions never trained on
    assert set(test.labels.tolist()) == set(range(NUM_CLASSES))  # the test split has every combination
    assert 0.15 < is_heldout(test_attrs).mean() < 0.35  # 4 of 16 (shape, colour) pairs
    assert np.array_equal(decode_labels(encode_labels(test_attrs)), test_attrs)
    # every caption names exactly its image's attributes, in several phrasings
    for cap, a in zip(train.captions[:500], train_attrs[:500]):
        assert parse_prompt(cap) == dict(zip(("shape", "colour", "position", "size"), a.tolist())), cap
    assert len({c.split()[0] for c in train.captions}) >= 4


def test_drawing_shows_its_attributes():
    # a large red cross in the top left, a small blue circle in the bottom right
    x = draw(np.array([[3, 0, 0, 1], [0, 2, 3, 0]]), seed=0)
    lit = (x + 1).sum(1) > 0.3  # (2, 16, 16)
    ys, xs = np.nonzero(lit[0].numpy())
    assert xs.mean() < 8 and ys.mean() < 8
    ys, xs = np.nonzero(lit[1].numpy())
    assert xs.mean() > 8 and ys.mean() > 8
    assert lit[0].sum() > lit[1].sum()  # large covers more than small
    rgb0 = ((x[0] + 1) / 2)[:, lit[0]].mean(1)
    rgb1 = ((x[1] + 1) / 2)[:, lit[1]].mean(1)
    assert rgb0.argmax() == 0 and rgb1.argmax() == 2
    with pytest.raises(UserError, match="more than one colour"):
        parse_prompt("a red and blue square")
    assert parse_prompt("a green thing") == {"colour": 1}


def test_adherence_on_real_and_wrong_prompts():
    from fewstep.eval.adherence import evaluate_shapes, load_attribute_classifier

    x, y, caps = shapes_arrays("test")
    x, y, caps = x[:512], y[:512], caps[:512]
    model = load_attribute_classifier()
    real = evaluate_shapes(x, prompts=caps, classifier=model)
    assert real["adherence"] >= 0.98 and real["adherence_heldout"] >= 0.98  # the ruler reads held-out pairs too
    assert real["fid"] < 5 and real["precision"] > 0.8 and real["recall"] > 0.8
    wrong = evaluate_shapes(x, prompts=caps[1:] + caps[:1], classifier=model)  # each image with another's prompt
    assert wrong["adherence"] < 0.2  # (its FID is as low: the prompts' marginal is the same; adherence is the check)
    by_label = evaluate_shapes(x, labels=y, classifier=model)
    assert by_label["adherence"] == pytest.approx(real["adherence"], abs=0.02)
    noise = evaluate_shapes(torch.rand_like(x) * 2 - 1, prompts=caps, classifier=model)
    assert noise["fid"] > 10 * real["fid"] and noise["adherence"] < 0.1


def test_minilm_encodes_offline(monkeypatch):
    from fewstep.models.text_unet import MAX_TOKENS, TEXT_DIM, load_minilm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc, tok = load_minilm()
    ids = tok(["a red circle", "a blue circle", ""], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = enc(ids.input_ids, attention_mask=ids.attention_mask)[0]
    assert h.shape == (3, MAX_TOKENS, TEXT_DIM)
    assert tok.convert_ids_to_tokens(ids.input_ids[0, :5].tolist()) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    # the real pretrained encoder: the colour word's embedding moves, and "red" sits nearer "red" than "blue"
    assert (h[0, 2] - h[1, 2]).norm() > 1.0
    cos = torch.nn.functional.cosine_similarity
    assert cos(h[0, 1:4].mean(0), h[0, 1:4].mean(0), 0) > cos(h[0, 1:4].mean(0), h[2, 1:4].mean(0), 0)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny shapes text teacher trained for 2 iterations by train_teacher, on 32 captioned images."""
    from fewstep.config import TeacherConfig
    from fewstep.data import Dataset
    from fewstep.train.teacher import train_teacher

    full = load_data("shapes", "train")
    data = Dataset("shapes", "image", full.x[:32], full.labels[:32], full.num_classes, full.class_names,
                   captions=full.captions[:32])
    cfg = TeacherConfig.model_validate({"data": "shapes", "network": TINY, "label_dropout": 0.5,
                                        "loop": {"iterations": 2, "batch_size": 4, "log_every": 1,
                                                 "checkpoint_every": 2, "sample_every": 1000}})
    out = tmp_path_factory.mktemp("text") / "teacher"
    assert train_teacher(cfg, out, dataset=data) == out
    return out


def test_text_teacher_is_a_diffusers_pipeline(tiny_teacher):
    from diffusers import DiffusionPipeline

    import fewstep
    from fewstep.models.hf import DiffusersDenoiser, generate_images

    teacher = fewstep.load_teacher(tiny_teacher)
    assert isinstance(teacher, DiffusersDenoiser) and teacher.text_conditional
    assert teacher.info["meta"]["data"] == "shapes" and teacher.sample_shape == (3, 16, 16)
    # the empty prompt is the null condition, encoded by the pipeline's own encode_prompt (MiniLM tokens)
    null = teacher.net.null_cond(1)["encoder_hidden_states"]
    assert torch.allclose(null, teacher.encode_prompts([""])["encoder_hidden_states"])
    # diffusers itself loads the folder (naming the components it has not: no VAE, no safety checker), and its UNet
    # is the one fewstep runs
    pipe = DiffusionPipeline.from_pretrained(str(tiny_teacher), vae=None, safety_checker=None, feature_extractor=None)
    assert pipe.vae is None and type(pipe.text_encoder).__name__ == "BertModel"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 900])
    cond = teacher.encode_prompts(["a small red square in the top left", "green cross, large, bottom right"])
    with torch.no_grad():
        ours = teacher.raw(x, t, cond)
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample  # DDPM: c_in 1
    assert torch.allclose(ours, theirs, atol=1e-5)
    images = generate_images(teacher, ["a red circle", "a blue square"], steps=2, cfg_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_caption_dropout_trains_the_empty_prompt():
    from fewstep.config import TeacherConfig
    from fewstep.methods.base import Batch
    from fewstep.models.hf import denoiser_from_pipeline
    from fewstep.models.text_unet import DEFAULTS, build_text_pipeline
    from fewstep.train.teacher import TeacherMethod

    cfg = TeacherConfig.model_validate({"data": "shapes", "network": TINY, "label_dropout": 1.0})
    pipe = build_text_pipeline({**DEFAULTS, **TINY}, 16, 3, cfg.schedule, cfg.prediction_type)
    den = denoiser_from_pipeline(pipe, "unused")
    den.components.prompt_bank(["a red circle", "a blue square"])
    method = TeacherMethod(den.requires_grad_(True), cfg)
    batch = Batch(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    torch.manual_seed(0)
    loss, _ = method.loss("denoiser", batch, 0)
    torch.manual_seed(0)
    t = den.schedule.sample_train_t(2)
    eps = torch.randn_like(batch.x0)
    torch.rand(2)  # the dropout draw
    null = den.null_cond(den.prompt_lookup(batch.labels))
    assert torch.allclose(loss, den.denoising_loss(batch.x0, t, eps, null).mean())
    torch.manual_seed(0)
    cond = den.prompt_lookup(batch.labels)
    assert not torch.allclose(loss, den.denoising_loss(batch.x0, den.schedule.sample_train_t(2),
                                                       torch.randn_like(batch.x0), cond).mean())


def test_eval_prompts_reports_adherence(tiny_teacher, tmp_path, capsys):
    from fewstep.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a small {COLOURS[2]} {SHAPES[0]} in the top left\nred square, large, bottom right\n")
    assert (HELDOUT_PAIRS[0] == (SHAPES[0], COLOURS[2]))
    rc = main(["eval", "--model", str(tiny_teacher), "--prompts", str(prompts), "--n", "8", "--steps", "2",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= out["adherence"] <= 1 and out["fid"] > 0 and out["heldout_share"] == 0.5
    assert out["data"] == "shapes" and out["adherence_seen"] is not None


def test_shipped_text_teacher_follows_prompts():
    """The shipped shapes teacher (its UNet in the zoo, MiniLM from its package, assembled once in the cache) follows
    seen and held-out compositional prompts (measured: every one of 32 large-shape prompts at 1 and 8 DDIM steps)."""
    import fewstep
    from fewstep.data.shapes import heldout_prompts, seen_prompts
    from fewstep.eval.adherence import evaluate_shapes
    from fewstep.models.hf import generate_images

    teacher = fewstep.load_teacher("shapes")
    assert teacher.info["meta"]["data"] == "shapes"
    prompts = seen_prompts()[1::12] + heldout_prompts()[1::8]  # large shapes: 8 seen, 4 held-out compositions
    images = generate_images(teacher, prompts, steps=4, sampler="ddim", cfg_scale=3.0)
    result = evaluate_shapes(images, prompts)
    assert result["adherence_seen"] >= 0.75 and result["adherence_heldout"] >= 0.5, result
