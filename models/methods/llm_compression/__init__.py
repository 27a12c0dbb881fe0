"""LLM-compression family (notes: shared/methods/llm-compression-and-inference.md); shared toolkit in
`models/llm/compression/`."""
