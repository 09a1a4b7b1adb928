"""TourRank (arXiv 2406.11678): tournament-style zero-shot LLM reranking."""
from zoo.tourrank.module import (
    TourRankModule,
    parse_selection,
    run_tournaments,
    seeded_groups,
)

__all__ = ["TourRankModule", "parse_selection", "run_tournaments", "seeded_groups"]
