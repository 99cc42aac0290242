"""Multi-process training on the CPU (gloo): `accelerate launch --config_file configs/accelerate_ddp.yaml
--num_processes 2`, the command a GPU user runs, here with CPU processes.

1. **Same result as one process with the same global batch.** The loop draws the global batch's indices from
   ``(seed, it)`` and gives each process a contiguous slice, so 1 process x 32 and 2 processes x 16 train on the same
   examples; DDP averages the two halves' gradients, which is the 1-process gradient of the mean loss. The methods'
   own noise draws are per process (two ranks must not share noise), so they cannot match a 1-process run draw for
   draw; the comparison therefore uses a method whose loss draws nothing (a classifier on four Gaussian blobs, with
   gradient clipping, an LR schedule and an EMA). Tolerance: 4 ulps of the largest weight per AdamW step, 12 steps
   (the only difference is the order of float32 additions in the all-reduce). Only rank 0 writes checkpoints, the
   config, metrics.jsonl, TensorBoard events and samples (every write is recorded per rank).
2. **Every method runs unchanged under DDP** (dmd2, add, disback, lightning), and the ranks' generators are bit-identical
   after training (a method that trained a player outside its DDP forward would desynchronise them).
3. **FSDP**: fewstep shards the players itself with FSDP2 (``fully_shard``, which runs on CPU/gloo although
   Accelerate enables its own FSDP for GPUs only), so ``loop.fsdp: true`` is tested here with the DDP launch config:
   DMD2 sharded equals DDP, and resuming from a checkpoint (full weights + name-keyed optimizer state gathered on
   rank 0) equals the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DDP_CONFIG = ROOT / "configs" / "accelerate_ddp.yaml"


#: what a rank prints when it aborts (exit -6) in the interpreter's teardown, after its work and its result file are
#: written: seen about once in 30 two-process gloo launches on the 2-core machine since 2026-12-01 (0 in 40 before
#: that day's loop changes; cause not found yet). The launch is then run once more from a clean slate, so that the
#: suite does not fail on it; the tests' assertions are unchanged.
ABORT_AT_EXIT = "terminate called without an active exception"


def launch(script: Path, *args: str, processes: int = 2, timeout: int = 120,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes N script args`` (N = 1: plain
    python); ``env`` adds variables. A launch that fails only by :data:`ABORT_AT_EXIT` is run once more, after the
    folders among ``args`` are put back as they were (what the first attempt created in them removed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    if processes == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
               "--num_processes", str(processes), "--main_process_port", str(29500 + os.getpid() % 2000),
               str(script), *args]
    before = {Path(a): set(os.listdir(a)) if os.path.isdir(a) else None for a in args if os.path.isabs(a)}
    for attempt in range(2):
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0 or attempt == 1 or ABORT_AT_EXIT not in res.stderr:
            break
        for folder, names in before.items():
            created = [folder] if names is None else [folder / n for n in set(os.listdir(folder)) - names]
            for path in created:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def test_launch_runs_again_only_after_an_abort_at_exit(tmp_path: Path) -> None:
    counter, out = tmp_path / "attempts", tmp_path / "out"
    out.mkdir()
    (out / "kept").write_text("before")
    script = tmp_path / "flaky.py"
    script.write_text(f"""
import sys
from pathlib import Path
counter = Path({str(counter)!r})
attempt = len(counter.read_text()) if counter.exists() else 0
counter.write_text("x" * (attempt + 1))
(Path(sys.argv[1]) / f"written_{{attempt}}").write_text("")
if attempt == 0:
    sys.stderr.write(sys.argv[2] + "\\n")
    sys.exit(134)
""")
    launch(script, str(out), ABORT_AT_EXIT, processes=1)
    assert counter.read_text() == "xx"  # run once more, from the folder as it was
    assert sorted(p.name for p in out.iterdir()) == ["kept", "written_1"]
    counter.unlink()
    with pytest.raises(AssertionError, match="another failure"):  # any other failure fails at once
        launch(script, str(out), "another failure", processes=1)
    assert counter.read_text() == "x"


PRELUDE = """
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from torch import nn
from accelerate import PartialState
"""

EQUIVALENCE = PRELUDE + """
import fewstep.train.loop as loop
import torch.utils.tensorboard as tb
from fewstep.config import LoopConfig
from fewstep.methods.base import Method, Player

