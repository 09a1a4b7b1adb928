"""Find, publish, download and safely read zoo checkpoints.

A checkpoint is a `save_pretrained` folder (`config.yaml`, `model.safetensors`,
`README.md`). This module only resolves names to such folders and handles the
files; rebuilding a module from a folder is `ZooModule.from_pretrained`'s job.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from zoo.paths import cache_dir

REQUIRED_FILES = ("config.yaml", "model.safetensors")
MANIFEST = "sha256"
PACKAGED_INDEX = Path(__file__).resolve().parent / "checkpoints.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")

# A leading dot is refused too: it rules out "." and ".." and keeps staging dirs out of listings.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, fetched, verified or read."""


def store_dir() -> Path:
    """The local zoo store: `$ZOO_STORE`, else `cache_dir()/store`."""
    env = os.environ.get("ZOO_STORE")
    return Path(env) if env else cache_dir() / "store"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CheckpointError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '-' and '.' "
            "(not as the first character)"
        )
    return name


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_required(folder: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename a finished staging dir to its final name; a concurrent writer that got there first wins."""
    try:
        staging.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging)


# --------------------------------------------------------------------------- store


def publish(folder, entry: str, tag: str, overwrite: bool = False) -> Path:
    """Copy a save_pretrained folder to `store_dir()/entry/tag/` with a sha256 manifest."""
    _check_name("entry", entry)
    _check_name("tag", tag)
    source = Path(folder).expanduser()
    if not source.is_dir():
        raise CheckpointError(f"cannot publish {source}: not a directory")
    missing = _missing_required(source)
    if missing:
        raise CheckpointError(
            f"cannot publish {source}: missing {', '.join(missing)} "
            "(expected a folder written by save_pretrained)"
        )
    dest = store_dir() / entry / tag
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{entry}:{tag} is already published at {dest}; pass overwrite=True (--overwrite) to replace it")

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the destination first so a failed copy never leaves a half-written tag.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
    try:
        copied = staging / "checkpoint"
        shutil.copytree(source, copied)
        (copied / MANIFEST).unlink(missing_ok=True)  # a republished store folder brings its old manifest
        lines = [
            f"{_sha256_file(path)}  {path.relative_to(copied).as_posix()}\n"
            for path in sorted(copied.rglob("*"))
            if path.is_file()
        ]
        (copied / MANIFEST).write_text("".join(lines))
        if dest.exists():
            shutil.rmtree(dest)
        copied.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def list_published() -> list[dict]:
    """Every `entry:tag` in the store, as dicts with `entry`, `tag` and `path`."""
    root = store_dir()
    if not root.is_dir():
        return []
    found = []
    for entry_dir in sorted(root.iterdir()):
        if not (entry_dir.is_dir() and _NAME.fullmatch(entry_dir.name)):
            continue
        for tag_dir in sorted(entry_dir.iterdir()):
            if tag_dir.is_dir() and _NAME.fullmatch(tag_dir.name) and (tag_dir / "config.yaml").is_file():
                found.append({"entry": entry_dir.name, "tag": tag_dir.name, "path": tag_dir})
    return found


# --------------------------------------------------------------------------- index


def index_files() -> list[Path]:
    """The index files read, lowest precedence first: `$ZOO_INDEX` (else the packaged one), then `cache_dir()/index.json`."""
    env = os.environ.get("ZOO_INDEX")
    files = [Path(env) if env else PACKAGED_INDEX]
    user_index = cache_dir() / "index.json"
    if user_index.is_file():
        files.append(user_index)
    return files


def _archive_suffix(url: str) -> str | None:
    path = urllib.request.urlparse(url).path.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if path.endswith(suffix)), None)


def _read_index_file(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint index {path} does not exist (check $ZOO_INDEX)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint index {path}: {err}") from None
    if not isinstance(records, list):
        raise CheckpointError(f"checkpoint index {path} must hold a JSON list of objects")
    cleaned = []
    for position, record in enumerate(records):
        where = f"checkpoint index {path}, item {position}"
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("entry", "tag", "url", "sha256")):
            raise CheckpointError(f"{where}: needs string fields entry, tag, url and sha256")
        _check_name("entry", record["entry"])
        _check_name("tag", record["tag"])
        sha = record["sha256"].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise CheckpointError(f"{where}: sha256 must be 64 hex digits, got {record['sha256']!r}")
        if _archive_suffix(record["url"]) is None:
            raise CheckpointError(f"{where}: url must end in {', '.join(ARCHIVE_SUFFIXES)}, got {record['url']!r}")
        cleaned.append({**record, "sha256": sha, "description": str(record.get("description", ""))})
    return cleaned


def list_index() -> list[dict]:
    """Index entries; where an `entry:tag` appears twice, the later file (the user's cache index) wins."""
    merged: dict[tuple[str, str], dict] = {}
    for path in index_files():
        for record in _read_index_file(path):
            merged[record["entry"], record["tag"]] = record
    return [merged[key] for key in sorted(merged)]


def _index_record(entry: str, tag: str) -> dict | None:
    return next((r for r in list_index() if r["entry"] == entry and r["tag"] == tag), None)


def archive_path(record: dict) -> Path:
    """Where the archive of an index record is cached (and where a user may place it by hand)."""
    return cache_dir() / "downloads" / record["sha256"] / ("archive" + _archive_suffix(record["url"]))


def download(entry: str, tag: str) -> Path:
    """Fetch `entry:tag` from the index once, verify its sha256, extract it and return the checkpoint folder."""
    _check_name("entry", entry)
    _check_name("tag", tag)
    record = _index_record(entry, tag)
    if record is None:
        raise CheckpointError(f"{entry}:{tag} is not in the checkpoint index.\n{_offer()}")
    archive = archive_path(record)
    extracted = archive.parent / "extracted"
    if extracted.is_dir():
        return _checkpoint_root(extracted, record["url"])

    if archive.is_file():
        _verify_archive(archive, record, source=f"the file at {archive}")
    else:
        _fetch(record, archive, name=f"{entry}:{tag}")

    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=archive.parent))
    try:
        _safe_extract(archive, staging)
        _checkpoint_root(staging, record["url"])
        _move_into_place(staging, extracted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _checkpoint_root(extracted, record["url"])


def _verify_archive(path: Path, record: dict, source: str) -> None:
    got = _sha256_file(path)
    if got != record["sha256"]:
        path.unlink()
        raise CheckpointError(
            f"sha256 mismatch for {source} ({record['url']}): expected {record['sha256']}, got {got}; "
            "the file was deleted and nothing was extracted"
        )


def _fetch(record: dict, archive: Path, name: str) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".download-", dir=archive.parent)
    partial = Path(partial)
    try:
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(record["url"], timeout=60) as response:
                shutil.copyfileobj(response, out, _CHUNK)
        # URLError, HTTPError and timeouts are OSErrors; ValueError is a malformed URL; HTTPException a cut-off body.
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise CheckpointError(
                f"could not download checkpoint {name} from {record['url']} ({err}).\n"
                "To supply it another way, either\n"
                f"  - fetch {record['url']} yourself and place it at\n"
                f"      {archive}\n"
                f"    (its sha256 must be {record['sha256']}), or\n"
                "  - publish a local save_pretrained folder: "
                f"python -m zoo publish DIR {record['entry']} {record['tag']}"
            ) from None
        _verify_archive(partial, record, source="the downloaded file")
        partial.rename(archive)
    finally:
        partial.unlink(missing_ok=True)


