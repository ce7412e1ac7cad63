"""Shared pieces of the benchmarks: one training run of a variant on MNIST-1D, measured the same way every time.

Each run happens in its own process (``python benchmarks/common.py VARIANT SEED EPOCHS [SCORER]``) so that its peak
memory (max RSS) is its own; it prints one JSON line.
"""

from __future__ import annotations

import gzip
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

THREADS = 2
BATCH = 256
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist; benchmarks only


def run_variant(variant: str, seed: int, epochs: int, scorer: str = "l2", quick: bool = False) -> dict:
    """Run one variant in a fresh process; returns its measurements."""
    args = [sys.executable, __file__, variant, str(seed), str(epochs), scorer, "quick" if quick else "full"]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _train(variant: str, seed: int, epochs: int, scorer: str, quick: bool) -> dict:
    import lightning.pytorch as pl
    import torch
    import torch_pruning as tp
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_halfprune import Cubic, HalfPrune
    from lightning_halfprune.core.measure import MacCounter, count_params
    from lightning_halfprune.demo import CNN1D, MNIST1DDataModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    pl.seed_everything(seed, verbose=False)
    data = MNIST1DDataModule(num_samples=1000 if quick else 5000)
    model = CNN1D(channels=32 if variant == "dense32" else 64)
    callbacks, cut_at = [], epochs * 2 // 5
    prune = None
    if variant == "halfprune":
        schedule = Cubic(start=epochs // 5, end=epochs // 2, ratio=0.5, every=max(1, epochs // 10))
        prune = HalfPrune(schedule, scorer=scorer, monitor="val_acc", verbose=False, latency_batch_size=0)
    elif variant == "oneshot":
        prune = HalfPrune({cut_at: 0.5}, scorer=scorer, monitor="val_acc", verbose=False, latency_batch_size=0)
    elif variant.startswith("modelpruning"):
        structured = variant.endswith("ln")
        convs = [(m, "weight") for m in model.features if isinstance(m, torch.nn.Conv1d)]
        callbacks.append(
            ModelPruning(
                "ln_structured" if structured else "l1_unstructured",
                amount=0.5,
                parameters_to_prune=convs if structured else (),
                use_global_unstructured=False,
                pruning_dim=0 if structured else None,
                pruning_norm=2 if structured else None,
                apply_pruning=lambda epoch: epoch == cut_at,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        )
    if prune is not None:
        callbacks.append(prune)

    def trainer(max_epochs: int) -> pl.Trainer:
        return quiet_trainer(max_epochs, callbacks, num_sanity_val_steps=0)

    start = time.perf_counter()
    if variant == "tp_by_hand":  # what a user does by hand: train, prune with torch-pruning, fine-tune anew
        trainer(cut_at + 1).fit(model, data)
        pruner = tp.pruner.BasePruner(
            model,
            model.example_input_array,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=[model.classifier],
        )
        pruner.step()
        trainer(epochs - cut_at - 1).fit(model, data)  # configure_optimizers builds a fresh optimizer
        t = trainer(1)
    else:
        t = trainer(epochs)
        t.fit(model, data)
    wall = time.perf_counter() - start
    test_acc = t.test(model, data, verbose=False)[0]["test_acc"]
    example = torch.zeros(1, 1, 40)
    events = prune.reports if prune else []
    return {
        "variant": variant,
        "scorer": scorer if prune else None,
        "seed": seed,
        "epochs": epochs,
        "test_acc": test_acc,
        "params": count_params(model),
        "macs": MacCounter()(model, example),
        "latency_ms": statistics.median(measure_latency(model, example, BATCH, runs=30) for _ in range(3)),
        "event_seconds": sum(r.seconds for r in events),
        "wall_seconds": wall,
        "acc_after_cut": events[-1].metric_after_cut if events else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def quiet_trainer(max_epochs: int, callbacks: list, **kwargs):
    """A CPU Trainer that logs, checkpoints and prints nothing: the benchmarks time training, not I/O."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def sweep_net(width: int):
    """The event-cost sweep's model: 4 conv layers of ``width`` channels on 8x8 inputs, SGD with momentum."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvNet(pl.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            layers, c = [], 3
            for _ in range(4):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                c = width
            self.features, self.head = nn.Sequential(*layers), nn.Linear(width, 10)
            self.example_input_array = torch.zeros(1, 3, 8, 8)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return ConvNet(width)


def median(values: list[float]) -> float:
    return statistics.median(values)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    variant, seed, epochs, scorer, mode = sys.argv[1:6]
    print(json.dumps(_train(variant, int(seed), int(epochs), scorer, mode == "quick")))


def fashion_mnist(split: str):
    """Fashion-MNIST images (N, 1, 28, 28) and labels as uint8 arrays, read from the idx files on disk.

    ``split``: ``"train"`` or ``"t10k"``. Each benchmark scales and normalises them its own way.
    """
    import numpy as np

    with gzip.open(f"{FASHION_MNIST}/{split}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f"{FASHION_MNIST}/{split}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def measure_latency(model, example_input, batch_size: int = 64, runs: int = 10) -> float:
    """Median milliseconds of one forward pass at ``batch_size``, by ``torch.utils.benchmark`` (eval, no grad)."""
    import torch
    from torch.utils import benchmark

    from lightning_halfprune.core.graph import graph_safe, run_model
    from lightning_halfprune.core.measure import repeat_batch

    x = repeat_batch(example_input, batch_size)
    with graph_safe(model), torch.no_grad():
        model.eval()
        timer = benchmark.Timer("run_model(model, x)", globals={"run_model": run_model, "model": model, "x": x})
        return timer.timeit(runs).median * 1000
