"""Exact patching grids on smollm2-135m: mechattr vs TransformerLens 4.3's `generic_activation_patch`.

Both sides run in this process on the same model and IOI batch; the script checks they agree and prints
the time ratio. TL runs one full forward per cell; `--tl-layers` times TL on a subset of layers and
scales its time to the full grid (say so when you quote it).

    .venv/bin/python benchmarks/bench_patching.py [--n 8] [--kinds resid_pre,attn_out,mlp_out] [--tl-layers 30]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

import mechattr  # noqa: E402
from mechattr import tasks  # noqa: E402

TL_FUNCTIONS = {"resid_pre": tl_patching.get_act_patch_resid_pre, "attn_out": tl_patching.get_act_patch_attn_out,
                "mlp_out": tl_patching.get_act_patch_mlp_out}


def tl_grid(model, task, kind, layers):
    """TL's exact grid restricted to `layers` (all positions), metric = mean logit difference."""
    import pandas as pd

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, task.answer[:, None]) - last.gather(-1, task.wrong[:, None])).mean()

    _, clean_cache = model.run_with_cache(task.clean)
    index = pd.DataFrame([(l, p) for l in layers for p in range(task.n_pos)], columns=["layer", "pos"])
    setter = tl_patching.layer_pos_patch_setter
    out = tl_patching.generic_activation_patch(model, task.corrupt, clean_cache, metric, setter, kind,
                                               index_df=index)
    return out.reshape(len(layers), task.n_pos)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--kinds", default="resid_pre,attn_out,mlp_out")
    parser.add_argument("--tl-layers", type=int, default=30, help="time TL on this many evenly spaced layers")
    args = parser.parse_args()

    model = mechattr.load_model("smollm2-135m")
    task = tasks.ioi(model, n=args.n, seed=0)
    n_layers = model.cfg.n_layers
    tl_layers = sorted({round(i * (n_layers - 1) / max(1, args.tl_layers - 1)) for i in range(args.tl_layers)})
    print(f"smollm2-135m, IOI batch [{task.n_examples}, {task.n_pos}], torch threads {torch.get_num_threads()}")
    total_ours = total_tl = 0.0
    for kind in args.kinds.split(","):
        start = time.perf_counter()
        effects = mechattr.patch(model, task, mechattr.grid(model, kind, task.n_pos), progress=False)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            theirs = tl_grid(model, task, kind, tl_layers)
        tl_time = (time.perf_counter() - start) * n_layers / len(tl_layers)
        diff = float((effects.values[tl_layers] - theirs).abs().max())
        cells = n_layers * task.n_pos
        total_ours += ours
        total_tl += tl_time
        print(f"{kind:10s} {cells} cells  mechattr {ours:7.1f} s ({1000 * ours / cells:5.1f} ms/cell)  "
              f"TL {tl_time:7.1f} s ({1000 * tl_time / cells:5.1f} ms/cell)  ratio {tl_time / ours:5.2f}x  "
              f"max |diff| {diff:.2e}")
        assert diff < 1e-4, f"{kind}: mechattr and TL disagree by {diff}"
    scaled = "" if len(tl_layers) == n_layers else f" (TL timed on {len(tl_layers)} of {n_layers} layers, scaled)"
    print(f"total      mechattr {total_ours:.1f} s  TL {total_tl:.1f} s  ratio {total_tl / total_ours:.2f}x{scaled}")


if __name__ == "__main__":
    main()
