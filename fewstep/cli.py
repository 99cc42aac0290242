"""The ``fewstep`` command. Thin: it parses, validates, and calls the Python API.

Every user error (unknown name, bad number, existing --out, unreadable file) ends as one line on stderr and exit
status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .methods import METHOD_NAMES
from .options import (CLASSIFIER, EXPORT_FORMATS, MAX_BATCH_SIZE, MAX_ITERATIONS, MAX_RESOLUTION, MAX_STUDENT_STEPS,
                      SAMPLERS, TEACHERS, check_cfg_scale, check_seed, whole_number)

# Building the parser imports no torch (fewstep/options.py holds the names it offers): `fewstep --help` answers at once.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default; an option whose default is None says in its help what it falls back
    to, and a flag is off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``fewstep: error: ...``) and exit status 2, and help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)  # "argument --n: --n must ..." -> "--n must ..."
        sys.stderr.write(f"fewstep: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _version() -> str:
    """The installed distribution's version, else the package's own (a source tree on sys.path)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fewstep")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _argument(check: Any, *args: Any, number: type = int):
    """An argparse type: ``number(value)`` (the raw string when it does not parse) through ``check(value, *args)``
    of fewstep/options.py, its UserError as argparse's one-line error."""

    def parse(value: str) -> Any:
        try:
            parsed: Any = number(value)
        except ValueError:
            parsed = value
        try:
            return check(parsed, *args)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _positive_int(name: str, most: int | None = None):
    """An argparse type: a whole number from 1 to ``most``."""
    return _argument(whole_number, name, 1, most)


def _seed(name: str = "--seed"):
    return _argument(check_seed, name)


def _scale(name: str):
    """An argparse type: a guidance scale, finite and at least 0."""
    return _argument(check_cfg_scale, name, number=float)


def _new_path(value: str) -> Path:
    """``--out`` that does not exist yet, in a place where it can be written (checked now, not after the work)."""
    from .io import check_writable

    p = Path(value)
    if p.exists():
        raise argparse.ArgumentTypeError(f"{p} already exists; choose a new --out (results are never overwritten)")
    try:
        return check_writable(p)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _new_picture(value: str) -> Path:
    """``sample``'s ``--out``: a new picture file (its suffix picks the format), or a folder (``DIR/``, or a ``DIR``
    that exists) to write ``DIR/samples.png`` into."""
    if value.endswith(("/", os.sep)) or Path(value).is_dir():
        value = str(Path(value) / "samples.png")
    return _new_path(value)


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value


