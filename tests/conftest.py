import os

# `make test` runs pytest-xdist workers: each takes its share of the cores, and so do the processes a
# test starts (notebook kernels, the README's commands); cores oversubscribed by OpenMP threads run
# several times slower. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

import mechattr  # noqa: E402


# Tests of other modules that use a module's long session fixture run on that module's worker.
_RUN_WITH = {"tests/test_readme.py::test_the_examples_run_in_order_without_warnings": "tests/test_app.py"}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist runs whole modules on one worker (their module fixtures are computed once), in the
    order collected, with `_RUN_WITH`'s tests joining their module."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _RUN_WITH.get(nodeid, nodeid.split("::", 1)[0])

    return ByModule(config, log)


# The longest modules (about 480, 450 and 200 s of one thread each, the README's examples counted with
# test_app), started first so the others fill in around them and both workers finish together.
_LONGEST_FIRST = ("tests/test_app.py", "tests/test_notebooks.py", "tests/test_cli.py")


def pytest_collection_modifyitems(items):
    """The longest modules first, then the other tests that load SmolLM2, then the rest."""
    def order(item: pytest.Item) -> tuple[int, bool]:
        module = _RUN_WITH.get(item.nodeid, item.nodeid.split("::", 1)[0])
        longest = _LONGEST_FIRST.index(module) if module in _LONGEST_FIRST else len(_LONGEST_FIRST)
        return longest, item.get_closest_marker("slow") is None

    items.sort(key=order)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once per session (tests get their own copy via `load_model`
    only where they change weights)."""
    return mechattr.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_ioi(smollm2):
    return mechattr.tasks.ioi(smollm2, n=8, seed=0)


@pytest.fixture(scope="session")
def quick_run(smollm2, tmp_path_factory):
    """The main job's quick configuration, run once: (output directory, metrics). Tests that change the
    directory work on a copy."""
    from mechattr.app import RunConfig, run

    out = tmp_path_factory.mktemp("run")
    return out, run(RunConfig.quick(), out, progress=False, model=smollm2)


@pytest.fixture(scope="session")
def tiny():
    """A random 2-layer TL-native model (d_model 64, 4 heads, vocab 50)."""
    return mechattr.native_model()


@pytest.fixture(scope="session")
def gqa():
    """A random TL-native bridge: 3 layers, 4 query heads sharing 2 key/value heads, LayerNorm."""
    from tests.bridges import bridge

    return bridge(n_layers=3, n_key_value_heads=2, seed=1)


@pytest.fixture(scope="session")
def tiny_task():
    """4 random prompts of 7 tokens; the corrupted ones differ at positions 2 and 4."""
    from tests.bridges import random_task

    return random_task(50, (2, 4), seed=0, name="tiny")


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """SmolLM2 loaded with the checkpoint's weights (no compatibility mode), heads L9H6 and L12H0 trained
    two steps on IOI, and exported: (trained bridge, its `FinetuneResult`, the export folder)."""
    from mechattr.finetune import TrainConfig, masks, train
    from mechattr.finetune.export import export
    from mechattr.selection import SiteSet
    from mechattr.sites import Site

    model = mechattr.load_model("smollm2-135m", compatibility=False)
    sites = SiteSet.of([Site("z", 9, head=6), Site("z", 12, head=0)])
    task = mechattr.tasks.ioi(model, n=8, seed=0)
    result = train(model, masks(model, sites), task, TrainConfig(steps=2, lr=1e-2, batch_size=4), progress=False,
                   sites=sites, base_model="smollm2-135m")
    return model, result, export(model, tmp_path_factory.mktemp("export") / "smollm2", delta=result.delta)
