"""The `halfprune` command, run as a user would: a subprocess on a shortened demo config."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from wandb_reader import OfflineRun

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "--trainer.max_epochs=3",
    "--data.num_samples=600",
    "--halfprune.schedule={0: 0.25, 1: 0.5}",
]


def halfprune(tmp_path, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_SILENT": "true", "PYTHONWARNINGS": "default"} | (env_extra or {})
    cmd = [sys.executable, "-m", "lightning_halfprune", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_demo_config_trains_prunes_logs_offline_and_prints_the_table(tmp_path):
    out = halfprune(tmp_path, "fit", f"--config={ROOT / 'examples' / 'mnist1d.yaml'}", *SHORT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "HalfPrune summary: 2 prune event(s)" in text
    for row in ("params", "MACs / sample", "latency ms (batch 64)", "val_acc"):
        assert f"\n  {row}" in text
    assert "W&B logs offline" in text and "wandb sync" in text
    assert "args parameter is intended" not in text  # we let LightningCLI read sys.argv itself
    assert "lightning_halfprune" not in out.stderr  # no warning raised from our code
    run = OfflineRun(str(tmp_path / "runs"))
    assert run.scalar("halfprune/ratio") == [0.25, 0.5]
    assert run.summary["halfprune/final_params_ratio"] < 0.5 and "halfprune/final_metric_delta" in run.summary
    assert run.config["halfprune"]["monitor"] == "val_acc"


def test_print_config_shows_every_argument_and_round_trips(tmp_path):
    out = halfprune(tmp_path, "fit", f"--config={ROOT / 'examples' / 'mnist1d.yaml'}", "--print_config")
    assert out.returncode == 0, out.stderr[-3000:]
    config = yaml.safe_load(out.stdout)
    args = config["halfprune"]["init_args"]
    for name in ("schedule", "scorer", "ignored_layers", "round_to", "max_layer_ratio", "global_pruning", "monitor"):
        assert name in args
    assert args["max_layer_ratio"] == 0.9 and args["schedule"]["class_path"] == "lightning_halfprune.Cubic"
    (tmp_path / "printed.yaml").write_text(out.stdout)
    again = halfprune(tmp_path, "fit", "--config=printed.yaml", *SHORT, "--trainer.logger=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "HalfPrune summary: 2 prune event(s)" in again.stdout + again.stderr


def test_halfprune_as_a_trainer_callback_with_regex_ignored_layers(tmp_path):
    (tmp_path / "cb.yaml").write_text(
        "trainer:\n  max_epochs: 2\n  logger: false\n  callbacks:\n"
        "    - class_path: lightning_halfprune.HalfPrune\n      init_args:\n"
        "        schedule: {0: 0.5}\n        scorer: redundancy\n        ignored_layers: ['features\\.0']\n"
        "data:\n  init_args: {num_samples: 600}\n"
    )
    out = halfprune(tmp_path, "fit", "--config=cb.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HalfPrune epoch 0" in out.stdout + out.stderr


def test_a_typo_in_a_key_is_an_error_naming_it(tmp_path):
    out = halfprune(tmp_path, "fit", f"--config={ROOT / 'examples' / 'mnist1d.yaml'}", "--halfprune.scorr=l1")
    assert out.returncode != 0 and "scorr" in out.stderr
    (tmp_path / "bad.yaml").write_text("halfprune:\n  schedule: {1: 0.5}\n  max_layer_ratioo: 0.5\n")
    out = halfprune(tmp_path, "fit", "--config=bad.yaml")
    assert out.returncode != 0 and "max_layer_ratioo" in out.stderr


def test_a_schedule_past_max_epochs_is_flagged_before_training(tmp_path):
    out = halfprune(
        tmp_path,
        "fit",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
        "--data.num_samples=600",
        "--halfprune.schedule={1: 0.25, 5: 0.5}",
    )
    text = out.stdout + out.stderr
    assert "prune points [5]" in text and "max_epochs=2" in text
    assert text.index("prune points [5]") < text.index("HalfPrune epoch 1")
