"""Figures of Effects, checked on hand-built effects whose colours and significance are known."""

import xml.etree.ElementTree as ET

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import mechattr
from mechattr import plots
from mechattr.effects import Effects
from mechattr.sites import Grid, Site

TOKENS = ("<s>", "When", " Mary", " and", "\n", " $5", " to")
TOKEN_LABELS = ["0: '<s>'", "1: 'When'", "2: ' Mary'", "3: ' and'", "4: '\\n'", r"5: ' \$5'", "6: ' to'"]
ALT = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # zero-mean spread over 6 examples

# resid_pre cells (layer, pos) -> (mean patched metric, spread across examples). Every other cell: mean 0,
# spread 0.5, so its t statistic is exactly 0. Small spreads give p ~ 1e-8: significant; spread 20
# around a mean of 3 gives p ~ 0.75: not significant however large the mean.
DESIGN = {(0, 1): (3.0, 0.1), (0, 3): (3.0, 20.0), (1, 2): (-3.0, 0.1), (1, 5): (-1.0, 0.05)}
SIGNIFICANT = {(0, 1), (1, 2), (1, 5)}


def make_effects(grid: Grid, means: torch.Tensor, spreads: torch.Tensor, clean: float = 2.0,
                 corrupt: float = 0.0) -> Effects:
    per_example = means[..., None] + spreads[..., None] * ALT  # (*grid, example)
    return Effects(values=per_example.mean(-1), per_example=per_example, clean=torch.full((6,), clean),
                   corrupt=torch.full((6,), corrupt), grid=grid, str_tokens=TOKENS, meta={"task": "toy"})


@pytest.fixture(scope="module")
def resid(tiny):
    g = mechattr.grid(tiny, "resid_pre", 7)
    means, spreads = torch.zeros(g.shape), torch.full(g.shape, 0.5)
    for cell, (mean, spread) in DESIGN.items():
        means[cell], spreads[cell] = mean, spread
    return make_effects(g, means, spreads)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def image_of(ax):
    return next(im for im in ax.images if im.get_gid() == "effects")


def overlay_of(ax):
    found = [p for p in ax.patches if p.get_gid() == plots.OVERLAY_GID]
    return found[0] if found else None


def pixels(ax, *cells: tuple[int, int]) -> list[np.ndarray]:
    """Mean RGB of a 5x5 patch of the rendered figure around each image cell (col, row)."""
    ax.figure.canvas.draw()
    rgba = np.asarray(ax.figure.canvas.buffer_rgba()).astype(float)
    out = []
    for col, row in cells:
        x, y = ax.transData.transform((col, row))
        r, c = int(round(rgba.shape[0] - y)), int(round(x))  # the buffer's first row is the top
        out.append(rgba[r - 2: r + 3, c - 2: c + 3, :3].reshape(-1, 3).mean(0))
    return out


def reddish(rgb: np.ndarray) -> bool:
    return rgb[0] > rgb[2] + 60


def bluish(rgb: np.ndarray) -> bool:
    return rgb[2] > rgb[0] + 60


def test_heatmap_cells_hold_the_normalized_effect_on_a_symmetric_scale(resid):
    ax = plots.heatmap(resid)
    image = image_of(ax)
    # clean 2, corrupt 0: normalized = patched / 2; layers are rows, positions columns.
    expected = np.zeros((2, 7))
    for cell, (mean, _) in DESIGN.items():
        expected[cell] = mean / 2
    np.testing.assert_allclose(np.asarray(image.get_array()), expected, atol=1e-6)
    assert image.norm.vmin == pytest.approx(-1.5) and image.norm.vmax == pytest.approx(1.5)
    assert image.colorbar.ax.get_ylabel() == "normalized logit_diff effect"


def test_heatmap_colours_positive_red_and_negative_blue(resid):
    ax = plots.heatmap(resid, alpha=None)
    red, blue, zero = pixels(ax, (1, 0), (2, 1), (0, 0))
    assert reddish(red) and not bluish(red), red
    assert bluish(blue) and not reddish(blue), blue
    assert zero.min() > 235, zero  # 0 maps to the white middle of the diverging map


def test_heatmap_labels_tokens_with_positions_and_layers(tiny, resid):
    ax = plots.heatmap(resid)
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKEN_LABELS
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert ax.get_ylabel() == "layer" and ax.get_xlabel() == "token"
    title = ax.get_title()
    assert "resid_pre" in title and "toy" in title and "clean 2.00" in title
    # A grid over a subset of layers is labelled with the layers it holds.
    g = mechattr.grid(tiny, "resid_pre", 7, layers=[1])
    sub = plots.heatmap(make_effects(g, torch.ones(g.shape), torch.full(g.shape, 0.1)))
    assert [t.get_text() for t in sub.get_yticklabels()] == ["1"]


