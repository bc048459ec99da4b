"""The causal attribution table with questions packed by stem, against each question in its own row
(SmolLM2, one process, interleaved over `--repeats`).

Both sides run every context once and its questions on the context's keys and values. Packed: each stem
once, its endings after it in one row, `--batch` questions per call. Own rows: each whole question in a
row of its own, `--rows` per call (the table's way before packing). Printed: each side's time and their
ratio, the largest score difference, and whether every trial's TDR and AUROC agree.

    python benchmarks/bench_table.py [--network asia] [--trials 3] [--batch 64] [--rows 16] [--repeats 2]
"""

import argparse
import time

from mechattr import causal
from mechattr.app import stages
from mechattr.app.config import RunConfig
from mechattr.causal import scoring
from mechattr.models import load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="asia", choices=list(causal.NETWORKS))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="questions per call, packed")
    parser.add_argument("--rows", type=int, default=16, help="questions per call, one row each")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = RunConfig(trials=args.trials)
    model = load_model(config.model)
    problem = causal.load(args.network, n_samples=config.n_samples, seed=config.seed)
    budget = stages._budget(model, problem, config)  # the main job's prompt budget
    seconds, tables = {"packed": [], "own rows": []}, {}
    for _ in range(args.repeats):
        for side in seconds:
            # Packing proves itself once per model (None: it holds); a refusal sends each question to its own row.
            scoring._PACKING[model] = None if side == "packed" else "refused by the benchmark"
            batch = args.batch if side == "packed" else args.rows
            start = time.perf_counter()
            tables[side] = causal.attribution_table(model, problem, trials=args.trials, seed=config.seed,
                                                    max_tokens=budget, batch_size=batch)
            seconds[side].append(time.perf_counter() - start)
    scoring._PACKING.pop(model)
    packed, rows = tables["packed"], tables["own rows"]
    n = len(packed.pairs)
    print(f"{args.network}: {n} questions over {args.trials} trials, prompts of at most {budget} tokens\n")
    print(f"| side | questions per call | seconds (best of {args.repeats}) |")
    print("|---|---|---|")
    print(f"| packed by stem | {args.batch} | {min(seconds['packed']):.1f} |")
    print(f"| own rows | {args.rows} | {min(seconds['own rows']):.1f} |")
    print(f"\npacked / own rows: {min(seconds['packed']) / min(seconds['own rows']):.2f}")
    gap = float((packed.pairs.score - rows.pairs.score).abs().max())
    same = packed.trials[["TDR", "AUROC"]].equals(rows.trials[["TDR", "AUROC"]])
    print(f"largest score difference: {gap:.2g}; every trial's TDR and AUROC equal: {same}")


if __name__ == "__main__":
    main()
