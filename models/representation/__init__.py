"""The representation family's shared kit (notes: shared/methods/representation-and-structured.md).

`augment` — batched image views; `losses` — the InfoNCE family (per-instance values, multi-positive
masks, per-pair temperatures); `encoders` — encoder + projection heads, saved and loaded as a
registered model; `contrastive` — one self-supervised training loop with checkpoint/resume;
`evaluation` — the one evaluation routine every method reports through (linear probe, k-NN,
NMI/ARI, Recall@k, RankMe) and the embedding plot.
"""
