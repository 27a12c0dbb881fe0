"""The shared tiny-LLM kit: BPE tokenizer, Llama configs, token batches, perplexity, HF folders and
the cached base model that the LLM method families start from."""
