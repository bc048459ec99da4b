import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechattr  # noqa: E402
from mechattr.tasks import Task  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once per session (tests get their own copy via `load_model`
    only where they change weights)."""
    return mechattr.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_ioi(smollm2):
    return mechattr.tasks.ioi(smollm2, n=8, seed=0)


@pytest.fixture(scope="session")
def tiny():
    """A random 2-layer TL-native model (d_model 64, 4 heads, vocab 50)."""
    return mechattr.native_model()


@pytest.fixture(scope="session")
def tiny_task():
    """4 random prompts of 7 tokens; the corrupted ones differ at positions 2 and 4."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (4, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(0, 50, (4,), generator=g)
    corrupt[:, 4] = torch.randint(0, 50, (4,), generator=g)
    return Task(clean, corrupt, answer=torch.tensor([1, 2, 3, 4]), wrong=torch.tensor([5, 6, 7, 8]), name="tiny")
