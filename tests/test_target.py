"""Pruning to a target: half the MACs or params, or 2x faster, found by searching the global channel ranking."""

import pytest
import torch
import yaml

from lightning_halfprune import HalfPrune
from lightning_halfprune.core.measure import MacCounter, count_params
from lightning_halfprune.demo import CNN1D, MNIST1DDataModule
from models import Classifier, PlainCNN, ResNetish, TransformerBlock, loaders, trainer
from test_cli import ROOT, halfprune

FAMILIES = {
    "plain_cnn": lambda: PlainCNN(width=32),
    "resnet": lambda: ResNetish(width=32),
    "transformer": lambda: TransformerBlock(dim=64, heads=4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_macs_target_halves_the_macs_within_3_percent(tmp_path, family):
    model = Classifier(FAMILIES[family]())
    example = model.example_input_array
    original = MacCounter()(model, example)
    prune = HalfPrune({0: 0.25, 1: 0.5}, target="macs", latency_batch_size=0, verbose=False)
    train, val = loaders()
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, train, val)
    final = MacCounter()(model, example) / original
    assert abs(final - 0.5) <= 0.03 * 0.5, final
    first, last = prune.reports
    assert (first.aim.target, first.aim.goal, last.aim.goal) == ("macs", 0.75, 0.5)
    assert last.aim.reached == pytest.approx(final)  # counted after the real cut
    assert abs(first.aim.reached - 0.75) <= 0.05 * 0.75  # coarser steps earlier: heads go 4 channels at a time
    assert last.scalars()["halfprune/target_reached"] == pytest.approx(final)
    assert "target: macs of original" in last.to_console()


def test_params_target_and_max_layer_ratio_still_caps_every_layer(tmp_path):
    model = Classifier(ResNetish(width=32))
    original = count_params(model)
    prune = HalfPrune({0: 0.6}, target="params", max_layer_ratio=0.5, latency_batch_size=0, verbose=False)
    train, val = loaders()
    trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(model, train, val)
    widths = prune.surgeon.widths
    assert all(w >= prune.original_widths[name] * 0.5 for name, w in widths.items())
    assert count_params(model) / original == pytest.approx(prune.reports[0].aim.reached)
    assert prune.state_dict()["original_counts"]["params"] == original  # a resumed fit keeps aiming at the same


def test_latency_target_reaches_2x_on_the_mnist1d_model_or_says_how_far(tmp_path):
    torch.manual_seed(0)
    model, data = CNN1D(channels=64), MNIST1DDataModule(num_samples=600)
    prune = HalfPrune({0: 0.5}, target="latency", latency_budget_s=0.5, verbose=False)
    trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(model, data)
    report = prune.reports[0]
    assert report.aim.target == "latency" and report.aim.goal == 0.5 and report.aim.tries >= 3
    assert report.after.macs < report.before.macs
    row = dict((a, c) for a, _, c in report.rows())["target: latency"]
    if report.aim.reached is None:
        assert row == "not measurable"
    else:  # the time fraction reached, timed side by side against the original: shown as a speed-up
        assert row == f"{1 / report.aim.reached:.2f}x faster"
        assert 1 / report.aim.reached > 1.0


def test_bad_target_arguments_fail_before_training():
    with pytest.raises(ValueError, match="`target` must be one of .* got 'flops'"):
        HalfPrune({0: 0.5}, target="flops")
    with pytest.raises(ValueError, match="`target='latency'` times the model: `timing` must be a Timing"):
        HalfPrune({0: 0.5}, target="latency", timing=None)
    with pytest.raises(ValueError, match="timing.budget_s"):
        HalfPrune({0: 0.5}, timing={"budget_s": 0})


def test_cli_takes_the_target(tmp_path):
    out = halfprune(
        tmp_path, "fit", f"--config={ROOT / 'examples' / 'mnist1d.yaml'}", "--halfprune.target=macs", "--print_config"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    args = yaml.safe_load(out.stdout)["halfprune"]["init_args"]
    assert (args["target"], args["timing"]["threads"], args["timing"]["budget_s"]) == ("macs", 1, 1.0)
