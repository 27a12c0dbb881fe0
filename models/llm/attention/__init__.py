"""Sparse and approximate attention for the tiny Llama kit, each registered as a transformers
`AttentionInterface` function (notes: shared/methods/llm-compression-and-inference.md, "Attention kit")."""
