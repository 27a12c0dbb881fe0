"""Representation-family methods: self-supervised, contrastive and metric learning of encoders, and RankMe."""
