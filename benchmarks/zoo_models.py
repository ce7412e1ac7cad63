"""The model zoo's models: name -> (builder, (task, image size)), and how each task is fed and scored.

Hugging Face models are built from tiny configs (never downloaded: ``HF_HUB_OFFLINE=1``), timm ones with
``pretrained=False``, torchvision ones with ``weights=None``. Tasks: ``image`` (a module taking images, returning
logits), ``hf_image`` (``pixel_values=``), ``text`` (token ids -> class logits), ``lm`` (next-token loss),
``seq2seq`` (T5: the ids are encoder input and teacher-forced decoder input), ``speech`` (Whisper: log-mel features
in, class read from the last decoder position).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, BATCHES, EPOCHS, SEQ, VOCAB, CLASSES = 8, 3, 2, 16, 1000, 10
MELS, FRAMES = 8, 16  # Whisper: log-mel bins, frames (2 x max_source_positions)


def _timm(name: str, img: int, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)

    return build, ("image", img)


def _tv(name: str, img: int, **kw):
    def build():
        import torchvision

        weights = {} if name == "VisionTransformer" else {"weights": None}  # the class itself takes no weights
        return getattr(torchvision.models, name)(num_classes=CLASSES, **weights, **kw)

    return build, ("image", img)


def _hf(model_cls: str, config_cls: str, task: str, img: int = 32, **config):
    def build():
        import transformers

        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))

    return build, (task, img)


def _own(cls_name: str, task: str, img: int = 32):
    def build():
        return globals()[cls_name]()

    return build, (task, img)


TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
# Text models at the proportions of the real ones: MLP 4x the hidden size (BERT, GPT-2, Llama 3.2 1B), 4 layers and
# tied embeddings where the real model ties them (GPT-2, Llama 3.2, Qwen2), so that the embedding is 20-26% of the
# params, as in BERT-base (22%), GPT-2 small (31%), Llama 3.2 1B (21%), Qwen2 0.5B (28%). With a 1000-word vocabulary
# on 2 layers of width 64 it would be 50-65%, and it is kept by default (`prune_hidden_size=False`).
REAL_TEXT = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=VOCAB,
    max_position_embeddings=64,
)
TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # some defaults lie beyond a 1000-word vocabulary
REAL_LM = dict(REAL_TEXT, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True)
REAL_MHA = dict(REAL_TEXT, use_cache=False, **TOKENS)  # an LM without GQA
GPT2 = dict(n_embd=64, n_head=4, vocab_size=VOCAB)
PHI3_TOKENS = TOKENS
CLS = dict(REAL_TEXT, num_labels=CLASSES)
MOE = dict(REAL_LM, num_experts_per_tok=2, **TOKENS)
ROTARY_GPT = dict(n_embd=64, n_head=4, n_layer=4, n_positions=64, rotary_dim=8, vocab_size=VOCAB, use_cache=False,
                  bos_token_id=0, eos_token_id=0)
FALCON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, vocab_size=VOCAB, use_cache=False,
              bos_token_id=0, eos_token_id=0)
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=8)
SMALL_VIT = dict(embed_dim=192, depth=4, num_heads=3)  # a timm ViT-Tiny's width at 4 layers

MODELS = {
    "timm_vit_tiny": _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8),
    "timm_deit_tiny": _timm("deit_tiny_patch16_224", 32, img_size=32, patch_size=8),
    "timm_swin_tiny": _timm("swin_tiny_patch4_window7_224", 64, img_size=64, window_size=4),
    "timm_mixer_s16": _timm("mixer_s16_224", 64, img_size=64),
    "timm_convnext_atto": _timm("convnext_atto", 32),
    "timm_efficientnet_b0": _timm("efficientnet_b0", 32),
    "timm_resnet18": _timm("resnet18", 32),
    "timm_mobilenetv3_small_100": _timm("mobilenetv3_small_100", 32),
    "timm_regnetx_002": _timm("regnetx_002", 32),
    "tv_resnet18": _tv("resnet18", 32),
    "tv_mobilenet_v2": _tv("mobilenet_v2", 32),
    "tv_densenet121": _tv("densenet121", 32),
    "tv_efficientnet_b0": _tv("efficientnet_b0", 32),
    "tv_convnext_tiny": _tv("convnext_tiny", 32),
    "tv_regnet_x_400mf": _tv("regnet_x_400mf", 32),
    "tv_vit_2l": _tv(
        "VisionTransformer", 32, image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    ),
    "tv_swin_t": _tv("swin_t", 64),
    "hf_bert": _hf("BertForSequenceClassification", "BertConfig", "text", **CLS),
    "hf_vit": _hf(
        "ViTForImageClassification",
        "ViTConfig",
        "hf_image",
        image_size=32,
        patch_size=8,
        num_labels=CLASSES,
        **{k: v for k, v in TINY_TEXT.items() if k != "vocab_size"},
    ),
    "hf_gpt2_lm": _hf("GPT2LMHeadModel", "GPT2Config", "lm", n_layer=4, n_positions=64, **GPT2),
    "hf_llama_gqa": _hf("LlamaForCausalLM", "LlamaConfig", "lm", **REAL_LM),
    "hf_qwen2_gqa": _hf("Qwen2ForCausalLM", "Qwen2Config", "lm", **REAL_LM),
    # fused q|k|v with GQA and fused gate|up; untied like Phi-3-mini
    "hf_phi3_gqa": _hf(
        "Phi3ForCausalLM", "Phi3Config", "lm", **dict(REAL_LM, tie_word_embeddings=False), **PHI3_TOKENS
    ),
    # the embedding-heavy shape (2 layers, 1024 positions: 56% of the params): only the hidden size can halve it
    "hf_gpt2_lm_hidden": _hf("GPT2LMHeadModel", "GPT2Config", "lm", n_layer=2, **GPT2),
    # ---- issue 22: MoE (4 experts, 2 per token)
    "hf_mixtral_moe": _hf("MixtralForCausalLM", "MixtralConfig", "lm", **dict(MOE, intermediate_size=128),
                          num_local_experts=4),
    "hf_qwen2_moe": _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", "lm", **MOE, num_experts=4,
                        moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "hf_qwen3_moe": _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "lm", **MOE, num_experts=4,
                        moe_intermediate_size=64, head_dim=16),
    # ---- fused q/k/v layouts
    "hf_gpt_neox": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", "lm", **REAL_MHA, partial_rotary_factor=0.5),
    "hf_falcon_mqa": _hf("FalconForCausalLM", "FalconConfig", "lm", **FALCON, multi_query=True,
                         new_decoder_architecture=False),
    "hf_falcon_grouped": _hf("FalconForCausalLM", "FalconConfig", "lm", **FALCON, new_decoder_architecture=True,
                             num_kv_heads=2),
    "hf_bloom": _hf("BloomForCausalLM", "BloomConfig", "lm", hidden_size=64, n_head=4, n_layer=4, vocab_size=VOCAB,
                    use_cache=False, **TOKENS),
    "hf_modernbert": _hf("ModernBertForSequenceClassification", "ModernBertConfig", "text",
                         **dict(CLS, intermediate_size=128), **TOKENS, cls_token_id=0, sep_token_id=0,
                         local_attention=8, global_attn_every_n_layers=1),
    "hf_gptj": _hf("GPTJForCausalLM", "GPTJConfig", "lm", **ROTARY_GPT),
    "hf_codegen": _hf("CodeGenForCausalLM", "CodeGenConfig", "lm", n_ctx=64, **ROTARY_GPT),
    # ---- per-head position biases and projections, encoder-decoders
    "hf_t5": _hf("T5ForConditionalGeneration", "T5Config", "seq2seq", d_model=64, d_kv=16, d_ff=256, num_layers=2,
                 num_heads=4, vocab_size=VOCAB, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0, use_cache=False),
    "hf_deberta_v2": _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", "text", **CLS,
                         relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=False, position_buckets=8,
                         max_relative_positions=16),
    "hf_whisper": _hf("WhisperForConditionalGeneration", "WhisperConfig", "speech", d_model=64,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2, decoder_layers=2,
                      encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=MELS, max_source_positions=FRAMES // 2,
                      max_target_positions=SEQ, vocab_size=VOCAB, decoder_start_token_id=0, use_cache=False,
                      **TOKENS),
    # ---- decoder LMs
    "hf_qwen3": _hf("Qwen3ForCausalLM", "Qwen3Config", "lm", **REAL_LM, head_dim=16, **TOKENS),
    "hf_gemma": _hf("GemmaForCausalLM", "GemmaConfig", "lm", **REAL_LM, head_dim=16, **TOKENS),
    "hf_gemma2": _hf("Gemma2ForCausalLM", "Gemma2Config", "lm", **REAL_LM, head_dim=16, query_pre_attn_scalar=16,
                     sliding_window=8, **TOKENS),
    "hf_mistral": _hf("MistralForCausalLM", "MistralConfig", "lm", **dict(REAL_LM, tie_word_embeddings=False),
                      **TOKENS),
    "hf_opt": _hf("OPTForCausalLM", "OPTConfig", "lm", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  ffn_dim=256, vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False,
                  **TOKENS),
    "hf_phi": _hf("PhiForCausalLM", "PhiConfig", "lm", **REAL_MHA, partial_rotary_factor=0.5),
    "hf_stablelm": _hf("StableLmForCausalLM", "StableLmConfig", "lm", **REAL_LM, partial_rotary_factor=0.25,
                       **TOKENS),
    "hf_olmo": _hf("OlmoForCausalLM", "OlmoConfig", "lm", **REAL_LM, **TOKENS),
    "hf_mamba": _hf("MambaForCausalLM", "MambaConfig", "lm", hidden_size=64, num_hidden_layers=4, vocab_size=VOCAB,
                    state_size=8, use_cache=False, **TOKENS),
    # the proportions of state-spaces/mamba2-130m: tied embeddings ~30% of the params, B|C a tenth of the inner width
    "hf_mamba2": _hf("Mamba2ForCausalLM", "Mamba2Config", "lm", hidden_size=64, num_hidden_layers=6, vocab_size=VOCAB,
                     num_heads=8, head_dim=16, expand=2, n_groups=1, state_size=8, chunk_size=8, use_cache=False,
                     tie_word_embeddings=True, **TOKENS),
    # multi-head latent attention (DeepSeek-V3, Kimi-K2): low-rank q, a shared latent k/v, a dense layer then experts
    "hf_deepseek_v3": _hf("DeepseekV3ForCausalLM", "DeepseekV3Config", "lm", **dict(MOE, num_key_value_heads=4,
                          intermediate_size=128), moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                          first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    # fourth session: more families users run
    "hf_bart": _hf("BartForConditionalGeneration", "BartConfig", "seq2seq", d_model=64, encoder_layers=2,
                   decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                   decoder_ffn_dim=256, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                   decoder_start_token_id=0, forced_eos_token_id=None, **TOKENS),
    "hf_gemma3": _hf("Gemma3ForCausalLM", "Gemma3TextConfig", "lm", **REAL_LM, head_dim=16, sliding_window=8,
                     **TOKENS),
    "hf_gpt_oss": _hf("GptOssForCausalLM", "GptOssConfig", "lm", **dict(MOE, intermediate_size=128),
                      num_local_experts=4, head_dim=16, sliding_window=8),
    "hf_olmoe": _hf("OlmoeForCausalLM", "OlmoeConfig", "lm", **dict(MOE, intermediate_size=128), num_experts=4),
    # a Mamba-2 + attention hybrid (IBM Bamba, the layout of Granite-4 and NemotronH): every MLP, one attention layer
    "hf_bamba": _hf("BambaForCausalLM", "BambaConfig", "lm", **REAL_LM, mamba_n_heads=8, mamba_d_head=16,
                    mamba_n_groups=1, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=8, attn_layer_indices=[2],
                    **TOKENS),
    # ---- encoders
    "hf_roberta": _hf("RobertaForSequenceClassification", "RobertaConfig", "text", **CLS, pad_token_id=1),
    "hf_distilbert": _hf("DistilBertForSequenceClassification", "DistilBertConfig", "text", dim=64, n_layers=4,
                         n_heads=4, hidden_dim=256, vocab_size=VOCAB, max_position_embeddings=64, num_labels=CLASSES),
    "hf_electra": _hf("ElectraForSequenceClassification", "ElectraConfig", "text", **CLS, embedding_size=32),
    "hf_albert": _hf("AlbertForSequenceClassification", "AlbertConfig", "text", **CLS, embedding_size=32),
    # ---- vision (HF)
    "hf_siglip_vision": _hf("SiglipForImageClassification", "SiglipConfig", "hf_image", vision_config=VISION,
                            num_labels=CLASSES),
    "hf_clip_vision": _hf("CLIPForImageClassification", "CLIPConfig", "hf_image", vision_config=VISION,
                          num_labels=CLASSES),
    "hf_swin": _hf("SwinForImageClassification", "SwinConfig", "hf_image", 64, image_size=64, patch_size=4,
                   embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=CLASSES),
    "hf_convnext": _hf("ConvNextForImageClassification", "ConvNextConfig", "hf_image", hidden_sizes=[32, 64, 128, 256],
                       depths=[1, 1, 2, 1], num_labels=CLASSES),
    # ---- timm
    "timm_beit": _timm("beit_base_patch16_224", 32, img_size=32, patch_size=8, **SMALL_VIT),
    "timm_eva02_tiny": _timm("eva02_tiny_patch14_224", 56, img_size=56),
    "timm_hiera_tiny": _timm("hiera_tiny_224", 64, img_size=64),
    "timm_mobilevitv2_050": _timm("mobilevitv2_050", 64),
    "timm_efficientvit_m0": _timm("efficientvit_m0", 64, img_size=64),
    "timm_nf_resnet26": _timm("nf_resnet26", 32),
    "timm_eca_nfnet_l0": _timm("eca_nfnet_l0", 32),
    "timm_resnetv2_50x1_bit": _timm("resnetv2_50x1_bit", 32),
    "timm_coatnet_nano": _timm("coatnet_nano_rw_224", 64, img_size=64),
    "timm_maxvit_nano": _timm("maxvit_nano_rw_256", 64, img_size=64),
    "timm_poolformer_s12": _timm("poolformer_s12", 32),
    "timm_levit_128s": _timm("levit_128s", 64, img_size=64),
    "timm_deit3_small": _timm("deit3_small_patch16_224", 32, img_size=32, patch_size=8),
    "timm_cait_xxs24": _timm("cait_xxs24_224", 32, img_size=32, patch_size=8),
    "timm_xcit_nano": _timm("xcit_nano_12_p16_224", 64, img_size=64),
    "timm_pvt_v2_b0": _timm("pvt_v2_b0", 64),
    "timm_ghostnet_100": _timm("ghostnet_100", 32),
    "timm_rexnet_100": _timm("rexnet_100", 32),
    "timm_repvgg_a0": _timm("repvgg_a0", 32),
    # ---- fourth session: popular families not tried yet
    "hf_swinv2": _hf("Swinv2ForImageClassification", "Swinv2Config", "hf_image", 64, image_size=64, patch_size=4,
                     embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=CLASSES),
    "timm_swinv2_tiny": _timm("swinv2_tiny_window8_256", 64, img_size=64, window_size=4),  # per-head logit scale, cpb
    "timm_convnextv2_atto": _timm("convnextv2_atto", 32),  # GRN: per-channel gamma/beta
    "timm_dinov2_small": _timm("vit_small_patch14_dinov2", 56, img_size=56),  # LayerScale
    "timm_efficientformerv2_s0": _timm("efficientformerv2_s0", 64, img_size=64),
    "timm_fastvit_t8": _timm("fastvit_t8", 64),
    "timm_regnety_002": _timm("regnety_002", 32),  # squeeze-excitation
    # ---- torchvision
    "tv_googlenet_aux": _tv("googlenet", 64, aux_logits=True, init_weights=True),
    "tv_inception_v3": _tv("inception_v3", 75, aux_logits=False, init_weights=True),  # aux logits need 299 px
    "tv_shufflenet_v2": _tv("shufflenet_v2_x0_5", 32),
    "tv_squeezenet": _tv("squeezenet1_1", 64),
    "tv_mnasnet": _tv("mnasnet0_5", 32),
    "tv_vgg11_bn": _tv("vgg11_bn", 32),
    "tv_wide_resnet50_2": _tv("wide_resnet50_2", 32),
    "tv_resnext50_32x4d": _tv("resnext50_32x4d", 32),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small", 32),
    "tv_resnet18_fpn": _own("ResNetFPN", "image", 64),
    # ---- recurrent (our own)
    "own_lstm_lm": _own("LSTMLM", "lm"),
    "own_gru_bi_text": _own("GRUText", "text"),
}


def _torch():
    import torch

    return torch


def ResNetFPN():
    """torchvision's detection backbone (ResNet-18 with FrozenBatchNorm2d and an FPN), a small head on its features."""
    torch = _torch()
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
            self.head = torch.nn.Linear(self.backbone.out_channels, CLASSES)

        def forward(self, x):
            features = self.backbone(x)
            pooled = sum(f.mean(dim=(2, 3)) for f in features.values())
            return self.head(pooled)

    return Net()


