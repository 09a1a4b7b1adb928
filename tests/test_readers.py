import json
from collections import Counter
from pathlib import Path

import pytest

from datamodules.readers import (
    DataFormatError,
    RetrievalData,
    iter_jsonl,
    read_beir,
    read_cranfield,
    read_trec_qrels,
    read_trec_run,
    write_trec_run,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


# ---------------------------------------------------------------- RetrievalData


def test_doc_text_and_subset():
    data = RetrievalData(
        corpus={"d1": {"title": "T", "text": "body"}, "d2": {"title": "", "text": "only"}},
        queries={"q1": "one", "q2": "two"},
        qrels={"q1": {"d1": 1}, "q2": {"d2": 1}},
        name="toy",
    )
    assert data.doc_text("d1") == "T body"
    assert data.doc_text("d1", sep="\n") == "T\nbody"
    assert data.doc_text("d2") == "only"
    sub = data.subset(["q2"])
    assert sub.queries == {"q2": "two"} and sub.qrels == {"q2": {"d2": 1}}
    assert sub.corpus is data.corpus and sub.name == "toy"
    with pytest.raises(KeyError, match="q9"):
        data.subset(["q9"])


# ---------------------------------------------------------------- JSON lines


def test_iter_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"x": 1}\n\n   \n{"x": 2}\r\n')
    assert list(iter_jsonl(path)) == [(1, {"x": 1}), (4, {"x": 2})]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"x": 1}\n{"x": 2,}\n', "invalid JSON"),
        (b'{"x": 1}\n[1, 2]\n', "expected a JSON object, got list"),
        (b'{"x": 1}\n"\xff"\n', "not valid UTF-8"),
    ],
)
def test_iter_jsonl_errors_name_file_and_line(tmp_path, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=f"bad.jsonl:2: {problem}") as err:
        list(iter_jsonl(path))
    assert str(path) in str(err.value) and err.value.line_no == 2


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*JSON-lines"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="BEIR dataset folder"):
        read_beir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="run.txt.*TREC run"):
        read_trec_run(tmp_path / "run.txt")
    with pytest.raises(FileNotFoundError, match="TREC qrels"):
        read_trec_qrels(tmp_path / "qrels.txt")
    with pytest.raises(FileNotFoundError, match="Cranfield"):
        read_cranfield(tmp_path)


# ---------------------------------------------------------------- BEIR


def make_beir(folder: Path, corpus=None, queries=None, qrels=None) -> Path:
    write(folder / "corpus.jsonl", corpus if corpus is not None else jsonl(
        {"_id": "d1", "title": "Alpha", "text": "first doc"},
        {"_id": 2, "text": "no title, numeric id"},
        {"_id": "d3", "title": "", "text": "third"},
    ))
    write(folder / "queries.jsonl", queries if queries is not None else jsonl(
        {"_id": "q1", "text": "query one"},
        {"_id": "q2", "text": "query two"},
        {"_id": "q3", "text": "query three, no qrels in this split"},
    ))
    write(folder / "qrels" / "test.tsv", qrels if qrels is not None else (
        "query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\t2\t0\r\nq2\td3\t2\r\n"
    ))
    return folder


def test_read_beir_toy(tmp_path):
    data = read_beir(make_beir(tmp_path / "toy"))
    assert data.name == "toy/test"
    assert data.corpus == {
        "d1": {"title": "Alpha", "text": "first doc"},
        "2": {"title": "", "text": "no title, numeric id"},
        "d3": {"title": "", "text": "third"},
    }
    assert data.queries == {"q1": "query one", "q2": "query two"}  # q3 has no qrels
    assert data.qrels == {"q1": {"d1": 1, "2": 0}, "q2": {"d3": 2}}
    with pytest.raises(FileNotFoundError, match="train.tsv.*split 'train'"):
        read_beir(tmp_path / "toy", split="train")


