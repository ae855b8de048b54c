"""The demo world's tokenizer: a small byte-level BPE with a Qwen-style chat template.

Byte-level, so every template a user writes round-trips exactly (unknown words fall back to bytes), and
trained on the task's text and the default templates, so those cost few tokens.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trd_lightning import prompts
from trd_lightning.data.demo.task import TEMPLATES, flawed_solution, sample_problem

PAD, START, END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
VOCAB_SIZE = 512


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts the BPE merges are learnt from: problems, solutions, the demo templates and the default ones."""
    rng = random.Random(seed)
    texts = [
        prompts.STUDENT_TEMPLATE,
        prompts.PRIVILEGED_TEMPLATE,
        prompts.REFINE_OPD_TEMPLATE,
        prompts.REFINE_OPSD_TEMPLATE,
        prompts.TRUNCATION_MARKER,
        "user assistant",
        *TEMPLATES.values(),
    ]
    for _ in range(n):
        p = sample_problem(rng)
        texts += [p.text, p.solution(), flawed_solution(p, rng)]
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the demo tokenizer (deterministic) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, START, END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
