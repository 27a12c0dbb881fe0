"""Lossless compression with probabilistic circuits: discrete image data, Chow–Liu trees, the hidden Chow–Liu
tree (HCLT) circuit and its mini-batch EM, conditional marginals by full or path-only re-evaluation,
constriction's rANS coder, and the baseline codecs (independent pixels, a MADE-style AR MLP, zlib, lzma, PNG)."""
