"""Sites: the places in a model where the do-operator can act.

A `Site` is a frozen, hashable value (`Site("z", layer=9, head=6)`). `KINDS` is the one table that maps
a site kind to its hook name and to the meaning of each non-batch axis of that hook's activation, so
indexing an activation at a site never parses a string; `AUXILIARY` names the other hooks the engine reads
(rotated queries and keys, the MLP's input). A `Grid` is a product of sites (or of edges, see
`mechattr.graph`) with named axes.

A site's `pos` is a token index, the same in every example, or the name of a position the task aligns
across its examples (`Task.named_positions`, e.g. "S2"), which each example has at its own index.
"""

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from mechattr.models import hook_problem, model_name, model_shape

__all__ = ["Site", "SiteKind", "KINDS", "AUXILIARY", "hook_name", "Grid", "grid", "validate", "available_kinds"]


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

# Hooks the engine reads that are not sites: queries and keys after rotary embeddings (fired only by
# rotary models) and the MLP's input (the residual after ln2's hook, where edges into an MLP are read).
AUXILIARY: dict[str, str] = {
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "mlp_in": "blocks.{layer}.ln2.hook_in",
}


def hook_name(kind: str, layer: int = 0) -> str:
    """The hook of a site kind (or an `AUXILIARY` hook) in block `layer`."""
    template = KINDS[kind].hook if kind in KINDS else AUXILIARY.get(kind)
    if template is None:
        raise ValueError(f"unknown hook kind {kind!r}; valid: {', '.join([*KINDS, *AUXILIARY])}")
    return template.format(layer=layer)


@dataclass(frozen=True)
class Site:
    """One place to intervene. `pos`, `head` or `neuron` left as None means "all of that axis"; a `pos`
    given as a string names a task position (see the module docstring)."""

    kind: str
    layer: int = 0
    pos: int | str | None = None
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
        if self.pos == "":
            raise ValueError(f"site kind {self.kind!r}: a named position needs a name, got pos=''")

    @property
    def hook(self) -> str:
        return hook_name(self.kind, self.layer)

    def to_json(self) -> list:
        """[kind, layer, pos, head, neuron], the form saved in effects and circuit files."""
        return [self.kind, self.layer, self.pos, self.head, self.neuron]

    @classmethod
    def from_json(cls, value: Sequence) -> "Site":
        return cls(*value)

    @property
    def index(self) -> tuple:
        """Index into the activation with its batch axis removed."""
        return self.index_from(0)

    def index_from(self, start: int) -> tuple:
        """Index into an activation that holds only positions `start`.. (a run that reuses the prefix)."""
        if isinstance(self.pos, str):
            raise ValueError(f"site {self} is at the named position {self.pos!r}, whose index differs per "
                             "example; index activations with Site.where(rows, at)")
        dims = KINDS[self.kind].dims
        offsets = {"pos": start}
        return tuple(slice(None) if d is None or getattr(self, d) is None else getattr(self, d) - offsets.get(d, 0)
                     for d in dims)

    def where(self, rows: slice, at: Tensor | None = None, start: int = 0) -> tuple:
        """Index into a batched activation holding positions `start`..: batch `rows`, then the site's axes.
        `at` [rows] is each row's token index of a named `pos` (required then, ignored otherwise)."""
        if not isinstance(self.pos, str):
            return (rows, *self.index_from(start))
        if at is None:
            raise ValueError(f"site {self} is at the named position {self.pos!r}: pass each row's index as `at`")
        dims = KINDS[self.kind].dims
        batch = torch.arange(rows.start, rows.stop, device=at.device)  # (rows,), paired with at's rows
        return (batch, *(at - start if d == "pos" else slice(None) if d is None or getattr(self, d) is None
                         else getattr(self, d) for d in dims))

    @property
    def first_pos(self) -> int:
        """The earliest position whose activations the site can change (causal attention); 0 for a named
        position, whose earliest index depends on the task."""
        return self.pos if isinstance(self.pos, int) else 0

    @property
    def resume_layer(self) -> int | None:
        """The first block whose input can differ from the unpatched run; None when the site sits before
        the blocks (embeddings), so only a full forward applies it."""
        return None if self.kind == "embed" else self.layer

    def __repr__(self) -> str:
        """The constructor call that builds this site, without the defaults: `Site("z", layer=9, head=6)`."""
        fields = [f"layer={self.layer}"] if self.kind != "embed" else []
        fields += [f"{k}={getattr(self, k)!r}" for k in ("pos", "head", "neuron") if getattr(self, k) is not None]
        return f"Site({', '.join([repr(self.kind), *fields])})"

    def __str__(self) -> str:
        parts = [f"L{self.layer}"] if self.kind != "embed" else []
        parts += [f"@{self.pos}" if isinstance(self.pos, str) else f"P{self.pos}"] if self.pos is not None else []
        parts += [f"{k[0].upper()}{getattr(self, k)}" for k in ("head", "neuron") if getattr(self, k) is not None]
        return f"{self.kind}[{' '.join(parts)}]"


