"""Tiny models and tokenizers built locally, for tests and smoke runs (no Hub access).

`make_tiny_tokenizer()` trains a small BPE tokenizer with the `tokenizers` library on an arithmetic/chat corpus and
wraps it as a `PreTrainedTokenizerFast` with a chat template; `make_tiny_model()` builds a randomly initialised
2-layer Qwen2 causal LM from a config.
"""

from __future__ import annotations

import string

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 7? Let's think step by step. 12 + 7 = 19. The answer is \\boxed{19}.",
    "Compute 3 * 4 - 5. First 3 * 4 = 12, then 12 - 5 = 7. So the answer is \\boxed{7}.",
    "Tom has 5 apples and buys 3 more. How many apples does he have? 5 + 3 = 8. #### 8",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "system user assistant question answer solution problem step first then so total",
]


def make_tiny_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS * 20 + [" ".join(string.digits)] + [string.ascii_letters + string.punctuation]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_tiny_model(tokenizer, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
