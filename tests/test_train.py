"""The training loop, the EMA, configs, and teacher training (tiny networks; the whole file runs in seconds)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.config import LoopConfig, TeacherConfig, dump_config, load_config
from fewstep.errors import UserError
from fewstep.methods.base import Batch, Method, Player
from fewstep.models import load_denoiser
from fewstep.train import EMA, list_checkpoints, load_checkpoint, read_metrics, train, train_teacher




class Mixture:
    """Stand-in for a fewstep.data Dataset: four labelled Gaussian blobs in 2-D."""
    kind = "points"
    sample_shape = (2,)
    num_classes = 4

    def __init__(self, n: int = 2048, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        centres = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        self.x = centres[self.labels] + 0.1 * torch.randn(n, 2, generator=g)


class TinyImages:
    kind = "image"
    sample_shape = (1, 8, 8)
    num_classes = 3

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        self.labels = torch.randint(0, 3, (n,), generator=g)


def small_cfg(iterations: int, **loop: object) -> TeacherConfig:
    loop_cfg = dict(iterations=iterations, batch_size=64, checkpoint_every=10, log_every=3, sample_every=0,
                    progress=False)
    loop_cfg.update(loop)
    return TeacherConfig(data="stand-in", network={"type": "mlp", "width": 32, "depth": 2}, lr=3e-3,
                         warmup_iterations=5, ema_decay=0.9, loop=LoopConfig(**loop_cfg))


def assert_same(a: object, b: object, where: str = "checkpoint") -> None:
    """Recursive bit-for-bit equality of checkpoint contents (tensors with torch.equal)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            if k != "elapsed_seconds":
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ------------------------------------------------------------------------------------------------------------------
# (a) a tiny teacher learns, and its run directory is complete
# ------------------------------------------------------------------------------------------------------------------
def test_teacher_training_lowers_the_loss_and_writes_the_run(tmp_path: Path) -> None:
    cfg = TeacherConfig(
        data="stand-in", network={"type": "mlp", "width": 64, "depth": 2}, lr=3e-3, warmup_iterations=20,
        loop=LoopConfig(iterations=200, batch_size=256, log_every=20, checkpoint_every=50, keep_checkpoints=2,
                        sample_every=100, progress=False),
    )
    samples: list[Path] = []

    def sample_fn(denoiser, path: Path) -> None:
        assert not denoiser.training
        samples.append(path)

    out = tmp_path / "teacher"
    prefix = train_teacher(cfg, out, dataset=Mixture(4096), sample_fn=sample_fn)

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["it"] for r in rows] == list(range(20, 201, 20))
    first, last = rows[0]["denoiser/loss"], rows[-1]["denoiser/loss"]
    assert last < 0.5 * first, (first, last)
    assert all(r["nonfinite_skipped"] == 0 and r["denoiser/lr"] == pytest.approx(3e-3) for r in rows)

    assert prefix == out / "model"
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000150.pt", "step_00000200.pt"]
    assert [p.name for p in samples] == ["step_00000100.png", "step_00000200.png"]

    resolved = load_config(out / "config.yaml", TeacherConfig)
    assert resolved.network == {"type": "mlp", "dim": 2, "num_classes": 4, "width": 64, "depth": 2}
    assert resolved.loop == cfg.loop

    # The saved model is the EMA of the final checkpoint, and it denoises: x0_hat near the blob centres.
    den, desc = load_denoiser(prefix)
    assert desc["meta"] == {"data": "stand-in", "resolution": None, "iterations": 200, "seed": 0}
    ema = load_checkpoint(out / "checkpoints" / "step_00000200.pt")["players"]["denoiser"]["ema"]["module"]
    for k, v in den.net.state_dict().items():
        assert torch.equal(v, ema[f"denoiser.net.{k}"])
    x0 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    t = torch.full((2,), 300.0)
    x_t = den.schedule.add_noise(x0, torch.randn(2, 2, generator=torch.Generator().manual_seed(0)), t)
    with torch.no_grad():
        err = (den(x_t, t, torch.tensor([0, 3])) - x0).abs().max()
    assert err < 0.5


