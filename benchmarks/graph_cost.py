"""What building the dependency graph and the prunable groups costs on transformers (Hugging Face, from configs).

    python benchmarks/graph_cost.py

For each model: ``Surgeon(model, example)`` (trace + torch-pruning graph + every group, attention found and
described) and then one ``plan`` at ratio 0.5 with the L2 scorer, each timed ``REPEATS`` times on a fresh model
(median, min-max). Also plain torch-pruning's ``get_all_groups`` on a 1-layer Llama in a subprocess with a time
limit: the hang this package works around by never rooting a group at q/k/v.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import warnings

import torch

from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon

REPEATS = 3
PLAIN_LIMIT_S = 60


def models() -> dict:
    import transformers as tf

    return {
        "GPT-2 small (124M, 12 layers)": lambda: tf.GPT2LMHeadModel(tf.GPT2Config()),
        "BERT-base (110M, 12 layers)": lambda: tf.BertForSequenceClassification(tf.BertConfig()),
        "Llama 2 layers GQA (hidden 64)": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
        ),
        "Llama 12 layers GQA (hidden 768)": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=256)
        ),
    }


class Logits(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ids):
        return self.net(input_ids=ids, use_cache=False).logits


def plain_torch_pruning_llama() -> None:
    import torch_pruning as tp
    import transformers as tf

    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    graph = tp.DependencyGraph().build_dependency(model, torch.ones(1, 8, dtype=torch.long),
                                                  forward_fn=lambda m, x: m(x).logits)
    print(sum(1 for _ in graph.get_all_groups()))


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {REPEATS} repeats on fresh models\n")
    print("| model | params | graph + groups s (median, min-max) | groups | attention modules | plan 0.5 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in models().items():
        builds, plans = [], []
        for _ in range(REPEATS):
            model = Logits(make()).eval()
            example = torch.ones(1, 16, dtype=torch.long)
            start = time.perf_counter()
            surgeon = Surgeon(model, example)
            groups = surgeon.groups()
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            surgeon.plan(0.5, get_scorer("l2"))
            plans.append(time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        attention = sum(g.attention is not None for g in groups)
        print(
            f"| {name} | {params:.1f}M | {statistics.median(builds):.2f} ({min(builds):.2f}-{max(builds):.2f}) "
            f"| {len(groups)} | {attention} | {statistics.median(plans):.2f} |",
            flush=True,
        )
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, __file__, "plain"], timeout=PLAIN_LIMIT_S, capture_output=True, check=True)
        print(f"\nplain torch-pruning get_all_groups, 1-layer Llama: {time.perf_counter() - start:.1f} s")
    except subprocess.TimeoutExpired:
        print(f"\nplain torch-pruning get_all_groups, 1-layer Llama: not finished after {PLAIN_LIMIT_S} s (killed)")


if __name__ == "__main__":
    if sys.argv[1:] == ["plain"]:
        plain_torch_pruning_llama()
    else:
        main()
