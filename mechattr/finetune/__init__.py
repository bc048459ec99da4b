"""Precision fine-tuning: train only the parameters of the sites that matter.

    sites = mechattr.selection.select(effects, top_k=8)          # from patching or attribution
    mask = masks(model, sites)                                     # {param name: bool tensor}
    result = train(model, mask, task, TrainConfig(steps=50), sites=sites)
    result.delta.save("delta.safetensors")                         # indices + values only
    Delta.load("delta.safetensors").apply(mechattr.load_model(name))

Coordinates: `mechattr.load_model` returns a bridge in compatibility mode, whose weights are the
checkpoint's with LayerNorm folded in and the unembedding centred. Training happens on those weights,
so a delta applies to a model loaded the same way (`mechattr.load_model(name)`), not to the original
checkpoint; `Delta.apply` checks this.
"""

from mechattr.finetune.callbacks import Checkpoint, Evaluate
from mechattr.finetune.compare import ComparisonTable, compare
from mechattr.finetune.data import Text
from mechattr.finetune.delta import Delta, merge
from mechattr.finetune.masks import full_masks, masks, n_trained, union
from mechattr.finetune.methods import Full, LoRA, RandomSites, BottomSites, TopSites
from mechattr.finetune.trainer import Callback, FinetuneResult, TrainConfig, train

__all__ = ["masks", "full_masks", "union", "n_trained", "train", "TrainConfig", "FinetuneResult", "Callback",
           "Checkpoint", "Evaluate", "Text", "Delta", "merge", "compare", "ComparisonTable", "TopSites",
           "BottomSites", "RandomSites", "LoRA", "Full"]
