"""A byte-level BPE tokenizer trained on the `stdlib-code` corpus with the `tokenizers` library.

Byte-level BPE (as GPT-2's) never meets an unknown character, so `decode(encode(text)) == text` for
any string, which the round-trip test pins. The trained tokenizer is wrapped as a Hugging Face
`PreTrainedTokenizerFast` so a model folder carries it as `tokenizer.json` + `tokenizer_config.json`
and any HF-aware tool (transformers, peft, the serving engine) loads it unchanged.

Special tokens: `<|endoftext|>` separates documents (bos = eos), `<|pad|>` pads batches, and the
chat roles `<|system|>`, `<|user|>`, `<|assistant|>` with `<|end|>` make the chat template below, so
the tiny model can sit behind `/v1/chat/completions` like a real instruction model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (EOS, PAD, *(f"<|{r}|>" for r in ROLES), END_OF_TURN)

# One turn is `<|role|>\n content <|end|>\n`; the prompt for a reply ends with `<|assistant|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; the 256 byte symbols and the special tokens are always in the vocabulary."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus {len(SPECIAL_TOKENS)} special tokens")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap(core, model_max_length)


def wrap(core: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """The HF face of a `tokenizers.Tokenizer`: named special tokens and the chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS, PAD)],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens added), in one batched Rust call."""
    return [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
