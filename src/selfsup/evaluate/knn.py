"""Weighted k-nearest-neighbour classification of Wu et al. 2018 (InstDisc, Section 3.4).

Each of the k nearest training features (cosine similarity s_i) votes for its class with weight
exp(s_i / T); defaults k = 200, T = 0.1 as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(bank_features: torch.Tensor, bank_labels: torch.Tensor,
                query_features: torch.Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk_size: int = 1024) -> torch.Tensor:
    """Predicted class of every query, shape (Q,)."""
    bank = F.normalize(bank_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk_size):
        similarity = queries[start:start + chunk_size] @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
        votes.scatter_add_(1, bank_labels[top_index].to(similarity.device), weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(bank_features: torch.Tensor, bank_labels: torch.Tensor,
             query_features: torch.Tensor, query_labels: torch.Tensor, num_classes: int,
             k: int = 200, temperature: float = 0.1) -> float:
    predictions = knn_predict(bank_features, bank_labels, query_features, num_classes, k,
                              temperature)
    return (predictions.cpu() == query_labels.cpu()).float().mean().item()
