"""The budget curves' ranking with exact patching on fewer examples, against every ranking example
(SmolLM2, greater_than, one process, interleaved over `--repeats`).

`rank_units` ranks the 270 heads by AtP on the ranking examples and by exact patching on all of them or
only on the first `--exact` (`exact_examples`). Printed: each side's time and their ratio, and each
side's exact top `--top` heads.

    python benchmarks/bench_ranking.py [--examples 32] [--exact 8] [--top 3] [--repeats 2]
"""

import argparse
import time

from mechattr.finetune.ranking import rank_units
from mechattr.models import load_model
from mechattr.tasks.registry import train_heldout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=32, help="ranking examples (AtP; exact patching: all)")
    parser.add_argument("--exact", type=int, default=8, help="the first N that exact patching ranks on instead")
    parser.add_argument("--top", type=int, default=3, help="exact top heads printed per side")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = load_model("smollm2-135m")
    train, _ = train_heldout(model, "greater_than", 0, 0, 0.5)
    ranked = train.subset(slice(0, args.examples))
    seconds, rankings = {None: [], args.exact: []}, {}
    for _ in range(args.repeats):
        for exact in seconds:
            start = time.perf_counter()
            rankings[exact] = rank_units(model, ranked, (1,), neurons=False, exact_examples=exact)[0]["head"]
            seconds[exact].append(time.perf_counter() - start)
    full, fewer = (min(seconds[k]) for k in (None, args.exact))
    print(f"| exact patching on | seconds (best of {args.repeats}) | exact top {args.top} |")
    print("|---|---|---|")
    for exact, label in ((None, f"all {ranked.n_examples}"), (args.exact, f"the first {args.exact}")):
        top = ", ".join(str(site) for site, _ in rankings[exact]["exact"].top(args.top))
        print(f"| {label} | {min(seconds[exact]):.1f} | {top} |")
    print(f"\nfewer / all: {fewer / full:.2f}")


if __name__ == "__main__":
    main()
