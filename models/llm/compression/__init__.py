"""The LLM-compression family's shared toolkit: calibration statistics, pruning masks (magnitude,
Wanda, SparseGPT; unstructured and N:M), round-to-nearest quantization, storage accounting and the
registration of a compressed model with its lineage."""
