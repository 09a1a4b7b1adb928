"""BOOM: Bagging-based rObust mOdel Merging for general text embeddings (arXiv 2602.05787)."""