def _member_error(archive: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"refusing to extract {archive}: member {name!r} {why}")


def _safe_relative(archive: Path, name: str) -> PurePosixPath:
    """The member's path inside the destination; absolute paths, drives and `..` are refused."""
    relative = PurePosixPath(name.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(name).drive:
        raise _member_error(archive, name, "has an absolute path")
    if ".." in relative.parts:
        raise _member_error(archive, name, "escapes the archive with '..'")
    return relative


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files and directories only, writing each file ourselves rather than trusting the archive library."""
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    relative = _safe_relative(archive, info.filename)
                    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip was written without Unix modes
                    if kind == stat.S_IFLNK:
                        raise _member_error(archive, info.filename, "is a link")
                    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                        raise _member_error(archive, info.filename, "is not a regular file or directory")
                    target = dest.joinpath(*relative.parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(info) as src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
        else:
            with tarfile.open(archive, "r:*") as bundle:
                for member in bundle:
                    relative = _safe_relative(archive, member.name)
                    if member.issym() or member.islnk():
                        raise _member_error(archive, member.name, "is a link")
                    target = dest.joinpath(*relative.parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isfile():
                        raise _member_error(archive, member.name, "is not a regular file or directory")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.extractfile(member) as src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(f"cannot extract {archive}: corrupt archive ({err})") from None


def _checkpoint_root(folder: Path, url: str) -> Path:
    """The folder holding config.yaml: the archive root or its single top-level directory."""
    roots = sorted({path.parent for path in folder.rglob("config.yaml")})
    if len(roots) != 1:
        problem = "has no config.yaml" if not roots else f"has {len(roots)} config.yaml files"
        raise CheckpointError(f"the archive from {url} {problem}; expected one save_pretrained folder")
    missing = _missing_required(roots[0])
    if missing:
        raise CheckpointError(f"the archive from {url} lacks {', '.join(missing)} next to config.yaml")
    return roots[0]


# --------------------------------------------------------------------------- resolve


def _offer() -> str:
    published = [f"{r['entry']}:{r['tag']}" for r in list_published()]
    indexed = [f"{r['entry']}:{r['tag']}" for r in list_index()]
    return (
        f"Published in the store ({store_dir()}): {', '.join(published) or '(none)'}\n"
        f"Available from the index ({', '.join(map(str, index_files()))}): {', '.join(indexed) or '(none)'}\n"
        "A directory containing config.yaml may be given instead."
    )


def resolve(name_or_path) -> Path:
    """A save_pretrained folder for a directory, an `entry:tag` or a bare `entry`."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} is a directory without config.yaml, not a save_pretrained folder")
        return path
    if isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text or text.startswith(("~", ".")):
        raise CheckpointError(f"checkpoint directory {path} does not exist")

    entry, _, tag = text.partition(":")
    _check_name("entry", entry)
    if not tag:
        tag = _default_tag(entry)
    _check_name("tag", tag)
    local = store_dir() / entry / tag
    if (local / "config.yaml").is_file():
        return local
    if _index_record(entry, tag) is None:
        raise CheckpointError(f"unknown checkpoint {text!r}.\n{_offer()}")
    return download(entry, tag)


