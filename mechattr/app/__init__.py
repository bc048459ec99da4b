"""The application layer: the main job `mechattr run` on top of the library.

    from mechattr.app import RunConfig, run
    metrics = run(RunConfig.quick(), "runs/smoke")

Modules: `config` (`RunConfig`), `store` (the run directory: strict JSON records and the stage cache),
`stages` (the seven stages and `run`), `report` (report.md and its figures). The command line
(`mechattr.cli`) calls `run`.
"""

from mechattr.app.config import RunConfig
from mechattr.app.stages import effects_summary, run
from mechattr.app.store import DELTA_FILE, STAGE_DIR

__all__ = ["RunConfig", "run", "effects_summary", "STAGE_DIR", "DELTA_FILE"]
