"""Plotting, in one package; every function returns a matplotlib figure (or an object holding one).

    from mechattr import plots
    plots.save(plots.heatmap(effects).figure, "z.png")

Modules: `effects` (heatmaps and side-by-side grids of `Effects`, `save`; re-exported here),
`estimates` (an estimate against exact patching, circuits and their faithfulness curves), `attention`
(attention patterns of head sites), `finetune` (training curves and fine-tuning comparisons).
"""

from mechattr.plots.effects import DPI, FORMATS, OVERLAY_GID, VALUES, grids, heatmap, save

__all__ = ["heatmap", "grids", "save", "VALUES", "FORMATS", "DPI", "OVERLAY_GID"]
