"""Independent references: one site per forward with a hand-written TransformerLens hook."""

import torch


def hand_patch(model, base_tokens, source_tokens, hook_name, index, answer, wrong, value_fn=None):
    """Per-example logit difference at the last position after setting activation[:, *index] in the base
    run to `value_fn(base_act, source_act)` (default: the source run's activation), in place as TL's own
    patch setters do."""
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source_tokens, names_filter=lambda n: n == hook_name)
        _, base_cache = model.run_with_cache(base_tokens, names_filter=lambda n: n == hook_name)
    where = (slice(None),) + tuple(index)
    source_act, base_act = source_cache[hook_name][where], base_cache[hook_name][where]
    value = source_act if value_fn is None else value_fn(base_act, source_act)

    def hook(act, hook):
        act[where] = value
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(base_tokens, fwd_hooks=[(hook_name, hook)])[:, -1]
    return logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]


def logit_diff(model, tokens, answer, wrong):
    with torch.no_grad():
        logits = model(tokens)[:, -1]
    return logits.gather(-1, answer[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]