def test_overlay_covers_exactly_the_cells_not_significant(resid):
    assert {tuple(i) for i in resid.significant().nonzero().tolist()} == SIGNIFICANT
    ax = plots.heatmap(resid)
    rows, cols = np.meshgrid(np.arange(2), np.arange(7), indexing="ij")
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(float)  # image coords are (col, row)
    covered = overlay_of(ax).get_path().contains_points(centres).reshape(2, 7)
    expected = np.ones((2, 7), dtype=bool)
    for cell in SIGNIFICANT:
        expected[cell] = False
    np.testing.assert_array_equal(covered, expected)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["hatched: not significant (Benjamini-Hochberg, FDR 0.05)"]


def cell_pixels(ax, col: int, row: int) -> np.ndarray:
    """The rendered RGB pixels inside image cell (col, row), 3 pixels in from its borders."""
    ax.figure.canvas.draw()
    rgba = np.asarray(ax.figure.canvas.buffer_rgba()).astype(int)
    (x0, y0), (x1, y1) = ax.transData.transform([(col - 0.5, row + 0.5), (col + 0.5, row - 0.5)])
    top, bottom = rgba.shape[0] - int(y1), rgba.shape[0] - int(y0)  # the buffer's first row is the top
    return rgba[top + 3: bottom - 3, int(x0) + 3: int(x1) - 3, :3].reshape(-1, 3)


