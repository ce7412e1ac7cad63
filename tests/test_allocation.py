"""``attention="heads_last"``: a ratio's parameters come from the MLPs first; the loss picks how many heads go."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_halfprune import HalfPrune, Schedule
from lightning_halfprune.core.measure import count_params
from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.options import Calibration
from test_minitron import LM, SEQ, qwen3, tokens

EXAMPLE = torch.zeros(1, SEQ, dtype=torch.long)


def cut(model: torch.nn.Module, attention: str, ratio: float, judge=None) -> torch.nn.Module:
    surgeon = Surgeon(model, EXAMPLE, attention=attention)
    surgeon.cut(surgeon.plan(ratio, get_scorer("l2"), judge))
    return model


def widths(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(query heads, MLP width) of every layer."""
    return [(layer.self_attn.q_proj.out_features // 8, layer.mlp.up_proj.out_features) for layer in model.model.layers]


def test_heads_last_keeps_every_head_and_the_parameters_of_the_ratio() -> None:
    uniform = cut(qwen3(), "heads", 0.5)
    model = cut(qwen3(), "heads_last", 0.5)
    assert widths(uniform) == [(2, 32), (2, 32)]
    # per layer: attention 3072 params (all heads), 96 per MLP neuron; half of 3072 + 6144 leaves 16 neurons
    assert widths(model) == [(4, 16), (4, 16)]
    assert count_params(model) == count_params(uniform)
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 16
    model(input_ids=tokens(2)[:, :-1])


def test_the_judge_chooses_among_the_splits_at_the_same_parameters() -> None:
    model = qwen3()
    seen = []

    def judge() -> float:  # prefers fewer heads: the uniform split must win
        seen.append(widths(model))
        return float(model.model.layers[0].self_attn.q_proj.out_features)

    cut(model, "heads_last", 0.5, judge)
    assert seen == [[(4, 16), (4, 16)], [(2, 32), (2, 32)]]  # every split was tried, the model put back after each
    assert widths(model) == [(2, 32), (2, 32)]


def test_a_ratio_the_mlps_cannot_give_alone_takes_heads_too() -> None:
    model = cut(qwen3(), "heads_last", 0.8)  # 20% of 9216 per layer = 1843: more than all heads alone hold
    assert widths(model)[0][0] == 2 and count_params(model) <= count_params(cut(qwen3(), "heads", 0.8)) + 2 * 96


def test_heads_last_in_a_real_fit_cuts_on_the_calibration_loss_and_trains_on() -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    module = LM()
    expected = count_params(cut(copy.deepcopy(module.model), "heads", 0.5))
    prune = HalfPrune(Schedule({2: 0.5}, interval="step"), scorer="l2", attention="heads_last",
                      calibration=Calibration(batches=2), verbose=False, timing=None)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[prune])
    trainer.fit(module, DataLoader(tokens(), batch_size=8))
    assert len(prune.reports) == 1 and trainer.global_step == 4
    assert widths(module.model) in ([(4, 16), (4, 16)], [(2, 32), (2, 32)])
    assert count_params(module.model) == expected
