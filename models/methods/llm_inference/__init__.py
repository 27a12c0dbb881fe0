"""LLM-inference family: sparse/approximate attention and KV-cache engines (notes:
shared/methods/llm-compression-and-inference.md); the attention functions live in `models/llm/attention/`."""
