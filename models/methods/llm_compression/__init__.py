"""LLM-compression family: EoRA, SquareHead, PAT, PASER and N:M progressive gradient flow; their shared
toolkit (calibration, pruning, quantization, storage, the compression job's shape) is `models/llm/compression/`."""
