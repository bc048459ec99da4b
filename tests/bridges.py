"""Small random TL-native bridges and random-token tasks for tests, built offline."""

from typing import Any

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


def templated_task(seed: int = 0, vocab: int = 50) -> Task:
    """12 prompts in 3 groups that share their first 5 tokens, then 1-4 tokens of their own (right-padded
    with 0), with random answers."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(1, vocab, (3, 5), generator=g)
    lengths = torch.tensor([6, 9, 7, 8] * 3)
    clean = torch.cat([heads.repeat_interleave(4, 0), torch.randint(1, vocab, (12, 4), generator=g)], 1)
    for i, length in enumerate(lengths):
        clean[i, length:] = 0
    return Task(clean, clean.clone(), answer=torch.randint(0, vocab, (12,), generator=g),
                wrong=torch.randint(0, vocab, (12,), generator=g), name="templated", lengths=lengths)


def block_inputs(model, layer: int) -> tuple[list[tuple[int, int]], Any]:
    """The (rows, positions) of every call of block `layer` from now on, and the hook handle to remove."""
    shapes: list[tuple[int, int]] = []
    handle = model.blocks[layer].register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    return shapes, handle
