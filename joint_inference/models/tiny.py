"""Tiny random causal LMs with a locally trained tokenizer: smoke tests and benchmarks, no download."""
from __future__ import annotations

import torch

WORDS = ("the a movie film was is good bad great awful boring fun sentence sentiment topic about of positive "
         "negative world sports business technology yes no maybe question answer choice premise it this that "
         "and but not very really quite story plot actors acting love hate").split()


def synthetic_sentences(n: int, length: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=g)) for _ in range(n)]


def train_tokenizer(add_bos: bool = True, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on synthetic text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = (s + ".\nThe sentiment of the sentence is positive." for s in synthetic_sentences(400))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_tokenizer(arch: str = "llama", **_):
    """The tokenizer :func:`tiny_causal_lm` gives a model of ``arch`` (``model.random_init``'s other keys
    shape the model only)."""
    return train_tokenizer(add_bos=arch == "llama")


def tiny_causal_lm(arch: str = "llama", tokenizer=None, seed: int = 0, **dims):
    """(random model, tokenizer); the model's vocabulary is padded beyond the tokenizer's, as in Qwen2.

    Weights are drawn wide enough (std 0.2) that predictions depend on the input, so tests
    comparing predictions have something to compare.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer(arch)
    vocab = len(tokenizer) + 37
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**{"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                                "tie_word_embeddings": False, "initializer_range": 0.2, "pad_token_id": tokenizer.pad_token_id, **special, **dims})
        return LlamaForCausalLM(config).eval(), tokenizer
    if arch == "gpt2":
        config = GPT2Config(**{"vocab_size": vocab, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 1024,
                               "initializer_range": 0.2, **special, **dims})
        return GPT2LMHeadModel(config).eval(), tokenizer
    raise ValueError(f"unknown tiny architecture {arch!r}; use llama or gpt2")
