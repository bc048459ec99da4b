"""Precision fine-tuning: train only the parameters of the sites that matter.

    sites = mechattr.selection.select(effects, top_k=8)          # from patching or attribution
    mask = masks(model, sites)                                     # {param name: bool tensor}
    result = train(model, mask, task, TrainConfig(steps=50), sites=sites)
    result.delta.save("delta.safetensors")                         # indices + values only
    Delta.load("delta.safetensors").apply(mechattr.load_model(name))

Coordinates: `mechattr.load_model(name)` returns a bridge in compatibility mode, whose weights are the
checkpoint's with LayerNorm folded in and the unembedding centred; a delta trained there applies to a
model loaded the same way, not to the original checkpoint. To fine-tune a model that leaves mechattr,
train `mechattr.load_model(name, compatibility=False)` (the checkpoint's own weights, same hooks and
masks) and export it (`mechattr.finetune.export`: a Hugging Face folder and a delta keyed by Hugging Face
names). Each delta records its coordinates, and `Delta.apply` checks that the model fits.
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
