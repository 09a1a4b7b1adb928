"""Learning to rank from clicks: an SVMlight/LETOR reader, a Yandex click-log reader, a synthetic
LTR generator and the simulated-session datamodule of the user-aware ULTR paper.

The datamodule fixes a logged top-K list per training query, allocates sessions to
(user, query) pairs, simulates user-aware PBM clicks on the lists and hands the click log to
the module (which turns clicks into labels); training batches are whole candidate lists,
evaluation batches carry the expert labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.readers import DataFormatError, _iter_lines, _require_file
from zoo.blocks.clicks import (
    ETA,
    UserPBMSimulator,
    allocate_sessions,
    examination,
    relevance_probability,
)

__all__ = [
    "ClickLTRDataModule",
    "ClickLog",
    "LTRData",
    "SimulatedClicks",
    "read_svmlight",
    "read_yandex_clicks",
    "synthetic_ltr",
]

SOURCES = ("synthetic", "svmlight")
LOGGING_POLICIES = ("noisy_linear", "ridge", "random")
TRAIN_UNITS = ("queries", "sessions")


@dataclass
class LTRData:
    """Documents grouped by query: rows ``offsets[i]:offsets[i+1]`` belong to query ``qids[i]``."""

    features: np.ndarray   # [n_docs, F] float32
    labels: np.ndarray     # [n_docs] int64
    offsets: np.ndarray    # [Q + 1]
    qids: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.qids)

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def _parse_svmlight_line(line: str, path: Path, line_no: int, n_features: int | None
                         ) -> tuple[int, str | None, dict[int, float]]:
    body = line.split("#", 1)[0].split()
    try:
        label = int(float(body[0]))
    except ValueError:
        raise DataFormatError(path, line_no, f"label {body[0]!r} is not a number") from None
    if float(body[0]) != label or label < 0:
        raise DataFormatError(path, line_no, f"label {body[0]!r} is not a non-negative integer grade")
    qid, values = None, {}
    for token in body[1:]:
        key, sep, value = token.partition(":")
        if not sep:
            raise DataFormatError(path, line_no, f"expected 'index:value', got {token!r}")
        if key == "qid":
            qid = value
            continue
        if not key.isdigit() or int(key) < 1:
            raise DataFormatError(path, line_no, f"feature index {key!r} is not a positive integer")
        index = int(key)
        if n_features is not None and index > n_features:
            raise DataFormatError(path, line_no, f"feature index {index} exceeds n_features={n_features}")
        try:
            values[index] = float(value)
        except ValueError:
            raise DataFormatError(path, line_no, f"feature {index} value {value!r} is not a number") from None
    return label, qid, values


def read_svmlight(path: str | Path, query_file: str | Path | None = None, n_features: int | None = None) -> LTRData:
    """SVMlight/LETOR ranking data: ``label [qid:ID] index:value ... [# comment]`` per document.

    Queries come from ``qid:`` fields (LETOR; a query's lines must be consecutive) or, without
    them, from a LightGBM-style ``query_file`` of group sizes (default ``<path>.query`` when it
    exists). Feature indices are 1-based; ``n_features`` fixes the width (default: the largest index).
    """
    path = Path(path)
    _require_file(path, "an SVMlight/LETOR ranking file (label [qid:ID] index:value ...)")
    labels, rows, line_qids, line_nos = [], [], [], []
    for line_no, line in _iter_lines(path):
        if not line.split("#", 1)[0].strip():
            continue
        label, qid, values = _parse_svmlight_line(line, path, line_no, n_features)
        labels.append(label)
        rows.append(values)
        line_qids.append(qid)
        line_nos.append(line_no)
    if not rows:
        raise DataFormatError(path, 1, "no data lines")
    width = n_features or max((max(r) for r in rows if r), default=1)
    features = np.zeros((len(rows), width), dtype=np.float32)
    for i, values in enumerate(rows):
        if values:
            features[i, np.fromiter(values, dtype=np.int64) - 1] = np.fromiter(values.values(), dtype=np.float32)

    has_qid = [q is not None for q in line_qids]
    if any(has_qid) and not all(has_qid):
        bad = line_nos[has_qid.index(not has_qid[0])]
        raise DataFormatError(path, bad, "some lines have a qid: field and others do not")
    if all(has_qid):
        qids, sizes, finished = [], [], set()
        for qid, line_no in zip(line_qids, line_nos):
            if qids and qid == qids[-1]:
                sizes[-1] += 1
                continue
            if qid in finished:
                raise DataFormatError(path, line_no, f"qid {qid!r} reappears after other queries (lines of a "
                                                     "query must be consecutive)")
            if qids:
                finished.add(qids[-1])
            qids.append(qid)
            sizes.append(1)
    else:
        query_path = Path(query_file) if query_file else path.with_name(path.name + ".query")
        _require_file(query_path, f"the group sizes of {path.name} (one count per line), or qid: fields")
        sizes = []
        for line_no, line in _iter_lines(query_path):
            if not line.strip():
                continue
            if not line.strip().isdigit() or int(line) < 1:
                raise DataFormatError(query_path, line_no, f"group size {line.strip()!r} is not a positive integer")
            sizes.append(int(line))
        if sum(sizes) != len(rows):
            raise DataFormatError(query_path, len(sizes), f"group sizes sum to {sum(sizes)} but {path.name} has "
                                                          f"{len(rows)} data lines")
        qids = [str(i) for i in range(len(sizes))]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return LTRData(features, np.asarray(labels, dtype=np.int64), offsets, qids, path.name)


@dataclass
class ClickLog:
    """Real search sessions: each shows ``K`` results of a query; ``items`` index (query, doc) pairs."""

    query: np.ndarray      # [S] index into queries
    items: np.ndarray      # [S, K] index into item_keys
    clicks: np.ndarray     # [S, K] bool, clicked at least once
    queries: list[str]
    item_keys: list[tuple[str, str]]
    unlisted_clicks: int   # clicks on ids not among the session's shown results


def read_yandex_clicks(path: str | Path) -> ClickLog:
    """The Yandex WSCD sample as shipped with PyClick: per line, the sessions of one query,
    separated by ``;``; a session is ``<query>\\t<d1>,...,<dK> : <clicked>, <clicked>, ...``."""
    path = Path(path)
    _require_file(path, "a Yandex WSCD click log (sessions 'query<TAB>d1,...,dK : c1 , c2' separated by ';')")
    queries: dict[str, int] = {}
    items: dict[tuple[str, str], int] = {}
    query_rows, item_rows, click_rows = [], [], []
    unlisted, n_positions = 0, None
    for line_no, line in _iter_lines(path):
        for n, session in enumerate(s for s in line.split(";") if s.strip()):
            where = f"session {n + 1}"
            shown_part, sep, clicked_part = session.partition(":")
            query, tab, docs = shown_part.strip().partition("\t")
            if not sep or not tab:
                raise DataFormatError(path, line_no, f"{where}: expected 'query<TAB>d1,...,dK : clicks', "
                                                     f"got {session.strip()[:60]!r}")
            shown = [d.strip() for d in docs.split(",")]
            if any(not d for d in shown) or len(set(shown)) != len(shown):
                raise DataFormatError(path, line_no, f"{where}: shown results must be distinct non-empty ids")
            if n_positions is None:
                n_positions = len(shown)
            elif len(shown) != n_positions:
                raise DataFormatError(path, line_no, f"{where}: {len(shown)} results shown, expected {n_positions}")
            clicked = {c.strip() for c in clicked_part.split(",") if c.strip()}
            unlisted += len(clicked - set(shown))
            q = queries.setdefault(query.strip(), len(queries))
            query_rows.append(q)
            item_rows.append([items.setdefault((query.strip(), d), len(items)) for d in shown])
            click_rows.append([d in clicked for d in shown])
    if not query_rows:
        raise DataFormatError(path, 1, "no sessions")
    return ClickLog(np.asarray(query_rows), np.asarray(item_rows), np.asarray(click_rows, dtype=bool),
                    list(queries), list(items), unlisted)


def synthetic_ltr(n_queries: int = 300, docs_per_query: int = 20, n_features: int = 16, seed: int = 0,
                  zero_share: float = 0.4) -> tuple[LTRData, np.ndarray]:
    """Generated LTR data: x ~ N(0, I), y = 5-level bins of w·x + 0.5·x1·x2 + noise at per-dataset
    quantiles (``zero_share`` of the documents get 0). Returns the data and the true weights w."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n_features)
    x = rng.normal(size=(n_queries * docs_per_query, n_features)).astype(np.float32)
    latent = x @ w + 0.5 * x[:, 0] * x[:, 1] + rng.normal(size=len(x))
    cuts = np.quantile(latent, [zero_share, zero_share + 0.3 * (1 - zero_share),
                                zero_share + 0.65 * (1 - zero_share), zero_share + 0.9 * (1 - zero_share)])
    labels = np.searchsorted(cuts, latent).astype(np.int64)
    offsets = np.arange(n_queries + 1, dtype=np.int64) * docs_per_query
    return LTRData(x, labels, offsets, [f"q{i}" for i in range(n_queries)], "synthetic-ltr"), w


@dataclass
class SimulatedClicks:
    """The click log of the training queries plus what the simulator knew (for label-error reports)."""

    query: Tensor          # [S] index into the training queries
    user: Tensor           # [S]
    clicks: Tensor         # [S, K] bool
    theta: Tensor          # [U, K] the users' examination curves (oracle propensities)
    shown: Tensor          # [Q_train, K] row of the document at each position within its list, -1 = none
    gamma: Tensor          # [Q_train, K] true relevance probability of the shown documents (0 = none)

    @property
    def n_queries(self) -> int:
        return self.shown.shape[0]


class _Items(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def collate_lists(rows: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Pad lists to the longest in the batch: features, labels, relevance, mask, position."""
    length = max(len(r["labels"]) for r in rows)
    n = len(rows)
    out = {
        "features": torch.zeros(n, length, rows[0]["features"].shape[1]),
        "labels": torch.zeros(n, length, dtype=torch.long),
        "relevance": torch.zeros(n, length, dtype=torch.float64),
        "mask": torch.zeros(n, length, dtype=torch.bool),
        "position": torch.full((n, length), -1, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        m = len(r["labels"])
        out["features"][i, :m] = r["features"]
        out["labels"][i, :m] = r["labels"]
        out["relevance"][i, :m] = r["relevance"]
        out["mask"][i, :m] = True
        out["position"][i, :m] = r["position"]
    for key in ("query_index", "session_index"):
        if key in rows[0]:
            out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return out


class ClickLTRDataModule(L.LightningDataModule):
    """Simulated-user click data for unbiased LTR (the user-aware ULTR paper's pipeline).

    ``source``: synthetic (generated, the embedded default) or svmlight (``path``, e.g. the Yahoo
    LTR sample). Queries are split train/valid/test by ``split`` fractions (seeded). Each training
    query's logged list is its top ``n_shown`` under ``logging_policy``: noisy_linear (the generator's
    weights plus N(0, 0.5²) noise; synthetic only), ridge (a ridge regression fitted on the labels
    of ``logging_fraction`` of the training queries, a stand-in production ranker) or random.
    ``sessions`` sessions of ``users`` users (``eta``: their examination exponents, default the
    reference list for that many users) are simulated with the user-aware PBM.
    ``train_unit``: queries (a batch of lists) or sessions (a batch of sessions, for click-level IPS).
    """

    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        query_file: str | None = None,
        n_features: int = 16,
        synthetic: dict | None = None,
        split: tuple[float, float, float] | list[float] = (0.6, 0.2, 0.2),
        logging_policy: str = "noisy_linear",
        logging_noise: float = 0.5,
        logging_fraction: float = 0.1,
        logging_l2: float = 1.0,
        n_shown: int = 10,
        users: int = 10,
        eta: list[float] | None = None,
        sessions: int = 20000,
        epsilon: float = 0.1,
        relevance_mapping: str = "linear",
        max_grade: int = 4,
        preference_fraction: float = 0.5,
        activity_decay: float = 1.25,
        train_unit: str = "queries",
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        simulation_seed: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, valid in [("source", source, SOURCES), ("logging_policy", logging_policy, LOGGING_POLICIES),
                                   ("train_unit", train_unit, TRAIN_UNITS)]:
            if value not in valid:
                raise ValueError(f"unknown {name} '{value}'; choose one of {', '.join(valid)}")
        if source == "svmlight" and not path:
            raise ValueError("data source 'svmlight' needs data.path (an SVMlight/LETOR file)")
        if logging_policy == "noisy_linear" and source != "synthetic":
            raise ValueError("logging_policy 'noisy_linear' needs the generator's weights: use ridge or random")
        if eta is None and users not in ETA:
            raise ValueError(f"no reference eta list for {users} users (have {sorted(ETA)}); pass data.eta")
        if eta is not None and len(eta) != users:
            raise ValueError(f"data.eta has {len(eta)} values for {users} users")
        if len(split) != 3 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three fractions summing to 1, got {list(split)}")
        self.save_hyperparameters()
        self.data: LTRData | None = None
        self.splits: dict[str, list[int]] = {}
        self.click_log: SimulatedClicks | None = None
        self.logger_scores: np.ndarray | None = None   # every document's score under the logging policy

    # -- loading -------------------------------------------------------------------------
    def load(self) -> tuple[LTRData, np.ndarray | None]:
        hp = self.hparams
        if hp.source == "synthetic":
            data, w = synthetic_ltr(**{"n_features": hp.n_features, "seed": hp.seed, **(hp.synthetic or {})})
            if data.features.shape[1] != hp.n_features:
                raise ValueError(f"synthetic.n_features={data.features.shape[1]} but data.n_features={hp.n_features}")
            return data, w
        return read_svmlight(hp.path, hp.query_file, n_features=hp.n_features), None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        hp = self.hparams
        data, weights = self.load()
        self.data = data
        order = np.random.default_rng(hp.seed).permutation(len(data))
        n_train = round(hp.split[0] * len(data))
        n_valid = round(hp.split[1] * len(data))
        self.splits = {"train": sorted(order[:n_train].tolist()),
                       "valid": sorted(order[n_train:n_train + n_valid].tolist()),
                       "test": sorted(order[n_train + n_valid:].tolist())}
        self.click_log = self.simulate(weights)

    def logging_scores(self, weights: np.ndarray | None) -> np.ndarray:
        """Scores of every document under the logging policy (higher is shown earlier)."""
        hp, data = self.hparams, self.data
        rng = np.random.default_rng(hp.simulation_seed)
        if hp.logging_policy == "noisy_linear":
            return data.features @ (weights + rng.normal(scale=hp.logging_noise, size=weights.shape))
        if hp.logging_policy == "random":
            return rng.random(len(data.labels))
        train = self.splits["train"]
        chosen = rng.choice(train, size=max(1, math.ceil(hp.logging_fraction * len(train))), replace=False)
        rows = np.concatenate([np.arange(len(data.labels))[data.rows(q)] for q in sorted(chosen)])
        x = np.hstack([data.features[rows], np.ones((len(rows), 1), np.float32)]).astype(np.float64)
        coef = np.linalg.solve(x.T @ x + hp.logging_l2 * np.eye(x.shape[1]), x.T @ data.labels[rows])
        return data.features @ coef[:-1] + coef[-1]

    def simulate(self, weights: np.ndarray | None) -> SimulatedClicks:
        hp, data = self.hparams, self.data
        scores = self.logger_scores = self.logging_scores(weights)
        train = self.splits["train"]
        shown = torch.full((len(train), hp.n_shown), -1, dtype=torch.long)
        gamma = torch.zeros(len(train), hp.n_shown, dtype=torch.float64)
        for i, q in enumerate(train):
            rows = data.rows(q)
            top = np.argsort(-scores[rows], kind="stable")[: hp.n_shown]
            shown[i, : len(top)] = torch.from_numpy(top)
            gamma[i, : len(top)] = relevance_probability(torch.from_numpy(data.labels[rows][top]), hp.epsilon,
                                                         hp.relevance_mapping, hp.max_grade)
        theta = examination(hp.eta or ETA[hp.users], hp.n_shown)
        sessions = allocate_sessions(hp.sessions, len(train), hp.users, hp.simulation_seed,
                                     hp.preference_fraction, hp.activity_decay)
        generator = torch.Generator().manual_seed(hp.simulation_seed)
        clicks = UserPBMSimulator(theta).simulate(gamma[sessions.query], sessions.user, generator)
        return SimulatedClicks(sessions.query, sessions.user, clicks, theta, shown, gamma)

    # -- items ---------------------------------------------------------------------------
    def list_item(self, q: int, train_index: int | None = None) -> dict[str, Any]:
        """One query's candidate list; ``position`` is each document's rank in the logged list (-1 = not shown)."""
        hp, data = self.hparams, self.data
        rows = data.rows(q)
        labels = torch.from_numpy(data.labels[rows])
        item = {"features": torch.from_numpy(data.features[rows]), "labels": labels,
                "relevance": relevance_probability(labels, hp.epsilon, hp.relevance_mapping, hp.max_grade),
                "position": torch.full((len(labels),), -1, dtype=torch.long)}
        if train_index is not None:
            shown = self.click_log.shown[train_index]
            valid = shown >= 0
            item["position"][shown[valid]] = torch.arange(int(valid.sum()))
            item["query_index"] = train_index
        return item

    def train_dataloader(self) -> DataLoader:
        lists = [self.list_item(q, i) for i, q in enumerate(self.splits["train"])]
        if self.hparams.train_unit == "sessions":
            items = [{**lists[int(q)], "session_index": s} for s, q in enumerate(self.click_log.query.tolist())]
        else:
            items = lists
        return DataLoader(_Items(items), batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate_lists,
                          num_workers=self.hparams.num_workers, drop_last=len(items) > self.hparams.batch_size)

    def _eval_loader(self, split: str) -> DataLoader:
        items = [self.list_item(q) for q in self.splits[split]]
        return DataLoader(_Items(items), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=collate_lists, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