def _default_tag(entry: str) -> str:
    """The store's only tag or its `latest`; when the store has none, the same rule over the index."""
    stored = [r["tag"] for r in list_published() if r["entry"] == entry]
    indexed = [r["tag"] for r in list_index() if r["entry"] == entry]
    tags = stored or indexed
    if not tags:
        raise CheckpointError(f"unknown checkpoint {entry!r}.\n{_offer()}")
    if "latest" in tags:
        return "latest"
    if len(tags) == 1:
        return tags[0]
    raise CheckpointError(
        f"{entry!r} has several tags and none is named 'latest'; ask for one as {entry}:TAG.\n"
        f"In the store: {', '.join(stored) or '(none)'}\n"
        f"In the index: {', '.join(indexed) or '(none)'}"
    )


# --------------------------------------------------------------------------- torch files


def safe_torch_load(path, map_location="cpu"):
    """`torch.load` restricted to tensors and plain values; anything else is a CheckpointError, never a fallback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False; keep only the offending detail.
        detail = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", str(err), re.MULTILINE)
        raise CheckpointError(
            f"refusing to load {path}: the file contains objects that are not plain tensors/values "
            "and will not be unpickled, since unpickling them could run arbitrary code"
            + (f" ({detail.group(1).strip()})" if detail else "")
        ) from None
    except (EOFError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupt or not a torch checkpoint ({type(err).__name__}: {err})"
        ) from None


# --------------------------------------------------------------------------- command line


def add_hub_commands(subparsers) -> None:
    """Register `publish` and `checkpoints`; each parser's `func(args)` returns an exit code."""
    parser = subparsers.add_parser("publish", help="copy a save_pretrained folder into the local zoo store")
    parser.add_argument("dir", help="folder written by save_pretrained")
    parser.add_argument("entry", help="zoo entry name, e.g. e2rank")
    parser.add_argument("tag", help="checkpoint tag, e.g. minilm-scifact")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing entry:tag")
    parser.set_defaults(func=cmd_publish)

    parser = subparsers.add_parser("checkpoints", help="list published and downloadable checkpoints")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=cmd_checkpoints)


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        dest = publish(args.dir, args.entry, args.tag, overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"published {args.entry}:{args.tag} to {dest}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    try:
        published = list_published()
        indexed = list_index()
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(
            {"published": [{**r, "path": str(r["path"])} for r in published], "index": indexed},
            indent=2,
        ))
        return 0
    rows = [("SOURCE", "NAME", "LOCATION", "DESCRIPTION")]
    rows += [("store", f"{r['entry']}:{r['tag']}", str(r["path"]), "") for r in published]
    rows += [("index", f"{r['entry']}:{r['tag']}", r["url"], r["description"]) for r in indexed]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    if len(rows) == 1:
        print("(no checkpoints: publish one with `python -m zoo publish DIR ENTRY TAG`)")
    return 0
