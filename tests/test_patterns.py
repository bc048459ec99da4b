import matplotlib.pyplot as plt
import pytest
import torch

from mechattr import Site
from mechattr.plots.attention import attention_patterns, plot_attention
from tests.bridges import bridge


def test_patterns_match_the_models_own_cache(tiny, tiny_task):
    heads = [Site("z", 1, head=3), Site("z", 0, head=0), Site("pattern", 1, head=0)]
    patterns = attention_patterns(tiny, tiny_task.clean, heads)
    _, cache = tiny.run_with_cache(tiny_task.clean)
    for site, pattern in zip(heads, patterns):
        expected = cache[f"blocks.{site.layer}.attn.hook_pattern"][:, site.head].mean(0)
        torch.testing.assert_close(pattern, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(patterns.sum(-1), torch.ones(3, 7))
    assert patterns.triu(1).abs().max() == 0  # causal: no query reads a later key


def test_gqa_heads_of_one_group_have_their_own_patterns(tiny_task):
    gqa = bridge(n_layers=1, n_key_value_heads=2, seed=1)
    a, b = attention_patterns(gqa, tiny_task.clean, [Site("z", 0, head=0), Site("z", 0, head=1)])
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("site, needle", [(Site("mlp_out", 1), "not a query head"), (Site("z", 1), "not a query"),
                                          (Site("z", 2, head=0), "out of range"), (Site("z", 0, head=4), "4 query")])
def test_bad_sites_are_named(tiny, tiny_task, site, needle):
    with pytest.raises(ValueError, match=needle):
        attention_patterns(tiny, tiny_task.clean, [site])


def test_plot_has_one_labelled_panel_per_head(tiny, tiny_task):
    heads = [Site("z", 1, head=h) for h in range(4)]
    labels = [f"t{i}" for i in range(7)]
    fig = plot_attention(attention_patterns(tiny, tiny_task.clean, heads), heads, labels, ncols=2)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == ["head 1.0", "head 1.1", "head 1.2", "head 1.3"]
    assert [t.get_text() for t in panels[0].get_xticklabels()] == labels
    plt.close(fig)
    with pytest.raises(ValueError, match="6 token labels"):
        plot_attention(torch.zeros(4, 7, 7), heads, labels[:6])
