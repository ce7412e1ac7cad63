"""``MinitronScorer``: activation importance of MLP neurons and attention heads on token batches (real models)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_halfprune import HalfPrune, Schedule
from lightning_halfprune.core.minitron import MinitronScorer
from lightning_halfprune.core.scoring import SCORERS, get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.options import Calibration

VOCAB, SEQ = 64, 16


def qwen3() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, use_cache=False)
    return Qwen3ForCausalLM(config)


class LM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = qwen3()
        self.example_input_array = torch.zeros(1, SEQ, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def tokens(n: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(1))


def calibrated(model: torch.nn.Module) -> tuple[MinitronScorer, Surgeon]:
    scorer = MinitronScorer()
    scorer.inputs_of = lambda batch: batch[:, :-1]
    scorer.calibrate(model, list(tokens().split(8)), lambda batch: torch.zeros(()))
    return scorer, Surgeon(model, torch.zeros(1, SEQ, dtype=torch.long))


def test_registered_by_name() -> None:
    assert "minitron" in SCORERS
    assert isinstance(get_scorer("minitron"), MinitronScorer)


def test_one_score_per_channel_and_a_dead_neuron_ranks_lowest() -> None:
    model = qwen3()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5].zero_()  # neuron 5 of layer 0 feeds nothing to down_proj: act(gate) * 0
    scorer, surgeon = calibrated(model)
    groups = {g.name: g for g in surgeon.groups()}
    group = next(g for name, g in groups.items() if name.startswith("model.layers.0.mlp"))
    scores = scorer(group.group)
    assert scores.shape == (group.width,) == (64,)
    assert torch.isfinite(scores).all()
    assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    for g in surgeon.groups():  # every group gets one finite score per channel
        s = scorer(g.group)
        assert s is not None and s.shape == (g.width,) and torch.isfinite(s).all()


def test_a_silent_head_group_is_cut_first() -> None:
    model = qwen3()
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.weight[8:16].zero_()  # key/value head 1: query heads 2 and 3 output zeros
    scorer, surgeon = calibrated(model)
    group = next(g for g in surgeon.groups() if g.attention is not None and g.name.startswith("model.layers.1"))
    scores = scorer(group.group)
    assert scores.shape == (4 * 8,)
    per_head = scores.view(4, 8)
    assert torch.allclose(per_head, per_head[:, :1].expand(4, 8))  # each channel carries its head's norm
    assert per_head[2:].max() == 0 and per_head[:2].min() > 0
    cuts = surgeon.plan(0.5, scorer)
    surgeon.cut(cuts)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    out = model(input_ids=tokens(2)[:, :-1]).logits
    assert out.shape == (2, SEQ, VOCAB)
    kept_v = attn.v_proj.weight
    assert kept_v.shape[0] == 8 and kept_v.abs().sum() > 0  # the silent key/value head went, the live one stayed


def test_minitron_in_a_real_fit() -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    module = LM()
    prune = HalfPrune(Schedule({2: 0.5}, interval="step"), scorer="minitron", calibration=Calibration(batches=2),
                      verbose=False, timing=None)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[prune])
    trainer.fit(module, DataLoader(tokens(), batch_size=8))
    assert len(prune.reports) == 1
    config = module.model.config
    assert config.intermediate_size == 32 and config.num_attention_heads == 2
    assert all(layer.mlp.down_proj.in_features == 32 for layer in module.model.model.layers)


@pytest.mark.parametrize("heads", [True, False])
def test_heads_option_scores_every_group(heads: bool) -> None:
    model = qwen3()
    scorer = MinitronScorer(heads=heads)
    scorer.inputs_of = lambda batch: batch[:, :-1]
    scorer.calibrate(model, [tokens(8)], lambda batch: torch.zeros(()))
    surgeon = Surgeon(model, torch.zeros(1, SEQ, dtype=torch.long))
    for g in surgeon.groups():
        assert scorer(g.group).shape == (g.width,)
    scorer.release()
    assert scorer(surgeon.groups()[0].group) is None  # nothing calibrated: the group is left alone
