"""Readers (and a TREC run writer) for standard IR data formats.

Every malformed line raises `DataFormatError` with a ``path:line: what was wrong``
message, so a broken file can be fixed without a debugger.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DataFormatError",
    "RetrievalData",
    "iter_jsonl",
    "read_beir",
    "read_cranfield",
    "read_trec_qrels",
    "read_trec_run",
    "write_trec_run",
]


class DataFormatError(ValueError):
    """A data file does not follow its format; the message starts with ``path:line:``."""

    def __init__(self, path: str | Path, line_no: int, problem: str):
        super().__init__(f"{path}:{line_no}: {problem}")
        self.path = str(path)
        self.line_no = line_no
        self.problem = problem


@dataclass
class RetrievalData:
    """An ad-hoc retrieval collection with string ids throughout."""

    corpus: dict[str, dict[str, str]]  # doc_id -> {"title": ..., "text": ...}
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str

    def doc_text(self, doc_id: str, sep: str = " ") -> str:
        """Title and text joined by `sep`; just the text when the title is empty."""
        doc = self.corpus[doc_id]
        title = doc.get("title", "")
        return f"{title}{sep}{doc['text']}" if title else doc["text"]

    def subset(self, query_ids: Iterable[str]) -> RetrievalData:
        """Same corpus (shared, not copied), only `query_ids` and their qrels."""
        query_ids = list(query_ids)
        unknown = [qid for qid in query_ids if qid not in self.queries]
        if unknown:
            raise KeyError(f"{self.name}: unknown query ids {unknown[:10]}")
        return RetrievalData(
            corpus=self.corpus,
            queries={qid: self.queries[qid] for qid in query_ids},
            qrels={qid: dict(self.qrels[qid]) for qid in query_ids if qid in self.qrels},
            name=self.name,
        )


def _require_file(path: Path, expected: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected {expected})")


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (expected {expected})")


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end-of-line) for every line.

    Lines are decoded one by one so an encoding error can name its line; CRLF files
    (BEIR's qrels are) read the same as LF ones.
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(path, line_no, f"not valid UTF-8 ({err.reason})") from None
            yield line_no, line.rstrip("\r\n")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    path = Path(path)
    _require_file(path, "a JSON-lines file")
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, line_no, f"invalid JSON ({err})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def _json_str(obj: dict[str, Any], key: str, path: Path, line_no: int, default: str | None = None) -> str:
    if key not in obj:
        if default is not None:
            return default
        raise DataFormatError(path, line_no, f"missing required key {key!r}")
    value = obj[key]
    # BEIR ids are sometimes written as JSON numbers; ids are strings everywhere here.
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataFormatError(path, line_no, f"key {key!r} must be a string, got {type(value).__name__}")
    return value


def _add_judgement(
    qrels: dict[str, dict[str, int]], qid: str, docid: str, rel: int, path: Path, line_no: int
) -> None:
    """Store one judgement; an exact repeat is harmless, a contradicting one is an error."""
    judged = qrels.setdefault(qid, {})
    if judged.get(docid, rel) != rel:
        raise DataFormatError(
            path, line_no, f"query {qid!r} judges doc {docid!r} again with a different grade ({rel} vs {judged[docid]})"
        )
    judged[docid] = rel


def _columns(line: str, layout: str, path: Path, line_no: int, tab: bool = False) -> list[str]:
    """Split a table line, insisting on one column per name in `layout`."""
    fields = line.split("\t") if tab else line.split()
    expected = len(layout.split())
    if len(fields) != expected:
        kind = "tab" if tab else "whitespace"
        problem = f"expected {expected} {kind}-separated columns, got {len(fields)} ({layout})"
        raise DataFormatError(path, line_no, problem)
    return fields


def _parse_int(field: str, what: str, path: Path, line_no: int) -> int:
    try:
        return int(field)
    except ValueError:
        raise DataFormatError(path, line_no, f"{what} {field!r} is not an integer") from None


def read_beir(folder: str | Path, split: str = "test") -> RetrievalData:
    """A BEIR dataset folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv.

    Only queries with at least one qrels line in `split` are kept; the corpus is kept whole.
    """
    folder = Path(folder)
    _require_dir(folder, "a BEIR dataset folder with corpus.jsonl, queries.jsonl and qrels/")
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    _require_file(corpus_path, "the BEIR corpus, one JSON object per document")
    _require_file(queries_path, "the BEIR queries, one JSON object per query")
    _require_file(qrels_path, f"the BEIR qrels of split {split!r}")

    corpus: dict[str, dict[str, str]] = {}
    first_seen: dict[str, int] = {}
    for line_no, obj in iter_jsonl(corpus_path):
        doc_id = _json_str(obj, "_id", corpus_path, line_no)
        if doc_id in corpus:
            first = first_seen[doc_id]
            raise DataFormatError(corpus_path, line_no, f"duplicate _id {doc_id!r} (first on line {first})")
        first_seen[doc_id] = line_no
        corpus[doc_id] = {
            "title": _json_str(obj, "title", corpus_path, line_no, default=""),
            "text": _json_str(obj, "text", corpus_path, line_no),
        }

    all_queries: dict[str, str] = {}
    for line_no, obj in iter_jsonl(queries_path):
        qid = _json_str(obj, "_id", queries_path, line_no)
        if qid in all_queries:
            raise DataFormatError(queries_path, line_no, f"duplicate _id {qid!r}")
        all_queries[qid] = _json_str(obj, "text", queries_path, line_no)

    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in _iter_lines(qrels_path):
        if not line.strip():
            continue
        if line_no == 1 and line.split() == ["query-id", "corpus-id", "score"]:
            continue
        fields = _columns(line, "query-id corpus-id score", qrels_path, line_no, tab=True)
        qid, doc_id, score = (f.strip() for f in fields)
        if qid not in all_queries:
            raise DataFormatError(qrels_path, line_no, f"unknown query-id {qid!r} (not in {queries_path.name})")
        if doc_id not in corpus:
            raise DataFormatError(qrels_path, line_no, f"unknown corpus-id {doc_id!r} (not in {corpus_path.name})")
        _add_judgement(qrels, qid, doc_id, _parse_int(score, "score", qrels_path, line_no), qrels_path, line_no)

    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels, name=f"{folder.name}/{split}")


def read_trec_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels: ``qid iter docid rel`` per line, whitespace separated."""
    path = Path(path)
    _require_file(path, "a TREC qrels file (qid iter docid rel)")
    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        qid, _, doc_id, rel = _columns(line, "qid iter docid rel", path, line_no)
        _add_judgement(qrels, qid, doc_id, _parse_int(rel, "relevance", path, line_no), path, line_no)
    return qrels


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    """TREC run: ``qid Q0 docid rank score tag`` per line; scores, not ranks, are kept."""
    path = Path(path)
    _require_file(path, "a TREC run file (qid Q0 docid rank score tag)")
    run: dict[str, dict[str, float]] = {}
    for line_no, line in _iter_lines(path):
        if not line.strip():
            continue
        qid, _, doc_id, rank, score, _ = _columns(line, "qid Q0 docid rank score tag", path, line_no)
        _parse_int(rank, "rank", path, line_no)
        try:
            value = float(score)
        except ValueError:
            raise DataFormatError(path, line_no, f"score {score!r} is not a number") from None
        ranked = run.setdefault(qid, {})
        if doc_id in ranked:
            raise DataFormatError(path, line_no, f"doc {doc_id!r} retrieved twice for query {qid!r}")
        ranked[doc_id] = value
    return run


