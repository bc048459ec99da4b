"""Peak memory of one patching sweep on smollm2-135m under a few memory settings.

Each setting runs in a fresh child process that loads the model, builds IOI with `--n` prompts, resets
the peak resident set size and runs the sweep; the parent prints the peak above the loaded model and
checks that every setting gives the same effects. `patch` caches both unpatched runs of every example
at once; `sweep(examples_per_chunk=k)` runs k examples at a time.

    .venv/bin/python benchmarks/bench_memory.py [--n 256] [--kind z] [--layers 27,28,29]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MiB = 2**20
# (label, sweep arguments): examples_per_chunk None runs `patch` on the whole task.
SETTINGS = [
    ("patch, max_memory 2 GiB (default)", {"examples_per_chunk": None, "max_memory": 2048 * MiB}),
    ("patch, max_memory 64 MiB", {"examples_per_chunk": None, "max_memory": 64 * MiB}),
    ("sweep, 64 examples per chunk", {"examples_per_chunk": 64, "max_memory": 2048 * MiB}),
    ("sweep, 16 examples per chunk, max_memory 64 MiB", {"examples_per_chunk": 16, "max_memory": 64 * MiB}),
]


def _rss(field: str = "VmHWM") -> int:
    """Resident set size in bytes: its peak since the last reset (VmHWM) or now (VmRSS), from Linux's
    /proc; elsewhere the peak of the whole process (ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(l for l in status.read_text().splitlines() if l.startswith(field))
        return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _reset_rss_peak() -> bool:
    """Start the peak over from the current size (Linux: writing 5 to clear_refs); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> None:
    """Run one setting and print its measurements as one JSON line."""
    import torch

    import mechattr
    from mechattr import sweeps, tasks
    from mechattr.effects import save_effects

    torch.set_num_threads(spec["threads"])
    model = mechattr.load_model("smollm2-135m")
    task = tasks.ioi(model, n=spec["n"], seed=0)
    g = mechattr.grid(model, spec["kind"], task.n_pos, layers=spec["layers"])
    reset = _reset_rss_peak()
    loaded = _rss("VmRSS")
    start = time.perf_counter()
    effects = sweeps.sweep(model, task, g, examples_per_chunk=spec["examples_per_chunk"],
                           max_memory=spec["max_memory"], progress=False)
    seconds = time.perf_counter() - start
    peak = _rss()
    save_effects(spec["out"], [effects])
    print(json.dumps({"loaded": loaded, "peak": peak, "reset": reset, "seconds": seconds, "cells": len(g)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="IOI prompts")
    parser.add_argument("--kind", default="z", help="site kind of the grid")
    parser.add_argument("--layers", default="27,28,29", help="comma-separated layers of the grid")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    from mechattr.effects import Effects

    layers = [int(x) for x in args.layers.split(",")]
    print(f"smollm2-135m, IOI n={args.n}, {args.kind} grid at layers {layers}, {args.threads} torch threads")
    print(f"{'setting':<50} {'peak above load':>16} {'model loaded':>13} {'time':>8}")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, setting) in enumerate(SETTINGS):
            spec = {**setting, "n": args.n, "kind": args.kind, "layers": layers, "threads": args.threads,
                    "out": f"{tmp}/{i}"}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            if done.returncode:
                sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            # Without a reset the peak includes loading, so only the total is meaningful.
            above = row["peak"] - row["loaded"] if row["reset"] else row["peak"]
            print(f"{label:<50} {above / MiB:>12.0f} MiB {row['loaded'] / MiB:>9.0f} MiB {row['seconds']:>7.1f}s")
            effects = Effects.load(spec["out"])
            first = first or effects
            gap = float((effects.per_example - first.per_example).abs().max())
            if gap > 1e-4:
                sys.exit(f"{label}: effects differ from the first setting's by {gap:.2e}")
    print(f"all settings agree to 1e-4; cells: {row['cells']}, clean {first.clean_metric:+.2f}, "
          f"corrupt {first.corrupt_metric:+.2f}")


if __name__ == "__main__":
    main()
