"""Figures of `Effects`: heatmaps over layers x positions / heads, side-by-side grids, and saving.

Every grid is drawn as one matrix: rows are layers (layer 0 at the top; a grid without a layer axis
is one row) and columns are the remaining axes in the grid's order. A layer x pos x head grid is not
reduced: its columns are positions, each split into its heads, with a line between positions. The
colour scale is diverging and symmetric about 0, and every cell has exactly its value's colour on the
colour bar; cells that are not significant after Benjamini-Hochberg correction are marked only by a
light hatch over that colour (the legend says so). A position whose token differs between examples is
labelled "(varies)", not with one example's token. Figures come from pyplot, so notebooks show them
inline; nothing here opens a window or draws at random.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from jaxtyping import Bool, Float
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, PathPatch
from matplotlib.path import Path as MplPath

from mechattr.effects import Effects
from mechattr.storage import write_atomic

__all__ = ["heatmap", "grids", "save", "VALUES", "FORMATS"]

VALUES = ("normalized", "effect", "values")  # what a cell can show, see `Effects`
FORMATS = (".png", ".svg", ".pdf")  # what `save` writes, chosen by the path's suffix
DPI = 200  # raster resolution of saved PNGs
CMAP = colormaps["RdBu_r"].with_extremes(bad="0.85")  # red = positive; NaN cells grey
# Non-significant cells: a sparse, thin, half-transparent hatch over an untouched face, so the colour
# stays the colour bar's and a grid where nothing is significant (small n) stays readable. With
# linewidth 0 the hatch takes the edge colour and no outline is drawn.
HATCH = {"facecolor": "none", "hatch": "//", "edgecolor": (0.15, 0.15, 0.15, 0.45), "linewidth": 0.0}
HATCH_LINEWIDTH = 0.6
OVERLAY_GID = "not-significant"  # gid of the artist covering non-significant cells
MAX_TOKEN_CHARS = 14  # longer tokens are cut with an ellipsis in tick labels


@dataclass(frozen=True)
class _Matrix:
    """An Effects grid laid out for drawing: rows are layers, columns the other axes flattened."""

    data: Float[np.ndarray, "row col"]
    significant: Bool[np.ndarray, "row col"] | None  # None = no significance overlay
    label: str  # colour bar label: metric and value kind
    row_labels: list[str]
    row_title: str
    col_labels: list[str]  # one per column group (a group is one column unless two axes share columns)
    col_title: str
    group: int  # columns per group


def _token_label(pos: int, token: str, varies: bool = False) -> str:
    """`3: ' John'`: position and token, quoted so leading spaces show, control characters escaped;
    `3: (varies)` where examples have different tokens."""
    if varies:
        return f"{pos}: (varies)"
    text = token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(text) > MAX_TOKEN_CHARS:
        text = text[: MAX_TOKEN_CHARS - 1] + "…"
    return f"{pos}: '{text}'".replace("$", r"\$")  # a bare $ would start matplotlib mathtext


def _axis_labels(effects: Effects, axis: str, values: list) -> tuple[list[str], str]:
    if axis == "pos":
        tokens = effects.str_tokens
        if any(isinstance(p, str) for p in values):  # named positions ("S2"): each example has its own index
            return [str(p).replace("$", r"\$") for p in values], "named position"
        if tokens and all(p < len(tokens) for p in values):
            varying = set(effects.meta.get("varying_positions", ()))
            return [_token_label(p, tokens[p], p in varying) for p in values], "token"
        return [str(p) for p in values], "position"
    if axis == "head":
        return [str(h) for h in values], "key/value head" if effects.kind in ("k", "v") else "head"
    if axis == "site":
        return [str(s) for s in effects.sites], "site"
    return [str(v) for v in values], axis


def _values(effects: Effects, value: str) -> tuple[np.ndarray, str]:
    """The cell values to draw and their colour bar label; `normalized` falls back to `effect`."""
    if value not in VALUES:
        raise ValueError(f"unknown value kind {value!r}; valid: {', '.join(VALUES)}")
    metric = effects.metric
    if value == "normalized":
        try:
            return effects.normalized.detach().cpu().numpy(), f"normalized {metric} effect"
        except ValueError:
            warnings.warn(f"{effects.kind}: clean and corrupted {metric} are equal, so the normalized effect "
                          "is undefined; showing the unnormalized effect instead", stacklevel=4)
            value = "effect"
    if value == "effect":
        return effects.effect.detach().cpu().numpy(), f"{metric} effect (patched − {effects.base_run} run)"
    return effects.values.detach().cpu().numpy(), f"{metric} under {effects.intervention}"


def _matrix(effects: Effects, value: str, alpha: float | None) -> _Matrix:
    data, label = _values(effects, value)
    axes, shape = effects.axes, effects.grid.shape
    if len(axes) > 3 or (len(axes) == 3 and axes[0] != "layer"):
        raise ValueError(f"cannot lay out a {effects.kind} grid with axes {axes}; at most layer x two more axes")
    has_layer = bool(axes) and axes[0] == "layer"
    n_rows = shape[0] if has_layer else 1
    col_axes = axes[1:] if has_layer else axes
    sites = effects.sites
    n_cols = len(sites) // n_rows
    if has_layer:
        row_labels, row_title = [str(sites[r * n_cols].layer) for r in range(n_rows)], "layer"
    else:
        row_labels, row_title = [""], ""
    # Column labels come from the sites of the first row, so grids over a subset of layers, positions
    # or heads are labelled with the real indices.
    group = shape[-1] if len(col_axes) == 2 else 1
    if col_axes:
        first_axis_values = [getattr(sites[c], col_axes[0], None) for c in range(0, n_cols, group)]
        col_labels, col_title = _axis_labels(effects, col_axes[0], first_axis_values)
    else:  # e.g. a layer-only grid, each site covering every position: one column
        col_labels, col_title = [""], ""
    if len(col_axes) == 2:
        col_title = f"{col_title} (each split into {group} {col_axes[1]}s)"
    significant = None
    if alpha is not None:
        significant = effects.significant(alpha).cpu().numpy().reshape(n_rows, n_cols)
    return _Matrix(data.reshape(n_rows, n_cols), significant, label, row_labels, row_title, col_labels,
                   col_title, group)


def _overlay_path(mask: Bool[np.ndarray, "row col"]) -> MplPath | None:
    """One rectangle per horizontal run of True cells, in image coordinates (cell (r, c) centred at (c, r))."""
    vertices, codes = [], []
    for r, row in enumerate(mask):
        padded = np.concatenate([[False], row, [False]])
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2]):
            x0, x1, y0, y1 = start - 0.5, stop - 0.5, r - 0.5, r + 0.5
            vertices += [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
            codes += [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO, MplPath.LINETO, MplPath.CLOSEPOLY]
    return MplPath(vertices, codes) if vertices else None


def _not_significant_note(alpha: float) -> Patch:
    """Legend entry for the overlay; its outline (absent on the overlay) frames the small sample."""
    note = Patch(**{**HATCH, "linewidth": 0.5, "edgecolor": "0.5"},
                 label=f"hatched: not significant (Benjamini-Hochberg, FDR {alpha:g})")
    note.set_hatch_linewidth(HATCH_LINEWIDTH)
    return note


def _rotated(m: _Matrix) -> bool:
    """Long column labels (tokens, sites) are set at an angle so they do not collide."""
    return any(len(t) > 4 for t in m.col_labels)


def _ticks(ax: Axes, m: _Matrix) -> None:
    n_rows, n_cols = m.data.shape
    step = max(1, int(np.ceil(n_rows / 32)))  # keep row labels legible on deep models
    if m.row_title:
        ax.set_yticks(range(0, n_rows, step), m.row_labels[::step])
        ax.set_ylabel(m.row_title)
    else:
        ax.set_yticks([])
    n_groups = n_cols // m.group
    if m.col_title:
        centres = np.arange(n_groups) * m.group + (m.group - 1) / 2
        step = max(1, int(np.ceil(n_groups / 48)))
        ax.set_xticks(centres[::step], m.col_labels[::step])
        ax.set_xlabel(m.col_title)
    else:
        ax.set_xticks([])
    if _rotated(m):
        ax.tick_params(axis="x", labelrotation=55)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.tick_params(length=2, labelsize=8)
    if m.group > 1:
        for x in np.arange(1, n_groups) * m.group - 0.5:
            ax.axvline(x, color="0.2", linewidth=0.8)
    if n_rows <= 64 and n_cols <= 64:  # thin cell borders help reading values off small grids
        ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw(ax: Axes, m: _Matrix, vmax: float | None) -> AxesImage:
    if vmax is None:
        vmax = _abs_max([m])
    image = ax.imshow(m.data, cmap=CMAP, norm=Normalize(-vmax, vmax), aspect="auto", interpolation="nearest")
    image.set_gid("effects")
    if m.significant is not None:
        path = _overlay_path(~m.significant)
        if path is not None:
            overlay = ax.add_patch(PathPatch(path, **HATCH, gid=OVERLAY_GID))
            overlay.set_hatch_linewidth(HATCH_LINEWIDTH)
    _ticks(ax, m)
    return image


def _abs_max(matrices: list[_Matrix]) -> float:
    """Largest |value| over all cells (NaN ignored); 1 when every cell is 0, so the scale stays valid."""
    finite = [np.abs(m.data[np.isfinite(m.data)]) for m in matrices]
    peak = max((float(f.max()) for f in finite if f.size), default=0.0)
    return peak if peak > 0 else 1.0


def _figsize(m: _Matrix) -> tuple[float, float]:
    """Inches: ~0.38 per column and ~0.2 per row plus room for labels, clamped to a printable page."""
    n_rows, n_cols = m.data.shape
    label_room = 0.3 + 0.06 * max(len(t) for t in m.col_labels) if _rotated(m) else 0.5
    width = float(np.clip(2.6 + 0.38 * n_cols, 4.5, 16.0))
    height = float(np.clip(1.2 + label_room + 0.2 * n_rows, 2.4, 12.0))
    return width, height


def _describe(effects: Effects) -> tuple[str, str]:
    """('denoise patch', '(ioi, n=8; clean 2.61, corrupt −4.97)'): what was done, then to what and the baselines."""
    task = effects.meta.get("task")
    about = f"{task}, " if task else ""
    baselines = f"clean {effects.clean_metric:.2f}, corrupt {effects.corrupt_metric:.2f}".replace("-", "−")
    return f"{effects.intervention} {effects.method}", f"({about}n={effects.n_examples}; {baselines})"


def _colorbar(fig: Figure, image: AxesImage, ax: Axes | list[Axes], label: str) -> None:
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)


def heatmap(effects: Effects, value: str = "normalized", ax: Axes | None = None, title: str | None = None,
            alpha: float | None = 0.05, *, vmax: float | None = None) -> Axes:
    """Draw `effects` as a [layer, other axes] heatmap with a colour bar, on `ax` or a new figure.

    `value` is one of `VALUES` ("normalized" falls back to "effect", with a warning, when clean and
    corrupted metrics are equal). Cells not significant at Benjamini-Hochberg FDR `alpha` are hatched,
    their colour unchanged (`alpha=None`: no hatching). `vmax` fixes the colour limits to [-vmax, vmax] (default: the
    largest |value|).
    """
    m = _matrix(effects, value, alpha)
    if ax is None:
        _, ax = plt.subplots(figsize=_figsize(m), layout="constrained")
    image = _draw(ax, m, vmax)
    _colorbar(ax.figure, image, ax, m.label)
    if title is None:
        what, details = _describe(effects)
        # About 11 characters of 11 pt text fit per inch: on a narrow figure the details take a second line.
        width = ax.figure.bbox.width / ax.figure.dpi  # inches, also on a subfigure
        fits = len(effects.kind) + len(what) + len(details) + 3 <= width * 11
        title = f"{effects.kind}: {what}" + (" " if fits else "\n") + details
    ax.set_title(title, fontsize=11, pad=20)
    if m.significant is not None and not m.significant.all():
        ax.legend(handles=[_not_significant_note(alpha)], loc="lower right", bbox_to_anchor=(1.0, 1.0),
                  frameon=False, fontsize=8, borderaxespad=0.2, handlelength=2.4, handleheight=1.2)
    return ax


def grids(effects_list: list[Effects], value: str = "normalized", ncols: int | None = None,
          title: str | None = None, alpha: float | None = 0.05, titles: list[str] | None = None) -> Figure:
    """Several grids (e.g. resid_pre, attn_out, z) side by side, `ncols` per row (default up to 3);
    `titles` names the panels (default: their kinds).

    Panels whose colour bar labels agree (same metric and value kind) share one symmetric colour scale
    and one colour bar; otherwise each panel gets its own.
    """
    if not effects_list:
        raise ValueError("grids needs at least one Effects")
    if titles is not None and len(titles) != len(effects_list):
        raise ValueError(f"grids got {len(titles)} titles for {len(effects_list)} panels")
    matrices = [_matrix(e, value, alpha) for e in effects_list]
    ncols = min(len(matrices), 3) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, len(matrices))
    nrows = -(-len(matrices) // ncols)
    sizes = np.array([_figsize(m) for m in matrices] + [(0.0, 0.0)] * (nrows * ncols - len(matrices)))
    widths = sizes[:, 0].reshape(nrows, ncols).max(0)  # each column as wide as its widest panel
    heights = sizes[:, 1].reshape(nrows, ncols).max(1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(widths.sum(), 24.0), min(heights.sum(), 24.0)),
                             layout="constrained", squeeze=False, width_ratios=widths, height_ratios=heights)
    shared = len({m.label for m in matrices}) == 1
    vmax = _abs_max(matrices) if shared else None
    used = list(axes.flat[: len(matrices)])
    for ax, m, name in zip(used, matrices, titles or [e.kind for e in effects_list]):
        image = _draw(ax, m, vmax)
        ax.set_title(name, fontsize=11)
        if not shared:
            _colorbar(fig, image, ax, m.label)
    if shared:
        _colorbar(fig, image, used, matrices[0].label)
    for ax in axes.flat[len(matrices):]:
        ax.remove()
    if any(m.significant is not None and not m.significant.all() for m in matrices):
        fig.legend(handles=[_not_significant_note(alpha)], loc="outside upper right", frameon=False, fontsize=8,
                   handlelength=2.4, handleheight=1.2)
    fig.suptitle(" ".join(_describe(effects_list[0])) if title is None else title, fontsize=12)
    return fig


def save(fig: Figure, path: str | Path) -> list[Path]:
    """Write `fig` by the suffix of `path` (.png at `DPI`, .svg, .pdf; no suffix: both .png and .svg),
    creating parent directories, then close it. Returns the files written.

    Vector output carries no creation date and SVG ids are salted with a constant, so the same figure
    saves to the same bytes.
    """
    path = Path(path)
    targets = [path.with_suffix(".png"), path.with_suffix(".svg")] if path.suffix == "" else [path]
    for target in targets:
        if target.suffix.lower() not in FORMATS:
            raise ValueError(f"cannot save a figure as {str(target)!r}: suffix {target.suffix!r} is not one of "
                             f"{', '.join(FORMATS)} (or give no suffix for .png and .svg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in targets:
        fmt = target.suffix.lower()[1:]
        metadata = {"Date": None} if fmt == "svg" else {"CreationDate": None} if fmt == "pdf" else None
        with plt.rc_context({"svg.hashsalt": "mechattr"}):
            write_atomic(target, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata,
                                                         facecolor="white"))
    plt.close(fig)
    return targets
