"""Tiny random HF decoders (float32, eval, seeded) and their HF `generate` greedy references."""
from __future__ import annotations

import functools

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 512
MAX_LEN = 512
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_LEN,
)
FAMILIES = ("llama", "qwen2", "gpt2", "mistral")


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif family == "mistral":  # window >= max_model_len: equivalent to full attention
        model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=MAX_LEN))
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=MAX_LEN)
        config.eos_token_id = config.bos_token_id = VOCAB - 1
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.eval()


def random_prompts(lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate on the prompt alone, greedy, EOS disabled."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@functools.cache
def reference(family: str, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int) -> list[list[int]]:
    """Cached HF references (a fresh model per call, so the engine's model switch cannot leak in)."""
    model = build_model(family)
    return [hf_greedy(model, list(p), max_new_tokens) for p in prompts]



def word_tokenizer():
    """A tokenizer over the tiny vocabulary: token i is the word "w{i}", the last id is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<eos>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
