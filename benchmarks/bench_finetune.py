"""Step time, peak memory and optimizer state of masked fine-tuning vs full fine-tuning on SmolLM2.

Three ways to train on the same batches of the cause-effect task: the masked trainer on k attention
heads, the same trainer with every entry selected, and a plain PyTorch AdamW loop over all parameters
(the usual full fine-tuning). Prints a table and the ratios full / masked.

    python benchmarks/bench_finetune.py [--steps 4] [--batch 8] [--heads 8]

With --compare, runs the method comparison on the cause-effect task instead (held-out pairs, seeds 0-2):
precision fine-tuning of the top heads by exact patching, random heads with as many parameters, the
bottom heads, LoRA of about as many parameters, and full fine-tuning; --attribution atp (or atp*, ig)
adds precision from that attribution estimate of the same head effects.

    python benchmarks/bench_finetune.py --compare [--steps 12] [--effects runs/cause_effect_z] [--out runs/compare]
"""

import argparse
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mechattr
from mechattr.attribution import attribute
from mechattr.effects import Effects
from mechattr.finetune import (BottomSites, Full, LoRA, RandomSites, TopSites, TrainConfig, compare, full_masks, masks,
                               n_trained, train)
from mechattr.finetune.data import batch_indices
from mechattr.finetune.memory import PeakMemory
from mechattr.finetune.trainer import Callback
from mechattr.selection import select
from mechattr.sites import Site
from mechattr.tasks import cause_effect
from mechattr.tasks.cause_effect import CAUSE_EFFECT_PAIRS


class StepTimer(Callback):
    """Wall time of every step after the first (which also allocates the optimizer state)."""

    def on_start(self, state):
        self.times, self.last = [], time.perf_counter()

    def on_step(self, state):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def masked_run(model, mask_set, task, config):
    timer = StepTimer()
    with PeakMemory() as memory:
        result = train(model, mask_set, task, config, [timer], progress=False)
    return {"n_trained": result.n_trained, "step_s": sum(timer.times[1:]) / max(1, len(timer.times) - 1),
            "peak_mb": memory.peak_bytes / 2**20, "optimizer_mb": result.optimizer_bytes / 2**20}


def plain_full_run(model, task, config):
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    times = []
    with PeakMemory() as memory:
        for step in range(config.steps):
            start = time.perf_counter()
            index = batch_indices(task.n_examples, config.batch_size, config.seed, step)
            F.cross_entropy(model(task.clean[index])[:, -1].float(), task.answer[index]).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    return {"n_trained": sum(p.numel() for p in params), "step_s": sum(times[1:]) / max(1, len(times) - 1),
            "peak_mb": memory.peak_bytes / 2**20, "optimizer_mb": state / 2**20}


def head_effects(model, task, directory: Path | None) -> Effects:
    """Exact patching of every attention head (denoising) on the training pairs, cached in `directory`."""
    if directory is not None and (directory / "effects.json").is_file():
        return Effects.load(directory)
    start = time.perf_counter()
    effects = mechattr.patch(model, task, mechattr.grid(model, "z"))
    print(f"patched {len(effects.sites)} heads on {task.n_examples} examples in {time.perf_counter() - start:.0f} s")
    if directory is not None:
        effects.save(directory, task=task.name)
    return effects


def direction_by_likelihood(model) -> float:
    """Share of pairs whose sentence "A causes B." is likelier than "B causes A.": the knowledge the
    Yes/No questions ask for, read without a question."""
    def log_likelihood(text):
        tokens = model.to_tokens(text)
        with torch.no_grad():
            logp = model(tokens).log_softmax(-1)[0, :-1]
        return float(logp.gather(-1, tokens[0, 1:, None]).sum())

    right = [log_likelihood(f"{a.capitalize()} causes {b}.") > log_likelihood(f"{b.capitalize()} causes {a}.")
             for a, b in CAUSE_EFFECT_PAIRS]
    return sum(right) / len(right)


