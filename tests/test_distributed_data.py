"""Diffusers data preparation under ``accelerate launch``: the main process encodes the captions and images and
writes the cache; the other processes wait for it and read it instead of encoding again. CLI messages appear once.

Two CPU processes (gloo) run ``fewstep distill`` on a tiny text-to-image pipeline (``hf_tiny``); each records how
many images and captions it encoded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import hf_tiny
from test_distributed import launch

pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from accelerate import PartialState

state = PartialState(cpu=True)
from fewstep.models import hf

record = {"images": [], "prompts": []}
encode_images, encode_prompts = hf.Components.encode_images, hf.Components.encode_prompts
hf.Components.encode_images = lambda self, x, *a, **k: record["images"].append(len(x)) or encode_images(self, x, *a, **k)
hf.Components.encode_prompts = lambda self, p, *a, **k: record["prompts"].append(list(p)) or encode_prompts(self, p, *a, **k)
from fewstep.cli import main

record["rc"] = main(sys.argv[2:])
json.dump(record, open(f"{sys.argv[1]}/rank{state.process_index}.json", "w"))
"""


def test_main_process_prepares_the_cache_and_prints_once(tmp_path: Path) -> None:
    hf_tiny.sd_pipeline(tmp_path / "sd")
    images = hf_tiny.captioned_images(tmp_path / "images", 8, prefix="")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    res = launch(script, str(tmp_path), "distill", "--method", "dmd2", "--teacher", str(tmp_path / "sd"), "--data",
                 str(images), "--steps", "1", "--iterations", "2", "--batch-size", "2", "--out", str(out),
                 timeout=300, env={"XDG_CACHE_HOME": str(cache)})
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rc"] == r1["rc"] == 0
    captions = json.loads(json.dumps(sorted(p.read_text() for p in images.glob("*.txt"))))
    train_caption_lists = [p for p in r0["prompts"] if len(p) > 1]  # (one-prompt calls: the empty prompt, CFG's null)
    assert sum(r0["images"]) > 0 and len(train_caption_lists) == 1 and set(train_caption_lists[0]) <= set(captions)
    assert r1["images"] == [] and not [p for p in r1["prompts"] if len(p) > 1]  # rank 1 read the cache
    files = sorted(p.name for p in (cache / "fewstep" / "diffusers").iterdir())
    assert [f.split("_")[0] for f in files] == ["data", "prompts"]  # one of each, no temporary files left
    assert res.stdout.count("student written to") == 1  # printed by the main process only
    assert (out / "report.html").is_file()
