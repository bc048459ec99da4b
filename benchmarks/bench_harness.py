"""What the fine-tuning harness saves, new / old, with exactness beside each ratio (SmolLM2, greater_than).

Old: what a comparison did before the harness: held-out scoring by full forwards that unembed every
position, and training steps that run every block. New: scoring and training resumed from the base
model's residual entering the lowest trained block (`Prefix`, computed once per batch and shared by the
runs of a comparison), unembedding only the positions read. Both on the same trained heads, in one
process, interleaved over `--repeats`.

The second table times the resumed held-out scoring itself with each row run whole from the block
(`Prefix.logits(share=False)`, as before) and with the prompts' common beginnings run once per distinct
beginning (`share=True`, what scoring does now): greater_than's prompts share their first 9 tokens in 10
patterns.

The last table asks whether runs of one budget would gain from sharing a batch (several runs' rows in
one forward): it times the resumed blocks on k x B rows against k forwards of B rows. On a CPU a
forward's cost grows with its rows, so the ratio is the most stacking could save.

    python benchmarks/bench_harness.py [--heads 9.6,12.0,20.0] [--steps 5] [--repeats 3]
"""

import argparse
import time

import torch

import mechattr
from mechattr.finetune import TrainConfig, masks, train
from mechattr.finetune.evaluation import per_example
from mechattr.finetune.harness import Scorer
from mechattr.finetune.prefix import first_block
from mechattr.forward import at_last
from mechattr.selection import SiteSet
from mechattr.sites import Site
from mechattr.tasks.registry import train_heldout


def old_scores(model, task, batch=32):
    """Held-out metric and correctness by full forwards with every position unembedded."""
    out = []
    with torch.no_grad():
        for start in range(0, task.n_examples, batch):
            rows = slice(start, start + batch)
            out.append(at_last(model(task.clean[rows]), None if task.last is None else task.last[rows]).float())
    last = torch.cat(out)
    metric = task.metric(last, task.answer, task.wrong, last.log_softmax(-1))
    return metric, (last.gather(-1, task.answer[:, None]) > last.gather(-1, task.wrong[:, None]))[:, 0]


def resumed_logits(prefix, model, layer, share):
    """Last-position logits of every row of `prefix`, resumed at `layer`, 32 rows per forward."""
    with torch.no_grad():
        return prefix.logits(model, layer, torch.arange(prefix.n_examples), "last", 32, share)


