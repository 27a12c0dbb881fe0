"""The representation family's shared kit.

`augment` — batched image views; `losses` — the InfoNCE family (per-instance values, multi-positive
masks, per-pair temperatures); `encoders` — encoder + projection heads, saved and loaded as a
registered model; `contrastive` — one self-supervised training loop with checkpoint/resume;
`evaluation` — the one evaluation routine every method reports through (linear probe, k-NN,
NMI/ARI, Recall@k, RankMe) and the embedding plot; `series` — multivariate series with bad positive
pairs and a 1-D CNN encoder; `job` — the params every job shares (`RepresentationParams`) and the one
ending every job calls (`finish_representation_job`: evaluate, log, plot, report, register).
"""