def validate(sites: Iterable[Any], model: Any, n_pos: int | None = None) -> None:
    """Raise a ValueError naming the first site that does not exist in `model` (or in prompts of `n_pos`):
    a kind the model lacks or cannot be patched at, or an index out of range. Edges are checked by their
    sender and receiver; named positions by the task (`Task.check_positions`). The first check of a
    kind on a model runs the model once (`models.hook_problem`)."""
    shape = model_shape(model)
    problems: dict[str, str | None] = {}  # per kind: grids hold tens of thousands of sites of one kind
    for site in _as_sites(sites):
        if site.kind not in problems:
            problems[site.kind] = _kind_problem(model, site.kind)
        problem = problems[site.kind]
        if problem is not None:
            raise ValueError(f"site {site}: site kind {site.kind!r} is not available on model {model_name(model)}: "
                             f"{problem}; valid kinds on this model: {', '.join(available_kinds(model))}")
        _check_ranges(site, shape, n_pos)


def _check_ranges(site: Site, shape: dict[str, int], n_pos: int | None) -> None:
    spec = KINDS[site.kind]
    checks = [("layer", site.layer, shape["n_layers"], "n_layers")]
    if spec.heads:
        key = "n_heads" if spec.heads == "query" else "n_kv_heads"
        checks.append(("head", site.head, shape[key], key))
    if spec.width:
        checks.append(("neuron", site.neuron, shape["d_mlp"], "d_mlp"))
    if n_pos is not None and not isinstance(site.pos, str):
        checks.append(("pos", site.pos, n_pos, "prompt length in tokens"))
    for name, value, bound, what in checks:
        if value is not None and not 0 <= value < bound:
            raise ValueError(f"site {site}: {name} {value} out of range; the model has {what} = {bound} "
                             f"(valid {name}s 0..{bound - 1})")


def available_kinds(model: Any) -> list[str]:
    """The site kinds `model` has hooks for and whose hooks reach its output."""
    return [kind for kind in KINDS if _kind_problem(model, kind) is None]


def _as_sites(items: Iterable[Any]) -> Iterable[Site]:
    for item in items:
        if isinstance(item, Site):
            yield item
        else:  # an edge
            yield item.sender
            yield item.receiver


def _kind_problem(model: Any, kind: str) -> str | None:
    problem = hook_problem(model, hook_name(kind, 0))
    if problem is not None and kind == "resid_mid" and getattr(model.cfg, "parallel_attn_mlp", False):
        problem += (" (parallel attention: attention and MLP both read the block's input, so there is no "
                    "residual stream between them)")
    return problem


@dataclass(frozen=True)
class Grid:
    """A product of sites of one kind, laid out in C order along named axes; or a list of edges
    (`Grid.of(edges)`, kind "edge")."""

    kind: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    sites: tuple[Any, ...]  # Sites, or `mechattr.graph.Edge`s

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    @classmethod
    def of(cls, sites: Sequence[Any]) -> "Grid":
        """A one-axis grid over an arbitrary list of sites (possibly of mixed kinds) or of edges."""
        sites = tuple(sites)
        if not sites:
            raise ValueError("a grid needs at least one site")
        kinds = {s.kind for s in sites}
        return cls(kind=kinds.pop() if len(kinds) == 1 else "mixed", axes=("site",), shape=(len(sites),), sites=sites)


def grid(model: Any, kind: str, n_pos: int | Sequence[int | str] | None = None, *,
         per_position: bool | None = None, layers: Sequence[int] | None = None) -> Grid:
    """All sites of `kind`: layer x pos for block kinds (and embed: pos), layer x head for head kinds
    (patched at every position; `per_position=True` gives layer x pos x head), layer x neuron for neurons.

    `n_pos`, needed whenever the grid has a position axis, is the prompt length in tokens (positions
    0..n_pos-1) or the positions themselves: `task.positions` (named positions on a task of mixed lengths).
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
        axes.append(("pos", list(range(n_pos)) if isinstance(n_pos, int) else list(n_pos)))
    if spec.heads:
        axes.append(("head", list(range(shape["n_heads" if spec.heads == "query" else "n_kv_heads"]))))
    if spec.width:
        axes.append(("neuron", list(range(shape["d_mlp"]))))
    names = tuple(a for a, _ in axes)
    sites = tuple(Site(kind, **dict(zip(names, combo))) for combo in itertools.product(*(v for _, v in axes)))
    if not sites:
        raise ValueError(f"the {kind!r} grid is empty: {dict((a, v) for a, v in axes if not v)}")
    # Only the ranges: whether the model can be patched at this kind is checked when a run uses the grid.
    # Every axis but the layers is the model's own or range(n_pos): one site per layer is checked.
    checked: set[int | None] = set()
    for site in sites:
        if site.layer not in checked:
            checked.add(site.layer)
            _check_ranges(site, shape, n_pos if isinstance(n_pos, int) else None)
    return Grid(kind=kind, axes=names, shape=tuple(len(v) for _, v in axes), sites=sites)
