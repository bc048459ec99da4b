"""Sites: the places in a model where the do-operator can act.

A `Site` is a frozen, hashable value (`Site("z", layer=9, head=6)`). `KINDS` is the one table that maps
a site kind to its hook name and to the meaning of each non-batch axis of that hook's activation, so
indexing an activation at a site never parses a string. A `Grid` is a product of sites with named axes.
"""

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["Site", "SiteKind", "KINDS", "Grid", "grid", "model_shape", "validate"]


@dataclass(frozen=True)
class SiteKind:
    """How one kind of site is found in a TransformerLens model."""

    hook: str  # hook name template, formatted with the layer
    dims: tuple[str | None, ...]  # meaning of each non-batch activation axis; None = never indexed
    heads: str | None = None  # "query" or "kv": which head count bounds `head`
    width: str | None = None  # "d_mlp" when the kind indexes MLP neurons


KINDS: dict[str, SiteKind] = {
    "embed": SiteKind("hook_embed", ("pos", None)),
    "resid_pre": SiteKind("blocks.{layer}.hook_resid_pre", ("pos", None)),
    "resid_mid": SiteKind("blocks.{layer}.hook_resid_mid", ("pos", None)),
    "resid_post": SiteKind("blocks.{layer}.hook_resid_post", ("pos", None)),
    "attn_out": SiteKind("blocks.{layer}.hook_attn_out", ("pos", None)),
    "mlp_out": SiteKind("blocks.{layer}.hook_mlp_out", ("pos", None)),
    "z": SiteKind("blocks.{layer}.attn.hook_z", ("pos", "head", None), heads="query"),
    "q": SiteKind("blocks.{layer}.attn.hook_q", ("pos", "head", None), heads="query"),
    # GQA: keys and values have one head per key/value group, so `head` indexes the group.
    "k": SiteKind("blocks.{layer}.attn.hook_k", ("pos", "head", None), heads="kv"),
    "v": SiteKind("blocks.{layer}.attn.hook_v", ("pos", "head", None), heads="kv"),
    # The pattern's axes are [head, query_pos, key_pos]; a site's `pos` is the query position.
    "pattern": SiteKind("blocks.{layer}.attn.hook_pattern", ("head", "pos", None), heads="query"),
    "neuron": SiteKind("blocks.{layer}.mlp.hook_post", ("pos", "neuron"), width="d_mlp"),
}

BLOCK_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_KINDS = ("z", "q", "k", "v", "pattern")


@dataclass(frozen=True)
class Site:
    """One place to intervene. `pos`, `head` or `neuron` left as None means "all of that axis"."""

    kind: str
    layer: int = 0
    pos: int | None = None
    head: int | None = None
    neuron: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        spec = KINDS[self.kind]
        if self.head is not None and spec.heads is None:
            raise ValueError(f"site kind {self.kind!r} has no head axis, got head={self.head}")
        if self.neuron is not None and spec.width is None:
            raise ValueError(f"site kind {self.kind!r} has no neuron axis, got neuron={self.neuron}")

    @property
    def hook(self) -> str:
        return KINDS[self.kind].hook.format(layer=self.layer)

    @property
    def index(self) -> tuple:
        """Index into the activation with its batch axis removed."""
        return self.index_from(0)

    def index_from(self, start: int) -> tuple:
        """Index into an activation that holds only positions `start`.. (a run that reuses the prefix)."""
        dims = KINDS[self.kind].dims
        offsets = {"pos": start}
        return tuple(slice(None) if d is None or getattr(self, d) is None else getattr(self, d) - offsets.get(d, 0)
                     for d in dims)

    @property
    def first_pos(self) -> int:
        """The earliest position whose activations the site can change (causal attention)."""
        return 0 if self.pos is None else self.pos

    @property
    def resume_layer(self) -> int | None:
        """The first block whose input can differ from the unpatched run; None when the site sits before
        the blocks (embeddings), so only a full forward applies it."""
        return None if self.kind == "embed" else self.layer

    def __str__(self) -> str:
        parts = [f"L{self.layer}"] if self.kind != "embed" else []
        parts += [f"{k[0].upper()}{getattr(self, k)}" for k in ("pos", "head", "neuron") if getattr(self, k) is not None]
        return f"{self.kind}[{' '.join(parts)}]"


