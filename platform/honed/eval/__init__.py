"""Evaluation: perplexity per source, task metrics, before/after tables."""