def mode(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The most frequent colour and the share of pixels that have it."""
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return colours[counts.argmax()], counts.max() / counts.sum()


def bar_colour(image, value: float) -> np.ndarray:
    """The rendered colour bar's colour at `value`."""
    bar = image.colorbar.ax
    bar.figure.canvas.draw()
    rgba = np.asarray(bar.figure.canvas.buffer_rgba()).astype(int)
    x, y = bar.transData.transform((np.mean(bar.get_xlim()), value))
    return rgba[rgba.shape[0] - int(round(y)), int(round(x)), :3]


@pytest.fixture
def mixed(tiny):
    """Normalized 0.87 at (0, 3), not significant (spread 20), beside a significant 1.2 at (0, 1); every
    other cell 0 and not significant."""
    g = mechattr.grid(tiny, "resid_pre", 7)
    means, spreads = torch.zeros(g.shape), torch.full(g.shape, 0.5)
    means[0, 1], spreads[0, 1] = 2.4, 0.1
    means[0, 3], spreads[0, 3] = 1.74, 20.0
    return make_effects(g, means, spreads)


def test_every_cell_has_its_colour_bar_colour(mixed):
    assert not bool(mixed.significant()[0, 3]) and bool(mixed.significant()[0, 1])
    ax = plots.heatmap(mixed)
    image = image_of(ax)
    for (row, col), value in (((0, 3), 0.87), ((0, 1), 1.2), ((1, 4), 0.0)):
        expected = np.round(np.asarray(image.cmap(image.norm(value))[:3]) * 255)
        shown, share = mode(cell_pixels(ax, col, row))
        np.testing.assert_allclose(shown, expected, atol=1)  # the cell's own colour, not a faded one
        if abs(value) < 1.2:  # 1.2 is the bar's end, on its frame
            np.testing.assert_allclose(shown, bar_colour(image, value), atol=8)  # a bar pixel spans a small range
        assert share > 0.7, share  # the hatch is light: most of a hatched cell shows its colour


def test_hatching_marks_exactly_the_cells_not_significant(mixed):
    ax = plots.heatmap(mixed)
    significant = mixed.significant().numpy()
    for row in range(2):
        for col in range(7):
            pixels = cell_pixels(ax, col, row)
            colour, share = mode(pixels)
            marked = (np.abs(pixels - colour).max(1) > 10).mean()
            assert (marked > 0.03) == (not significant[row, col]), (row, col, marked)
    assert overlay_of(ax).get_facecolor()[3] == 0  # the hatch has no face to tint the colour with


def test_nothing_significant_at_small_n_stays_readable(tiny):
    # Four examples and a noisy grid: no cell survives the correction, so every cell is hatched.
    g = mechattr.grid(tiny, "resid_pre", 7)
    per_example = torch.linspace(-1, 1, 14).reshape(*g.shape, 1) + torch.tensor([1.5, -1.5, 1.5, -1.5])
    noisy = Effects(values=per_example.mean(-1), per_example=per_example, clean=torch.full((4,), 2.0),
                    corrupt=torch.zeros(4), grid=g)
    assert not noisy.significant().any()
    ax = plots.heatmap(noisy)
    image = image_of(ax)
    for col, row in ((0, 0), (6, 1), (3, 1)):
        shown, share = mode(cell_pixels(ax, col, row))
        value = float(image.get_array()[row, col])
        np.testing.assert_allclose(shown, np.round(np.asarray(image.cmap(image.norm(value))[:3]) * 255), atol=1)
        assert share > 0.7, share


def test_positions_whose_token_varies_say_so(tiny):
    from mechattr.tasks import Task

    clean = torch.tensor([[1, 2, 3, 4, 5, 6, 7]] * 4)
    clean[:, 2] = torch.tensor([10, 11, 12, 13])  # a different name in each example
    corrupt = clean.clone()
    corrupt[:, 2] = torch.tensor([20, 21, 22, 23])
    task = Task(clean, corrupt, answer=torch.arange(1, 5), wrong=torch.arange(5, 9), str_tokens=TOKENS)
    effects = mechattr.patch(tiny, task, mechattr.grid(tiny, "resid_pre", 7), progress=False)
    assert effects.meta["varying_positions"] == [2]
    labels = [t.get_text() for t in plots.heatmap(effects).get_xticklabels()]
    assert labels == [*TOKEN_LABELS[:2], "2: (varies)", *TOKEN_LABELS[3:]]


def test_alpha_none_draws_no_overlay(resid):
    ax = plots.heatmap(resid, alpha=None)
    assert overlay_of(ax) is None and ax.get_legend() is None


def test_other_value_kinds_and_fixed_limits(resid):
    effect = image_of(plots.heatmap(resid, value="effect", vmax=4.0))
    np.testing.assert_allclose(np.asarray(effect.get_array()), (resid.values - 0.0).numpy().reshape(2, 7), atol=1e-6)
    assert (effect.norm.vmin, effect.norm.vmax) == (-4.0, 4.0)
    assert effect.colorbar.ax.get_ylabel() == "logit_diff effect (patched − corrupt run)"
    raw = image_of(plots.heatmap(resid, value="values"))
    assert raw.colorbar.ax.get_ylabel() == "logit_diff under denoise"


def test_normalized_falls_back_to_effect_when_clean_equals_corrupt(tiny):
    g = mechattr.grid(tiny, "resid_pre", 7)
    means = torch.arange(14.0).reshape(g.shape) - 7  # (layer, pos)
    flat = make_effects(g, means, torch.full(g.shape, 0.1), clean=1.0, corrupt=1.0)
    with pytest.warns(UserWarning, match="normalized effect is undefined"):
        image = image_of(plots.heatmap(flat))
    np.testing.assert_allclose(np.asarray(image.get_array()), (means - 1.0).numpy(), atol=1e-5)
    assert image.colorbar.ax.get_ylabel().startswith("logit_diff effect")
    assert image.norm.vmax == pytest.approx(8.0) and image.norm.vmin == pytest.approx(-8.0)


def test_unknown_value_kind_is_rejected(resid):
    with pytest.raises(ValueError, match=r"'logit'.*valid: normalized, effect, values"):
        plots.heatmap(resid, value="logit")


def test_head_grid_puts_heads_on_x(tiny):
    g = mechattr.grid(tiny, "z")  # (layer, head)
    means = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    ax = plots.heatmap(make_effects(g, means, torch.full(g.shape, 0.01)))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "head"
    np.testing.assert_allclose(np.asarray(image_of(ax).get_array()), means.numpy() / 2, atol=1e-6)
    positive, negative = pixels(ax, (1, 0), (3, 1))
    assert reddish(positive) and bluish(negative)


def test_layer_pos_head_grid_splits_each_position_into_heads(tiny):
    g = mechattr.grid(tiny, "z", 7, per_position=True)  # (layer, pos, head)
    assert g.axes == ("layer", "pos", "head")
    means = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(g.shape) - 20
    ax = plots.heatmap(make_effects(g, means, torch.full(g.shape, 0.01)))
    data = np.asarray(image_of(ax).get_array())
    assert data.shape == (2, 28)
    for layer, pos, head in [(0, 0, 0), (0, 3, 2), (1, 6, 3), (1, 2, 1)]:
        assert data[layer, pos * 4 + head] == pytest.approx(float(means[layer, pos, head]) / 2)
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKEN_LABELS
    np.testing.assert_allclose(ax.get_xticks(), np.arange(7) * 4 + 1.5)
    separators = [line.get_xdata()[0] for line in ax.lines]
    np.testing.assert_allclose(sorted(separators), np.arange(1, 7) * 4 - 0.5)


def test_one_axis_grids_are_one_row(tiny):
    g = mechattr.grid(tiny, "embed", 7)
    means = torch.tensor([0.0, 0.0, 4.0, 0.0, -4.0, 0.0, 0.0])
    ax = plots.heatmap(make_effects(g, means, torch.full(g.shape, 0.01)))
    assert np.asarray(image_of(ax).get_array()).shape == (1, 7)
    assert [t.get_text() for t in ax.get_xticklabels()] == TOKEN_LABELS
    positive, negative = pixels(ax, (2, 0), (4, 0))
    assert reddish(positive) and bluish(negative)
    sites = [Site("z", 1, head=2), Site("mlp_out", 0, pos=3)]
    ax = plots.heatmap(make_effects(Grid.of(sites), torch.tensor([1.0, -1.0]), torch.full((2,), 0.01)))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["z[L1 H2]", "mlp_out[L0 P3]"]
    assert ax.get_xlabel() == "site"


def test_grids_share_one_scale_when_value_kinds_match(tiny, resid):
    heads = mechattr.grid(tiny, "z")
    z = make_effects(heads, torch.full(heads.shape, 0.5), torch.full(heads.shape, 0.01))  # normalized 0.25
    fig = plots.grids([resid, z, resid], ncols=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3 and len(fig.axes) == 4  # the empty fourth slot is removed; one colour bar
    for ax in panels:
        assert (image_of(ax).norm.vmin, image_of(ax).norm.vmax) == pytest.approx((-1.5, 1.5))
    assert [ax.get_title() for ax in panels] == ["resid_pre", "z", "resid_pre"]
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert colorbars[0].get_ylabel() == "normalized logit_diff effect"


def test_grids_scale_separately_when_value_kinds_differ(tiny, resid):
    g = mechattr.grid(tiny, "resid_pre", 7)
    flat = make_effects(g, torch.full(g.shape, 0.2), torch.full(g.shape, 0.01), clean=1.0, corrupt=1.0)
    with pytest.warns(UserWarning):
        fig = plots.grids([resid, flat], title="two")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 4  # a colour bar per panel
    assert image_of(panels[0]).norm.vmax == pytest.approx(1.5)
    assert image_of(panels[1]).norm.vmax == pytest.approx(0.8)  # |0.2 - 1| = 0.8
    assert fig.get_suptitle() == "two"


def test_grids_needs_effects():
    with pytest.raises(ValueError, match="at least one"):
        plots.grids([])


def test_save_png_and_svg(tmp_path, resid):
    ax = plots.heatmap(resid)
    fig = ax.figure
    width_px = round(fig.get_size_inches()[0] * plots.DPI)
    written = plots.save(fig, tmp_path / "a" / "b" / "fig")  # no suffix: both formats
    assert written == [tmp_path / "a" / "b" / "fig.png", tmp_path / "a" / "b" / "fig.svg"]
    png = written[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == width_px  # IHDR width: saved at DPI
    assert ET.parse(written[1]).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert not plt.fignum_exists(fig.number)


def test_save_is_deterministic(tmp_path, resid):
    for name in ("one", "two"):
        plots.save(plots.heatmap(resid).figure, tmp_path / name)
    assert (tmp_path / "one.svg").read_bytes() == (tmp_path / "two.svg").read_bytes()
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def test_save_rejects_unknown_suffix(tmp_path, resid):
    fig = plots.heatmap(resid).figure
    with pytest.raises(ValueError, match=r"'\.jpeg' is not one of \.png, \.svg, \.pdf"):
        plots.save(fig, tmp_path / "new" / "fig.jpeg")
    assert not (tmp_path / "new").exists()


def test_grids_without_position_or_head_axes(tiny):
    g = mechattr.grid(tiny, "resid_pre", per_position=False)  # (layer,): each site covers every position
    assert g.axes == ("layer",)
    ax = plots.heatmap(make_effects(g, torch.tensor([2.0, -2.0]), torch.full(g.shape, 0.01)))
    np.testing.assert_allclose(np.asarray(image_of(ax).get_array()), [[1.0], [-1.0]], atol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"] and len(ax.get_xticks()) == 0
    top, bottom = pixels(ax, (0, 0), (0, 1))
    assert reddish(top) and bluish(bottom)  # layer 0 is the top row


def test_grids_panel_titles_can_be_given(tiny, tiny_task):
    effects = [mechattr.patch(tiny, tiny_task, mechattr.grid(tiny, kind, tiny_task.n_pos), progress=False)
               for kind in ("resid_pre", "attn_out")]
    fig = plots.grids(effects, titles=["before", "after"])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["before", "after"]
    with pytest.raises(ValueError, match="1 titles for 2 panels"):
        plots.grids(effects, titles=["one"])
