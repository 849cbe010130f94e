"""Evaluation: retrieval recall and zero-shot classification."""
