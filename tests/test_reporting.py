"""Before/after figures reach the console, every Lightning logger, and W&B (offline, read back from its files)."""

import csv
import logging

import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_halfprune import HalfPrune, PruneReport
from models import Classifier, loaders, trainer
from wandb_reader import OfflineRun


def test_report_holds_before_after_and_the_monitored_metric(tmp_path, caplog):
    prune = HalfPrune({1: 0.5}, monitor="val_acc")
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, max_epochs=3, callbacks=[prune]).fit(Classifier("plain_cnn"), *loaders())
    (report,) = prune.reports
    assert isinstance(report, PruneReport) and (report.epoch, report.global_step, report.ratio) == (1, 8, 0.5)
    assert report.after.params < report.before.params and report.after.macs < report.before.macs
    assert report.before.widths["net.features.0"] == 16 and report.after.widths["net.features.0"] == 8
    assert report.before.latency_ms > 0 and report.after.latency_ms > 0 and report.latency_batch_size == 64
    assert all(0 <= m <= 1 for m in (report.metric_before, report.metric_after_cut, report.metric_recovered))
    assert (
        set(report.timings) == {"measure", "score", "cut", "log", "latency"}
        and report.seconds >= sum(report.timings.values()) * 0.99
    )
    assert "| net.features.0 | 16 | 8 |" in report.to_markdown()
    assert report.to_dict()["after"]["params"] == report.after.params
    text = caplog.text
    assert "HalfPrune epoch 1 step 8" in text and "HalfPrune summary: 1 prune event(s)" in text


def test_after_cut_metric_equals_a_real_validation_of_the_pruned_model(tmp_path):
    model = Classifier("plain_cnn")
    train, val = loaders()
    prune = HalfPrune({1: 0.5}, monitor="val_acc")
    t = trainer(tmp_path, max_epochs=2, callbacks=[prune])
    with pytest.warns(UserWarning, match="no training to recover"):
        t.fit(model, train, val)
    (result,) = t.validate(model, val, verbose=False)
    assert prune.reports[0].metric_after_cut == pytest.approx(result["val_acc"], abs=1e-6)


def test_every_logger_gets_the_scalars_by_global_step(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, max_epochs=3, logger=logger, callbacks=[HalfPrune({0: 0.25, 1: 0.5}, monitor="val_acc")]).fit(
        Classifier("plain_cnn"), *loaders()
    )
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    events = [r for r in rows if r.get("halfprune/params_after")]
    assert [int(r["step"]) for r in events] == [4, 8]
    assert float(events[1]["halfprune/params_after"]) < float(events[0]["halfprune/params_after"])
    assert all(float(r["halfprune/macs_ratio"]) < 1 for r in events)
    assert any(r.get("halfprune/metric_recovered") for r in rows)
    hparams = open(f"{logger.log_dir}/hparams.yaml").read()
    assert "halfprune" in hparams and "scorer: l2" in hparams


def test_wandb_offline_run_holds_scalars_tables_config_and_summary(tmp_path):
    logger = WandbLogger(project="halfprune-test", save_dir=str(tmp_path), offline=True)
    trainer(tmp_path, max_epochs=3, logger=logger, callbacks=[HalfPrune({0: 0.25, 1: 0.5}, monitor="val_acc")]).fit(
        Classifier("plain_cnn"), *loaders()
    )
    logger.experiment.finish()
    wandb.teardown()  # stops wandb's service process, which flushes the run's transaction log
    run = OfflineRun(str(tmp_path))
    assert len(run.scalar("halfprune/params_after")) == 2
    assert run.scalar("halfprune/ratio") == [0.25, 0.5]
    assert run.config["halfprune"]["scorer"] == "l2" and run.config["halfprune"]["monitor"] == "val_acc"
    assert 0.2 < run.summary["halfprune/final_params_ratio"] < 0.35
    assert "halfprune/final_speedup_measurable" in run.summary and "halfprune/final_metric_delta" in run.summary
    tables = run.tables()
    assert len(tables) == 2 and tables[0]["columns"] == ["event", "layer", "width_before", "width_after"]
    widths = {row[1]: (row[2], row[3]) for row in tables[1]["data"]}
    assert widths["net.features.0"] == (12, 8)
    assert any("widths_chart_event_1" in k for k in run.config) or any(
        "widths_chart" in str(v) for v in run.config.values()
    )


class BrokenLogger(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("halfprune/") for k in metrics):
            raise ConnectionError("logging backend is down")
        super().log_metrics(metrics, step)


def test_a_failing_logger_is_a_warning_not_a_crash(tmp_path):
    model = Classifier("plain_cnn")
    with pytest.warns(UserWarning, match="could not log to BrokenLogger: ConnectionError"):
        trainer(tmp_path, max_epochs=2, logger=BrokenLogger(tmp_path), callbacks=[HalfPrune({0: 0.5})]).fit(
            model, *loaders()
        )
    assert model.net.features[0].out_channels == 8 and len(model.losses) == 8
    assert torch.isfinite(torch.tensor(model.losses)).all()
