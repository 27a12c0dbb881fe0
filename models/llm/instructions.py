"""A synthetic instruction pool from the `stdlib-code` corpus, labelled by capability.

PASER recovers a pruned model on instruction data (Alpaca-style in the paper); here, with no downloads
allowed, the pool is made from the corpus itself with `ast`, one instruction per function or module and
four capabilities a code model can lose under pruning:

- `docstring`: write the docstring of a given signature;
- `body`: continue a function from its signature and docstring;
- `signature`: name and sign a function from its one-line description;
- `imports`: write the import block of a module.

Every example is `### Instruction:\\n…\\n### Response:\\n…<eos>`; losses are taken on response tokens.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

CAPABILITIES = ("docstring", "body", "signature", "imports")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Instruction:
    instruction: str
    response: str
    capability: str

    @property
    def prompt(self) -> str:
        return f"### Instruction:\n{self.instruction}\n### Response:\n"


def _functions(tree: ast.Module, source: str) -> list[tuple[str, str, str]]:
    """(signature line, docstring, first body lines) of functions with a docstring."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node) and node.body[1:]:
            signature = lines[node.lineno - 1].strip()
            first = node.body[1]
            body = "\n".join(lines[first.lineno - 1 : min(first.lineno + 5, node.end_lineno or first.lineno)])
            if signature.endswith(":") and len(signature) < 160:
                out.append((signature, ast.get_docstring(node) or "", body))
    return out


# lines with their endings, split at \r\n, \r or \n only (as `ast` counts lines, unlike str.splitlines)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _segment(lines: list[str], node: ast.stmt) -> str:
    """`ast.get_source_segment(source, node)` from the source's lines split once (the stdlib splits the whole
    source again, character by character, for every node it is asked about)."""
    first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
    start, end = node.col_offset, node.end_col_offset
    if first == last:
        return lines[first].encode()[start:end].decode()
    head = lines[first].encode()[start:].decode()
    tail = lines[last].encode()[:end].decode()
    return "".join([head, *lines[first + 1 : last], tail])


def instructions_from(texts: Sequence[str], limit_per_capability: int, seed: int = 0) -> list[Instruction]:
    """Up to `limit_per_capability` examples of each capability from `texts`, sampled reproducibly. Documents are
    read in a seeded order until every capability has twice the limit (parsing the whole corpus takes long)."""
    pools: dict[str, list[Instruction]] = {c: [] for c in CAPABILITIES}
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    for index in order:
        if all(len(v) >= 2 * limit_per_capability for v in pools.values()):
            break
        source = texts[index]
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = _LINE.findall(source)
        imports = [_segment(lines, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        if 2 <= len(imports) <= 12:
            first = (ast.get_docstring(tree) or "this module").splitlines()[0][:100]
            pools["imports"].append(
                Instruction(
                    f"Write the imports of a module about: {first}", "\n".join(i for i in imports if i), "imports"
                )
            )
        for signature, doc, body in _functions(tree, source):
            summary = doc.splitlines()[0][:120]
            pools["docstring"].append(Instruction(f"Write the docstring of `{signature}`", doc[:300], "docstring"))
            pools["body"].append(
                Instruction(f'Continue the function:\n{signature}\n    """{summary}"""', body[:300], "body")
            )
            pools["signature"].append(
                Instruction(f"Write the signature of a function that does: {summary}", signature, "signature")
            )
    rng = random.Random(seed)
    out: list[Instruction] = []
    for capability in CAPABILITIES:
        items = pools[capability]
        out.extend(rng.sample(items, min(limit_per_capability, len(items))))
    return out


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[Instruction], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, L] and labels with the prompt and padding set to -100 (loss on responses only)."""
    ids = torch.full((len(items), max_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), max_len), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        prompt = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(item.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (prompt + response)[:max_len]
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return ids, labels
