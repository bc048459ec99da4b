"""Exact patching grids: mechattr vs TransformerLens 4.3's `generic_activation_patch`, on any model.

Both sides run in this process on the same model and batch; the script checks they agree and prints
the time ratio. TL runs one full forward per cell; `--tl-layers` times TL on a subset of layers and
scales its time to the full grid (say so when you quote it). `--model` is anything `load_model` takes:
the built-in smollm2-135m (IOI batch), a saved Hugging Face folder or a `.gguf` file. A model whose
tokenizer cannot spell the IOI prompts gets a random-token task instead, and the script says so.

    .venv/bin/python benchmarks/bench_patching.py [--model FOLDER] [--n 8] [--kinds resid_pre,attn_out,mlp_out]
        [--tl-layers 30] [--device cuda] [--dtype bfloat16]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformer_lens import patching as tl_patching  # noqa: E402

import mechattr  # noqa: E402
from mechattr import tasks  # noqa: E402
from mechattr.models import DTYPES  # noqa: E402
from mechattr.sites import KINDS  # noqa: E402

# Largest |mechattr - TL| accepted, as a fraction of the largest |effect|: float32 runs agree to rounding;
# in 16-bit dtypes the two sides batch rows differently, so their roundings differ by a few units of 2**-8.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
RANDOM_TASK_POS = 12  # prompt length of the random-token task
LAYER_POS_KINDS = tuple(kind for kind, spec in KINDS.items() if spec.dims == ("pos", None) and kind != "embed")


def add_model_arguments(parser: argparse.ArgumentParser, device: str | None = None) -> None:
    parser.add_argument("--model", default=mechattr.models.DEFAULT_MODEL,
                        help="smollm2-135m, a Hugging Face model folder, or a .gguf file")
    parser.add_argument("--n", type=int, default=8, help="examples in the batch")
    parser.add_argument("--device", default=device, help="e.g. cpu, cuda, cuda:1 (default: where it loads)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))


def random_task(model, n: int, n_pos: int = RANDOM_TASK_POS) -> tasks.Task:
    """n random prompts of n_pos tokens whose corrupted copies differ at two late positions."""
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupt = clean.clone()
    for pos in (n_pos // 2, n_pos - 3):
        corrupt[:, pos] = torch.randint(0, vocab, (n,), generator=g)
    answer, wrong = torch.randint(0, vocab, (2, n), generator=g)
    return tasks.Task(clean, corrupt, answer=answer, wrong=wrong, name="random tokens")


def model_and_task(args: argparse.Namespace):
    """The model `args` name, on its device and dtype, and the IOI batch (or a random-token one) there."""
    model = mechattr.load_model(args.model, device=args.device, dtype=args.dtype)
    try:
        task = tasks.ioi(model, n=args.n, seed=0)
    except tasks.TaskError as error:
        print(f"{args.model}: IOI does not fit its tokenizer ({str(error).splitlines()[0]}); using "
              f"{args.n} random-token prompts of {RANDOM_TASK_POS} tokens")
        task = random_task(model, args.n)
    device = next(model.parameters()).device
    return model, task.to(device)


def timed(fn, device: torch.device):
    """(fn(), wall seconds), waiting for a GPU's queued work at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def tl_grid(model, task, kind, layers):
    """TL's exact grid restricted to `layers` (all positions), metric = mean logit difference."""
    import pandas as pd

    def metric(logits):
        last = logits[:, -1].float()
        return (last.gather(-1, task.answer[:, None]) - last.gather(-1, task.wrong[:, None])).mean()

    _, clean_cache = model.run_with_cache(task.clean)
    index = pd.DataFrame([(l, p) for l in layers for p in range(task.n_pos)], columns=["layer", "pos"])
    setter = tl_patching.layer_pos_patch_setter
    out = tl_patching.generic_activation_patch(model, task.corrupt, clean_cache, metric, setter, kind,
                                               index_df=index)
    return out.reshape(len(layers), task.n_pos).float()


def evenly_spaced(n_layers: int, count: int) -> list[int]:
    count = min(count, n_layers)
    return sorted({round(i * (n_layers - 1) / max(1, count - 1)) for i in range(count)})


def compare_grids(model, task, kinds, n_tl_layers: int) -> dict[str, mechattr.Effects]:
    """Prints, per site kind, mechattr's and TL's time on the full [layer, pos] grid, their ratio and
    largest difference, and checks the agreement; returns mechattr's grids."""
    n_layers, device = model.cfg.n_layers, next(model.parameters()).device
    tl_layers = evenly_spaced(n_layers, n_tl_layers)
    tolerance = TOLERANCE[next(model.parameters()).dtype]
    total_ours = total_tl = 0.0
    grids = {}
    for kind in kinds:
        grid = mechattr.grid(model, kind, task.n_pos)
        effects, ours = timed(lambda: mechattr.patch(model, task, grid, progress=False), device)
        with torch.no_grad():
            theirs, tl_time = timed(lambda: tl_grid(model, task, kind, tl_layers), device)
        tl_time *= n_layers / len(tl_layers)
        diff = float((effects.values[tl_layers].to(theirs.device) - theirs).abs().max())
        scale = float(theirs.abs().max())
        cells = n_layers * task.n_pos
        total_ours += ours
        total_tl += tl_time
        grids[kind] = effects
        print(f"{kind:10s} {cells} cells  mechattr {ours:7.2f} s ({1000 * ours / cells:6.2f} ms/cell)  "
              f"TL {tl_time:7.2f} s ({1000 * tl_time / cells:6.2f} ms/cell)  ratio {tl_time / ours:5.2f}x  "
              f"max |diff| {diff:.2e} (largest |effect| {scale:.2e})", flush=True)
        assert diff <= tolerance * max(scale, 1.0), f"{kind}: mechattr and TL disagree by {diff}"
    scaled = "" if len(tl_layers) == n_layers else f" (TL timed on {len(tl_layers)} of {n_layers} layers, scaled)"
    print(f"total      mechattr {total_ours:.2f} s  TL {total_tl:.2f} s  ratio {total_tl / total_ours:.2f}x{scaled}")
    return grids


def describe(model, task, model_name: str) -> str:
    param = next(model.parameters())
    return (f"{model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}), {task.name} batch "
            f"[{task.n_examples}, {task.n_pos}], {param.dtype} on {param.device}, torch threads "
            f"{torch.get_num_threads()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--kinds", default="resid_pre,attn_out,mlp_out",
                        help=f"comma-separated [layer, pos] site kinds, of {', '.join(LAYER_POS_KINDS)}")
    parser.add_argument("--tl-layers", type=int, default=30, help="time TL on this many evenly spaced layers")
    args = parser.parse_args()
    other = [k for k in args.kinds.split(",") if k not in LAYER_POS_KINDS]
    if other:  # TL's layer_pos setter patches whole activations at a position: only these kinds compare
        parser.error(f"--kinds {','.join(other)}: the comparison with TL runs [layer, pos] grids only; "
                     f"valid kinds: {', '.join(LAYER_POS_KINDS)}")

    model, task = model_and_task(args)
    print(describe(model, task, args.model))
    compare_grids(model, task, args.kinds.split(","), args.tl_layers)


if __name__ == "__main__":
    main()
