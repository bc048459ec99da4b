"""The decoder-only architecture families mechattr is checked on, as one table.

Each `Family` says how to build a tiny random model of it offline (a `transformers` config and its
keyword arguments) and what mechattr supports on it. The conformance tests run over this table, and the
README's support matrix is `support_table()`, so the documentation claims only what the tests check.
`build(name, folder)` writes a loadable model folder: `mechattr.load_model(build("gpt2", tmp))`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Family", "FAMILIES", "build", "tokenizer", "support_table", "masks_supported", "VOCAB"]

VOCAB = 260  # 256 byte tokens and 4 special ones: every family's `vocab_size`
_SPECIAL = ("<|endoftext|>", "<pad>", "<s>", "</s>")
_SCALE = 4.0  # default initialisations are so small that patches barely move the metric
_D = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
          max_position_embeddings=64)  # the common shape, in the names most configs use
_GQA = dict(_D, num_key_value_heads=2)


_PARALLEL = "parallel attention and MLP: no resid_mid, so no edges into MLPs"
_NORMED_MLP = "a norm after the MLP: edges into MLPs are refused"


@dataclass(frozen=True)
class Family:
    """One architecture family: how to build a tiny model of it and what mechattr supports on it."""

    config: str  # `transformers` config class name
    kwargs: dict[str, Any]  # config arguments for a 2-layer, d_model-64 model with `VOCAB` tokens
    architecture: str  # the `architectures` entry the bridge dispatches on
    boots: bool = True  # whether TransformerLens 4.3's bridge loads it
    fast_path: bool = True  # patched runs resume at a block (else exact full forwards)
    prefix: bool = True  # ...and at a position, reusing the unpatched prefix's keys and values
    attribution: bool = True  # `attribute(method="atp")` equals a hand-written gradient
    relp: bool = True  # `attribute(method="relp")` equals hand-written relevance rules (else a clear refusal)
    edges: bool = True  # `edges.patch_edges` into heads equals its exact reference
    mlp_edges: bool = True  # ...and into MLPs (else such edges get a clear error)
    masks: bool | None = None  # fine-tuning masks; None: `mechattr.finetune.layouts.SUPPORTED_FAMILIES` says
    missing: tuple[str, ...] = ()  # site kinds the model lacks or cannot be patched at (a clear error)
    notes: str = ""  # why something is unsupported, or what differs on this family


FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=64), "GPT2LMHeadModel",
                   prefix=False, notes="no explicit attention mask: patched runs resume at a block, from position 0"),
    "gpt_neox": Family("GPTNeoXConfig", dict(_D, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.25}),
                       "GPTNeoXForCausalLM", mlp_edges=False, missing=("resid_mid",), notes=_PARALLEL),
    "gptj": Family("GPTJConfig", dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, rotary_dim=8),
                   "GPTJForCausalLM", mlp_edges=False, missing=("resid_mid", "pattern"),
                   notes=f"{_PARALLEL}; the attention pattern hook is read-only"),
    # ffn_dim = 4 x d_model as in every OPT checkpoint: TL 4.3 reads the MLP width as 4 x d_model.
    "opt": Family("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                                    word_embed_proj_dim=64, max_position_embeddings=64), "OPTForCausalLM",
                  mlp_edges=False, missing=("pattern",),
                  notes="the attention pattern hook is read-only; the MLP has no module of its own to recompute"),
    "llama": Family("LlamaConfig", _GQA, "LlamaForCausalLM"),
    "mistral": Family("MistralConfig", dict(_GQA, sliding_window=None), "MistralForCausalLM"),
    "mixtral": Family("MixtralConfig", dict(_GQA, num_local_experts=4, num_experts_per_tok=2,
                                            sliding_window=None), "MixtralForCausalLM", relp=False,
                      notes="mixture of experts: relp has no rule for the router"),
    "qwen2": Family("Qwen2Config", _GQA, "Qwen2ForCausalLM"),
    "qwen3": Family("Qwen3Config", dict(_GQA, head_dim=16), "Qwen3ForCausalLM"),
    "gemma": Family("GemmaConfig", dict(_GQA, head_dim=16), "GemmaForCausalLM"),
    "gemma2": Family("Gemma2Config", dict(_GQA, head_dim=16, final_logit_softcapping=30.0,
                                          attn_logit_softcapping=50.0, sliding_window=4),
                     "Gemma2ForCausalLM", mlp_edges=False, notes=f"final logit soft-capping; {_NORMED_MLP}"),
    "gemma3": Family("Gemma3TextConfig", dict(_GQA, head_dim=16, sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention"]),
                     "Gemma3ForCausalLM", mlp_edges=False, notes=_NORMED_MLP),
    "phi": Family("PhiConfig", dict(_D, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5}),
                  "PhiForCausalLM", mlp_edges=False, missing=("resid_mid",), notes=_PARALLEL),
    "phi3": Family("Phi3Config", _GQA, "Phi3ForCausalLM"),
    "olmo2": Family("Olmo2Config", _GQA, "Olmo2ForCausalLM", edges=False, mlp_edges=False,
                    notes="norms after attention and MLP (no ln1/ln2): edge receivers cannot be recomputed"),
    "stablelm": Family("StableLmConfig", _GQA, "StableLmForCausalLM"),
    "falcon": Family("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=64), "FalconForCausalLM",
                     mlp_edges=False, missing=("resid_mid",), notes=_PARALLEL),
    "bloom": Family("BloomConfig", dict(n_layer=2, hidden_size=64, n_head=4), "BloomForCausalLM",
                    mlp_edges=False, notes="ALiBi positions; the MLP reads the residual as a second input"),
}


def tokenizer() -> Any:
    """A byte-level tokenizer built offline: 256 byte tokens, then `_SPECIAL` (ids 256..259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab.update({tok: 256 + i for i, tok in enumerate(_SPECIAL)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    eos, pad, bos, _ = _SPECIAL
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad, bos_token=bos,
                                   unk_token=eos)


def _config(family: Family) -> Any:
    import transformers

    eos, pad, bos, _ = (256 + i for i in range(len(_SPECIAL)))  # the ids `tokenizer()` gives them
    tok_ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    config = getattr(transformers, family.config)(vocab_size=VOCAB, **tok_ids, **family.kwargs)
    config.architectures = [family.architecture]
    return config


def build(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `name` model (float32, matrices scaled by `_SCALE`, seeded) and the byte-level
    tokenizer into `folder`; returns `folder`, ready for `mechattr.load_model(str(folder))`."""
    from transformers import AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known families: {', '.join(FAMILIES)}")
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(FAMILIES[name]), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(_SCALE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def _mark(value: bool) -> str:
    return "yes" if value else "no"


def masks_supported(name: str) -> bool:
    """Whether precision fine-tuning masks are checked on family `name`."""
    family = FAMILIES[name]
    if family.masks is not None:
        return family.masks
    from mechattr.finetune import layouts

    return name in getattr(layouts, "SUPPORTED_FAMILIES", ())


def support_table() -> str:
    """The README's support matrix, as a markdown table (one row per family)."""
    rows = ["| family | loads | patch | fast path (block / position) | attribution (AtP) | RelP | edges "
            "| fine-tuning masks | kinds not available | notes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in FAMILIES.items():
        fast = f"{_mark(f.boots and f.fast_path)} / {_mark(f.boots and f.fast_path and f.prefix)}"
        edges = "heads" if f.boots and f.edges and not f.mlp_edges else _mark(f.boots and f.edges)
        cells = [_mark(f.boots), _mark(f.boots), fast, _mark(f.boots and f.attribution), _mark(f.boots and f.relp),
                 edges, _mark(f.boots and masks_supported(name)), ", ".join(f.missing)]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {f.notes} |")
    return "\n".join(rows) + "\n"
