"""JADE (arXiv 2601.21916): one shared LLM as workflow Planner and Executors, trained jointly with PPO."""
from zoo.jade.module import (
    ROLES,
    JADEModule,
    Role,
    is_workflow_valid,
    parse_answer,
    parse_doc_ids,
    parse_query,
    parse_subquestions,
    parse_workflow,
    retrieval_cost,
    round_cost,
)

__all__ = ["ROLES", "JADEModule", "Role", "is_workflow_valid", "parse_answer", "parse_doc_ids", "parse_query",
           "parse_subquestions", "parse_workflow", "retrieval_cost", "round_cost"]
