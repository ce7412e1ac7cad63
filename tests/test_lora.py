"""LoRA (peft): the base layers' widths are cut with their adapters, the rank is kept, and peft saves and reloads."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lightning_halfprune import HalfPrune  # noqa: E402
from models import trainer  # noqa: E402
from transformer_models import SEQ, VOCAB, hf_model, loader  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


class LoraLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
        self.net = peft.get_peft_model(hf_model("llama"), config)
        self.example_input_array = torch.ones(2, SEQ, dtype=torch.long)

    def forward(self, ids):
        return self.net(input_ids=ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_lora_adapters_follow_their_base_layers_and_keep_their_rank(tmp_path):
    model = LoraLM()
    prune = HalfPrune({0: 0.5}, latency_batch_size=0)
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, loader("llama"))

    assert len(prune.history) == 1
    layers = [m for m in model.net.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(layers) == 2 * len(TARGETS)
    for layer in layers:
        base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
        assert a.out_features == b.in_features == 4  # the rank is never cut
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
        assert (a.in_features, b.out_features) == (base.in_features, base.out_features)
    assert model.net.peft_config["default"].r == 4
    up = model.net.base_model.model.model.layers[0].mlp.up_proj
    attention = model.net.base_model.model.model.layers[0].self_attn
    assert up.out_features == 64 and attention.q_proj.out_features == 32  # MLP 128 -> 64, heads 4 -> 2
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.net.named_parameters())  # base stays frozen


def test_a_pruned_lora_model_merges_and_reloads_through_peft(tmp_path):
    model = LoraLM()
    trainer(tmp_path, max_epochs=2, callbacks=[HalfPrune({0: 0.5}, latency_batch_size=0)]).fit(model, loader("llama"))
    ids = torch.randint(1, VOCAB, (3, SEQ))
    model.eval()
    with torch.no_grad():
        expected = model(ids)
        model.net.save_pretrained(tmp_path / "adapter")
        base = model.net.unload()  # the pruned base model without adapters: its config follows the cuts
        base.save_pretrained(tmp_path / "base")
        reloaded_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        reloaded = peft.PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, expected)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids, use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)
