"""A passkey-retrieval set built offline inside standard-library code (the issue's long-context evaluation set).

Each sample is held-out code tokens with the line `PASSKEY = <5 digits>` inserted at a relative depth, followed
by more code and the prompt `PASSKEY = `; the model must recall the digits. Tiny models rarely generate five
digits exactly, so accuracy is scored as ranking: the sample counts as retrieved when the true key has the
highest total log-likelihood among `candidates` keys (the true one and random distractors), chance being
1/candidates. The needle and the candidates are tokenized the same way (prefix, key and newline separately),
so copying the key token for token is possible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PasskeySample:
    prompt: torch.Tensor  # int64 [L]: code with the needle, ending in the question prefix
    candidates: list[torch.Tensor]  # token ids of each candidate key; index 0 is the true key
    depth: float
    question: int = 0  # trailing prompt tokens that are the question (not the context a KV press compresses)


def text_ids(tokenizer, text: str) -> list[int]:
    """`text`'s token ids without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class NeedleTokens:
    """The pieces a needle and its question are built from, tokenized separately (so the key copies token for
    token): the prefix `\nPASSKEY = ` (needle and question) and the newline that ends the needle line."""

    prefix: list[int]
    newline: list[int]

    @classmethod
    def of(cls, tokenizer) -> NeedleTokens:
        return cls(text_ids(tokenizer, "\nPASSKEY = "), text_ids(tokenizer, "\n"))

    def filler(self, length: int, key: list[int]) -> int:
        """Code tokens a prompt of `length` tokens (needle and question included) holds."""
        return length - len(self.prefix) - len(key) - len(self.newline) - len(self.prefix)

    def prompt(self, code: list[int], depth: float, key: list[int]) -> list[int]:
        """`code` with the needle line for `key` inserted at relative `depth`, then the question prefix."""
        cut = int(depth * len(code))
        return code[:cut] + self.prefix + key + self.newline + code[cut:] + self.prefix


def passkey_samples(
    tokenizer,
    stream: torch.Tensor,
    length: int,
    depths: tuple[float, ...],
    per_depth: int,
    candidates: int = 5,
    seed: int = 0,
) -> list[PasskeySample]:
    """`per_depth` samples at each depth, each `length` tokens long including the needle and the question, cut
    from consecutive pieces of the held-out token `stream`."""
    rng = random.Random(seed)
    pieces = NeedleTokens.of(tokenizer)
    samples, offset = [], 0
    for depth in depths:
        for _ in range(per_depth):
            keys = rng.sample(range(10000, 100000), candidates)
            key_ids = [text_ids(tokenizer, str(key)) for key in keys]
            filler = pieces.filler(length, key_ids[0])
            if offset + filler > len(stream):
                offset = 0
            code = stream[offset : offset + filler].tolist()
            offset += filler
            prompt = torch.tensor(pieces.prompt(code, depth, key_ids[0]), dtype=torch.long)
            samples.append(
                PasskeySample(prompt, [torch.tensor(k, dtype=torch.long) for k in key_ids], depth, len(pieces.prefix))
            )
    return samples


@torch.no_grad()
def candidate_loglik(model: nn.Module, sample: PasskeySample) -> torch.Tensor:
    """Total log-likelihood of each candidate key after the prompt: [candidates]."""
    scores = []
    for key in sample.candidates:
        ids = torch.cat([sample.prompt, key]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, len(sample.prompt) - 1 : -1].float()
        scores.append(-F.cross_entropy(logits, key, reduction="sum"))
    return torch.stack(scores)


def passkey_accuracy(model: nn.Module, samples: list[PasskeySample]) -> float:
    """Fraction of samples whose true key (candidate 0) has the highest log-likelihood."""
    was_training = model.training
    model.eval()
    hits = sum(int(candidate_loglik(model, s).argmax().item() == 0) for s in samples)
    model.train(was_training)
    return hits / max(len(samples), 1)