def LSTMLM():
    """A 2-layer LSTM language model (embedding 64, hidden 128), untied."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 64)
            self.rnn = torch.nn.LSTM(64, 128, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(128, VOCAB)

        def forward(self, input_ids):
            return self.head(self.rnn(self.embed(input_ids))[0])

    return Net()


def GRUText():
    """A 2-layer bidirectional GRU classifier (embedding 64, hidden 96 per direction), mean-pooled."""
    torch = _torch()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 64)
            self.rnn = torch.nn.GRU(64, 96, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(192, CLASSES)

        def forward(self, input_ids):
            return self.head(self.rnn(self.embed(input_ids))[0].mean(dim=1))

    return Net()


# --------------------------------------------------------------------------------------------------- feeding a task
def inputs(task: str, img: int, n: int, seed: int):
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    if task in ("text", "lm", "seq2seq"):
        return torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if task == "speech":
        return torch.randn(n, MELS, FRAMES, generator=g)
    return torch.randn(n, 3, img, img, generator=g)


def forward(net, task: str, x):
    """The model's logits for input ``x`` of ``task``."""
    if task == "hf_image":
        out = net(pixel_values=x)
    elif task in ("text", "lm"):
        out = net(input_ids=x)
    elif task == "seq2seq":
        out = net(input_ids=x, decoder_input_ids=x)
    elif task == "speech":  # the decoder reads 4 fixed tokens; the class comes from the last position
        ids = _torch().arange(4).expand(len(x), 4)
        out = net(input_features=x, decoder_input_ids=ids)
    else:
        out = net(x)
    logits = getattr(out, "logits", out)
    return logits[:, -1] if task == "speech" else logits


def next_token(task: str) -> bool:
    """Whether ``task`` is scored by next-token cross-entropy (else by the class labels)."""
    return task in ("lm", "seq2seq")
