"""Evaluation: feature extraction, weighted kNN, instance retrieval, linear probe."""
