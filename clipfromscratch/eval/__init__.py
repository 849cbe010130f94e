"""Evaluation: retrieval, zero-shot, linear and class-agnostic probes, clustering, comparison reports, search.

models.py (one interface for every model family) -> data.py (evaluation datasets) -> embed.py (batched
encoding) -> tasks.py (the tasks, over the pure metrics of retrieval, zeroshot, probe, class_agnostic and
cluster) -> compare.py and plots.py (reports) ; search.py (text-to-image search) ; cli.py (the commands).
"""
