"""Evaluation of trained models: retrieval, zero-shot classification, kNN."""
