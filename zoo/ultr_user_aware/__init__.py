"""User-aware unbiased learning to rank (arXiv 2508.20798)."""
