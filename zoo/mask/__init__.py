"""M-ASK: multi-agent search and knowledge management trained with turn-level ΔF1 rewards (arXiv 2601.04703)."""
from zoo.mask.module import (
    KnowledgeState,
    MASKModule,
    parse_answer,
    parse_planning,
    parse_search,
    parse_summary,
    parse_update,
)

__all__ = ["KnowledgeState", "MASKModule", "parse_answer", "parse_planning", "parse_search", "parse_summary",
           "parse_update"]
