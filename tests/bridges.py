"""Small random TL-native bridges and random-token tasks for tests, built offline."""

import torch

from mechattr.tasks import Task


def bridge(**overrides):
    """A random TL-native bridge with `overrides` of the default small config (compatibility mode)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    cfg = dict(d_model=64, n_layers=2, n_ctx=32, d_head=16, n_heads=4, d_vocab=50, act_fn="gelu", seed=0)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**cfg, **overrides}))
    model.enable_compatibility_mode()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_task(vocab: int, corrupted: tuple[int, ...], seed: int, name: str, n: int = 4, n_pos: int = 7) -> Task:
    """n random prompts of n_pos tokens whose corrupted copies differ at the `corrupted` positions;
    answers 1..n, wrong answers n+1..2n."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, n_pos), generator=g)
    corrupt = clean.clone()
    for pos in corrupted:
        corrupt[:, pos] = torch.randint(0, vocab, (n,), generator=g)
    return Task(clean, corrupt, answer=torch.arange(1, n + 1), wrong=torch.arange(n + 1, 2 * n + 1), name=name)


def answered_task(seed: int, n: int = 12) -> Task:
    """n random 7-token prompts corrupted at position 3, with random answer and wrong-answer ids (of the
    native model's 50-token vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (n, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, 50, (n,), generator=g)
    return Task(clean, corrupt, answer=torch.randint(0, 50, (n,), generator=g),
                wrong=torch.randint(0, 50, (n,), generator=g), name=f"random{seed}")