out, record = sys.argv[1], sys.argv[2]
state = PartialState(cpu=not torch.cuda.is_available())  # the first PartialState decides: CPU processes need cpu=True
calls = []  # every file this process writes through the loop


def recorded(kind, fn):
    def wrapper(*a, **k):
        calls.append([kind, str(a[1] if kind in ("checkpoint", "config") else a[0])])
        return fn(*a, **k)
    return wrapper


loop.atomic_torch_save = recorded("checkpoint", loop.atomic_torch_save)
loop.dump_config = recorded("config", loop.dump_config)
loop.append_text = recorded("open", loop.append_text)  # metrics.jsonl rows


class Writer(tb.SummaryWriter):
    def __init__(self, *a, **k):
        calls.append(["tensorboard", str(a[0])])
        super().__init__(*a, **k)


tb.SummaryWriter = Writer


class Blobs:
    def __init__(self, n=512):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        centres = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        self.x = centres[self.labels] + 0.6 * torch.randn(n, 2, generator=g)


class Classifier(Method):
    # no random draws in the loss: its gradient is a function of the batch alone
    def __init__(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        self.players = {"net": Player(net, opt, sched, grad_clip=0.5, ema_decay=0.9)}

    def loss(self, player, batch, it):
        logits = self.players["net"].module(batch.x0)
        return nn.functional.cross_entropy(logits, batch.labels), {"acc": (logits.argmax(1) == batch.labels).float().mean()}


def samples(step, path):
    calls.append(["sample", str(path)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(step))


m = Classifier()
cfg = LoopConfig(iterations=12, batch_size=32, checkpoint_every=5, log_every=4, sample_every=6, progress=False)
row = loop.train(m, Blobs(), cfg, out, sample_fn=samples, config=cfg)
net = m.players["net"]
plain = getattr(net.module, "module", net.module)
json.dump({"rank": state.process_index, "world": state.num_processes, "calls": calls, "row": row,
           "params": {k: v.tolist() for k, v in plain.state_dict().items()},
           "ema": {k: v.tolist() for k, v in net.ema.state_dict().items()}},
          open(f"{record}/rank{state.process_index}.json", "w"))
"""


def _tensors(d: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in d.items()}


def test_two_processes_match_one_and_only_rank_0_writes(tmp_path: Path) -> None:
    from fewstep.train import list_checkpoints, load_checkpoint, read_metrics

    script = tmp_path / "equivalence.py"
    script.write_text(EQUIVALENCE)
    runs = {}
    for world in (1, 2):
        rec = tmp_path / f"record{world}"
        rec.mkdir()
        launch(script, str(tmp_path / f"run{world}"), str(rec), processes=world)
        runs[world] = [json.loads((rec / f"rank{r}.json").read_text()) for r in range(world)]
    one, (r0, r1) = runs[1][0], runs[2]
    assert (one["world"], r0["world"], r1["rank"]) == (1, 2, 1)

    # ranks agree exactly (DDP), and match the 1-process run up to rounding: only the order of the float32 additions
    # differs (16 + 16 + all-reduce vs 32 terms); Adam turns a gradient's relative rounding into ~lr x that in the
    # update, so each of the 12 steps can move a weight (and its EMA) by a few ulps of |w|: 12 x 4 ulps (measured: 1)
    eps32, steps = torch.finfo(torch.float32).eps, 12
    w_max = max(float(v.abs().max()) for key in ("params", "ema") for v in _tensors(one[key]).values())
    for key in ("params", "ema"):
        a, b, c = _tensors(one[key]), _tensors(r0[key]), _tensors(r1[key])
        for k in a:
            assert torch.equal(b[k], c[k]), (key, k)
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=steps * 4 * eps32 * w_max, msg=f"{key}.{k}")
    # (the comparison is not vacuous: training moved the weights far beyond that tolerance; the network as the
    # script builds it)
    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).state_dict()
    moved = max((_tensors(one["params"])[k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1000 * steps * 4 * eps32 * w_max

    # logged means over processes equal the 1-process means
    rows1, rows2 = read_metrics(tmp_path / "run1" / "metrics.jsonl"), read_metrics(tmp_path / "run2" / "metrics.jsonl")
    assert [r["it"] for r in rows2] == [r["it"] for r in rows1] == [4, 8, 12]
    for a, b in zip(rows1, rows2):
        for k in ("net/loss", "net/acc", "net/lr"):
            # a mean of two half-batch means vs one mean, on weights equal to the bound above: the same ulps of |value|
            assert b[k] == pytest.approx(a[k], rel=steps * 4 * eps32, abs=0), k
    ck1, ck2 = (load_checkpoint(list_checkpoints(tmp_path / f"run{w}")[-1]) for w in (1, 2))
    for k, v in ck1["players"]["net"]["module"].items():
        torch.testing.assert_close(ck2["players"]["net"]["module"][k], v, rtol=0, atol=steps * 4 * eps32 * w_max)
    assert [p.name for p in list_checkpoints(tmp_path / "run2")] == [f"step_{s:08d}.pt" for s in (5, 10, 12)]

    # only the main process writes
    assert r1["calls"] == []
    kinds = {}
    for kind, path in r0["calls"]:
        kinds.setdefault(kind, []).append(Path(path).name)
    assert kinds["checkpoint"] == [f"step_{s:08d}.pt" for s in (5, 10, 12)]
    assert kinds["sample"] == ["step_00000006.png", "step_00000012.png"]
    assert kinds["config"] == ["config.yaml"] and kinds["tensorboard"] == ["tb"]
    assert kinds["open"] == ["metrics.jsonl"] * 3


METHODS = PRELUDE + """
import warnings
import fewstep

out, record = sys.argv[1], sys.argv[2]
state = PartialState(cpu=not torch.cuda.is_available())  # the first PartialState decides: CPU processes need cpu=True
assert state.num_processes == 2  # (two independent runs would agree trivially)
common = dict(teacher="grid25", steps=1, batch_size=8, log_every=1, sample_every=0, progress=False, evaluate_n=0)
configs = {
    "dmd2": {"ttur": 1},
    "add": {},
    "disback": {"record_checkpoints": 2, "record_every": 2, "switch_every": 1, "dmd2": {"ttur": 1}},
    "lightning": {"ladder": [2, 1], "teacher_steps": 4},
}
iterations = {"lightning": 4}  # one per phase: MSE, then LoRA cond / LoRA uncond / full
steps = {"dmd2": 2}  # a 2-step DMD2: its per-step fake scores (adapters) must stay in sync too
hashes, diverged = {}, {}
for method, config in configs.items():
    n = iterations.get(method, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = fewstep.distill(method=method, out=f"{out}/{method}", config={"method": method, **config},
                                  iterations=n, checkpoint_every=n, **{**common, "steps": steps.get(method, 1)})
    diverged[method] = any("differs across processes" in str(w.message) for w in caught)
    blob = b"".join(v.detach().cpu().contiguous().numpy().tobytes() for v in student.state_dict().values())
    hashes[method] = hashlib.sha256(blob).hexdigest()

# a method that breaks the contract on purpose: rank 1 nudges its generator's weights once, mid-run
import fewstep.distillation
from fewstep.methods import registry
from fewstep.methods.dmd2 import DMD2Method


class Diverging(DMD2Method):
    def loss(self, player, batch, it):
        if it == 2 and player == "generator" and state.process_index == 1:
            with torch.no_grad():
                for p in self.players["generator"].module.parameters():
                    p.add_(1e-3)
        return super().loss(player, batch, it)


fewstep.distillation.registry = lambda: {**registry(), "dmd2": (registry()["dmd2"][0], Diverging)}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    student = fewstep.distill(method="dmd2", out=f"{out}/diverging", config={"method": "dmd2", "ttur": 1},
                              iterations=3, checkpoint_every=3, **common)
diverged["diverging"] = any("differs across processes" in str(w.message) for w in caught)
blob = b"".join(v.detach().cpu().contiguous().numpy().tobytes() for v in student.state_dict().values())
hashes["diverging"] = hashlib.sha256(blob).hexdigest()
json.dump({"hashes": hashes, "diverged": diverged}, open(f"{record}/rank{state.process_index}.json", "w"))
"""


@pytest.fixture(scope="module")
def methods_under_ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Every method for a few iterations in one 2-process launch; the ranks' student hashes."""
    from fewstep import zoo

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    tmp = tmp_path_factory.mktemp("methods")
    script = tmp / "methods.py"
    script.write_text(METHODS)
    launch(script, str(tmp / "runs"), str(tmp), processes=2)
    r0, r1 = (json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["diverged"] == r1["diverged"]
    return tmp / "runs", r0, r1


ALL_METHODS = ("dmd2", "add", "disback", "lightning")


def test_every_method_runs_under_ddp(methods_under_ddp: tuple[Path, dict, dict]) -> None:
    from fewstep.train import list_checkpoints, read_metrics

    runs, r0, r1 = methods_under_ddp
    assert set(r0["hashes"]) == set(r1["hashes"]) == {*ALL_METHODS, "diverging"}
    for method in ALL_METHODS:
        run = runs / method
        n = 4 if method == "lightning" else 3
        assert [p.name for p in list_checkpoints(run)] == [f"step_{n:08d}.pt"], method
        assert [r["it"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, n + 1)), method
        assert (run / "student.safetensors").is_file()


@pytest.mark.parametrize("method", ["dmd2", "add", "disback", "lightning"])
def test_ranks_stay_in_sync_under_ddp(methods_under_ddp: tuple[Path, dict, dict], method: str) -> None:
    _, r0, r1 = methods_under_ddp
    assert r0["hashes"][method] == r1["hashes"][method]
    assert not r0["diverged"][method]  # the loop's check agrees (it warns when replicated weights differ)


def test_the_loop_warns_when_replicated_players_diverge(methods_under_ddp: tuple[Path, dict, dict]) -> None:
    _, r0, r1 = methods_under_ddp
    # a method whose rank 1 changes its weights outside the optimizer step: caught by the per-log-row checksum
    assert r0["hashes"]["diverging"] != r1["hashes"]["diverging"]
    assert r0["diverged"]["diverging"] and r1["diverged"]["diverging"]


FSDP = PRELUDE + """
import copy, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
from tiny import image_teacher
import fewstep.train.loop as loop
from fewstep.config import DMD2Config, LoopConfig
from fewstep.methods.dmd2 import DMD2Method
from fewstep.train.memory import is_sharded_module

out = sys.argv[1]
state = PartialState(cpu=not torch.cuda.is_available())
assert state.num_processes == 2


class Data:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1
        self.labels = torch.randint(0, 10, (64,), generator=g)


def run(name, fsdp, iterations, resume=False):
    lc = LoopConfig(iterations=iterations, batch_size=4, checkpoint_every=1, log_every=1, sample_every=0,
                    progress=False, fsdp=fsdp)
    torch.manual_seed(0)
    m = DMD2Method(image_teacher(), DMD2Config(ttur=1, steps=2, loop=lc))  # 2 steps: per-step fake scores
    players = {n: p.module for n, p in m.players.items()}
    seen = {}
    loop.train(m, Data(), lc, f"{out}/{name}", resume=resume,
               sample_fn=lambda step, path: seen.setdefault("sharded", [is_sharded_module(p.module)
                                                                       for p in m.players.values()]))
    # after training: plain modules with the full weights on every process
    assert not any(is_sharded_module(p.module) for p in m.players.values())
    plain = {n: p.module.module if isinstance(getattr(p.module, "module", None), nn.Module) else p.module
             for n, p in m.players.items()}  # (DDP keeps its wrapper)
    return {n: {k: v.detach().cpu().clone() for k, v in mod.state_dict().items()} for n, mod in plain.items()}, seen


ddp, _ = run("ddp", False, 2)
fsdp, seen = run("fsdp", True, 2)
run("fsdp_resumed", True, 1)
resumed, _ = run("fsdp_resumed", True, 2, resume=True)
result = {"rank": state.process_index, "sampled_after_gather": seen.get("sharded"),
          "fsdp_vs_ddp": [[(fsdp[n][k] - ddp[n][k]).abs().max().item(), ddp[n][k].abs().max().item(),
                           ddp[n][k].numel()] for n in ddp for k in ddp[n] if ddp[n][k].is_floating_point()],
          "lr": max(DMD2Config().lr_generator, DMD2Config().lr_fake), "beta1": DMD2Config().adam_betas[0],
          "resumed_vs_uninterrupted": max((resumed[n][k] - fsdp[n][k]).abs().max().item() for n in fsdp for k in fsdp[n])}
ck = torch.load(f"{out}/fsdp/checkpoints/step_00000001.pt", weights_only=True)
result["optimizer_format"] = ck["players"]["guidance"]["optimizer_format"]
result["optimizer_state_keys"] = len(ck["players"]["guidance"]["optimizer"]["state"])
result["guidance_params"] = len(ddp["guidance"])
json.dump(result, open(f"{out}/rank{state.process_index}.json", "w"))
"""


def test_fsdp_matches_ddp_and_resumes_from_its_optimizer_state(tmp_path: Path) -> None:
    """loop.fsdp (what configs/accelerate_fsdp.yaml turns on) shards DMD2's players with FSDP2 on 2 CPU processes:
    the result equals DDP's (same global gradients, up to float32 reduction order: see the bound below), a run resumed
    from its step-1 checkpoint equals the uninterrupted one exactly (the checkpoint holds the full, name-keyed
    optimizer state), and the players are plain full-weight modules after training (sampling and saving work)."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP.replace("{tests!r}", repr(str(Path(__file__).parent))))
    launch(script, str(tmp_path), processes=2, timeout=240)
    eps32, steps = torch.finfo(torch.float32).eps, 2
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        # FSDP reduces gradients in another order than DDP, so a gradient differs by rounding: a float32 sum of n
        # terms by up to n eps of their absolute sum, relative 1e-4 for the n ~ 1e3 terms of a weight's gradient here
        # (measured: 1e-5). AdamW's step is ~lr times the gradient's direction, so a step moves a weight by 4 ulps
        # of |w| plus lr x 1e-4. But Adam divides out a gradient's size: a parameter whose gradient is itself only
        # rounding noise (measured: two biases behind zero-initialised layers) moves ~lr a step in a direction the
        # rounding picks; with beta1 = 0 step 1 moves lr, step 2 at most sqrt(2) lr, so the runs may differ there by
        # 2 lr (1 + sqrt 2). Such parameters may hold at most 1% of the weights; everything else is within rounding.
        assert res["beta1"] == 0.0  # the bound below is for beta1 = 0 (DMD2's default)
        per = res["fsdp_vs_ddp"]
        rounding = [steps * (4 * eps32 * w_max + res["lr"] * 1e-4) for _, w_max, _ in per]
        assert all(d <= 2 * res["lr"] * (1 + math.sqrt(2)) + tol for (d, _, _), tol in zip(per, rounding)), res
        noisy = sum(n for (d, _, n), tol in zip(per, rounding) if d > tol)
        assert noisy <= 0.01 * sum(n for _, _, n in per), res
        assert res["resumed_vs_uninterrupted"] == 0.0, res
        assert res["optimizer_format"] == "fqn" and res["optimizer_state_keys"] > 0, res
    res0 = json.loads((tmp_path / "rank0.json").read_text())
    assert res0["sampled_after_gather"] == [False, False]
