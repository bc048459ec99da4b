"""MIB faithfulness on smollm2-135m: how faithful the circuits of each ranking are, with intervals.

Nodes as MIB counts them: every attention head (z, all positions) and every MLP output; the embedding is
not ranked. Each ranking (exact patching, AtP, AtP*, IG, RelP, under the ablation `Noise`: the clean run with
nodes set to their corrupted values) is scored by `mechattr.faithfulness.faithfulness`: f at MIB's ten
shares, CPR and CMD with bootstrap intervals over examples, and a random-ranking floor. Prints a
markdown table (and, with `--out`, writes it) with each ranking's time and the faithfulness run's time.

    .venv/bin/python benchmarks/bench_faithfulness.py [--task ioi] [--n 16] [--random 5] [--methods exact,relp]
        [--out FILE]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scipy import stats  # noqa: E402

import mechattr  # noqa: E402
from mechattr.faithfulness import faithfulness  # noqa: E402
from mechattr.graph import nodes  # noqa: E402
from mechattr.interventions import Noise  # noqa: E402
from mechattr.tasks.registry import by_name  # noqa: E402

METHODS = ("exact", "atp", "atp*", "ig", "relp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ioi", help="a task of the registry (default: ioi)")
    parser.add_argument("--n", type=int, default=16, help="examples (default: 16)")
    parser.add_argument("--random", type=int, default=5, help="random rankings of the floor (default: 5)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws (default: 1000)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"rankings to score, comma-separated; Spearman needs exact (default: {','.join(METHODS)})")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods) or "exact" not in methods:
        parser.error(f"--methods {args.methods}: need exact and any of {', '.join(METHODS)}")

    model = mechattr.load_model("smollm2-135m")
    task = by_name(model, args.task, n=args.n, seed=0)
    candidates = [s for s in nodes(model) if s.kind != "embed"]
    rankings, seconds = {}, {}
    for method in methods:
        start = time.perf_counter()
        rankings[method] = (mechattr.patch(model, task, candidates, Noise(), progress=False) if method == "exact"
                            else mechattr.attribute(model, task, candidates, method, intervention=Noise()))
        seconds[method] = time.perf_counter() - start
    exact = rankings["exact"].effect.flatten()
    lines = [f"SmolLM2-135M, task {task.name} ({task.n_examples} examples), {len(candidates)} nodes (heads and "
             f"MLPs), Noise ablation, {args.random} random rankings, {args.bootstrap} bootstrap draws", "",
             "| ranking | Spearman with exact | CPR [95% CI] | CMD [95% CI] | ranking s | faithfulness s |",
             "|---|---|---|---|---|---|"]
    floor = None
    for method, ranking in rankings.items():
        start = time.perf_counter()
        result = faithfulness(model, task, ranking, Noise(), random=args.random, bootstrap=args.bootstrap)
        spent = time.perf_counter() - start
        floor = result
        rho = stats.spearmanr(ranking.effect.flatten(), exact)[0]
        lines.append(f"| {method} | {rho:.3f} | {result.cpr:.3f} [{result.cpr_ci[0]:.3f}, {result.cpr_ci[1]:.3f}] | "
                     f"{result.cmd:.3f} [{result.cmd_ci[0]:.3f}, {result.cmd_ci[1]:.3f}] | {seconds[method]:.1f} | "
                     f"{spent:.1f} |")
        print(result.to_markdown())
    lines.append(f"| random (floor, mean ± sd) | | {floor.random_cpr[0]:.3f} ± {floor.random_cpr[1]:.3f} | "
                 f"{floor.random_cmd[0]:.3f} ± {floor.random_cmd[1]:.3f} | | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