@pytest.mark.parametrize(
    ("part", "content", "expected"),
    [
        ("corpus", jsonl({"_id": "d1", "text": "x"}, {"_id": "d2", "title": "no text"}),
         "corpus.jsonl:2: missing required key 'text'"),
        ("corpus", jsonl({"_id": "d1", "text": "x"}, {"text": "no id"}), "corpus.jsonl:2: missing required key '_id'"),
        ("corpus", jsonl({"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}), "corpus.jsonl:2: duplicate _id 'd1'"),
        ("corpus", jsonl({"_id": "d1", "text": None}), "corpus.jsonl:1: key 'text' must be a string"),
        ("corpus", '{"_id": "d1", "text": "x"}\n{"_id": "d2" "text": "y"}\n', "corpus.jsonl:2: invalid JSON"),
        ("queries", jsonl({"_id": "q1"}), "queries.jsonl:1: missing required key 'text'"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d3 1\n",
         "test.tsv:3: expected 3 tab-separated columns, got 1"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\n", "test.tsv:2: expected 3 tab-separated columns, got 2"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\tdX\t1\n", "test.tsv:2: unknown corpus-id 'dX'"),
        ("qrels", "query-id\tcorpus-id\tscore\nqX\td1\t1\n", "test.tsv:2: unknown query-id 'qX'"),
        ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", "test.tsv:2: score 'high' is not an integer"),
        ("qrels", "q1\td1\t1\nq1\td1\t2\n", "test.tsv:2: query 'q1' judges doc 'd1' again"),
    ],
)
def test_read_beir_errors_name_file_and_line(tmp_path, part, content, expected):
    folder = make_beir(tmp_path / "bad", **{part: content})
    with pytest.raises(DataFormatError, match=expected):
        read_beir(folder)


def test_read_beir_scifact_train(shared_data):
    data = read_beir(shared_data / "beir-scifact", split="train")
    assert len(data.queries) == 809
    assert len(data.corpus) == 5183
    assert sum(len(judged) for judged in data.qrels.values()) == 919
    assert set(data.qrels) == set(data.queries)
    assert all(isinstance(doc_id, str) for doc_id in data.corpus)


# ---------------------------------------------------------------- TREC qrels / runs


def test_read_trec_qrels(tmp_path):
    path = write(tmp_path / "qrels.txt", "1 0 d1 2\n1 0 d2 0\n\n2  Q0\td9   1 \n")
    assert read_trec_qrels(path) == {"1": {"d1": 2, "d2": 0}, "2": {"d9": 1}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 0 d1 2\n1 0 d2\n", "qrels.txt:2: expected 4 whitespace-separated columns"),
        ("1 0 d1 2\n\n1 0 d2 yes\n", "qrels.txt:3: relevance 'yes' is not an integer"),
    ],
)
def test_read_trec_qrels_errors(tmp_path, text, expected):
    with pytest.raises(DataFormatError, match=expected):
        read_trec_qrels(write(tmp_path / "qrels.txt", text))


def test_trec_run_round_trip_and_tie_order(tmp_path):
    run = {
        "q1": {"a": 1.0, "b": 1.0, "c": 2.5, "d10": 0.1 + 0.2, "d9": -3e-7},
        "q2": {"x": 7.0},
    }
    path = tmp_path / "deep" / "dir" / "run.txt"
    write_trec_run(path, run, tag="bm25")
    lines = path.read_text().splitlines()
    # score desc, ties (a, b at 1.0) by docid desc: b before a.
    assert [line.split()[2] for line in lines[:5]] == ["c", "b", "a", "d10", "d9"]
    assert [line.split()[3] for line in lines[:5]] == ["1", "2", "3", "4", "5"]
    assert lines[5] == "q2 Q0 x 1 7.0 bm25"
    assert all(line.split()[1] == "Q0" and line.endswith(" bm25") for line in lines)
    assert read_trec_run(path) == run  # exact floats, not approximations


def test_write_trec_run_rejects_whitespace_ids(tmp_path):
    with pytest.raises(ValueError, match="doc id 'a b'"):
        write_trec_run(tmp_path / "r.txt", {"q": {"a b": 1.0}})
    with pytest.raises(ValueError, match="tag"):
        write_trec_run(tmp_path / "r.txt", {"q": {"a": 1.0}}, tag="my run")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("q Q0 a 1 2.0 t\nq Q0 b 2 1.0\n", "run.txt:2: expected 6 whitespace-separated columns"),
        ("q Q0 a 1 2.0 t\nq Q0 b 2 high t\n", "run.txt:2: score 'high' is not a number"),
        ("q Q0 a one 2.0 t\n", "run.txt:1: rank 'one' is not an integer"),
        ("q Q0 a 1 2.0 t\n\nq Q0 a 2 1.0 t\n", "run.txt:3: doc 'a' retrieved twice"),
    ],
)
def test_read_trec_run_errors(tmp_path, text, expected):
    with pytest.raises(DataFormatError, match=expected):
        read_trec_run(write(tmp_path / "run.txt", text))


# ---------------------------------------------------------------- Cranfield