def correct(task, last):
    return (last.gather(-1, task.answer[:, None]) > last.gather(-1, task.wrong[:, None]))[:, 0]


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", default="9.6,12.0,20.0", help="trained heads as layer.head, comma-separated")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mechattr.load_model("smollm2-135m")
    train_task, heldout = train_heldout(model, "greater_than", n=0, seed=0, heldout=0.5)
    sites = SiteSet.of([Site("z", int(layer), head=int(head))
                        for layer, head in (h.split(".") for h in args.heads.split(","))])
    mask = masks(model, sites)
    layer = first_block(model, mask)
    config = TrainConfig(steps=args.steps, batch_size=8, lr=1e-3)
    print(f"SmolLM2-135M, greater_than: {train_task.n_examples} training and {heldout.n_examples} held-out examples; "
          f"heads {args.heads} (lowest trained block {layer}); {torch.get_num_threads()} threads\n")

    start = time.perf_counter()
    scorer = Scorer(model, heldout)  # fills the held-out prefix once, as a comparison does
    fill_s = time.perf_counter() - start
    heldout_prefix = scorer.prefix(scorer.heldout.clean, scorer.heldout.last)
    train_prefix = scorer.prefix(train_task.clean, train_task.last)
    start = time.perf_counter()
    train_prefix.fill(model)
    train_fill_s = time.perf_counter() - start
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in mask}

    rows = {"scoring": [], "training": [], "shared": []}
    for _ in range(args.repeats):
        for name, p in model.named_parameters():
            if name in saved:
                p.data.copy_(saved[name])
        t_old, _ = timed(lambda: train(model, mask, train_task, config, progress=False, skip_frozen=False))
        plain_entries = {name: p.detach().clone() for name, p in model.named_parameters() if name in mask}
        for name, p in model.named_parameters():
            if name in saved:
                p.data.copy_(saved[name])
        t_new, _ = timed(lambda: train(model, mask, train_task, config, progress=False, prefix=train_prefix))
        error = max(float((p.detach() - plain_entries[name]).abs().max())
                    for name, p in model.named_parameters() if name in mask)
        frozen = all(torch.equal(p.detach()[~mask[name]], plain_entries[name][~mask[name]])
                     for name, p in model.named_parameters() if name in mask)
        rows["training"].append((t_old, t_new, error, frozen))
        # Score the trained model both ways.
        s_old, (m_old, c_old) = timed(lambda: old_scores(model, heldout))
        s_new, (m_new, c_new) = timed(lambda: per_example(model, scorer.heldout, prefix=heldout_prefix, layer=layer))
        rows["scoring"].append((s_old, s_new, float((m_old - m_new).abs().max()), bool(torch.equal(c_old, c_new))))
        whole, shared = (timed(lambda: resumed_logits(heldout_prefix, model, layer, share)) for share in (False, True))
        rows["shared"].append((whole[0], shared[0], float((whole[1] - shared[1]).abs().max()),
                               bool(torch.equal(correct(heldout, whole[1]), correct(heldout, shared[1])))))

    print("| step | old s | new s | new/old | max abs difference | agrees |")
    print("|---|---|---|---|---|---|")
    for what, label in (("training", f"training ({args.steps} steps of 8)"),
                        ("scoring", f"held-out scoring ({heldout.n_examples} examples)")):
        old = min(r[0] for r in rows[what])
        new = min(r[1] for r in rows[what])
        error = max(r[2] for r in rows[what])
        agrees = all(r[3] for r in rows[what])
        print(f"| {label} | {old:.2f} | {new:.2f} | {new / old:.2f} | {error:.2e} | "
              f"{'frozen entries equal' if what == 'training' else 'correctness equal'}: {agrees} |")
    print(f"\nOnce per comparison (shared by all its runs): the held-out prefix {fill_s:.2f} s, the training "
          f"prefix {train_fill_s:.2f} s.")

    print(f"\nResumed held-out scoring from block {layer}, {heldout.n_examples} examples in rows of 32 "
          f"({heldout_prefix.shared_positions} shared first positions):\n")
    print("| rows run whole s | beginnings shared s | shared / whole | max abs logit difference | correctness equal |")
    print("|---|---|---|---|---|")
    whole, shared = min(r[0] for r in rows["shared"]), min(r[1] for r in rows["shared"])
    print(f"| {whole:.2f} | {shared:.2f} | {shared / whole:.2f} | {max(r[2] for r in rows['shared']):.2e} | "
          f"{all(r[3] for r in rows['shared'])} |")

    print("\nStacking k runs' rows in one forward (blocks from the lowest trained one, no gradients):\n")
    print("| rows per run | k | k forwards s | one forward of k x rows s | stacked / separate |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for rows_per_run in (8, 32):
            for k in (3, 5):
                index = torch.arange(rows_per_run)
                big = torch.arange(rows_per_run * k) % heldout.n_examples
                separate, stacked = [], []
                for _ in range(args.repeats):
                    separate.append(timed(lambda: [heldout_prefix.logits(model, layer, index) for _ in range(k)])[0])
                    stacked.append(timed(lambda: heldout_prefix.logits(model, layer, big))[0])
                print(f"| {rows_per_run} | {k} | {min(separate):.3f} | {min(stacked):.3f} | "
                      f"{min(stacked) / min(separate):.2f} |")


if __name__ == "__main__":
    main()
