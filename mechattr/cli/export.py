"""`mechattr export`: a saved delta applied to its base model's checkpoint weights, written as a Hugging
Face model folder (see `mechattr.finetune.export`)."""

import argparse
from pathlib import Path

__all__ = ["add"]


def add(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a delta trained in checkpoint coordinates (mechattr finetune --export) "
                                      "as a Hugging Face model folder")
    e.add_argument("delta", help="a delta.safetensors written by mechattr finetune")
    e.add_argument("--model", default=None, help="the base model (default: the one the delta records)")
    e.add_argument("--device", default=None, help="where the model is rebuilt, e.g. cpu, cuda (default: cpu)")
    e.add_argument("--out", required=True, help="output directory (new, empty, or an earlier export)")
    e.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    import mechattr
    from mechattr.finetune import Delta
    from mechattr.finetune.delta import CHECKPOINT
    from mechattr.finetune.export import export

    delta = Delta.load(args.delta)
    if delta.coordinates != CHECKPOINT:
        raise ValueError(f"{args.delta} was trained in coordinates {delta.coordinates!r}: it applies to "
                         f"{delta.applies_to()}, and cannot be exported. Fine-tune with --export DIR (or on "
                         "mechattr.load_model(name, compatibility=False)) to get a delta that can.")
    name = args.model or delta.base_model
    dtype = next(iter(delta.values.values())).dtype  # the probes hold base values in the trained dtype
    model = delta.apply(mechattr.load_model(name, device=args.device, dtype=dtype, compatibility=False))
    out = export(model, Path(args.out), delta=delta, base_model=name)
    print(f"applied {delta.n_trained:,} trained entries to {name!r}; wrote the Hugging Face model folder {out}")