CRAN_DOCS = """.I 1
.T
wing flutter
.A
someone
.B
j. ae. 1958
.W
wing flutter
   at   high speed .
.I 2
.T
heat transfer
.W
heat transfer in
slabs .
.A
misplaced author field
.W
second abstract part .
.I 3
.T
.A
nobody
.W
untitled document .
"""

CRAN_QUERIES = """.I 001
.W
what about wing flutter .
.I 004
.W
heat transfer
in slabs .
.I 009
.W
a query judged only with -1 .
"""

# Query numbers are positions in cran.qry: 2 is the `.I 004` query.
CRAN_QRELS = "1 1 1\n1 3 4 \n2 2 2\n2 3 -1\n3 1 -1"


def make_cranfield(folder: Path, docs=CRAN_DOCS, queries=CRAN_QUERIES, qrels=CRAN_QRELS) -> Path:
    write(folder / "cran.all.1400", docs)
    write(folder / "cran.qry", queries)
    write(folder / "cranqrel", qrels)
    return folder


def test_read_cranfield_toy(tmp_path):
    data = read_cranfield(make_cranfield(tmp_path / "cran"))
    assert data.corpus == {
        "1": {"title": "wing flutter", "text": "wing flutter at high speed ."},
        "2": {"title": "heat transfer", "text": "heat transfer in slabs . second abstract part ."},
        "3": {"title": "", "text": "untitled document ."},
    }
    # Query 3 has only a -1 judgement, so no relevant doc: dropped.
    assert data.queries == {"1": "what about wing flutter .", "2": "heat transfer in slabs ."}
    # gain = 5 - code; -1 is judged non-relevant (0).
    assert data.qrels == {"1": {"1": 4, "3": 1}, "2": {"2": 3, "3": 0}}


@pytest.mark.parametrize(
    ("part", "content", "expected"),
    [
        ("qrels", "1 1 1\n4 1 2\n", "cranqrel:2: query number 4 out of range .cran.qry has 3 queries"),
        ("qrels", "1 1 1\n1 2 7\n", "cranqrel:2: unknown relevance code 7"),
        ("qrels", "1 1 1\n1 99 2\n", "cranqrel:2: unknown doc id 99"),
        ("qrels", "1 1 1\n1 2\n", "cranqrel:2: expected 3 whitespace-separated columns"),
        ("qrels", "1 1 1\n1 x 2\n", "cranqrel:2: doc id 'x' is not an integer"),
        ("docs", ".I 1\n.W\nok\n.I one\n.W\nbad\n", "cran.all.1400:4: expected '.I <number>'"),
        ("docs", "stray text\n.I 1\n.W\nok\n", "cran.all.1400:1: text outside a field"),
        ("docs", ".I 1\n.W\nok\n.X\nwhat\n", r"cran.all.1400:4: unknown field marker '.X'"),
        ("docs", ".I 1\n.W\nok\n.I 1\n.W\nagain\n", "cran.all.1400:4: duplicate document"),
        ("docs", ".I 1\n.T\nno abstract\n", "cran.all.1400:1: document .I 1 has no .W"),
        ("queries", ".I 001\n.W\nfine\n.I 002\n.T\ntitle\n", "cran.qry:5: unknown field marker '.T'"),
    ],
)
def test_read_cranfield_errors_name_file_and_line(tmp_path, part, content, expected):
    folder = make_cranfield(tmp_path / "bad", **{part: content})
    with pytest.raises(DataFormatError, match=expected):
        read_cranfield(folder)


def test_read_cranfield_real(shared_data):
    data = read_cranfield(shared_data / "cranfield")
    assert len(data.corpus) == 1400
    assert len(data.queries) == 225
    assert sum(len(judged) for judged in data.qrels.values()) == 1837
    # README code counts: 1: 128, 2: 387, 3: 734, 4: 363, -1: 225 -> gains 4, 3, 2, 1, 0.
    gains = Counter(g for judged in data.qrels.values() for g in judged.values())
    assert gains == {4: 128, 3: 387, 2: 734, 1: 363, 0: 225}
    # qrels number queries by position: query 3 is `.I 004` (heat conduction in composite
    # slabs) and its judged docs are about composite slabs.
    assert data.queries["3"].startswith("what problems of heat conduction in composite slabs")
    assert "composite slabs" in data.corpus["144"]["title"]
    assert "composite slabs" in data.corpus["399"]["title"]
    assert data.qrels["3"]["144"] > 0 and data.qrels["3"]["399"] > 0
    # Records with repeated fields (240, 576, 578) parse; the .W text starts with the title.
    assert all(data.corpus[d]["text"].startswith(data.corpus[d]["title"]) for d in ("240", "576", "578"))
