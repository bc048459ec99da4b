"""Markdown summaries of patching results: which sites matter most, with numbers."""

from typing import Any, Sequence

from mechattr.effects import Effects

__all__ = ["summary_markdown", "effects_table"]


def effects_table(effects: Effects, k: int = 5) -> str:
    """The k sites with the largest |normalized effect| as a markdown table with 95% CIs."""
    lo, hi = effects.ci()
    gap = effects.clean_metric - effects.corrupt_metric
    significant = effects.significant()
    flat_sites = list(effects.sites)
    rows = ["| site | token | metric | normalized | 95% CI (metric) | BH-significant |", "|---|---|---|---|---|---|"]
    for site, _ in effects.top(k, by="effect"):
        i = flat_sites.index(site)
        value = float(effects.values.flatten()[i])
        token = repr(effects.str_tokens[site.pos]) if site.pos is not None and effects.str_tokens else ""
        rows.append(f"| `{site}` | {token} | {value:+.2f} | {(value - effects.corrupt_metric) / gap:+.2f} | "
                    f"[{float(lo.flatten()[i]):+.2f}, {float(hi.flatten()[i]):+.2f}] | "
                    f"{'yes' if significant.flatten()[i] else 'no'} |")
    return "\n".join(rows)


def summary_markdown(effects: Sequence[Effects], model_name: str, task: Any, seconds: float) -> str:
    """A short report: baselines, then the top sites of each grid, then the figures."""
    first = effects[0]
    lines = [
        f"# {task.name} on {model_name}: activation patching ({first.intervention})", "",
        f"{task.n_examples} examples of {task.n_pos} tokens; metric `{first.metric}` at the last position.",
        f"Clean run: {first.clean_metric:+.2f}; corrupted run: {first.corrupt_metric:+.2f}. "
        "A site's normalized effect is (patched - corrupted) / (clean - corrupted): 1 means patching that "
        "site alone restores the clean behaviour. Significance: paired t-test per cell, "
        "Benjamini-Hochberg across each grid at FDR 0.05.", "",
        f"Example clean prompt: `{''.join(task.str_tokens)}`", "",
    ]
    for e in effects:
        lines += [f"## `{e.kind}` ({' x '.join(e.axes)}, {len(e.sites)} sites, "
                  f"{int(e.significant().sum())} significant)", "", effects_table(e), "",
                  f"![{e.kind}]({e.kind}.png)", ""]
    lines.append(f"Computed in {seconds:.0f} s.")
    return "\n".join(lines) + "\n"
