"""LLM training methods: memory-efficient and low-bit-stable optimizers, spectral training, FIM planning."""
