"""LLM-inference family: sparse and approximate attention (HiP, HyperAttention), KV-cache compression (EMS-style
evict-then-merge, MatryoshkaKV) and parallel prompt decoding (PPD). The attention functions live in
`models/llm/attention/`, the caches and presses in `models/llm/kv_cache/`, PPD's decoding in
`models/llm/parallel_prompt.py` and `models/llm/prompt_tree.py`."""
