"""Step efficiency: the share of a training step's time spent in the networks' forward and backward passes.

    OMP_NUM_THREADS=1 python benchmarks/step_efficiency.py                     # every method on digits
    OMP_NUM_THREADS=1 python benchmarks/step_efficiency.py --methods dmd2 --steps 30

Each method trains on the embedded digits teacher with its shipped config (configs/<method>_digits.yaml) through the
real loop (:func:`fewstep.train.loop.train`): ``--warmup`` iterations, then ``--steps`` measured ones, once plainly
(the wall time of a step) and once under the PyTorch profiler (CPU activities), which splits each step's time into
network forward, network backward and the non-network categories of :mod:`fewstep.bench.profile` (its docstring
defines them; ``fewstep bench`` measures its column with the same code).

The network share is network time over step time, both measured under the profiler (which adds its per-op cost to
networks and loss code alike); the plain step time is printed beside it. Writes
benchmarks/results/step_efficiency.json (rows: data, method, variant ``default`` or ``--variant``, steps,
``network_share``, ``step_ms``, ``step_ms_profiled``, and each category's milliseconds per step; each method's row as
it is measured) and prints the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import ROOT, markdown_table, meta, write_results, run_main  # noqa: E402
from fewstep.bench.profile import NET_BACKWARD, measure_steps  # noqa: E402


def run_method(method_name: str, work: Path, warmup: int, steps: int, profile: bool, seed: int = 0,
               phase: str | None = None) -> dict:
    """:func:`fewstep.bench.profile.measure_steps` of ``configs/<method>_digits.yaml`` with loop seed ``seed``."""
    from fewstep.distillation import make_config

    cfg = make_config(method_name, ROOT / "configs" / f"{method_name}_digits.yaml", seed=seed, progress=False,
                      checkpoint_minutes=None)
    return measure_steps(method_name, cfg, work, warmup, steps, profile=profile, seed=seed, phase=phase)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["dmd2", "add", "lightning", "disback"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="measured iterations per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="default", help="the rows' variant (e.g. 'before' for an older tree)")
    p.add_argument("--phase", default=None,
                   help="SDXL-Lightning: measure in this phase kind of its last stage (e.g. full_uncond) instead of "
                        "the plan's first (the 8-step MSE stage); the row's variant gets '@<phase>'")
    p.add_argument("--no-write", action="store_true", help="print only (do not update the results file)")
    a = p.parse_args()
    torch.set_num_threads(1)

    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-steps-"))
    try:
        for name in a.methods:
            phase = a.phase if name == "lightning" else None
            plain = run_method(name, work, a.warmup, a.steps, profile=False, seed=a.seed, phase=phase)
            prof = run_method(name, work, a.warmup, a.steps, profile=True, seed=a.seed, phase=phase)
            split = prof.pop("ms_per_step")
            prof.pop("top_non_network")
            non_net = {k: v for k, v in split.items() if k not in ("network forward", NET_BACKWARD)}
            top = sorted(non_net.items(), key=lambda kv: -kv[1])[:5]
            variant = f"{a.variant}@{phase}" if phase else a.variant
            rows.append({"data": "digits", "method": name, "variant": variant, "steps": plain["steps"],
                         "network_share": prof["network_share"], "step_ms": plain["step_ms"],
                         "step_ms_profiled": prof["step_ms_profiled"],
                         "network_forward_ms": split.get("network forward", 0.0),
                         "network_backward_ms": split.get(NET_BACKWARD, 0.0),
                         "non_network_ms": non_net,
                         "top_non_network": ", ".join(f"{k} {v:.2f}" for k, v in top),
                         "iterations": a.steps, "wall_seconds": None})
            print(f"{name:>9}: network {100 * prof['network_share']:.1f}% of {prof['step_ms_profiled']:.1f} ms "
                  f"(profiled; plain {plain['step_ms']:.1f} ms); top non-network ms: {rows[-1]['top_non_network']}",
                  flush=True)
            if not a.no_write:  # after each method: a long run that stops keeps what it measured
                path = write_results("step_efficiency", meta([a.seed], warmup=a.warmup, measured_steps=a.steps,
                                                             threads=torch.get_num_threads()), rows[-1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [{**r, "network_share": 100 * r["network_share"]} for r in rows]
    print("\n" + markdown_table(table, ["method", "variant", "steps", "step_ms", "step_ms_profiled",
                                        "network_forward_ms", "network_backward_ms", "network_share",
                                        "top_non_network"]))
    if not a.no_write and rows:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    run_main(main)
