"""Tiny random HF decoders for the backend tests (no hub access: configs only)."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_common()),
    "mistral": lambda: tf.MistralConfig(**_common(sliding_window=None)),
    "qwen2": lambda: tf.Qwen2Config(**_common()),
    "phi3": lambda: tf.Phi3Config(**_common()),
    "gemma": lambda: tf.GemmaConfig(**_common(head_dim=16)),
    "gemma2_softcap": lambda: tf.Gemma2Config(**_common(head_dim=16, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=None, sliding_window=4)),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

# Linear layers per decoder layer (+1 for lm_head); GPT-2's Conv1D are addmm.
LINEARS_PER_LAYER = {"llama": 7, "mistral": 7, "qwen2": 7, "phi3": 4, "gemma": 7, "gpt2": 4}


def build(name: str, attn: str = "sdpa", dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def left_padded_batch(batch: int = 2, length: int = 7, pad: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask
