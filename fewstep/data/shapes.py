"""``shapes``: procedurally drawn 16x16 RGB images with captions that name their attributes.

Each image holds one shape (circle, square, triangle, cross) of one colour (red, green, blue, yellow) in one quadrant
(top left, top right, bottom left, bottom right) at one size (small, large) on a black background, with small jitter
in position, size and colour. The attributes come from the drawing, so whether an image follows a prompt is known
exactly (:mod:`fewstep.eval.adherence` checks it with a classifier trained on these drawings).

Compositions held out from training: four (shape, colour) pairs (:data:`HELDOUT_PAIRS`, one per shape and one per
colour, so every shape and every colour is seen in training with the three other partners). The train split never
draws them; the test split draws all 128 attribute combinations uniformly. Every draw is a pure function of
``(attributes, seed)``; the splits use fixed seeds.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
#: attribute name -> its values, in the order of the columns of :func:`decode_labels`
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS, "size": SIZES}
NUM_CLASSES = len(SHAPES) * len(COLOURS) * len(POSITIONS) * len(SIZES)  # 128
RESOLUTION = 16
#: (shape, colour) pairs never drawn in the train split
HELDOUT_PAIRS = (("circle", "blue"), ("square", "yellow"), ("triangle", "red"), ("cross", "green"))
TRAIN_SIZE, TRAIN_SEED = 8192, 0
TEST_SIZE, TEST_SEED = 2048, 1
#: caption phrasings; each training image gets one, drawn from its seed
TEMPLATES = (
    "a {size} {colour} {shape} in the {position}",
    "{colour} {shape}, {size}, {position}",
    "a {shape} that is {colour} and {size}, at the {position}",
    "the {position} corner holds a {size} {colour} {shape}",
    "{size} {shape} coloured {colour} in the {position} of the picture",
)
_RGB = {"red": (0.95, 0.15, 0.12), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (0.95, 0.9, 0.1)}
_CENTRES = {"top left": (4.0, 4.0), "top right": (12.0, 4.0), "bottom left": (4.0, 12.0), "bottom right": (12.0, 12.0)}
_RADIUS = {"small": 2.3, "large": 3.5}
_SUPER = 4  # supersampling per pixel side (anti-aliased edges)


def encode_labels(attrs: np.ndarray) -> np.ndarray:
    """Attribute indices ``(N, 4)`` (shape, colour, position, size) -> class indices ``(N,)`` in ``0..127``."""
    a = np.asarray(attrs, dtype=np.int64)
    return ((a[:, 0] * 4 + a[:, 1]) * 4 + a[:, 2]) * 2 + a[:, 3]


def decode_labels(labels: Tensor | np.ndarray) -> np.ndarray:
    """Class indices ``(N,)`` -> attribute indices ``(N, 4)`` (shape, colour, position, size)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    return np.stack([y // 32, (y // 8) % 4, (y // 2) % 4, y % 2], axis=1)


def class_names() -> list[str]:
    """One canonical caption per class index."""
    return [caption(a) for a in decode_labels(np.arange(NUM_CLASSES))]


def caption(attrs: np.ndarray | list[int], template: int = 0) -> str:
    """The caption of one attribute vector ``(shape, colour, position, size)`` in phrasing ``template``."""
    s, c, p, z = (int(v) for v in attrs)
    return TEMPLATES[template].format(shape=SHAPES[s], colour=COLOURS[c], position=POSITIONS[p], size=SIZES[z])


def is_heldout(attrs: np.ndarray) -> np.ndarray:
    """Whether each attribute vector ``(N, 4)`` is a held-out (shape, colour) composition."""
    a = np.asarray(attrs).reshape(-1, 4)
    pairs = {(SHAPES.index(s), COLOURS.index(c)) for s, c in HELDOUT_PAIRS}
    return np.array([(int(s), int(c)) in pairs for s, c in a[:, :2]], dtype=bool)


def draw(attrs: np.ndarray, seed: int) -> Tensor:
    """Images ``(N, 3, 16, 16)`` in ``[-1, 1]`` of the attribute vectors ``attrs`` ``(N, 4)``; jitter from ``seed``.

    Jitter: centre +-1 px, radius +-10 %, each colour channel +-0.05.
    """
    a = np.asarray(attrs, dtype=np.int64).reshape(-1, 4)
    n = len(a)
    rng = np.random.default_rng(seed)
    jitter_xy = rng.uniform(-1.0, 1.0, (n, 2))
    jitter_r = rng.uniform(0.9, 1.1, n)
    jitter_c = rng.uniform(-0.05, 0.05, (n, 3))
    centre = np.array([_CENTRES[POSITIONS[p]] for p in a[:, 2]]) + jitter_xy
    r = np.array([_RADIUS[SIZES[z]] for z in a[:, 3]]) * jitter_r
    rgb = np.clip(np.array([_RGB[COLOURS[c]] for c in a[:, 1]]) + jitter_c, 0, 1)
    # supersampled pixel-centre grid, in pixel units
    g = (np.arange(RESOLUTION * _SUPER) + 0.5) / _SUPER
    side = len(g)
    dx = np.broadcast_to(g[None, None, :] - centre[:, 0, None, None], (n, side, side))
    dy = np.broadcast_to(g[None, :, None] - centre[:, 1, None, None], (n, side, side))
    rr = r[:, None, None]
    masks = np.zeros(dx.shape, dtype=bool)
    for k, name in enumerate(SHAPES):
        sel = a[:, 0] == k
        if not sel.any():
            continue
        x, y, q = dx[sel], dy[sel], rr[sel]
        if name == "circle":
            m = x**2 + y**2 <= q**2
        elif name == "square":
            m = np.maximum(np.abs(x), np.abs(y)) <= 0.8 * q
        elif name == "triangle":  # apex up: base at y = 0.8 r, sides through the apex (0, -r)
            m = (y <= 0.8 * q) & (np.abs(x) <= (y + q) * 0.55)
        else:  # cross: a plus of arm width 0.7 r
            m = ((np.abs(x) <= 0.35 * q) & (np.abs(y) <= q)) | ((np.abs(y) <= 0.35 * q) & (np.abs(x) <= q))
        masks[sel] = m
    cover = masks.reshape(n, RESOLUTION, _SUPER, RESOLUTION, _SUPER).mean(axis=(2, 4))  # (N, 16, 16) in [0, 1]
    img = cover[:, None] * rgb[:, :, None, None]  # black background
    return torch.from_numpy((img * 2 - 1).astype(np.float32)).contiguous()


def random_attributes(n: int, seed: int, heldout: bool = True) -> np.ndarray:
    """``n`` attribute vectors drawn uniformly over all combinations (``heldout=False``: without the held-out
    (shape, colour) pairs)."""
    combos = decode_labels(np.arange(NUM_CLASSES))
    if not heldout:
        combos = combos[~is_heldout(combos)]
    rng = np.random.default_rng(seed)
    return combos[rng.integers(len(combos), size=n)]


@lru_cache(maxsize=4)
def _split(split: str) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    n, seed = (TRAIN_SIZE, TRAIN_SEED) if split == "train" else (TEST_SIZE, TEST_SEED)
    attrs = random_attributes(n, seed, heldout=split != "train")
    x = draw(attrs, seed + 1000)
    phr = np.random.default_rng(seed + 2000).integers(len(TEMPLATES), size=n)
    caps = tuple(caption(a, int(t)) for a, t in zip(attrs, phr))
    return x, torch.from_numpy(encode_labels(attrs)), caps


def shapes_arrays(split: str) -> tuple[Tensor, Tensor, list[str]]:
    """Images ``(N, 3, 16, 16)`` in ``[-1, 1]``, class indices ``(N,)`` and one caption per image of the fixed split
    ``"train"`` (8,192 images, no held-out pair) or ``"test"`` (2,048, all 128 combinations)."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    x, y, caps = _split(split)
    return x.clone(), y.clone(), list(caps)


_WORDS = {name: [(v, re.compile(r"\b" + v.replace(" ", r"\s+") + r"\b")) for v in values]
          for name, values in ATTRIBUTES.items()}


def parse_prompt(prompt: str) -> dict[str, int]:
    """The attributes a prompt names, ``{attribute: value index}`` (unnamed attributes are left out).

    Positions are matched as whole phrases ("top left"), the others as whole words; a prompt naming two values of
    one attribute is refused.
    """
    text = prompt.lower()
    out: dict[str, int] = {}
    for name, pats in _WORDS.items():
        hits = [i for i, (_, pat) in enumerate(pats) if pat.search(text)]
        if len(hits) > 1:
            raise UserError(f"prompt {prompt!r} names more than one {name} "
                            f"({', '.join(ATTRIBUTES[name][i] for i in hits)}); name at most one per prompt")
        if hits:
            out[name] = hits[0]
    return out


def heldout_prompts(template: int = 0) -> list[str]:
    """One prompt per held-out composition at every position and size (32 prompts)."""
    combos = decode_labels(np.arange(NUM_CLASSES))
    return [caption(a, template) for a in combos[is_heldout(combos)]]


def seen_prompts(template: int = 0) -> list[str]:
    """One prompt per composition seen in training (96 prompts)."""
    combos = decode_labels(np.arange(NUM_CLASSES))
    return [caption(a, template) for a in combos[~is_heldout(combos)]]


def evaluation_prompts() -> list[str]:
    """The prompts shapes models are measured on (run reports, ``fewstep demo --text``, benchmarks/shapes.py): one per
    composition, the 32 held out of training first, then the 96 seen (128), cycled to the sample count."""
    return heldout_prompts() + seen_prompts()
