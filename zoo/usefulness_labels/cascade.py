"""The CLUE cascade as pure functions over document indices: top-down binary stages, majority votes,
bracket-list parsing.

For levels C_1 < ... < C_n, stage k (k = n, ..., 2) asks of every still-unlabelled document of a
query whether it deserves level k; a document chosen by at least ``threshold`` of the V voters gets
level k and leaves the pool; whatever no stage chose gets C_1. The documents labelled k + 1 are the
anchors shown at stage k.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class StageRequest:
    """One query at one stage: the candidates still unlabelled and the anchors (labelled k + 1)."""

    query: int
    level: int
    candidates: list[int]
    anchors: list[int]


@dataclass
class StageAnswer:
    """Votes per candidate (aligned with the request's candidates), the raw replies, LLM calls spent."""

    votes: list[int]
    replies: list[str] = field(default_factory=list)
    calls: int = 0


# decide(level, requests) -> one answer per request (every request of a stage at once, so it can batch)
DecideFn = Callable[[int, list[StageRequest]], list[StageAnswer]]


@dataclass
class CascadeResult:
    labels: list[list[int]]                          # per query, per document
    stages: list[list[StageRequest]]                  # per query, in the order the stages ran
    answers: list[list[StageAnswer]]                  # aligned with ``stages``
    calls: list[int]                                  # LLM calls per query


def majority(voters: int) -> int:
    """ceil((V + 1) / 2): 3 of 5, 1 of 1, 2 of 2 (a strict majority for odd V, all-but-ties for even)."""
    return math.ceil((voters + 1) / 2)


def run_cascade(num_docs: Sequence[int], levels: Sequence[int], decide: DecideFn, threshold: int) -> CascadeResult:
    """Label every document of every query; queries with no unlabelled document skip the stage."""
    levels = sorted(levels)
    if len(levels) < 2:
        raise ValueError(f"a cascade needs at least two levels, got {list(levels)}")
    labels = [[levels[0]] * n for n in num_docs]
    pools = [list(range(n)) for n in num_docs]
    anchors: list[list[int]] = [[] for _ in num_docs]
    stages: list[list[StageRequest]] = [[] for _ in num_docs]
    answers: list[list[StageAnswer]] = [[] for _ in num_docs]
    calls = [0] * len(num_docs)
    for level in reversed(levels[1:]):
        requests = [StageRequest(q, level, list(pools[q]), list(anchors[q])) for q in range(len(num_docs)) if pools[q]]
        if not requests:
            break
        replies = decide(level, requests)
        if len(replies) != len(requests):
            raise ValueError(f"stage {level}: decide returned {len(replies)} answers for {len(requests)} requests")
        for request, answer in zip(requests, replies):
            if len(answer.votes) != len(request.candidates):
                raise ValueError(f"stage {level}, query {request.query}: {len(answer.votes)} vote counts for "
                                 f"{len(request.candidates)} candidates")
            chosen = [d for d, v in zip(request.candidates, answer.votes) if v >= threshold]
            for d in chosen:
                labels[request.query][d] = level
            pools[request.query] = [d for d in request.candidates if d not in chosen]
            anchors[request.query] = chosen
            stages[request.query].append(request)
            answers[request.query].append(answer)
            calls[request.query] += answer.calls
    return CascadeResult(labels, stages, answers, calls)


_BRACKET = re.compile(r"\[\s*(\d*)\s*\]")


def parse_bracket_ids(reply: str, num_docs: int) -> list[int] | None:
    """1-based ids from the reply's last bracket list (``[1][3]``, ``[2], [4]``; ``[]`` = none):
    the last run of brackets separated only by spaces or commas, so ids mentioned while reasoning
    do not count. Deduplicated; ids outside 1..num_docs dropped; None when the reply has no
    bracket at all (it needs the repair turn)."""
    matches = list(_BRACKET.finditer(reply))
    if not matches:
        return None
    run = [matches[-1]]
    for match in reversed(matches[:-1]):
        if reply[match.end():run[0].start()].strip(" ,\t"):
            break
        run.insert(0, match)
    found = [int(m.group(1)) for m in run if m.group(1)]
    return list(dict.fromkeys(i for i in found if 1 <= i <= num_docs))


def parse_level(reply: str, levels: Sequence[int]) -> int | None:
    """The last integer of ``reply`` that is a level (the single-prompt labeller's answer), or None."""
    valid = set(levels)
    found = [int(m) for m in re.findall(r"-?\d+", reply) if int(m) in valid]
    return found[-1] if found else None