def write_trec_run(path: str | Path, run: dict[str, dict[str, float]], tag: str = "zoo") -> None:
    """Write `run` in TREC format, ranked by score desc then docid desc (trec_eval's order)."""
    path = Path(path)
    for name, value in [("tag", tag), *(("query id", q) for q in run)]:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"{name} {value!r} must be non-empty and contain no whitespace")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for qid, scores in run.items():
            ranked = sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                if not doc_id or any(c.isspace() for c in doc_id):
                    raise ValueError(f"doc id {doc_id!r} must be non-empty and contain no whitespace")
                # repr() is the shortest text that reads back as the same float.
                handle.write(f"{qid} Q0 {doc_id} {rank} {float(score)!r} {tag}\n")


_SMART_MARKER = re.compile(r"^\.([A-Z])(?:\s+(.*))?$")


def _read_smart(path: Path, fields: str) -> list[tuple[int, str, dict[str, str]]]:
    """Records of a SMART-format file as (line of `.I`, .I value, {field: text}).

    A field that appears twice in a record (Cranfield docs 240, 576, 578) has its
    texts joined; all text is whitespace-normalised.
    """
    records: list[tuple[int, str, dict[str, list[str]]]] = []
    current: list[str] | None = None
    for line_no, line in _iter_lines(path):
        marker = _SMART_MARKER.match(line.strip()) if line.startswith(".") else None
        if marker is None:
            if current is not None:
                current.append(line)
            elif line.strip():
                raise DataFormatError(path, line_no, "text outside a field (expected '.I <number>' first)")
            continue
        letter, rest = marker.group(1), (marker.group(2) or "").strip()
        if letter == "I":
            if not rest.isdigit():
                raise DataFormatError(path, line_no, f"expected '.I <number>', got {line.strip()!r}")
            records.append((line_no, rest, {}))
            current = None
        elif letter not in fields:
            known = ", ".join("." + f for f in "I" + fields)
            raise DataFormatError(path, line_no, f"unknown field marker '.{letter}' (expected one of {known})")
        elif not records:
            raise DataFormatError(path, line_no, f"field '.{letter}' before the first '.I' record")
        else:
            current = records[-1][2].setdefault(letter, [])
            if rest:
                current.append(rest)
    return [
        (line_no, number, {key: " ".join(" ".join(parts).split()) for key, parts in record.items()})
        for line_no, number, record in records
    ]


