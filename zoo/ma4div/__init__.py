"""MA4DIV: multi-agent reinforcement learning for search result diversification (arXiv 2403.17421)."""