def run_comparison(args):
    base = mechattr.load_model("smollm2-135m")
    print(f"sentence likelihood ranks the causal direction right for {direction_by_likelihood(base):.0%} "
          f"of {len(CAUSE_EFFECT_PAIRS)} pairs")
    train_task, heldout = cause_effect(base, "train"), cause_effect(base, "heldout")
    effects = head_effects(base, train_task, args.effects)
    print(f"clean metric {effects.clean_metric:+.3f}, corrupt {effects.corrupt_metric:+.3f}, "
          f"{int(effects.significant().sum())} of {len(effects.sites)} heads significant (BH 0.05)")
    methods = [TopSites(effects, k=args.heads)]
    if args.attribution is not None:
        estimates = attribute(base, train_task, mechattr.grid(base, "z"), args.attribution)
        overlap = len(set(select(estimates, top_k=args.heads, significant_only=False))
                      & set(select(effects, top_k=args.heads, significant_only=False)))
        print(f"{args.attribution} top-{args.heads} heads share {overlap} with exact patching's")
        methods.append(TopSites(estimates, k=args.heads, tag=f"precision ({args.attribution})"))
    methods += [RandomSites(effects), BottomSites(effects, k=args.heads), LoRA(), Full(lr=args.full_lr)]
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr)
    start = time.perf_counter()
    table = compare("smollm2-135m", train_task, heldout, methods, config, seeds=(0, 1, 2))
    print(f"compared {len(methods)} methods x 3 seeds in {time.perf_counter() - start:.0f} s "
          f"(lr {args.lr}, full fine-tuning lr {args.full_lr}, {args.steps} steps of {args.batch})")
    print("precision heads:", ", ".join(str(s) for s in table.rows[0]["sites"]))
    print(table.to_markdown())
    if args.out is not None:
        table.save(args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per method (default 4; the first is not timed); comparison: default 12")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--heads", type=int, default=8, help="attention heads the masked trainer trains")
    parser.add_argument("--compare", action="store_true", help="run the method comparison instead")
    parser.add_argument("--lr", type=float, default=1e-3, help="comparison: learning rate (sites and LoRA)")
    parser.add_argument("--full-lr", type=float, default=3e-5, help="comparison: full fine-tuning learning rate")
    parser.add_argument("--effects", type=Path, default=None, help="comparison: cache directory of head effects")
    parser.add_argument("--attribution", default=None, help="comparison: also select heads by this estimate")
    parser.add_argument("--out", type=Path, default=None, help="comparison: write comparison.md/.json here")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 12 if args.compare else 4
    if args.compare:
        run_comparison(args)
        return
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-5)
    base = mechattr.load_model("smollm2-135m")
    task = cause_effect(base, "train")
    # Heads spread over the middle layers; which ones does not change the cost much.
    sites = [Site("z", 8 + i, head=i % base.cfg.n_heads) for i in range(args.heads)]
    rows = {}
    for name, run in (("masked (heads)", lambda m: masked_run(m, masks(m, sites), task, config)),
                      ("masked trainer, all entries", lambda m: masked_run(m, full_masks(m), task, config)),
                      ("plain AdamW, all parameters", lambda m: plain_full_run(m, task, config))):
        model = mechattr.load_model("smollm2-135m")
        rows[name] = run(model)
        del model
        gc.collect()
    print(f"SmolLM2-135M, batch {args.batch} x {task.n_pos} tokens, {args.steps} steps "
          f"({args.heads} heads = {n_trained(masks(base, sites)):,} entries), {torch.get_num_threads()} threads")
    print(f"{'method':32s} {'trained':>12s} {'step s':>8s} {'peak MB':>9s} {'optimizer MB':>13s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['n_trained']:>12,} {row['step_s']:>8.2f} {row['peak_mb']:>9.0f} "
              f"{row['optimizer_mb']:>13.2f}")
    masked = rows["masked (heads)"]
    for name in list(rows)[1:]:
        print(f"{name} / masked: step time x{rows[name]['step_s'] / masked['step_s']:.2f}, peak memory "
              f"x{rows[name]['peak_mb'] / max(masked['peak_mb'], 1e-9):.1f}, optimizer state "
              f"x{rows[name]['optimizer_mb'] / masked['optimizer_mb']:.0f}")


if __name__ == "__main__":
    main()
