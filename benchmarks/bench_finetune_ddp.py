"""Masked fine-tuning of SmolLM2 on 1 process vs 2 processes (data parallel, gloo on CPU).

Every side trains the same attention heads on the same IOI batches: one process with torch's default
threads (one per core), one process with 1 thread, and 2 processes under torchrun (1 thread each,
torchrun's default). Prints the median step time of each, the speedups of 2 processes, and the
largest difference between the 1-process and 2-process deltas.

Wall-clock times depend on what else the machine runs (2 threads of one process on a busy 2-core machine
stall each other badly). The CPU time per step of a 1-thread process does not; the ratio of those gives
the speedup when each process has a core to itself.

    python benchmarks/bench_finetune_ddp.py [--steps 8] [--batch 8] [--heads 8] [--lr 1e-4] [--examples 16]
                                            [--out runs/bench_ddp]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One side of the comparison (run alone, or on every process of a torchrun launch)."""
    import torch.distributed as dist

    import mechattr
    from mechattr.finetune import TrainConfig, accelerated, masks
    from mechattr.finetune.trainer import Callback
    from mechattr.sites import Site

    class StepTimer(Callback):
        """Wall and CPU seconds of every step (CPU: this process's threads, blind to other jobs' load)."""

        def on_start(self, state):
            self.times, self.cpu, self.last = [], [], (time.perf_counter(), time.process_time())

        def on_step(self, state):
            now = (time.perf_counter(), time.process_time())
            self.times.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
            self.last = now

    model = mechattr.load_model("smollm2-135m")
    task = mechattr.tasks.ioi(model, n=args.examples, seed=0)
    sites = [Site("z", 29 - i, head=i % 9) for i in range(args.heads)]  # one head in each of the last layers
    timer = StepTimer()
    out = Path(args.worker)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr)
    result = accelerated.train(model, masks(model, sites), task, config,
                               [timer], progress=False, delta_path=out / "delta.safetensors")
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"timing{rank}.json").write_text(json.dumps({
        "threads": torch.get_num_threads(), "step_s": timer.times, "cpu_s": timer.cpu, "loop_s": result.wall_s,
        "n_trained": result.n_trained, "losses": result.losses}))


def run_side(script: Path, argv: list[str], out: Path, processes: int, threads: int | None) -> dict:
    """One side in fresh processes: `threads` per process (None: torch's default)."""
    from mechattr.finetune import accelerated

    out.mkdir(parents=True, exist_ok=True)
    args = [*argv, "--worker", str(out)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if processes == 1:
        subprocess.run([sys.executable, str(script), *args], check=True, env=env)
    else:
        accelerated.launch(script, *args, processes=processes)  # torchrun: 1 thread per process
    ranks = [json.loads((out / f"timing{r}.json").read_text()) for r in range(processes)]
    # A step ends when its slowest process does; CPU time of a 1-thread process is its compute alone.
    return {**ranks[0], "cpu_s": [max(r["cpu_s"][i] for r in ranks) for i in range(len(ranks[0]["cpu_s"]))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="examples per step (split among the processes)")
    p.add_argument("--heads", type=int, default=8, help="attention heads trained")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--examples", type=int, default=16, help="IOI examples")
    p.add_argument("--out", default=None, help="folder for the deltas and timings (default: a temporary one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from mechattr.finetune import Delta

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_ddp_"))
    argv = ["--steps", str(args.steps), "--batch", str(args.batch), "--heads", str(args.heads), "--lr", str(args.lr),
            "--examples", str(args.examples)]
    script = Path(__file__).resolve()
    sides = {(1, None): None, (1, 1): None, (2, 1): None}  # (processes, threads per process)
    for processes, threads in sides:
        sides[processes, threads] = run_side(script, argv, out / f"p{processes}t{threads}", processes, threads)
    values = [Delta.load(out / name / "delta.safetensors").values for name in ("p1tNone", "p2t1")]
    diff = max(float((values[0][n] - values[1][n]).abs().max()) for n in values[0])
    median = lambda xs: statistics.median(xs[1:] or xs)  # noqa: E731  (the first step also allocates)
    step = {k: median(s["step_s"]) for k, s in sides.items()}
    cpu = {k: median(s["cpu_s"]) for k, s in sides.items()}
    print(f"SmolLM2-135M, {sides[1, None]['n_trained']} trained entries ({args.heads} heads), batch {args.batch}, "
          f"{args.steps} steps, lr {args.lr}, IOI n={args.examples}, {os.cpu_count()} cores")
    for (processes, _), side in sides.items():
        print(f"  {processes} process(es) x {side['threads']} thread(s): median step {step[processes, _]:.3f} s "
              f"(CPU {cpu[processes, _]:.3f} s per process), loop {side['loop_s']:.1f} s, "
              f"final loss {side['losses'][-1]:.4f}")
    print(f"speedup of 2 processes over 1, wall clock per step: {step[1, None] / step[2, 1]:.2f}x over 1 process "
          f"with {sides[1, None]['threads']} threads, {step[1, 1] / step[2, 1]:.2f}x over 1 process with 1 thread")
    print(f"speedup with a free core per process (1-thread CPU time per step, 1 process / slowest of 2): "
          f"{cpu[1, 1] / cpu[2, 1]:.2f}x")
    print(f"max |delta(2 processes) - delta(1 process)|: {diff:.2e}")


if __name__ == "__main__":
    main()