def _is_main_process() -> bool:
    """False on the other processes of an ``accelerate launch`` (they share the main process's results)."""
    import os

    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:  # not launched: no need to start Accelerate
        return True
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _say(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main process only: under ``accelerate launch`` a message appears once, not once a process."""
    if _is_main_process():
        print(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fewstep", description="Distill diffusion teachers into few-step generators.")
    p.add_argument("--version", action="version", version=f"fewstep {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    teachers = ", ".join(TEACHERS)

    # fewstep teacher train | sample
    teacher = sub.add_parser("teacher", help="train or sample a teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True, parser_class=_Parser)
    tt = tsub.add_parser("train", help="train a teacher diffusion model")
    tt.add_argument("--data", default=None, help="embedded name (digits, grid25, ...), an image folder or a .npy/.csv "
                    "(default: the config's, else digits)")
    tt.add_argument("--out", required=True, help="run directory (must not exist unless --resume or --restart)")
    tt.add_argument("--config", default=None, help="a YAML TeacherConfig (default: the preset for --data)")
    tt.add_argument("--iterations", type=_positive_int("--iterations", MAX_ITERATIONS), default=None,
                    help="training iterations (default: the config's loop.iterations)")
    tt.add_argument("--batch-size", type=_positive_int("--batch-size", MAX_BATCH_SIZE), default=None,
                    help="training batch (default: the config's loop.batch_size)")
    tt.add_argument("--resolution", type=_positive_int("--resolution", MAX_RESOLUTION), default=None,
                    help="image side in pixels (default: the config's, else the data's own)")
    tt.add_argument("--seed", type=_seed(), default=None, help="seed of every draw (default: the config's loop.seed)")
    _run_dir_flags(tt)
    tt.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    ts = tsub.add_parser("sample", help="sample a teacher into a PNG grid (or a scatter plot for points)")
    ts.add_argument("--teacher", required=True, help="embedded name, run directory, saved model or diffusers folder")
    ts.add_argument("--steps", type=_positive_int("--steps"), default=32,
                    help="sampling steps (at most the teacher schedule's timesteps)")
    ts.add_argument("--sampler", default="heun", help=f"one of {', '.join(SAMPLERS)}")
    ts.add_argument("--n", type=_positive_int("--n"), default=64, help="samples in the grid")
    ts.add_argument("--cfg-scale", type=_scale("--cfg-scale"), default=1.0,
                    help="classifier-free guidance scale (1 = none, 0 = unconditional)")
    ts.add_argument("--seed", type=_seed(), default=0, help="seed of the initial noise")
    ts.add_argument("--out", type=_new_picture, required=True,
                    help="picture to write (must not exist): .png, .jpg, .webp or .pdf (points also .svg); or a "
                         "folder DIR/ for DIR/samples.png")
    ts.add_argument("--prompt", action="append", default=None,
                    help="text-to-image teachers: a prompt (repeat for more; one image each, --n is ignored; default: "
                         "--n images on the empty prompt)")

    # fewstep distill
    di = sub.add_parser("distill", help="distill a teacher into a few-step student")
    di.add_argument("--method", default=None,
                    help=f"one of {', '.join(METHOD_NAMES)} (default: the --config's method; with --resume, the "
                         "run's; else dmd2)")
    di.add_argument("--base", default=None,
                    help="disback: the score-distillation method it wraps, dmd2 or add (default: the config's, dmd2)")
    di.add_argument("--path-cache", default=None,
                    help="disback: a folder where degradation paths are shared (default: inside --out)")
    di.add_argument("--teacher", default=None,
                    help="embedded name, teacher run directory or local diffusers folder (default: the config's, "
                         "else digits)")
    di.add_argument("--data", default=None, help="real data (default: the teacher's training data)")
    di.add_argument("--steps", type=_positive_int("--steps", MAX_STUDENT_STEPS), default=None,
                    help=f"student steps, 1..{MAX_STUDENT_STEPS} (default: the config's, 1)")
    di.add_argument("--out", required=True, help="run directory (must not exist unless --resume or --restart)")
    di.add_argument("--config", default=None, help="a YAML config of the method (default: the method's defaults; "
                    "see configs/)")
    di.add_argument("--iterations", type=_positive_int("--iterations", MAX_ITERATIONS), default=None,
                    help="training iterations (default: the config's loop.iterations)")
    di.add_argument("--batch-size", type=_positive_int("--batch-size", MAX_BATCH_SIZE), default=None,
                    help="training batch (default: the config's loop.batch_size)")
    di.add_argument("--seed", type=_seed(), default=None, help="seed of every draw (default: the config's loop.seed)")
    di.add_argument("--guidance-scale", type=_scale("--guidance-scale"), default=None,
                    help="CFG scale on the teacher's score, at least 1 (default: the config's, 1 = none)")
    di.add_argument("--resolution", type=_positive_int("--resolution", MAX_RESOLUTION), default=None,
                    help="diffusers teachers: the image side in pixels to distil at (default: the model's own)")
    di.add_argument("--inception-weights", default=None, metavar="FILE",
                    help="images other than digits: Inception FID in report.html with this weights file "
                         "(pt_inception-2015-12-05-6726825d.pth; default $FEWSTEP_INCEPTION_WEIGHTS)")
    _run_dir_flags(di)
    di.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    # fewstep sample
    sa = sub.add_parser("sample", help="sample a distilled student (or a teacher) into a PNG")
    sa.add_argument("--student", required=True, help="a `fewstep distill` run directory (or any --model)")
    sa.add_argument("--n", type=_positive_int("--n"), default=64, help="samples in the grid")
    sa.add_argument("--seed", type=_seed(), default=0, help="seed of the initial noise")
    sa.add_argument("--out", type=_new_picture, required=True,
                    help="picture to write (must not exist): .png, .jpg, .webp or .pdf (points also .svg); or a "
                         "folder DIR/ for DIR/samples.png")
    sa.add_argument("--prompt", action="append", default=None,
                    help="text-to-image models: a prompt (repeat for more; one image each, --n is ignored; default: "
                         "--n images on the empty prompt)")

    # fewstep eval
    ev = sub.add_parser("eval", help="sample a model and measure it against held-out data")
    ev.add_argument("--model", required=True,
                    help="embedded teacher, teacher or distillation run directory, or a diffusers folder")
    ev.add_argument("--data", default=None, help="reference data (default: the model's training data)")
    ev.add_argument("--steps", type=_positive_int("--steps"), default=None,
                    help="sampling steps (default: teachers 32, at most their schedule's timesteps; students their "
                         "own)")
    ev.add_argument("--sampler", default="heun", help=f"teachers: one of {', '.join(SAMPLERS)}")
    ev.add_argument("--n", type=_positive_int("--n"), default=2000, help="samples to draw and measure")
    ev.add_argument("--cfg-scale", type=_scale("--cfg-scale"), default=1.0,
                    help="teachers: classifier-free guidance scale (1 = none, 0 = unconditional)")
    ev.add_argument("--seed", type=_seed(), default=0, help="seed of the initial noise")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--inception", action="store_true",
                    help="add Inception FID (weights: --inception-weights, $FEWSTEP_INCEPTION_WEIGHTS or the cache)")
    ev.add_argument("--inception-weights", default=None, metavar="FILE",
                    help="path of pt_inception-2015-12-05-6726825d.pth (default: $FEWSTEP_INCEPTION_WEIGHTS, else "
                         "~/.cache/fewstep/)")
    ev.add_argument("--patch-fid", action="store_true",
                    help="add patch FID: Inception FID on full-resolution centre crops (SDXL-Lightning's measure of "
                         "detail; the Inception weights as --inception)")
    ev.add_argument("--patch-size", type=_positive_int("--patch-size"), default=299,
                    help="side of patch FID's centre crops (299: Inception's input size)")
    ev.add_argument("--clip", nargs="?", const="", default=None, metavar="DIR",
                    help="add CLIP score (text-to-image models; needs --prompts) with this transformers CLIP folder "
                         "(default when no DIR is given: $FEWSTEP_CLIP_MODEL, else "
                         "~/.cache/fewstep/clip-vit-large-patch14)")
    ev.add_argument("--prompts", default=None, metavar="FILE",
                    help="text-to-image models: sample from these prompts (one a line, repeated to --n; default: "
                         "the empty prompt)")

    # fewstep demo
    de = sub.add_parser("demo", help="the embedded default end to end: teacher, samples, evaluation, report")
    de.add_argument("--text", action="store_true",
                    help="the text-to-image default instead: a one-step DMD2 student of the shipped shapes teacher "
                         "(prompts on all-MiniLM-L6-v2), adherence and FID, prompt-labelled sample grids")
    de.add_argument("--out", default=None, help="run directory (default: runs/demo, or runs/demo-N if taken; with "
                                                "--text runs/demo-text, or runs/demo-text-N)")
    de.add_argument("--n", type=_positive_int("--n"), default=None,
                    help="samples per evaluation (default: 1000; with --text 128, one per composition)")
    de.add_argument("--distill-iterations", type=_positive_int("--distill-iterations", MAX_ITERATIONS), default=None,
                    help="DMD2 iterations of the demo's student (default: 1500; with --text 800)")

    # fewstep export
    ex = sub.add_parser("export", help="export a student of a diffusers teacher: a diffusers pipeline or a LoRA")
    ex.add_argument("--student", required=True, help="the run directory of `fewstep distill`")
    ex.add_argument("--format", default="diffusers", help=f"one of {', '.join(EXPORT_FORMATS)}: diffusers (a "
                    "pipeline folder) or lora (LoRA weights for the teacher pipeline)")
    ex.add_argument("--out", required=True, type=_new_path, help="the folder to write (must not exist)")
    ex.add_argument("--rank", type=_positive_int("--rank"), default=64,
                    help="LoRA rank of the SVD extraction of a full-weight student (--format lora)")

    # fewstep bench
    be = sub.add_parser("bench", help="every method from the same teacher over seeds and steps: bench.json, one report")
    be.add_argument("--data", default="digits,grid25", help=f"embedded data sets, comma-separated ({teachers})")
    be.add_argument("--methods", default=",".join(METHOD_NAMES), help="distillation methods, comma-separated")
    be.add_argument("--steps", default="1,2,4", help=f"student steps, comma-separated (1..{MAX_STUDENT_STEPS})")
    be.add_argument("--seeds", default="3", help="training seeds: 0 .. SEEDS-1 (each also the evaluation seed)")
    be.add_argument("--out", default=None, help="bench folder: results, report and the cache of runs (an earlier "
                    "bench's folder is reused: finished runs are not trained again, an interrupted one resumes; "
                    "no default: required unless --tables)")
    be.add_argument("--iterations", default=None, help="override the configs' loop.iterations for quick runs "
                    "(default: each config's own)")
    be.add_argument("--n", default="2000", help="evaluation samples per model and seed")
    be.add_argument("--teacher-steps", default="1,2,4,8,16,32",
                    help="the teacher's frontier: every sampler at these steps")
    be.add_argument("--profile-steps", default="20", help="iterations profiled per method and steps for the step "
                    "efficiency column (after 5 unprofiled ones; 0: do not profile)")
    be.add_argument("--remeasure", action="store_true", help="measure again instead of reusing cached evaluations")
    be.add_argument("--tables", default=None, metavar="BENCH_JSON",
                    help="print the README's markdown tables of a bench.json (or a bench folder) and exit "
                    "(default: none, run the plan)")

    # fewstep zoo build | list
    zo = sub.add_parser("zoo", help="list or rebuild the shipped embedded weights")
    zsub = zo.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    zsub.add_parser("list", help="list the shipped weights")
    zb = zsub.add_parser("build", help="retrain one shipped file from its preset (reproduces it)")
    zb.add_argument("name", help=f"one of {teachers}, {CLASSIFIER}")
    zb.add_argument("--work-dir", default=None, help="run directory for the training (default: runs/zoo/NAME)")
    zb.add_argument("--resume", action="store_true", help="continue the training in --work-dir")
    return p


def _run_dir_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint-every, and --resume / --restart (one or the other) of the training commands."""
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=None, metavar="N",
                   help="write a checkpoint every N iterations (default: the config's loop.checkpoint_every); one is "
                        "also written every loop.checkpoint_minutes of wall time (default 10) and at the end")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint that loads, with its config.yaml as "
                        "the config unless --config is given; refused when the options differ from the run's "
                        "(except a longer --iterations and the logging/checkpoint fields)")
    g.add_argument("--restart", action="store_true",
                   help="start over in an existing --out: its contents are first moved aside to "
                        "OUT.before-restart-<UTC time> (nothing is deleted)")


