"""Generative-family methods: lossless compression with probabilistic circuits, coordinate-aware neural fields
and progressive volume distillation, on the kits `models.compression` and `models.fields`."""