def model_shape(model: Any) -> dict[str, int]:
    """Layer, head, key/value-head and MLP sizes from a TransformerLens config (bridge or legacy)."""
    cfg = model.cfg
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    return {"n_layers": cfg.n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "d_mlp": cfg.d_mlp, "n_ctx": cfg.n_ctx}


def validate(sites: Iterable[Site], model: Any, n_pos: int | None = None) -> None:
    """Raise a ValueError naming the first site that does not exist in `model` (or in prompts of `n_pos`)."""
    shape = model_shape(model)
    for site in sites:
        spec = KINDS[site.kind]
        checks = [("layer", site.layer, shape["n_layers"], "n_layers")]
        if spec.heads:
            key = "n_heads" if spec.heads == "query" else "n_kv_heads"
            checks.append(("head", site.head, shape[key], key))
        if spec.width:
            checks.append(("neuron", site.neuron, shape["d_mlp"], "d_mlp"))
        if n_pos is not None:
            checks.append(("pos", site.pos, n_pos, "prompt length in tokens"))
        for name, value, bound, what in checks:
            if value is not None and not 0 <= value < bound:
                raise ValueError(f"site {site}: {name} {value} out of range; the model has {what} = {bound} "
                                 f"(valid {name}s 0..{bound - 1})")


@dataclass(frozen=True)
class Grid:
    """A product of sites of one kind, laid out in C order along named axes."""

    kind: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    sites: tuple[Site, ...]

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    @classmethod
    def of(cls, sites: Sequence[Site]) -> "Grid":
        """A one-axis grid over an arbitrary list of sites (possibly of mixed kinds)."""
        sites = tuple(sites)
        if not sites:
            raise ValueError("a grid needs at least one site")
        kinds = {s.kind for s in sites}
        return cls(kind=kinds.pop() if len(kinds) == 1 else "mixed", axes=("site",), shape=(len(sites),), sites=sites)


def grid(model: Any, kind: str, n_pos: int | None = None, *, per_position: bool | None = None,
         layers: Sequence[int] | None = None) -> Grid:
    """All sites of `kind`: layer x pos for block kinds (and embed: pos), layer x head for head kinds
    (patched at every position; `per_position=True` gives layer x pos x head), layer x neuron for neurons.

    `n_pos` is the prompt length in tokens, needed whenever the grid has a position axis.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    shape = model_shape(model)
    spec = KINDS[kind]
    if per_position is None:
        per_position = spec.heads is None and spec.width is None
    if per_position and n_pos is None:
        raise ValueError(f"a {kind!r} grid with a position axis needs n_pos (the prompt length in tokens)")
    layer_list = list(range(shape["n_layers"])) if layers is None else list(layers)
    axes: list[tuple[str, list]] = [] if kind == "embed" else [("layer", layer_list)]
    if per_position:
        axes.append(("pos", list(range(n_pos))))
    if spec.heads:
        axes.append(("head", list(range(shape["n_heads" if spec.heads == "query" else "n_kv_heads"]))))
    if spec.width:
        axes.append(("neuron", list(range(shape["d_mlp"]))))
    names = tuple(a for a, _ in axes)
    sites = tuple(Site(kind, **dict(zip(names, combo))) for combo in itertools.product(*(v for _, v in axes)))
    if not sites:
        raise ValueError(f"the {kind!r} grid is empty: {dict((a, v) for a, v in axes if not v)}")
    validate(sites, model, n_pos)
    return Grid(kind=kind, axes=names, shape=tuple(len(v) for _, v in axes), sites=sites)