def test_image_teacher_smoke(tmp_path: Path) -> None:
    cfg = TeacherConfig(data="stand-in", network={"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1},
                        loop=LoopConfig(iterations=2, batch_size=4, progress=False))
    prefix = train_teacher(cfg, tmp_path / "img", dataset=TinyImages())
    den, desc = load_denoiser(prefix)
    assert desc["network"]["type"] == "unet" and desc["network"]["in_channels"] == 1
    assert desc["network"]["resolution"] == 8 and desc["num_classes"] == 3 and desc["meta"]["resolution"] == 8
    assert den(torch.randn(2, 1, 8, 8), 500.0, torch.tensor([0, 3])).shape == (2, 1, 8, 8)


# ------------------------------------------------------------------------------------------------------------------
# (b) kill -9 mid-run, resume: bit-for-bit the uninterrupted run
# ------------------------------------------------------------------------------------------------------------------
RUN_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train import Mixture, small_cfg
    from fewstep.train import train_teacher
    train_teacher(small_cfg(40), sys.argv[1], resume=sys.argv[2] == "1", dataset=Mixture(512))
    """
)


def _launch(run_dir: Path, resume: bool, crash_at: int | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FEWSTEP_CRASH_AT_STEP"}
    env["OMP_NUM_THREADS"] = "1"
    if crash_at is not None:
        env["FEWSTEP_CRASH_AT_STEP"] = str(crash_at)
    script = RUN_SCRIPT.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", script, str(run_dir), "1" if resume else "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_resume_after_kill_is_bit_identical(tmp_path: Path) -> None:
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    procs = [_launch(crashed, resume=False, crash_at=27), _launch(clean, resume=False)]
    (rc_crash, err_crash), (rc_clean, err_clean) = [_wait(p) for p in procs]
    assert rc_clean == 0, err_clean
    assert rc_crash == 137, err_crash

    # The crash left checkpoints 10 and 20, rows up to 27, and no model.
    assert [p.name for p in list_checkpoints(crashed)] == ["step_00000010.pt", "step_00000020.pt"]
    assert read_metrics(crashed / "metrics.jsonl")[-1]["it"] == 27
    assert not (crashed / "model.safetensors").exists()

    rc, err = _wait(_launch(crashed, resume=True))
    assert rc == 0, err

    for name in ("step_00000030.pt", "step_00000040.pt"):
        a = load_checkpoint(crashed / "checkpoints" / name)
        b = load_checkpoint(clean / "checkpoints" / name)
        assert_same(a, b, name)
        assert a["players"]["denoiser"]["optimizer"]["state"], "optimizer state is saved"
    assert without_seconds(read_metrics(crashed / "metrics.jsonl")) == without_seconds(
        read_metrics(clean / "metrics.jsonl")
    )
    assert [r["it"] for r in read_metrics(clean / "metrics.jsonl")] == list(range(3, 40, 3)) + [40]
    assert (crashed / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------------------------
# (c) a truncated newest checkpoint is skipped on resume; leftover temporaries are ignored
# ------------------------------------------------------------------------------------------------------------------
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_teacher(small_cfg(30), run, dataset=Mixture(512))
    newest = run / "checkpoints" / "step_00000030.pt"
    reference = load_checkpoint(newest)
    rows = read_metrics(run / "metrics.jsonl")
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    leftover = run / "checkpoints" / ".step_00000040.pt.x1y2.tmp"
    leftover.write_bytes(b"half a checkpoint")

    with pytest.warns(UserWarning, match="step_00000030.pt"):
        train_teacher(small_cfg(30), run, resume=True, dataset=Mixture(512))
    assert_same(load_checkpoint(newest), reference)
    assert without_seconds(read_metrics(run / "metrics.jsonl")) == without_seconds(rows)
    assert not leftover.exists()


def test_resume_needs_a_checkpoint_and_a_finished_run_is_a_no_op(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(UserError, match="holds no run to resume; drop --resume"):
        train_teacher(small_cfg(6, checkpoint_every=100), run, resume=True, dataset=Mixture(256))
    assert not run.exists()
    train_teacher(small_cfg(6, checkpoint_every=100), run, dataset=Mixture(256))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006.pt"]
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    train_teacher(small_cfg(6, checkpoint_every=100), run, resume=True, dataset=Mixture(256))
    assert (run / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    with pytest.raises(UserError, match="at iteration 6, past the 4 iterations"):
        train_teacher(small_cfg(4, checkpoint_every=100), run, resume=True, dataset=Mixture(256))

    # no checkpoint left (a crash before the first one, or all of them damaged): refused, nothing touched
    (run / "checkpoints" / "step_00000006.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="step_00000006.pt: it is damaged or not a fewstep checkpoint"), \
            pytest.raises(UserError, match="has no checkpoint that loads, so there is nothing to resume; pass --restart"):
        train_teacher(small_cfg(6, checkpoint_every=100), run, resume=True, dataset=Mixture(256))
    (run / "checkpoints" / "step_00000006.pt").unlink()
    with pytest.raises(UserError, match="has no checkpoint to resume from; pass --restart"):
        train_teacher(small_cfg(6, checkpoint_every=100), run, resume=True, dataset=Mixture(256))
    assert {name: (run / name).read_bytes() for name in before} == before


# ------------------------------------------------------------------------------------------------------------------
# (d) a run directory is never overwritten
# ------------------------------------------------------------------------------------------------------------------
def test_existing_run_dir_without_resume_is_a_user_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="exists; pass --resume to continue it, --restart to move it aside and start over, or choose a new --out"):
        train_teacher(small_cfg(2), run, dataset=Mixture(64))
    (tmp_path / "empty").mkdir()
    train_teacher(small_cfg(1), tmp_path / "empty", dataset=Mixture(64))  # an empty folder is fine


# ------------------------------------------------------------------------------------------------------------------
# (e) configs: YAML round trip and one-line errors
# ------------------------------------------------------------------------------------------------------------------
def test_config_round_trip(tmp_path: Path) -> None:
    cfg = small_cfg(7, mixed_precision="bf16")
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", TeacherConfig) == cfg
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml", TeacherConfig) == TeacherConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("loop:\n  iterations: 0\n", "loop.iterations: Input should be greater than or equal to 1"),
        ("loop:\n  iteratoins: 5\n", "loop.iteratoins: Extra inputs are not permitted"),
        ("lr: fast\n", "lr: Input should be a valid number"),
        ("loop:\n  mixed_precision: fp8\n", "loop.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"),
        ("loop: {iterations: 3\n", "invalid YAML at line"),
        ("- 1\n- 2\n", "a config must be a YAML mapping"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path, TeacherConfig)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml", TeacherConfig)


# ------------------------------------------------------------------------------------------------------------------
# (f) the NaN guard
# ------------------------------------------------------------------------------------------------------------------
class Regression(Method):
    """Fit a linear map; the loss is NaN at the iterations in ``nan_at`` (or always)."""
    def __init__(self, nan_at: set[int] | None = None) -> None:
        net = nn.Linear(2, 2)
        self.players = {"net": Player(net, torch.optim.SGD(net.parameters(), lr=0.1), grad_clip=1.0)}
        self.nan_at = nan_at

    def loss(self, player: str, batch: Batch, it: int):
        loss = ((self.players[player].module(batch.x0) - batch.x0.flip(1)) ** 2).mean()
        if self.nan_at is None or it in self.nan_at:
            loss = loss * float("nan")
        return loss, {"double": 2 * loss.detach()}


def test_nan_guard_skips_the_update(tmp_path: Path) -> None:
    method = Regression(nan_at={2})
    loop = LoopConfig(iterations=5, batch_size=16, log_every=5, checkpoint_every=5, progress=False)
    logged: list[dict] = []
    with pytest.warns(UserWarning, match="iteration 2: non-finite loss"):
        row = train(method, Mixture(64), loop, tmp_path / "run", log_fn=logged.append)
    assert row["nonfinite_skipped"] == 1 and logged == [row]
    assert math.isfinite(row["net/loss"]) and row["net/double"] == pytest.approx(2 * row["net/loss"])
    assert all(torch.isfinite(p).all() for p in method.players["net"].module.parameters())

    # The run without iteration 2 at all takes the same 4 updates: the skip changed nothing else.
    class Skipping(Regression):
        def updates(self, it: int) -> list[str]:
            return [] if it == 2 else ["net"]

    torch.manual_seed(0)
    a, b = Regression(nan_at={2}), Skipping(nan_at=set())
    b.players["net"].module.load_state_dict(a.players["net"].module.state_dict())
    with pytest.warns(UserWarning):
        train(a, Mixture(64), loop, tmp_path / "a")
    train(b, Mixture(64), loop, tmp_path / "b")
    for p, q in zip(a.players["net"].module.parameters(), b.players["net"].module.parameters()):
        assert torch.equal(p, q)


def test_nan_guard_stops_a_diverged_run(tmp_path: Path) -> None:
    loop = LoopConfig(iterations=50, batch_size=8, progress=False)
    with pytest.warns(UserWarning), pytest.raises(UserError, match="training diverged: .* lower the learning rate"):
        train(Regression(nan_at=None), Mixture(64), loop, tmp_path / "run")


# ------------------------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------------------------
def test_ema_warmup_and_state() -> None:
    net = nn.Linear(3, 1)
    ema = EMA(net, decay=0.999)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    before = ema.module.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=0)  # d = 0.1: the copy moves 90 % of the way
    assert torch.allclose(ema.module.weight, before + 0.9)
    other = EMA(nn.Linear(3, 1), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.999 and torch.equal(other.module.weight, ema.module.weight)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path: Path) -> None:
    # Also checks that one Python session may switch precision between runs (Accelerate's state is per process).
    loop = LoopConfig(iterations=3, batch_size=8, mixed_precision="bf16", progress=False)
    row = train(Regression(nan_at=set()), Mixture(64), loop, tmp_path / "bf16")
    assert row["it"] == 3 and math.isfinite(row["net/loss"])
    row = train(Regression(nan_at=set()), Mixture(64), loop.model_copy(update={"mixed_precision": "no"}),
                tmp_path / "fp32")
    assert row["it"] == 3


# ------------------------------------------------------------------------------------------------------------------
# Memory: LoRA players on the teacher's own weights, frozen weights in the training dtype, gradient checkpointing
# ------------------------------------------------------------------------------------------------------------------
def _tiny_image_teacher() -> "object":
    from fewstep.diffusion.denoiser import Denoiser
    from fewstep.diffusion.schedule import DDPMSchedule
    from fewstep.models import ClassUNet

    torch.manual_seed(0)
    net = ClassUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_classes=3, resolution=8)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return Denoiser(net, DDPMSchedule(rescale_zero_terminal_snr=True), "v_prediction", (1, 8, 8), num_classes=3)


def _distill_loop(iterations: int = 3, **kw: object) -> LoopConfig:
    return LoopConfig(iterations=iterations, batch_size=4, checkpoint_every=iterations, log_every=1, sample_every=0,
                      progress=False, **kw)


@pytest.mark.parametrize("method", ["dmd2", "add"])
def test_lora_players_train_adapters_on_the_teachers_own_weights(tmp_path: Path, method: str) -> None:
    from fewstep.methods import registry
    from fewstep.models.lora import has_lora

    teacher = _tiny_image_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg_cls, method_cls = registry()[method]
    extra = {"feature_network": "teacher"} if method == "add" else {"ttur": 1}
    cfg = cfg_cls(lora_rank=4, warmup_iterations=0, lr_generator=1e-2, loop=_distill_loop(), **extra)
    torch.manual_seed(0)
    m = method_cls(teacher, cfg)
    gen = m.players["generator"].module
    assert has_lora(gen)
    # only adapters train; the frozen base weights ARE the teacher's tensors (held once)
    teacher_params = {id(p) for p in teacher.parameters()}
    for name, p in gen.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
        if not p.requires_grad:
            assert id(p) in teacher_params, name
    opt_params = {id(q) for g in m.players["generator"].optimizer.param_groups for q in g["params"]}
    assert opt_params == {id(p) for p in gen.parameters() if p.requires_grad}
    # B = 0: the LoRA generator starts exactly at the teacher
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([999.0, 500.0]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(gen(x, t, y), teacher(x, t, y))

    train(m, TinyImages(), cfg.loop, tmp_path / "run", config=cfg)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the teacher changed"
    with torch.no_grad():
        assert not torch.allclose(m.inference_model()(x, t, y), teacher(x, t, y)), "the adapters did not train"
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert any(".lora_A." in k for k in ckpt["players"]["generator"]["module"])


def test_disback_loads_its_path_into_a_lora_fake_score_without_touching_the_teacher() -> None:
    from fewstep.config import DMD2Config
    from fewstep.methods.dmd2 import DMD2Method
    from fewstep.models.lora import load_network_state

    teacher = _tiny_image_teacher()
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    m = DMD2Method(teacher, DMD2Config(lora_rank=2, gan=False, loop=_distill_loop()))
    fake = m.players["guidance"].module.fake
    other = {k: v + 0.01 for k, v in before.items()}
    load_network_state(fake.net, other)
    assert all(torch.equal(before[k], v) for k, v in teacher.net.state_dict().items())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([700.0, 300.0])
    ref = _tiny_image_teacher()
    ref.net.load_state_dict(other)
    with torch.no_grad():
        torch.testing.assert_close(fake(x, t, torch.tensor([0, 1])), ref(x, t, torch.tensor([0, 1])))
    with pytest.raises(RuntimeError, match="missing"):
        load_network_state(fake.net, {k: v for k, v in other.items() if "conv_in" not in k})


def test_bf16_holds_frozen_weights_in_bf16_during_training_only(tmp_path: Path) -> None:
    from fewstep.config import DMD2Config
    from fewstep.methods.dmd2 import DMD2Method

    teacher = _tiny_image_teacher()
    cfg = DMD2Config(lora_rank=2, ttur=1, ema_decay=0.9, loop=_distill_loop(2, mixed_precision="bf16"))
    m = DMD2Method(teacher, cfg)
    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    def sample_fn(step: int, path: Path) -> None:  # runs inside training
        gen = m.players["generator"].ema
        lora = next(p for n, p in gen.named_parameters() if ".lora_A." in n)
        seen.append((teacher.net.conv_in.weight.dtype, lora.dtype, m.inference_model()(
            torch.randn(1, 1, 8, 8), torch.tensor([999.0]), torch.tensor([1])).dtype))

    row = train(m, TinyImages(), cfg.loop, tmp_path / "run", sample_fn=sample_fn, config=cfg)
    assert math.isfinite(row["generator/loss"]) and math.isfinite(row["guidance/loss"])
    assert seen and seen[0][:2] == (torch.bfloat16, torch.float32)  # frozen teacher in bf16, adapters (EMA) in fp32
    # afterwards every weight is float32 again (evaluation and export run outside autocast)
    for module in (teacher, m.players["generator"].ema, m.players["guidance"].module):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    with torch.no_grad():
        assert m.inference_model()(torch.randn(1, 1, 8, 8), torch.tensor([999.0]), torch.tensor([1])).isfinite().all()


def test_gradient_checkpointing_option_changes_memory_not_results(tmp_path: Path) -> None:
    from fewstep.config import DMD2Config
    from fewstep.methods.dmd2 import DMD2Method

    rows, flags = [], []
    for gc in (False, True):
        cfg = DMD2Config(ttur=1, loop=_distill_loop(2, gradient_checkpointing=gc))
        torch.manual_seed(0)
        m = DMD2Method(_tiny_image_teacher(), cfg)
        rows.append(train(m, TinyImages(), cfg.loop, tmp_path / f"run{gc}", config=cfg))
        flags.append((m.players["generator"].module.module.denoiser.net.gradient_checkpointing
                      if hasattr(m.players["generator"].module, "module")
                      else m.players["generator"].module.denoiser.net.gradient_checkpointing,
                      m.teacher.net.gradient_checkpointing))
    assert flags == [(False, False), (True, False)]  # players only: the frozen teacher has no backward
    for k in ("generator/loss", "guidance/loss"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-5, abs=1e-6), k


# ------------------------------------------------------------------------------------------------------------------
# The GPU recipes (configs/sd15_*.yaml, configs/sdxl_*.yaml) run as written -- bf16, gradient checkpointing, LoRA --
# on a tiny SDXL-like diffusers pipeline, shrunk only in size (iterations, batch, ladder, path length)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    hf_tiny = pytest.importorskip("hf_tiny")
    root = tmp_path_factory.mktemp("recipes")
    hf_tiny.sdxl_pipeline(root / "sdxl")
    return root / "sdxl", hf_tiny.captioned_images(root / "images", 6)


@pytest.mark.parametrize("method", ["dmd2", "add", "lightning", "disback"])
def test_sdxl_recipe_runs_on_a_tiny_sdxl_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tiny_sdxl: tuple[Path, Path], method: str) -> None:
    import warnings

    import yaml

    from fewstep.distillation import distill

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    teacher, images = tiny_sdxl
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"sdxl_{method}.yaml").read_text())
    assert cfg["loop"]["mixed_precision"] == "bf16" and cfg["loop"]["gradient_checkpointing"] is True
    cfg.update(teacher=str(teacher), data=str(images))
    iterations = 3
    if method == "lightning":
        cfg.update(ladder=[2, 1], teacher_steps=4)
        iterations = 4  # one per phase
    if method == "disback":
        cfg.update(record_checkpoints=2, record_every=1, switch_every=1)
    if method == "add" and cfg.get("feature_network") == "timm":  # DINOv2 through timm: a stand-in ViT and its file
        cfg.update(feature_weights=str(pytest.importorskip("hf_tiny").fake_timm(monkeypatch, tmp_path / "vit")),
                   feature_resolution=16)
    cfg["loop"].update(iterations=iterations, batch_size=2, checkpoint_every=iterations, sample_every=0,
                       log_every=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = distill(method=method, config=cfg, out=tmp_path / "run", evaluate_n=0)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["it"] for r in rows] == list(range(1, iterations + 1))
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.endswith("/loss"))
    # after training every weight is back in float32 (bf16 was for training only)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
