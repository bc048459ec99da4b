import subprocess
import sys
import textwrap

import pytest
import torch

import mechattr
from mechattr import Site, distributed, grid, patch
from mechattr.attribution import attribute
from mechattr.interventions import Mean, Zero

# Run by torchrun on 2 ranks: every case's joined result (or error) is saved per rank.
WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import mechattr
    from mechattr import Site, distributed, grid, patch
    from mechattr.interventions import Mean

    out = sys.argv[1]
    torch.manual_seed(0)
    model = mechattr.native_model()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (5, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, 50, (5,), generator=g)
    task = mechattr.Task(clean, corrupt, torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10]))

    def flaky(model, task, sites, **kwargs):
        if dist.get_rank() == 1:
            raise ZeroDivisionError("only on rank 1")
        return patch(model, task, sites, **kwargs)

    cases = {
        "resid_cells": lambda: distributed.patch(model, task, grid(model, "resid_pre", 7), progress=False),
        "resid_examples": lambda: distributed.patch(model, task, grid(model, "resid_pre", 7), over="examples",
                                                    progress=False),
        "z_mean": lambda: distributed.patch(model, task, grid(model, "z"), Mean(), progress=False),
        "one_site": lambda: distributed.patch(model, task, [Site("mlp_out", 1, pos=6)], progress=False),
        "atp_examples": lambda: distributed.attribute(model, task, grid(model, "z"), "atp"),
        "atpstar_cells": lambda: distributed.attribute(model, task, grid(model, "z"), "atp*", over="cells"),
        "flaky": lambda: distributed.sharded(flaky, model, task, grid(model, "z"), progress=False),
    }
    results = {}
    for name, run in cases.items():
        try:
            e = run()
            results[name] = (e.values, e.per_example, e.clean, e.corrupt, e.grid, e.method, e.intervention)
        except Exception as error:
            results[name] = f"{type(error).__name__}: {error}"
    torch.save({"world": dist.get_world_size(), "results": results}, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()  # exiting with the group alive can abort in gloo's teardown
""")


@pytest.fixture(scope="module")
def task():
    """The worker's task: 5 prompts of 7 tokens, corrupted at position 3."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (5, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, 50, (5,), generator=g)
    return mechattr.Task(clean, corrupt, torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10]))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results from one `torchrun --nproc-per-node 2` launch of WORKER."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "worker.py").write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "worker.py"), str(root)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single(tiny, task):
    """The same cases computed in this process, without a process group."""
    return {
        "resid_cells": patch(tiny, task, grid(tiny, "resid_pre", 7), progress=False),
        "resid_examples": patch(tiny, task, grid(tiny, "resid_pre", 7), progress=False),
        "z_mean": patch(tiny, task, grid(tiny, "z"), Mean(), progress=False),
        "one_site": patch(tiny, task, [Site("mlp_out", 1, pos=6)], progress=False),
        "atp_examples": attribute(tiny, task, grid(tiny, "z"), "atp"),
        "atpstar_cells": attribute(tiny, task, grid(tiny, "z"), "atp*"),
    }


def test_two_ranks_join_to_the_single_process_result(ranks, tiny, task):
    assert [r["world"] for r in ranks] == [2, 2]
    for name, expected in _single(tiny, task).items():
        for rank in ranks:
            values, per_example, clean, corrupt, g, method, intervention = rank["results"][name]
            assert g == expected.grid, name
            assert (method, intervention) == (expected.method, expected.intervention), name
            torch.testing.assert_close(per_example, expected.per_example, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(values, expected.values, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(clean, expected.clean, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(corrupt, expected.corrupt, atol=1e-5, rtol=0, msg=name)
    # The grid is not trivially constant, so the comparison can fail.
    assert ranks[0]["results"]["resid_cells"][1].std() > 0.1


def test_a_failing_rank_fails_every_rank(ranks):
    assert ranks[1]["results"]["flaky"] == "ZeroDivisionError: only on rank 1"
    assert ranks[0]["results"]["flaky"].startswith("RuntimeError: rank 1 of 2 failed")
    assert "only on rank 1" in ranks[0]["results"]["flaky"]


def test_without_a_process_group_it_is_plain_patch(tiny, tiny_task, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = grid(tiny, "attn_out", tiny_task.n_pos)
    ours = distributed.patch(tiny, tiny_task, g, Zero(), progress=False)
    assert not torch.distributed.is_initialized()
    assert torch.equal(ours.per_example, patch(tiny, tiny_task, g, Zero(), progress=False).per_example)


@pytest.mark.parametrize("n, world", [(14, 2), (7, 3), (1, 2), (0, 2)])
def test_equal_costs_share_in_contiguous_blocks(n, world):
    parts = distributed.shares([1.0] * n, world)
    assert [i for part in parts for i in part] == list(range(n))  # every index once, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.shares([1.0] * 7, 3) == [[0, 1], [2, 3, 4], [5, 6]]


def test_shares_balance_estimated_costs(tiny, tiny_task):
    assert distributed.shares([3.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3]]
    g = grid(tiny, "resid_pre", tiny_task.n_pos)
    costs = [distributed.cell_cost(site, tiny, tiny_task.n_pos) for site in g]
    # Later layers and positions resume later, so cost less; embeddings run every block.
    assert costs[0] > costs[6] > costs[13] and costs[0] > costs[7]
    assert distributed.cell_cost(Site("embed", pos=3), tiny, tiny_task.n_pos) == costs[0]
    first, second = distributed.shares(costs, 2)
    assert len(first) < len(second) and first == list(range(len(first)))
    spent = [sum(costs[i] for i in part) for part in (first, second)]
    assert abs(spent[0] - spent[1]) <= max(costs)


def test_bad_share_axis_is_refused(tiny, tiny_task):
    with pytest.raises(ValueError, match="over='sites'.*cells, examples"):
        distributed.patch(tiny, tiny_task, [Site("z", 0, head=0)], over="sites")
