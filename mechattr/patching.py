"""The do-operator: exact activation patching over any set of sites.

`patch` sets each site, one at a time, to the intervention's value and measures the task metric:
`patch(model, task, sites, intervention)`, or `patch(runs, sites)` on unpatched runs other calls share
(`mechattr.unpatched`). The patched runs are cells of `mechattr.cells`, resumed mid-model where the
model allows; on a task of mixed lengths every example is read out at its own last token, and a site at
a named position ("S2") is patched at each example's own index of it.
"""

from typing import Any, Sequence

from mechattr.cells import DEFAULT_MAX_MEMORY, run_cells
from mechattr.effects import Effects
from mechattr.interventions import Intervention
from mechattr.runs import Runs, check_intervention, setup
from mechattr.sites import Grid, Site, hook_name, validate
from mechattr.tasks import Task

__all__ = ["patch"]


def patch(model: Any, task: Task | Grid | Sequence[Site] | None = None, sites: Grid | Sequence[Site] | None = None,
          intervention: Intervention | None = None, *, max_memory: int = DEFAULT_MAX_MEMORY, resume: bool = True,
          progress: bool | None = None) -> Effects:
    """do(site := intervention(base, source)) for every site, one site at a time, measured by the task's
    metric at each example's last token. Returns an `Effects` over the grid (a one-axis grid for a list).
    A site at a named position (`Site("resid_pre", 3, pos="S2")`, see `Task.positions`) is patched at each
    example's own index of it.

    `patch(model, task, sites, intervention=Denoise())`, or `patch(runs, sites)` with
    `runs = mechattr.unpatched(model, task, intervention)`, which records what it lacks (a hook it has not
    recorded costs one forward of each run) and can be shared with `attribute`, `discover` and `verify`.
    `resume=False` recomputes every layer (a reference path; the results are the same).
    """
    runs: Runs
    runs, sites = setup(model, task, sites, intervention, "patch")
    if sites is None:
        raise TypeError("patch(model, task, sites): the sites are missing")
    grid = sites if isinstance(sites, Grid) else Grid.of(list(sites))
    if not grid.sites:
        raise ValueError("patch needs at least one site; the grid is empty")
    validate(grid.sites, runs.model, runs.task.n_pos)
    runs.task.check_positions(grid.sites)
    check_intervention(runs.task, runs.intervention, grid.sites)
    layers = sorted({s.resume_layer for s in grid if s.resume_layer is not None}) if resume else None
    runs.record(sorted({s.hook for s in grid}), base_hooks=[hook_name("resid_pre", layer) for layer in layers or ()],
                block_inputs=resume)
    cells = [[(site, runs.value(site))] for site in grid]
    per_example = run_cells(runs, cells, layers, max_memory=max_memory, progress=progress,
                            desc=f"patching {grid.kind}")  # (cells, n)
    return Effects.of(runs, grid, per_example, method="patch")
