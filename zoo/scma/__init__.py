"""SCMA: self-compression of chain-of-thought via multi-agent reinforcement learning (arXiv 2601.21919)."""
