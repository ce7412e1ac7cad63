"""Data-driven scorers and the example input on any batch shape: what ``training_step`` feeds, or ``input_fn``."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer


class DictData(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"image": x, "label": y}


def dict_loaders():
    train, val = loaders()
    return (
        DataLoader(DictData(train.dataset), batch_size=16, shuffle=True),
        DataLoader(DictData(val.dataset), batch_size=16),
    )


class DictClassifier(Classifier):
    """``forward(image)``; the batch is ``{"image": ..., "label": ...}``; no example_input_array."""

    def __init__(self):
        super().__init__("plain_cnn")
        self.example_input_array = None

    def forward(self, image):
        return self.net(image)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["image"]).argmax(1) == batch["label"]).float().mean())


class NetCalledDirectly(DictClassifier):
    """``training_step`` calls ``self.net`` rather than ``self(...)``: nothing to capture, ``input_fn`` decides."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch["image"]), batch["label"])


@pytest.mark.parametrize("scorer", ["activation", "redundancy", "taylor"])
def test_dict_batches_with_data_driven_scorers(tmp_path, scorer):
    model = DictClassifier()
    prune = HalfPrune({0: 0.5}, scorer=scorer, latency_batch_size=0, verbose=False)
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *dict_loaders())
    assert model.net.features[0].out_channels == 8 and len(prune.history) == 1


def test_input_fn_from_a_dict_batch(tmp_path):
    model = NetCalledDirectly()
    prune = HalfPrune({0: 0.5}, scorer="activation", input_fn=lambda b: b["image"], latency_batch_size=0)
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *dict_loaders())
    assert model.net.features[0].out_channels == 8


def test_a_batch_that_cannot_be_fed_fails_at_train_start_listing_its_keys(tmp_path):
    model = DictClassifier()
    model.example_input_array = torch.zeros(2, 3, 8, 8)
    prune = HalfPrune({0: 0.5}, scorer="activation", input_fn=lambda b: b["pixels"], latency_batch_size=0)
    with pytest.raises(ValueError, match=r"keys 'image' \(16, 3, 8, 8\), 'label'.*input_fn") as err:
        trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *dict_loaders())
    assert prune.history == [] and model.losses == []  # nothing trained, nothing cut
    assert "KeyError" in str(err.value)
