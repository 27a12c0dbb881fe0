"""Baseline language-model jobs that several LLM families build on (not papers): `lm-pretrain`."""
