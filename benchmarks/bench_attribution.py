"""Attribution on smollm2-135m (IOI): how well and how fast AtP, AtP*, EAP-IG and RelP estimate exact patching.

Sites: every block site (resid_pre, attn_out, mlp_out x layer x position) and every head (z x layer x
head, all positions). Prints, on one model and batch in this process:
  - each estimate's time in forward-equivalents (one plain no-grad forward of the batch, timed between
    the methods). Times are CPU seconds of this process (all its threads), which other jobs on a
    shared machine disturb far less than wall time; wall seconds are printed too,
  - mechattr's exact grid (every z site; block kinds on `--exact-layers` evenly spaced layers, scaled),
  - TL 4.3's `generic_activation_patch` timed on `--tl-cells` cells and scaled to all sites,
  - TL 4.3's `tools.analysis.attribution_patching.attribution_patch` on the same batch (its per-example
    loop), checked against mechattr's AtP,
  - Spearman rank correlations of each estimate with exact patching, per site kind, and where each
    estimate ranks the ten heads of largest exact |effect|,
and with `--circuit DIR` discovers the node circuit and saves it with its plots.

    .venv/bin/python benchmarks/bench_attribution.py [--n 8] [--exact-layers 5] [--tl-cells 10] [--circuit DIR]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from scipy import stats  # noqa: E402

import mechattr  # noqa: E402
from mechattr import tasks  # noqa: E402
from mechattr.attribution import attribute  # noqa: E402
from mechattr.sites import Grid  # noqa: E402

BLOCK_KINDS = ("resid_pre", "attn_out", "mlp_out")


class Clock:
    """CPU seconds (`cpu`) and wall seconds (`wall`) of the block it times."""

    def __enter__(self):
        self.start = (time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.start[0]
        self.wall = time.perf_counter() - self.start[1]


def forward_time(model, tokens, repeats=3):
    """Median CPU seconds of one plain forward."""
    times = []
    for _ in range(repeats):
        with Clock() as clock, torch.no_grad():
            model(tokens)
        times.append(clock.cpu)
    return statistics.median(times)


def all_sites(model, n_pos):
    sites = [s for kind in BLOCK_KINDS for s in mechattr.grid(model, kind, n_pos).sites]
    return Grid.of(sites + list(mechattr.grid(model, "z", n_pos).sites))


def time_estimates(model, task, grid, ig_steps):
    """{label: (Effects, seconds, forward-equivalents)}, a forward timed before and after each."""
    runs = {"atp": {"method": "atp"}, "atp* (QK fix only)": {"method": "atp*", "graddrop": False},
            "atp*": {"method": "atp*"}, f"ig ({ig_steps} steps)": {"method": "ig", "steps": ig_steps},
            "relp": {"method": "relp"}}
    attribute(model, task, grid.sites[:1], "atp")  # warm-up: the first backward pays one-off costs
    out = {}
    for label, kwargs in runs.items():
        before = forward_time(model, task.corrupt)
        with Clock() as clock:
            effects = attribute(model, task, grid, **kwargs)
        unit = (before + forward_time(model, task.corrupt)) / 2
        out[label] = (effects, clock.cpu, clock.cpu / unit)
        print(f"{label:20s} {clock.cpu:7.1f} CPU s ({clock.wall:6.1f} wall s)  {clock.cpu / unit:5.1f} "
              f"forward-equivalents (forward {unit:.2f} CPU s)", flush=True)
    return out


def exact_grid(model, task, layers):
    """mechattr's exact patching: every z site, block kinds on `layers` (time scaled to all layers)."""
    n_layers = model.cfg.n_layers
    with Clock() as clock:
        z = mechattr.patch(model, task, mechattr.grid(model, "z", task.n_pos), progress=False)
    seconds = clock.cpu
    blocks = {}
    for kind in BLOCK_KINDS:
        with Clock() as clock:
            blocks[kind] = mechattr.patch(model, task, mechattr.grid(model, kind, task.n_pos, layers=layers),
                                          progress=False)
        seconds += clock.cpu * n_layers / len(layers)
    return z, blocks, seconds


