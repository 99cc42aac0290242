"""DisBack: the degradation path (it really degrades, it is cached and reused, a different teacher invalidates it),
the backtracking schedule (reverse order, switching by count and by threshold, every switch loading exactly the
intended checkpoint, the fake score starting from ``D^(N)``, the stage surviving a resume), the config, and
``fewstep.distill`` end to end with the method registered for the test.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fewstep.config import LoopConfig, validate_config
from fewstep.diffusion.denoiser import CFGDenoiser, Denoiser
from fewstep.diffusion.samplers import sample, sample_student, student_timesteps
from fewstep.errors import UserError
from fewstep.methods.base import Batch
from fewstep.methods.disback import (
    Backtrack,
    DisBackConfig,
    DisBackMethod,
    RecordSettings,
    open_degradation_path,
    path_key,
    record_degradation_path,
    state_hash,
)
from fewstep.methods.dmd2 import _unwrap
from tiny import image_teacher, point_teacher
from tiny import point_batch as tiny_point_batch

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def disback(teacher: Denoiser, path_dir: Path, seed: int = 0, dmd2: dict | None = None, **cfg) -> DisBackMethod:
    cfg.setdefault("record_checkpoints", 3)
    cfg.setdefault("record_every", 4)
    cfg.setdefault("record_lr", 1e-2)  # big steps: consecutive checkpoints clearly differ
    cfg.setdefault("loop", LoopConfig(batch_size=16, progress=False))
    if cfg.get("base", "dmd2") == "dmd2":
        cfg["dmd2"] = dmd2 or {"gan": False}
    torch.manual_seed(seed)
    return DisBackMethod(teacher, DisBackConfig(path_dir=str(path_dir), **cfg))


def point_batch(n: int = 16, seed: int = 0) -> Batch:
    return tiny_point_batch(n, seed)


def net_state(den: Denoiser) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in den.net.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def grid25_teacher() -> Denoiser:
    from fewstep import zoo
    from fewstep.api import load_teacher

    if not zoo.zoo_path("grid25").with_suffix(".safetensors").is_file():
        pytest.skip("the embedded grid25 teacher is not built")
    return load_teacher("grid25")


# ------------------------------------------------------------------------------------------------------------------
# 1. The degradation path
# ------------------------------------------------------------------------------------------------------------------
def test_recorded_path_degrades_from_teacher_to_initial_generator(tmp_path):
    """Along D^(0..N) the denoising loss rises on teacher samples and falls on initial-generator samples."""
    teacher = grid25_teacher()
    ts = student_timesteps(teacher.schedule, 1)
    settings = RecordSettings(checkpoints=4, every=10, lr=1e-3, batch_size=256)
    path = record_degradation_path(teacher, teacher, ts, settings, tmp_path)
    assert path.recorded and path.checkpoints == 4
    assert path.dir == tmp_path / path.key

    g = torch.Generator().manual_seed(5)
    n = 2048
    x_teacher = sample(teacher, torch.randn(n, 2, generator=g), 16, "ddim")
    x_generator = sample_student(teacher, torch.randn(n, 2, generator=g), ts)  # the initial generator = the teacher
    t = teacher.schedule.sample_train_t(n, generator=g)
    eps = torch.randn(n, 2, generator=g)
    probe = copy.deepcopy(teacher)
    on_teacher, on_generator = [], []
    for k in range(path.checkpoints + 1):
        path.load_into(probe, k)
        with torch.no_grad():
            on_teacher.append(probe.denoising_loss(x_teacher, t, eps).mean().item())
            on_generator.append(probe.denoising_loss(x_generator, t, eps).mean().item())
    assert all(a < b for a, b in zip(on_teacher, on_teacher[1:])), on_teacher
    assert all(a > b for a, b in zip(on_generator, on_generator[1:])), on_generator
    # D^(0) is the teacher, bit for bit
    assert_same_state(path.state(0), teacher.net.state_dict())


def test_path_files_are_safetensors_and_loadable_teachers(tmp_path):
    from fewstep.api import load_teacher

    teacher = point_teacher()
    ts = student_timesteps(teacher.schedule, 2)
    path = record_degradation_path(teacher, teacher, ts, RecordSettings(2, 3, 1e-2, 8), tmp_path)
    info = json.loads((path.dir / "path.json").read_text())
    assert info["key"] == path.key and info["checkpoints"] == 2 and len(info["recording_loss"]) == 2
    assert info["files"] == ["step_001.safetensors", "step_002.safetensors"]
    assert not list(path.dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    for k in (1, 2):
        loaded = load_teacher(path.file(k))
        assert_same_state(loaded.net.state_dict(), load_file(str(path.file(k))))
    # the teacher itself is never touched
    assert not any(p.grad is not None for p in teacher.parameters())


def test_cache_is_reused_and_invalidated(tmp_path):
    teacher = point_teacher()
    ts = student_timesteps(teacher.schedule, 1)
    settings = RecordSettings(2, 3, 1e-2, 8)
    first = record_degradation_path(teacher, teacher, ts, settings, tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}

    again = record_degradation_path(teacher, teacher, ts, settings, tmp_path)
    assert first.recorded and not again.recorded
    assert again.dir == first.dir
    assert {p.name: p.stat().st_mtime_ns for p in again.dir.iterdir()} == mtimes  # nothing rewritten

    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight differs
    changed = record_degradation_path(other, other, ts, settings, tmp_path)
    assert changed.recorded and changed.key != first.key
    # the generator, its timesteps and every recording setting are in the key too
    keys = {first.key, changed.key,
            path_key(teacher, other, ts, settings),
            path_key(teacher, teacher, student_timesteps(teacher.schedule, 2), settings),
            path_key(teacher, teacher, ts, RecordSettings(2, 3, 1e-2, 8, seed=1)),
            path_key(teacher, teacher, ts, RecordSettings(3, 3, 1e-2, 8))}
    assert len(keys) == 6
    # an unfinished recording (no manifest) is not a cache hit
    (first.dir / "path.json").unlink()
    assert open_degradation_path(tmp_path, first.key, teacher) is None
    assert record_degradation_path(teacher, teacher, ts, settings, tmp_path).recorded


def test_second_run_reuses_the_path_without_retraining(tmp_path):
    teacher = point_teacher()
    m1 = disback(teacher, tmp_path / "cache")
    m1.to("cpu")
    assert m1.path.recorded
    m2 = disback(teacher, tmp_path / "cache", seed=1, loop=LoopConfig(batch_size=16, seed=3, progress=False))
    m2.to("cpu")
    assert not m2.path.recorded and m2.path.dir == m1.path.dir  # another distillation seed, the same path
    m3 = disback(point_teacher(seed=1), tmp_path / "cache")
    m3.to("cpu")
    assert m3.path.recorded and m3.path.key != m1.path.key


# ------------------------------------------------------------------------------------------------------------------
# 2. Backtracking
# ------------------------------------------------------------------------------------------------------------------
def test_backtrack_order_and_count_switching():
    b = Backtrack(checkpoints=4, every=3)
    assert b.order() == [3, 2, 1, 0]
    seen = []
    for it in range(16):
        b.advance(it)
        seen.append(b.target_index)
    assert seen == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert b.switches == [(3, 1), (6, 2), (9, 3)]  # every stage is reached, the teacher kept to the end
    # a jump (a resumed loop, a caller skipping iterations) lands on the stage the iteration belongs to
    j = Backtrack(checkpoints=4, every=3)
    j.advance(7)
    assert j.stage == 2 and j.stage_start == 6


def test_backtrack_threshold_switching():
    b = Backtrack(checkpoints=3, every=None, threshold=1.0, window=2)
    assert not b.advance(0)
    b.observe(3.0)
    b.observe(0.5)  # mean 1.75: stay
    assert not b.advance(1) and b.stage == 0
    b.observe(0.9)  # last two: 0.5, 0.9 -> 0.7 < 1
    assert b.advance(2) and b.stage == 1 and b.stage_start == 2 and b.recent == []
    b.observe(0.1)  # one value: the window is not full yet
    assert not b.advance(3)
    b.observe(0.1)
    assert b.advance(4) and b.stage == 2 and b.final
    b.observe(0.0)
    b.observe(0.0)
    assert not b.advance(5) and b.stage == 2
    # count and threshold together: whichever comes first
    both = Backtrack(checkpoints=3, every=10, threshold=1.0, window=1)
    both.observe(0.5)
    assert both.advance(1) and both.stage == 1 and both.stage_start == 1
    assert not both.advance(10) and both.advance(11) and both.stage == 2


def test_every_switch_loads_the_intended_checkpoint(tmp_path):
    teacher = point_teacher()
    teacher_before = net_state(teacher)
    m = disback(teacher, tmp_path, record_checkpoints=3, switch_every=2, switch_unit="iterations",
                dmd2={"gan": False, "guidance_scale": 1.0})
    m.to("cpu")
    n = m.path.checkpoints
    files = {k: load_file(str(m.path.file(k))) for k in range(1, n + 1)}
    files[0] = teacher_before
    assert all(states_differ(files[k], files[k + 1]) for k in range(n))  # the test can tell them apart
    # the wrapped method's real score is the one frozen target copy, not the teacher
    assert m.base.teacher is m.target and m.base.real is m.target and m.target is not teacher
    assert not any(p.requires_grad for p in m.target.parameters())
    # the fake score starts from D^(N)
    fake = _unwrap(m.players["guidance"].module).fake
    assert_same_state(fake.net.state_dict(), files[n])

    loaded = []
    for it in range(9):
        m.updates(it)
        k = m.backtrack.target_index
        assert_same_state(m.target.net.state_dict(), files[k])
        loaded.append(k)
    assert loaded == [2, 2, 1, 1, 0, 0, 0, 0, 0]  # D^(N-1), ..., D^(0) = the teacher
    assert_same_state(net_state(teacher), teacher_before)  # never modified


def test_cfg_real_score_wraps_the_target_and_the_null_class_degrades(tmp_path):
    def build(dropout: float, path: Path) -> DisBackMethod:
        m = disback(image_teacher(), path, record_checkpoints=2, record_every=2, switch_every=1,
                    record_batch_size=32, record_label_dropout=dropout, dmd2={"gan": False, "guidance_scale": 2.0},
                    loop=LoopConfig(batch_size=4, progress=False))
        m.to("cpu")
        return m

    m = build(0.5, tmp_path / "a")
    assert isinstance(m.base.real, CFGDenoiser) and m.base.real.denoiser is m.target
    m.updates(0)
    assert_same_state(m.target.net.state_dict(), load_file(str(m.path.file(1))))
    # CFG's unconditional branch degrades too: the null class's embedding (row num_classes) is trained on the
    # generator's samples when labels are dropped, and untouched when they never are
    null_row = lambda state: state["embed.class_emb.weight"][10]  # noqa: E731
    teacher_null = null_row(m.path.state(0))
    assert not torch.equal(null_row(m.path.state(2)), teacher_null)
    kept = build(0.0, tmp_path / "b")
    assert torch.equal(null_row(kept.path.state(2)), teacher_null)
    assert not torch.equal(kept.path.state(2)["embed.class_emb.weight"][:10], m.path.state(0)["embed.class_emb.weight"][:10])


def test_dm_loss_measures_the_current_target(tmp_path):
    m = disback(point_teacher(), tmp_path, record_checkpoints=2, switch_every=3, dmd2={"gan": False, "ttur": 1})
    m.to("cpu")
    fake = _unwrap(m.players["guidance"].module).fake
    batch = point_batch()
    m.updates(0)
    torch.manual_seed(0)
    _, stats = m.loss("generator", batch, 0)
    assert stats["stage"] == 0.0 and stats["score_mismatch"] > 0  # target D^(1), fake D^(2)
    m.path.load_into(fake, 1)  # the fake equal to the current target: no mismatch, no gradient
    torch.manual_seed(0)
    loss, stats = m.loss("generator", batch, 0)
    assert float(stats["score_mismatch"]) == 0.0 and float(stats["dm"]) == 0.0
    for it in range(1, 4):
        m.updates(it)
    torch.manual_seed(0)
    _, stats = m.loss("generator", batch, 3)
    assert stats["stage"] == 1.0 and stats["score_mismatch"] > 0  # now against the teacher


def test_threshold_switching_in_the_method(tmp_path):
    m = disback(point_teacher(), tmp_path, record_checkpoints=3, switch_every=None, switch_threshold=1e9,
                switch_window=2, dmd2={"gan": False, "ttur": 1})
    m.to("cpu")
    batch = point_batch()
    stages = []
    for it in range(7):
        for player in m.updates(it):
            m.loss(player, batch, it)
        stages.append(m.backtrack.stage)
    # a generator update every iteration; two measured mismatches fill the window, then the next iteration switches
    assert stages == [0, 0, 1, 1, 2, 2, 2]
    assert_same_state(m.target.net.state_dict(), m.path.state(0))
    never = disback(point_teacher(), tmp_path, record_checkpoints=3, switch_every=None, switch_threshold=1e-12,
                    switch_window=1, dmd2={"gan": False, "ttur": 1})
    never.to("cpu")
    for it in range(4):
        for player in never.updates(it):
            never.loss(player, batch, it)
    assert never.backtrack.stage == 0


def test_resume_restores_the_stage(tmp_path):
    teacher = point_teacher()
    m = disback(teacher, tmp_path, record_checkpoints=4, switch_every=2, switch_unit="iterations")
    m.to("cpu")
    for it in range(5):
        m.updates(it)
    assert m.backtrack.stage == 2
    state = m.extra_state()
    # through a checkpoint file, as the loop saves it (tensors and plain values only)
    buf = tmp_path / "state.pt"
    torch.save(state, buf)
    state = torch.load(buf, weights_only=True)

    again = disback(teacher, tmp_path, record_checkpoints=4, switch_every=2, switch_unit="iterations")
    again.to("cpu")
    assert not again.path.recorded and again.backtrack.stage == 0
    again.load_extra_state(state)
    assert again.backtrack.stage == 2 and again.backtrack.stage_start == 4
    assert_same_state(again.target.net.state_dict(), load_file(str(again.path.file(1))))
    again.updates(5)
    assert again.backtrack.stage == 2  # the stage began at 4: it moves on at 6
    again.updates(6)
    assert again.backtrack.stage == 3
    # a checkpoint made along another path is refused
    other = disback(point_teacher(seed=2), tmp_path, record_checkpoints=4, switch_every=2, switch_unit="iterations")
    with pytest.raises(UserError, match="degradation path"):
        other.load_extra_state(state)


def test_switches_count_generator_updates(tmp_path):
    teacher = point_teacher()

    def switches(m, its, start=0):
        for it in range(start, its):
            m.updates(it)
        return [s for s in m.backtrack.switches]

    # ttur 5: the generator updates at iterations 0, 5, 10, ...; a switch every 3 of its updates is one at 15, 30, 45
    m = disback(teacher, tmp_path, record_checkpoints=4, switch_every=3, dmd2={"gan": False, "ttur": 5})
    m.to("cpu")
    assert switches(m, 60) == [(15, 1), (30, 2), (45, 3)] and m.generator_updates == 12
    # the iteration form: every 3 iterations
    it_form = disback(teacher, tmp_path, record_checkpoints=4, switch_every=3, switch_unit="iterations",
                      dmd2={"gan": False, "ttur": 5})
    it_form.to("cpu")
    assert switches(it_form, 60) == [(3, 1), (6, 2), (9, 3)]
    # resume-safe: the count is the method's own, from its checkpointed state (stopped at 22: 5 updates, stage 1)
    first = disback(teacher, tmp_path, record_checkpoints=4, switch_every=3, dmd2={"gan": False, "ttur": 5})
    first.to("cpu")
    switches(first, 22)
    state = torch.load(_saved(first.extra_state(), tmp_path), weights_only=True)
    assert state["disback"]["generator_updates"] == 5 and state["disback"]["stage"] == 1
    again = disback(teacher, tmp_path, record_checkpoints=4, switch_every=3, dmd2={"gan": False, "ttur": 5})
    again.to("cpu")
    again.load_extra_state(state)
    assert switches(again, 60, start=22) == [(30, 2), (45, 3)]
    with pytest.raises(UserError, match="switch_unit: generator_updates"):
        it_form.load_extra_state(state)


def _saved(state: dict, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_the_generator_warm_up_against_the_first_switch(tmp_path):
    from fewstep.methods.disback import generator_warmup_updates

    cfg = lambda **kw: DisBackConfig(**{"dmd2": {"gan": False, **kw}}).dmd2  # noqa: E731
    assert generator_warmup_updates(cfg(warmup_iterations=20, warmup_unit="updates")) == 20
    assert generator_warmup_updates(cfg(warmup_iterations=21, warmup_unit="iterations", ttur=5)) == 5
    with pytest.warns(UserWarning, match="warm-up .20 of its updates. lasts past the first switch .12"):
        disback(point_teacher(), tmp_path, switch_every=12, dmd2={"gan": False, "warmup_iterations": 20})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        disback(point_teacher(), tmp_path, switch_every=20, dmd2={"gan": False, "warmup_iterations": 20})
        # the iteration form: 100 iterations at ttur 5 are 20 generator updates
        disback(point_teacher(), tmp_path, switch_every=100, switch_unit="iterations",
                dmd2={"gan": False, "warmup_iterations": 20, "ttur": 5})


def test_init_generator_starts_from_a_trained_student(tmp_path):
    from fewstep.student import Student, save_student

    teacher = point_teacher()
    trained = point_teacher(seed=7)  # the same architecture, other weights: "a trained student"
    run = tmp_path / "run"
    run.mkdir()
    save_student(Student(trained, [999.0]), run / "student")
    plain = disback(teacher, tmp_path / "paths", dmd2={"gan": False})
    for source in (run, run / "student.safetensors"):
        m = disback(teacher, tmp_path / "paths", init_generator=str(source), dmd2={"gan": False})
        gen = _unwrap(m.players["generator"].module).denoiser
        assert_same_state(net_state(gen), net_state(trained))
        assert_same_state(net_state(m.initial_generator), net_state(trained))  # the path is recorded towards it
        assert m.key != plain.key
    assert_same_state(net_state(teacher), net_state(point_teacher()))  # the teacher is untouched
    m.to("cpu")
    assert states_differ(load_file(str(m.path.file(1))), net_state(teacher))
    # the wrong architecture or a missing file: one line naming the problem
    other = tmp_path / "other"
    other.mkdir()
    save_student(Student(image_teacher(), [999.0]), other / "student")
    with pytest.raises(UserError, match="does not fit the generator") as e:
        disback(teacher, tmp_path / "paths", init_generator=str(other), dmd2={"gan": False})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        disback(teacher, tmp_path / "paths", init_generator=str(tmp_path / "nowhere"), dmd2={"gan": False})


def test_add_base_swaps_its_distillation_teacher(tmp_path):
    pytest.importorskip("fewstep.methods.add")
    teacher = point_teacher()
    m = disback(teacher, tmp_path, dmd2=None, base="add", switch_every=1, record_checkpoints=2)
    assert m.base.teacher is m.target and m.target is not teacher
    if m.base.features is not None and hasattr(m.base.features, "denoiser"):
        assert m.base.features.denoiser is teacher  # the discriminator's features keep the real teacher
    m.to("cpu")
    assert "guidance" not in m.players
    batch = point_batch()
    for it in range(3):
        for player in m.updates(it):
            _, stats = m.loss(player, batch, it)
        assert_same_state(m.target.net.state_dict(), m.path.state(m.backtrack.target_index))
    assert stats["stage"] == 1.0 and "score_mismatch" in stats and "distill_mse" in stats


# ------------------------------------------------------------------------------------------------------------------
# 3. The config
# ------------------------------------------------------------------------------------------------------------------
def test_config_shared_fields_and_base_sections():
    cfg = DisBackConfig(teacher="grid25", steps=2, loop=LoopConfig(iterations=7))
    assert cfg.dmd2 is not None and cfg.add is None
    assert (cfg.dmd2.teacher, cfg.dmd2.steps, cfg.dmd2.loop.iterations) == ("grid25", 2, 7)
    dumped = cfg.model_dump(mode="json")
    assert "steps" not in dumped["dmd2"] and "loop" not in dumped["dmd2"]
    assert DisBackConfig.model_validate(dumped) == cfg  # the resolved config.yaml reads back the same
    with pytest.raises(UserError, match="dmd2.steps: set `steps` at the top level"):
        validate_config(DisBackConfig, {"dmd2": {"steps": 2}})
    with pytest.raises(UserError, match="base is 'dmd2'"):
        validate_config(DisBackConfig, {"add": {}})
    with pytest.raises(UserError, match="switch_every or switch_threshold"):
        validate_config(DisBackConfig, {"switch_every": None})
    with pytest.raises(UserError, match="nope"):
        validate_config(DisBackConfig, {"nope": 1})
    for name in ("digits", "grid25"):
        data = yaml.safe_load((ROOT / "configs" / f"disback_{name}.yaml").read_text())
        shipped = validate_config(DisBackConfig, data, name)
        assert shipped.teacher == name and shipped.base == "dmd2"
        dmd2 = yaml.safe_load((ROOT / "configs" / f"dmd2_{name}.yaml").read_text())
        # the same DMD2 as the plain DMD2 config, so the two compare like for like
        assert {k: v for k, v in dmd2.items() if k not in ("method", "teacher", "data", "steps", "loop")} == \
            data["dmd2"]


# ------------------------------------------------------------------------------------------------------------------
# 4. End to end: fewstep.distill with the method registered for the test
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def registered(monkeypatch):
    """``disback`` in the method registry, and the loop telling the method its run directory (the wiring the lead
    adds to fewstep/methods/__init__.py and fewstep/train/loop.py)."""
    import fewstep.distillation as distillation
    import fewstep.train.loop as loop

    base_registry = distillation.registry
    monkeypatch.setattr(distillation, "registry",
                        lambda: {**base_registry(), "disback": (DisBackConfig, DisBackMethod)})
    monkeypatch.setattr(distillation, "METHODS", (*distillation.METHODS, "disback"))
    real_train = loop.train

    def train(method, dataset, cfg, run_dir, *args, **kwargs):
        method.run_dir = Path(run_dir)
        return real_train(method, dataset, cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(loop, "train", train)


def test_distill_end_to_end(tmp_path, registered):
    from fewstep.distillation import distill
    from fewstep.train import list_checkpoints, read_metrics

    grid25_teacher()
    out = tmp_path / "run"
    common = dict(teacher="grid25", method="disback", out=out, batch_size=32, log_every=2, sample_every=0,
                  checkpoint_every=6, progress=False, record_checkpoints=3, record_every=3, switch_every=2,
                  dmd2={"ttur": 2})
    distill(steps=1, iterations=12, evaluate_n=100, **common)

    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "student.json", "eval.json", "report.html",
                 "degradation_path.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in list_checkpoints(out)] == ["step_00000006.pt", "step_00000012.pt"]
    pointer = json.loads((out / "degradation_path.json").read_text())
    path_dir = out / "degradation_path" / pointer["key"]
    assert Path(pointer["dir"]) == path_dir.resolve() and pointer["recorded_by_this_run"]
    assert sorted(p.name for p in path_dir.glob("*.safetensors")) == [f"step_00{k}.safetensors" for k in (1, 2, 3)]
    assert (path_dir / "path.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"] == "disback" and resolved["data"] == "grid25" and "loop" not in resolved["dmd2"]

    rows = read_metrics(out / "metrics.jsonl")
    gen_rows = [r for r in rows if "generator/score_mismatch" in r]
    assert gen_rows and all("generator/stage" in r for r in gen_rows)
    # one generator update per logged window (ttur 2, log_every 2); the target moves every 2 generator updates, i.e.
    # every 4 iterations (the resumed run below counts them across the stop at 6 from the checkpointed counter)
    assert [r["generator/stage"] for r in gen_rows] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    report = (out / "report.html").read_text()
    assert "generator/score_mismatch" in report and "generator/stage" in report
    assert (out / "curves" / "generator_stage.png").is_file()

    # resume: a run stopped at 6 and resumed to 12 equals the uninterrupted one, stage included
    out2 = tmp_path / "resumed"
    distill(steps=1, iterations=6, evaluate_n=0, **{**common, "out": out2})
    distill(steps=1, iterations=12, evaluate_n=0, resume=True, **{**common, "out": out2})
    assert not json.loads((out2 / "degradation_path.json").read_text())["recorded_by_this_run"]
    a, b = load_file(str(out / "student.safetensors")), load_file(str(out2 / "student.safetensors"))
    assert_same_state(a, b)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in read_metrics(out2 / "metrics.jsonl")] == [strip(r) for r in rows]


def test_distill_shares_a_path_cache(tmp_path, registered):
    from fewstep.distillation import distill

    grid25_teacher()
    cache = tmp_path / "cache"
    common = dict(teacher="grid25", method="disback", batch_size=16, iterations=2, log_every=1, sample_every=0,
                  progress=False, evaluate_n=0, record_checkpoints=2, record_every=2, path_dir=str(cache))
    distill(out=tmp_path / "a", **common)
    files = sorted(cache.glob("*/*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    distill(out=tmp_path / "b", seed=1, **common)
    assert sorted(cache.glob("*/*.safetensors")) == files and [p.stat().st_mtime_ns for p in files] == mtimes
    assert not (tmp_path / "a" / "degradation_path").exists()
    first = json.loads((tmp_path / "a" / "degradation_path.json").read_text())
    second = json.loads((tmp_path / "b" / "degradation_path.json").read_text())
    assert first["recorded_by_this_run"] and not second["recorded_by_this_run"]
    assert first["dir"] == second["dir"]


def test_distill_from_a_dmd2_run_directory(tmp_path, registered):
    from fewstep.distillation import distill
    from fewstep.train import read_metrics

    grid25_teacher()
    small = dict(teacher="grid25", batch_size=16, iterations=2, log_every=1, sample_every=0, progress=False,
                 evaluate_n=0)
    distill(method="dmd2", out=tmp_path / "dmd2", **small)
    out = tmp_path / "disback"
    distill(method="disback", out=out, record_checkpoints=2, record_every=2, init_generator=str(tmp_path / "dmd2"),
            **small)
    pointer = json.loads((out / "degradation_path.json").read_text())
    path = json.loads((Path(pointer["dir"]) / "path.json").read_text())
    trained = load_file(str(tmp_path / "dmd2" / "student.safetensors"))
    assert path["generator_sha256"] == state_hash(trained)  # the path was recorded towards the DMD2 student
    assert read_metrics(out / "metrics.jsonl")
    with pytest.raises(UserError, match="init_generator: .* does not fit the generator"):  # a digits student
        distill(method="disback", out=tmp_path / "bad", record_checkpoints=2, record_every=2,
                init_generator=str(tmp_path / "dmd2"), **{**small, "teacher": "digits"})


def test_a_text_to_image_recording_uses_the_data_prompts_with_dropout_in_bf16(tmp_path, monkeypatch):
    """On a tiny SD pipeline: the recording draws the data's prompts (the generator samples with them), trains the
    copy on them and, at record_label_dropout, on the empty prompt, under bf16 autocast with gradient checkpointing;
    both the conditional and the unconditional output of the recorded checkpoint move away from the teacher's."""
    hf_tiny = pytest.importorskip("hf_tiny")
    from fewstep.models.hf import load_diffusers

    hf_tiny.sd_pipeline(tmp_path / "sd")
    teacher = load_diffusers(tmp_path / "sd").eval()
    bank = teacher.components.prompt_bank(["a red square", "a blue circle", "a green thing"])
    seen = []
    real = Denoiser.denoising_loss

    def spy(self, x0, t, eps, cond=None):
        seen.append((cond, torch.is_autocast_enabled("cpu"), self.net.model.is_gradient_checkpointing))
        return real(self, x0, t, eps, cond)

    monkeypatch.setattr(Denoiser, "denoising_loss", spy)
    settings = RecordSettings(checkpoints=1, every=4, lr=1e-3, batch_size=8, label_dropout=0.5,
                              mixed_precision="bf16", gradient_checkpointing=True)
    path = record_degradation_path(teacher, copy.deepcopy(teacher), student_timesteps(teacher.schedule, 1),
                                   settings, tmp_path / "paths")
    assert len(seen) == 4 and all(autocast and gc for _, autocast, gc in seen)
    rows = {tuple(v.flatten().tolist()) for v in bank.table["encoder_hidden_states"]}
    null = tuple(teacher.null_cond(1)["encoder_hidden_states"].flatten().tolist())
    drawn = [tuple(c["encoder_hidden_states"][i].flatten().tolist()) for c, _, _ in seen for i in range(8)]
    assert set(drawn) <= rows | {null} and len(set(drawn) & rows) >= 2 and null in drawn  # prompts, and dropped ones
    assert not teacher.net.model.is_gradient_checkpointing  # only the recording's copy recomputes
    deg = copy.deepcopy(teacher)
    path.load_into(deg, 1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    cond = teacher.prompt_lookup(torch.tensor([0, 1]))
    with torch.no_grad():
        for c in (cond, teacher.null_cond(cond)):
            assert (deg(x, t, c) - teacher(x, t, c)).abs().max() > 1e-3
    # another prompt bank is another path
    teacher.components.prompt_bank(["something else"])
    assert path_key(teacher, teacher, student_timesteps(teacher.schedule, 1), settings) != path.key


def test_recording_settings_follow_the_loop_and_a_lora_rate_is_refused(tmp_path):
    from fewstep.methods.disback import DisBackConfig

    with pytest.raises(Exception, match="record_lr: set it explicitly"):
        DisBackConfig(dmd2={"lora_rank": 4})
    cfg = DisBackConfig(record_lr=5e-7, dmd2={"lora_rank": 4}, record_weight_decay=0.01, record_warmup=500,
                        loop={"mixed_precision": "bf16", "gradient_checkpointing": True})
    m = DisBackMethod(image_teacher(), cfg)
    s = m.settings
    assert (s.lr, s.weight_decay, s.warmup, s.mixed_precision, s.gradient_checkpointing) == \
        (5e-7, 0.01, 500, "bf16", True)
    m = DisBackMethod(image_teacher(), DisBackConfig(record_mixed_precision="no", record_gradient_checkpointing=False,
                                                     loop={"mixed_precision": "bf16", "gradient_checkpointing": True}))
    assert (m.settings.mixed_precision, m.settings.gradient_checkpointing) == ("no", False)


def test_the_recording_runs_before_the_wrapped_method_is_moved_to_the_device(tmp_path, monkeypatch):
    """Only the recording's own copy and the initial generator are on the GPU while it records: the wrapped method and
    the target copy move after it."""
    import fewstep.methods.disback as disback_module

    m = disback(point_teacher(), tmp_path, record_checkpoints=1, record_every=1)
    order = []
    real_record = disback_module.record_degradation_path
    monkeypatch.setattr(disback_module, "record_degradation_path",
                        lambda *a, **k: (order.append("record"), real_record(*a, **k))[1])
    monkeypatch.setattr(m.base, "to", lambda device: order.append("base") or m.base)
    real_target_to = m.target.to
    monkeypatch.setattr(m.target, "to", lambda *a, **k: (order.append("target"), real_target_to(*a, **k))[1])
    m.to("cpu")
    assert order == ["record", "base", "target"]


def test_a_per_step_fake_score_starts_from_the_paths_end_at_every_step(tmp_path):
    """DisBack around a 2-step DMD2 (per-step fake score): D^(N) goes into the trunk in place (the optimizer keeps
    the trained weights it holds) and every step's adapter is reset, so each step's fake score is D^(N)."""
    from fewstep.models.lora import active_adapters

    m = disback(point_teacher(), tmp_path, record_checkpoints=2, steps=2, dmd2={"gan": False, "ttur": 1})
    guidance = _unwrap(m.players["guidance"].module)
    fake = guidance.fake
    held = {id(q) for g in m.players["guidance"].optimizer.param_groups for q in g["params"]}
    with torch.no_grad():  # adapters away from zero, as after training: the load must reset them
        for name, p in fake.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    m.to("cpu")
    assert m.base.per_step
    assert {id(q) for q in fake.parameters() if q.requires_grad} <= held  # the same parameter objects
    end = Denoiser(copy.deepcopy(point_teacher().net), fake.schedule, fake.prediction_type, fake.sample_shape)
    m.path.load_into(end, m.path.checkpoints)
    x, t = torch.randn(8, 2), torch.full((8,), 500.0)
    for i in (1, 2):
        with active_adapters(fake, [f"step{i}"]):
            assert torch.equal(fake(x, t), end(x, t))


def test_the_gan_head_recorded_along_the_path_is_restored_bit_for_bit_at_each_switch(tmp_path):
    """head_along_path: the recording trains a copy of DMD2's head with D_deg and saves head^(k) beside D^(k); the
    run starts the head from head^(N) and every switch to D^(k) loads head^(k) exactly, while the head trains in
    between (a guidance step changes it; an iteration without a switch keeps the trained weights)."""
    teacher = point_teacher()
    dmd2 = {"gan": True, "guidance_scale": 1.0, "gan_head_weight": 1.0}
    m = disback(teacher, tmp_path, record_checkpoints=3, switch_every=2, switch_unit="iterations",
                head_along_path=True, dmd2=dmd2)
    head = _unwrap(m.players["guidance"].module).head
    built = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(UserError, match="real data"):
        m.prepare()  # no data given
    m.dataset = type("Data", (), {"x": torch.randn(64, 2), "labels": None})()
    m.to("cpu")
    plain = disback(point_teacher(), tmp_path, record_checkpoints=3, switch_every=2, switch_unit="iterations",
                    dmd2=dmd2)
    assert m.key != plain.key and m.path.info["gan_head"]  # the head's recording is part of the path's key
    n = m.path.checkpoints
    heads = {k: load_file(str(m.path.head_file(k))) for k in range(n + 1)}
    assert_same_state(heads[0], built)  # head^(0): the head as built
    assert all(states_differ(heads[k], heads[k + 1]) for k in range(n))  # the recording trained it
    assert_same_state(head.state_dict(), heads[n])  # the run starts from head^(N), with the fake score at D^(N)

    player = m.players["guidance"]
    for it in range(6):
        before = {k: v.clone() for k, v in head.state_dict().items()}
        m.updates(it)
        if it in (2, 4):  # the switches to D^(1) and D^(0)
            assert_same_state(head.state_dict(), heads[m.backtrack.target_index])
        else:
            assert_same_state(head.state_dict(), before)
        now = {k: v.clone() for k, v in head.state_dict().items()}
        loss, _ = m.loss("guidance", point_batch(), it)
        player.optimizer.zero_grad()
        loss.backward()
        player.optimizer.step()
        assert states_differ(head.state_dict(), now)  # the head trains between switches
    assert m.head_restores == [n, 1, 0]
    with pytest.raises(ValueError, match="head_along_path"):
        DisBackConfig(head_along_path=True, dmd2={"gan": False})
