"""Clustering quality: k-means with k = number of classes, scored against the labels it never saw."""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The fraction of samples whose cluster's majority class is their own class."""
    return float(contingency_matrix(labels, clusters).max(axis=0).sum() / len(labels))


def cluster_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {"purity": purity(labels, clusters), "nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters))}


def kmeans_scores(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """k-means (k = distinct labels, 10 restarts) on (N, F) features; purity, NMI and ARI of its clusters."""
    k = len(np.unique(labels))
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
    return cluster_scores(labels, clusters)