def tl_exact_seconds(model, task, cells, total_sites):
    """TL's generic_activation_patch (one full forward per cell) on `cells` resid_pre cells, scaled."""
    import pandas as pd
    from transformer_lens import patching as tl_patching

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, task.answer[:, None]) - last.gather(-1, task.wrong[:, None])).mean()

    _, clean_cache = model.run_with_cache(task.clean)
    index = pd.DataFrame([(layer, layer % task.n_pos) for layer in range(cells)], columns=["layer", "pos"])
    with Clock() as clock, torch.no_grad():
        tl_patching.generic_activation_patch(model, task.corrupt, clean_cache, metric,
                                             tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index)
    per_cell = clock.cpu / cells
    return per_cell, per_cell * total_sites


def tl_attribution(model, task, ours):
    """TL's node attribution patching, one call per example (its metric sees one example's logits);
    returns seconds and the largest difference from mechattr's AtP on z and mlp_out sites."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    totals: dict = {}
    params = [p for p in model.parameters() if not p.requires_grad]
    for p in params:  # its backward needs a graph, which frozen parameters and token inputs do not build
        p.requires_grad_(True)
    with Clock() as clock:
        for i in range(task.n_examples):
            answer, wrong = int(task.answer[i]), int(task.wrong[i])
            metric = lambda logits, a=answer, w=wrong: logits[0, -1, a] - logits[0, -1, w]  # noqa: E731
            result = attribution_patch(model, task.clean[i:i + 1], task.corrupt[i:i + 1], metric)
            for node, score in result.node_scores.items():
                if node.kind in ("attn_head_out", "mlp_out"):
                    key = (node.kind, node.layer, node.head if node.kind == "attn_head_out" else node.position)
                    totals[key] = totals.get(key, 0.0) + score / task.n_examples
    for p in params:
        p.requires_grad_(False)
    seconds = clock.cpu
    effect = dict(zip(ours.sites, ours.effect.tolist()))
    diff = 0.0
    for (kind, layer, index), score in totals.items():
        site = mechattr.Site("z", layer, head=index) if kind == "attn_head_out" else mechattr.Site("mlp_out", layer,
                                                                                                   pos=index)
        diff = max(diff, abs(effect[site] - score))
    return seconds, diff


def spearman_report(estimates, z, blocks):
    for label, (effects, _, _) in estimates.items():
        by_site = dict(zip(effects.sites, effects.effect.tolist()))
        rho_z = stats.spearmanr([by_site[s] for s in z.sites], z.effect.flatten())[0]
        exact = [e for kind in BLOCK_KINDS for e in blocks[kind].effect.flatten().tolist()]
        sites = [s for kind in BLOCK_KINDS for s in blocks[kind].sites]
        rho_b = stats.spearmanr([by_site[s] for s in sites], exact)[0]
        rho = {kind: stats.spearmanr([by_site[s] for s in blocks[kind].sites], blocks[kind].effect.flatten())[0]
               for kind in BLOCK_KINDS}
        by_kind = "  ".join(f"{kind} {value:.3f}" for kind, value in rho.items())
        pearson = stats.pearsonr([by_site[s] for s in z.sites], z.effect.flatten())[0]
        print(f"Spearman vs exact  {label:20s} z (all {len(z.sites)}): {rho_z:.3f} (Pearson {pearson:.3f})   "
              f"block sites (sampled layers, {len(sites)}): {rho_b:.3f} ({by_kind})")
    top = z.effect.flatten().abs().argsort(descending=True)[:10].tolist()
    print("exact top-10 heads (|effect|) and their rank by each estimate's |effect|:")
    for i in top:
        site = z.sites[i]
        ranks = []
        for label, (effects, _, _) in estimates.items():
            by_site = dict(zip(effects.sites, effects.effect.abs().tolist()))
            order = sorted(z.sites, key=lambda s: -by_site[s])
            ranks.append(f"{label} {order.index(site) + 1}")
        print(f"  {site} exact {z.effect.flatten()[i]:+.2f}: " + ", ".join(ranks))


def circuit_report(model, task, method, directory):
    from mechattr.plots.estimates import plot_circuit, plot_faithfulness
    from mechattr.circuits import discover

    with Clock() as clock:
        circuit = discover(model, task, "node", method=method)
    seconds = clock.wall
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    print(f"node circuit ({method}, {seconds:.0f} wall s): {len(circuit.heads())} heads "
          f"({len(circuit.heads()) / n_heads:.1%} of {n_heads}), {circuit.size} nodes, faithfulness "
          f"{circuit.faithfulness:.3f}, curve AUC {circuit.auc:.3f}")
    for size, value in zip(circuit.sizes, circuit.curve):
        heads = sum(s.kind == "z" for s in circuit.ranking[:size])
        print(f"  top {size:4d} nodes ({heads:3d} heads, {heads / n_heads:6.1%}): faithfulness {value:7.3f}")
    circuit.save(directory)
    plot_circuit(circuit).figure.savefig(f"{directory}/circuit.png", dpi=120)
    plot_faithfulness(circuit).figure.savefig(f"{directory}/faithfulness.png", dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--exact-layers", type=int, default=5, help="block kinds' exact grid on this many layers")
    parser.add_argument("--tl-cells", type=int, default=10, help="TL exact cells to time (scaled to all sites)")
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--skip-tl", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU times not inflated by threads spinning on a busy machine)")
    parser.add_argument("--circuit", default=None, help="discover the node circuit and save it here")
    parser.add_argument("--circuit-method", default="atp")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = mechattr.load_model("smollm2-135m")
    task = tasks.ioi(model, n=args.n, seed=0)
    grid = all_sites(model, task.n_pos)
    n_layers = model.cfg.n_layers
    layers = sorted({round(i * (n_layers - 1) / max(1, args.exact_layers - 1)) for i in range(args.exact_layers)})
    print(f"smollm2-135m, IOI batch [{task.n_examples}, {task.n_pos}], {len(grid)} sites, torch threads "
          f"{torch.get_num_threads()}, clean-corrupt metric gap measured below", flush=True)
    estimates = time_estimates(model, task, grid, args.ig_steps)
    z, blocks, exact_seconds = exact_grid(model, task, layers)
    print(f"gap: clean {z.clean_metric:.3f}, corrupt {z.corrupt_metric:.3f}")
    print(f"mechattr exact grid: {exact_seconds:.1f} CPU s for {len(grid)} sites (block kinds timed on layers "
          f"{layers}, scaled)", flush=True)
    spearman_report(estimates, z, blocks)
    star_seconds = estimates["atp*"][1]
    fast_seconds = estimates["atp* (QK fix only)"][1]
    print(f"speed-up over mechattr exact: atp* {exact_seconds / star_seconds:.1f}x, atp* without GradDrop "
          f"{exact_seconds / fast_seconds:.1f}x")
    if not args.skip_tl:
        per_cell, tl_seconds = tl_exact_seconds(model, task, args.tl_cells, len(grid))
        print(f"TL generic_activation_patch: {per_cell:.2f} CPU s per cell, {tl_seconds:.0f} CPU s for {len(grid)} sites "
              f"(timed on {args.tl_cells} cells, scaled); speed-up atp* {tl_seconds / star_seconds:.0f}x, "
              f"atp* without GradDrop {tl_seconds / fast_seconds:.0f}x, atp {tl_seconds / estimates['atp'][1]:.0f}x")
        seconds, diff = tl_attribution(model, task, estimates["atp"][0])
        print(f"TL attribution_patch (node, per-example loop): {seconds:.1f} CPU s vs mechattr atp "
              f"{estimates['atp'][1]:.1f} CPU s; max |difference| on z and mlp_out sites {diff:.2e}")
    if args.circuit:
        circuit_report(model, task, args.circuit_method, args.circuit)


if __name__ == "__main__":
    main()
