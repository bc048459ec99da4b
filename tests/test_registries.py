"""One registry per list: the command line's choices and help come from the library's registries, and
the capabilities registered on each intervention hold numerically."""

import re

import pytest
import torch

from mechattr.attribution import METHODS
from mechattr.circuits import LEVELS
from mechattr.cli import _parser
from mechattr.finetune import TrainConfig
from mechattr.finetune.data import LOSSES
from mechattr.finetune.masks import KV_MODES
from mechattr.finetune.methods import FINETUNE_METHODS
from mechattr.interventions import INTERVENTIONS, Steer, by_name
from mechattr.tasks import METRICS, TASKS


def _help(command: str) -> str:
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())  # argparse wraps lines


def _listed(help_text: str, option: str) -> list[str]:
    """The names an option's help lists after its colon: "what: a, b or c"."""
    text = help_text.split(f"{option} {option.strip('-').upper().replace('-', '_')} ")[1]
    text = text.split(": ", 1)[1].split(" --")[0].split(" (")[0]
    return re.split(r", | or ", text.strip())


def test_help_lists_every_registry_entry():
    patch, discover, finetune = _help("patch"), _help("discover"), _help("finetune")
    assert _listed(patch, "--intervention") == [n for n, c in INTERVENTIONS.items() if c.by_name_ok]
    assert _listed(discover, "--ablation") == [n for n, c in INTERVENTIONS.items() if c.ablates]
    assert _listed(_help("attribute"), "--method") == _listed(discover, "--method") == list(METHODS)
    assert _listed(discover, "--level") == list(LEVELS)
    assert _listed(finetune, "--kv") == list(KV_MODES)
    assert _listed(finetune, "--baselines") == [n for n in FINETUNE_METHODS if n != "precision"]
    for name in TASKS:
        assert f"{name}: {TASKS[name].help}" in " ".join(patch.split())
    for name in [*METRICS, *LOSSES]:
        assert f"{name}: " in patch + finetune
    assert "--device" in patch and "--dtype" in patch
    assert "{run,patch,attribute,verify,discover,finetune,curves,export}" in _parser().format_help()


def test_every_named_intervention_is_built_by_name_and_steer_is_refused():
    for name, cls in INTERVENTIONS.items():
        if cls.by_name_ok:
            assert type(by_name(name)) is cls and by_name(name).name == name
    with pytest.raises(ValueError, match="steer needs arguments"):
        by_name("steer")
    with pytest.raises(ValueError, match="valid: denoise, noise, mean, zero, resample, gaussian"):
        by_name("shuffle")


def _instances():
    return [by_name(n) if c.by_name_ok else Steer(vector=torch.ones(3)) for n, c in INTERVENTIONS.items()]


@pytest.mark.parametrize("intervention", _instances(), ids=list(INTERVENTIONS))
def test_examplewise_interventions_give_each_example_the_same_value_alone(intervention):
    base, source = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1)).split(2)
    whole = intervention(base, source)
    if isinstance(intervention, type(by_name("resample"))):
        pytest.skip("resample refuses a single example; it draws donors from the whole task")
    alone = torch.cat([intervention(base[i:i + 1], source[i:i + 1]) for i in range(2)])
    if intervention.examplewise:
        torch.testing.assert_close(alone, whole, rtol=0, atol=0)
    else:
        assert not torch.allclose(alone, whole)


@pytest.mark.parametrize("intervention", _instances(), ids=list(INTERVENTIONS))
def test_commutes_with_rotary_means_commuting_with_a_fixed_map_per_position(intervention):
    g = torch.Generator().manual_seed(2)
    base, source = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)  # (example, pos, d)
    rotation = torch.linalg.qr(torch.randn(4, 6, 6, generator=g)).Q  # one orthogonal map per position
    rotate = lambda x: torch.einsum("pij,epj->epi", rotation, x)  # noqa: E731
    if isinstance(intervention, Steer):
        intervention = Steer(vector=torch.ones(6))
    commuted = torch.allclose(intervention(rotate(base), rotate(source)), rotate(intervention(base, source)),
                              atol=1e-5)
    assert commuted == intervention.commutes_with_rotary


def test_train_config_rejects_an_unknown_loss_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"TrainConfig.loss: unknown task loss 'mse'; valid: ce, logit_diff"):
        TrainConfig(loss="mse")
    assert TrainConfig(loss="logit_diff").loss == "logit_diff"


def test_concrete_interventions_and_metrics_are_shape_checked():
    """Each concrete __call__ carries its own annotations, so the test-time checker sees mismatches."""
    from jaxtyping import TypeCheckError

    from mechattr.tasks import LogitDiff

    for intervention in _instances():
        with pytest.raises(TypeCheckError):
            intervention(torch.zeros(2, 3), torch.zeros(3, 3))  # base and source disagree on the example axis
    logits, ids = torch.zeros(2, 5), torch.tensor([0, 1])
    for metric in METRICS.values():
        with pytest.raises(TypeCheckError):
            metric()(logits, ids, torch.tensor([0, 1, 2]), logits)  # three wrong answers for two examples
    torch.testing.assert_close(LogitDiff()(logits, ids, ids, logits), torch.zeros(2))


def test_metrics_that_ignore_the_reference_accept_none_and_kl_names_it():
    from mechattr.tasks import KLToClean

    logits, ids, wrong = torch.tensor([[1.0, 3.0]]), torch.tensor([1]), torch.tensor([0])
    for name, metric in METRICS.items():
        if metric is not KLToClean:  # the reference is ignored: None gives the same numbers
            want = metric()(logits, ids, wrong, logits.log_softmax(-1))
            torch.testing.assert_close(metric()(logits, ids, wrong, None), want, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="kl metric needs the clean run's log-probabilities"):
        KLToClean()(logits, ids, ids, None)