# Cleverdon's codes (cranqrel.readme): 1 = complete answer ... 4 = minimum interest,
# so lower is better; gain = 5 - code turns them into grades 4..1 where larger is better.
# -1 (one per query in this copy) and 5 ("no interest") are judged non-relevant, gain 0,
# as the shared data README prescribes.
_CRANFIELD_GAIN = {1: 4, 2: 3, 3: 2, 4: 1, -1: 0, 5: 0}


def read_cranfield(folder: str | Path) -> RetrievalData:
    """The Cranfield 1400 collection (cran.all.1400, cran.qry, cranqrel).

    Query ids are the 1-based positions of the queries in cran.qry, which is how
    cranqrel numbers them (the `.I` numbers in cran.qry run 001..365 with gaps).
    Docs keep `.T` as title and `.W` (which repeats the title) as text.
    Qrels hold graded gains (see `_CRANFIELD_GAIN`); queries without a positive
    judgement are dropped.
    """
    folder = Path(folder)
    _require_dir(folder, "the Cranfield collection (cran.all.1400, cran.qry, cranqrel)")
    docs_path, queries_path, qrels_path = folder / "cran.all.1400", folder / "cran.qry", folder / "cranqrel"
    _require_file(docs_path, "the Cranfield documents in SMART format")
    _require_file(queries_path, "the Cranfield queries in SMART format")
    _require_file(qrels_path, "the Cranfield judgements (query_no doc_id code)")

    corpus: dict[str, dict[str, str]] = {}
    for line_no, number, record in _read_smart(docs_path, "TABW"):
        doc_id = str(int(number))
        if doc_id in corpus:
            raise DataFormatError(docs_path, line_no, f"duplicate document .I {number}")
        if "W" not in record:
            raise DataFormatError(docs_path, line_no, f"document .I {number} has no .W field")
        corpus[doc_id] = {"title": record.get("T", ""), "text": record["W"]}

    all_queries: dict[str, str] = {}
    for position, (line_no, number, record) in enumerate(_read_smart(queries_path, "W"), start=1):
        if "W" not in record:
            raise DataFormatError(queries_path, line_no, f"query .I {number} has no .W field")
        all_queries[str(position)] = record["W"]

    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in _iter_lines(qrels_path):
        if not line.strip():
            continue
        fields = _columns(line, "query_no doc_id code", qrels_path, line_no)
        qid = str(_parse_int(fields[0], "query number", qrels_path, line_no))
        doc_id = str(_parse_int(fields[1], "doc id", qrels_path, line_no))
        code = _parse_int(fields[2], "relevance code", qrels_path, line_no)
        if qid not in all_queries:
            raise DataFormatError(
                qrels_path, line_no,
                f"query number {qid} out of range "
                f"({queries_path.name} has {len(all_queries)} queries, numbered by position)",
            )
        if doc_id not in corpus:
            raise DataFormatError(qrels_path, line_no, f"unknown doc id {doc_id} (not in {docs_path.name})")
        if code not in _CRANFIELD_GAIN:
            raise DataFormatError(
                qrels_path, line_no, f"unknown relevance code {code} (expected 1..4, or -1/5 for non-relevant)"
            )
        _add_judgement(qrels, qid, doc_id, _CRANFIELD_GAIN[code], qrels_path, line_no)

    qrels = {qid: judged for qid, judged in qrels.items() if any(g > 0 for g in judged.values())}
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels, name="cranfield")