def _exists_error(out: Path) -> UserError:
    return UserError(f"{out} already exists; pass --resume to continue it, --restart to move it aside and start "
                     f"over, or choose a new --out")


# ----------------------------------------------------------------------------------------------------------------
def _cmd_teacher_train(a: argparse.Namespace) -> None:
    from .config import TeacherConfig, load_config, validate_config
    from .data import EMBEDDED_DATA
    from .train.teacher import teacher_sample_writer, train_teacher
    from .zoo import PRESETS

    out = Path(a.out)
    if out.is_dir() and any(out.iterdir()) and not (a.resume or a.restart):
        raise _exists_error(out)
    config = a.config or (out / "config.yaml" if a.resume and (out / "config.yaml").is_file() else None)
    if config:  # on resume without --config: the run's own resolved config
        cfg = load_config(config, TeacherConfig)
        if a.data:
            cfg = cfg.model_copy(update={"data": a.data})
    else:
        data = a.data or "digits"
        base = dict(PRESETS.get(data, {"data": data})) if data in EMBEDDED_DATA else {"data": data}
        base["data"] = data
        cfg = validate_config(TeacherConfig, base, "preset")
    loop_updates = {k: v for k, v in (("iterations", a.iterations), ("batch_size", a.batch_size), ("seed", a.seed),
                                      ("checkpoint_every", a.checkpoint_every)) if v is not None}
    cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update=loop_updates)})
    if a.resolution is not None:
        cfg = cfg.model_copy(update={"resolution": a.resolution})
    cfg = validate_config(TeacherConfig, cfg.model_dump(), "options")  # re-validate the overrides
    if a.dry_run:
        import yaml

        _say(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return
    model = train_teacher(cfg, out, resume=a.resume, restart=a.restart, sample_fn=teacher_sample_writer(cfg.data))
    _say(f"teacher written to {model}" + ("" if model.is_dir() else ".safetensors"))


def _cmd_teacher_sample(a: argparse.Namespace) -> None:
    from .api import check_sampling, generate, load_teacher, model_data
    from .eval.images import check_output, check_picture, save_samples

    _check_choice(a.sampler, SAMPLERS, "sampler")
    from .models.hf import decode_samples, generate_images, image_shape

    teacher = load_teacher(a.teacher)
    n, shape = len(a.prompt) if a.prompt else a.n, tuple(image_shape(teacher))
    check_sampling(teacher, n, a.steps, a.sampler, a.cfg_scale, a.seed, shape=shape)  # before any sampling
    check_picture(n, shape)
    check_output(a.out, shape, n)
    if a.prompt:
        images = generate_images(teacher, a.prompt, seed=a.seed, steps=a.steps, sampler=a.sampler,
                                 cfg_scale=a.cfg_scale)
        save_samples(images, a.out)
        _say(f"{len(a.prompt)} images ({a.sampler}, {a.steps} steps) written to {a.out}")
        return
    x, _, stats = generate(teacher, a.n, steps=a.steps, sampler=a.sampler, cfg_scale=a.cfg_scale, seed=a.seed)
    save_samples(decode_samples(teacher, x), a.out, model_data(teacher))
    _say(f"{a.n} samples ({a.sampler}, {a.steps} steps, NFE {stats['nfe']}) written to {a.out}")


def _cmd_eval(a: argparse.Namespace) -> None:
    from .api import evaluate, load_model

    _check_choice(a.sampler, SAMPLERS, "sampler")
    model = load_model(a.model)
    result = evaluate(model, data=a.data, n=a.n, steps=a.steps, sampler=a.sampler, cfg_scale=a.cfg_scale,
                      seed=a.seed, inception=a.inception, inception_weights=a.inception_weights,
                      patch_fid=a.patch_fid, patch_size=a.patch_size, clip=a.clip is not None,
                      clip_model=a.clip or None, prompts=a.prompts)
    result = {"model": a.model, **result}
    if a.json:
        _say(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for k, v in result.items():
            _say(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _cmd_distill(a: argparse.Namespace) -> None:
    from .distillation import METHODS, config_method, distill, make_config, resume_config

    out = Path(a.out)
    if out.is_dir() and any(out.iterdir()) and not (a.resume or a.restart):
        raise _exists_error(out)
    config = resume_config(out, a.config, a.resume)  # on resume without --config: the run's own config.yaml
    a.method = a.method or config_method(config) or "dmd2"
    _check_choice(a.method, tuple(METHODS), "method")
    options = dict(teacher=a.teacher, data=a.data, steps=a.steps, iterations=a.iterations, batch_size=a.batch_size,
                   seed=a.seed, guidance_scale=a.guidance_scale, resolution=a.resolution,
                   checkpoint_every=a.checkpoint_every)
    if a.method == "disback":
        _check_choice(a.base or "dmd2", ("dmd2", "add"), "--base")
        options.update(base=a.base, path_dir=a.path_cache)
    elif a.base is not None or a.path_cache is not None:
        raise UserError("--base and --path-cache are DisBack options; add --method disback or drop them")
    if a.dry_run:
        import yaml

        cfg = make_config(a.method, config, **options)
        _say(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return
    distill(method=a.method, out=out, config=config, resume=a.resume, restart=a.restart,
            inception_weights=a.inception_weights, **options)
    report = f"; report: {out / 'report.html'}" if (out / "report.html").is_file() else ""
    _say(f"student written to {out / 'student.safetensors'}{report}")


def _cmd_sample(a: argparse.Namespace) -> None:
    from .api import generate, load_model, model_data
    from .eval.images import check_output, check_picture, save_samples

    from .models.hf import decode_samples, generate_images, image_shape

    model = load_model(a.student)
    n, shape = len(a.prompt) if a.prompt else a.n, tuple(image_shape(model))
    check_picture(n, shape)  # before any sampling
    check_output(a.out, shape, n)
    if a.prompt:
        save_samples(generate_images(model, a.prompt, seed=a.seed), a.out)
        _say(f"{len(a.prompt)} images written to {a.out}")
        return
    x, _, stats = generate(model, a.n, seed=a.seed)
    save_samples(decode_samples(model, x), a.out, model_data(model))  # latent diffusers models: VAE-decoded
    _say(f"{a.n} samples (NFE {stats['nfe']}) written to {a.out}")


def _cmd_demo(a: argparse.Namespace) -> None:
    from .demo import run_demo, run_text_demo

    if a.out is None:
        base = "runs/demo-text" if a.text else "runs/demo"
        out = Path(base)
        i = 1
        while out.exists():
            out = Path(f"{base}-{i}")
            i += 1
    else:
        out = _new_path(a.out)
    given = {k: v for k, v in (("n", a.n), ("distill_iterations", a.distill_iterations)) if v is not None}
    report = (run_text_demo if a.text else run_demo)(out, **given)  # the others: each demo's own defaults
    _say(f"report written to {report}")


def _cmd_zoo(a: argparse.Namespace) -> None:
    from . import zoo

    if a.zoo_command == "list":
        for name in (*zoo.TEACHERS, zoo.CLASSIFIER):
            prefix = zoo.zoo_path(name)
            present = prefix.with_suffix(".safetensors").is_file()
            size = prefix.with_suffix(".safetensors").stat().st_size / 1e6 if present else 0.0
            status = f"{size:.2f} MB" if present else "missing"
            _say(f"{name:<18} {status:<10} rebuild: {zoo.build_command(name)}")
        return
    _check_choice(a.name, (*zoo.TEACHERS, zoo.CLASSIFIER), "embedded weights")
    work = Path(a.work_dir) if a.work_dir else Path("runs/zoo") / a.name
    if a.name == zoo.CLASSIFIER:
        from .eval.classifier import main as build_classifier

        build_classifier(["--out", str(zoo.zoo_path(zoo.CLASSIFIER))])
        return
    if work.exists() and any(work.iterdir()) and not a.resume:
        raise UserError(f"{work} already exists; pass --resume or --work-dir NEW_DIR")
    path = zoo.build_teacher(a.name, work, resume=a.resume)
    _say(f"{a.name} written to {path}.safetensors")


def _cmd_bench(a: argparse.Namespace) -> None:
    from .bench import make_plan, print_tables, run_bench

    if a.tables is not None:
        _say(print_tables(a.tables))
        return
    if a.out is None:
        raise UserError("fewstep bench needs --out DIR (the folder of results and cached runs), or --tables FILE")
    plan = make_plan(a.out, a.data, a.methods, a.steps, a.seeds, n=a.n, iterations=a.iterations,
                     teacher_steps=a.teacher_steps, profile_steps=a.profile_steps)
    try:
        run_bench(plan, progress=_is_main_process(), command="fewstep " + " ".join(sys.argv[1:]),
                  remeasure=a.remeasure)
    except KeyboardInterrupt:
        sys.stderr.write("fewstep: interrupted; run the same command again: finished runs are reused and the "
                         "interrupted one resumes from its last checkpoint\n")
        raise SystemExit(130) from None
    _say(f"wrote {plan.out / 'bench.json'} and {plan.out / 'report.html'}")


def _cmd_export(a: argparse.Namespace) -> None:
    from .export import FORMATS, export

    _check_choice(a.format, FORMATS, "export format")
    out = export(a.student, a.format, a.out, rank=a.rank)
    _say(f"{a.format} export written to {out}")


_python_warning_format = warnings.formatwarning


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """fewstep's own warnings as one line (``fewstep: warning: ...``); other libraries' keep Python's format."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        text = str(message).strip()
        return f"fewstep: warning: {text.splitlines()[0] if text else category.__name__}\n"
    return _python_warning_format(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    a = parser.parse_args(argv)
    handlers = {"eval": _cmd_eval, "demo": _cmd_demo, "zoo": _cmd_zoo, "distill": _cmd_distill,
                "sample": _cmd_sample, "export": _cmd_export, "bench": _cmd_bench}
    try:
        if a.command == "teacher":
            (_cmd_teacher_train if a.teacher_command == "train" else _cmd_teacher_sample)(a)
        else:
            handlers[a.command](a)
    except UserError as e:
        sys.stderr.write(f"fewstep: error: {e}\n")
        return 2
    except argparse.ArgumentTypeError as e:
        sys.stderr.write(f"fewstep: error: {e}\n")
        return 2
    except OSError as e:  # a file-system fault outside fewstep's writers (those raise UserError themselves)
        from .io import USER_ERRNOS

        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"fewstep: error: {where}{e.strerror or e}; check the path, its permissions and the free "
                         "space, then run again (a training run resumes with --resume)\n")
        return 2 if e.errno in USER_ERRNOS else 1
    except KeyboardInterrupt:
        sys.stderr.write("fewstep: interrupted; resume a training run with --resume\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
