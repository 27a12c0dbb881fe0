"""Sparse and approximate attention for the tiny Llama kit, each registered as a transformers
`AttentionInterface` function; `kit.py` holds what they share (exact attention with its log-sum-exp, the lse merge,
the registration glue), `flex.py` the fused kernels their default paths run on (FlexAttention tiles, and SDPA's CPU
kernel for dense tiles) and `measure.py` what every evaluation of them measures."""
