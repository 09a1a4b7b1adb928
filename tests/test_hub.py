import argparse
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zoo import hub
from zoo.hub import CheckpointError


class Hostile:
    """Unpickling this creates the marker file: a stand-in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path, monkeypatch):
    """Each test gets its own store and an empty index, whatever the caller's environment says."""
    monkeypatch.setenv("ZOO_STORE", str(tmp_path / "store"))
    index = tmp_path / "index.json"
    index.write_text("[]")
    monkeypatch.setenv("ZOO_INDEX", str(index))
    return index


def make_checkpoint(folder: Path, hidden: int = 4) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  hidden: {hidden}\n")
    save_file({"weight": torch.full((2, hidden), 0.5)}, str(folder / "model.safetensors"))
    (folder / "README.md").write_text("# tiny\n")
    return folder


def make_tar(tmp_path: Path, name: str = "ckpt.tar.gz") -> Path:
    source = make_checkpoint(tmp_path / "to-pack")
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(source, arcname="ckpt")
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index(index: Path, url: str, sha: str, entry="e2rank", tag="minilm-scifact") -> None:
    index.write_text(json.dumps([{"entry": entry, "tag": tag, "url": url, "sha256": sha, "description": "tiny test"}]))


def downloads() -> Path:
    return hub.cache_dir() / "downloads"


# --------------------------------------------------------------------------- store


def test_publish_then_resolve_round_trip(tmp_path):
    source = make_checkpoint(tmp_path / "run")
    dest = hub.publish(source, "e2rank", "minilm-scifact")

    assert dest == tmp_path / "store" / "e2rank" / "minilm-scifact"
    assert hub.resolve("e2rank:minilm-scifact") == dest
    assert (dest / "config.yaml").read_text() == (source / "config.yaml").read_text()
    manifest = dict(line.split("  ")[::-1] for line in (dest / "sha256").read_text().splitlines())
    assert manifest == {name: sha256(source / name) for name in ("README.md", "config.yaml", "model.safetensors")}
    assert hub.list_published() == [{"entry": "e2rank", "tag": "minilm-scifact", "path": dest}]


def test_publish_refuses_overwrite_unless_asked(tmp_path):
    hub.publish(make_checkpoint(tmp_path / "a", hidden=4), "e2rank", "t")
    with pytest.raises(CheckpointError, match="already published"):
        hub.publish(make_checkpoint(tmp_path / "b", hidden=8), "e2rank", "t")
    dest = hub.publish(tmp_path / "b", "e2rank", "t", overwrite=True)
    assert "hidden: 8" in (dest / "config.yaml").read_text()


def test_publish_names_missing_files(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "README.md").write_text("no weights")
    with pytest.raises(CheckpointError, match="missing config.yaml, model.safetensors"):
        hub.publish(folder, "e2rank", "t")


@pytest.mark.parametrize("entry, tag", [("../evil", "t"), ("e2rank", ".."), ("a/b", "t"), ("e2rank", "x\\y"), ("", "t")])
def test_path_traversal_in_names_refused(tmp_path, entry, tag):
    source = make_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="invalid"):
        hub.publish(source, entry, tag)
    assert not (tmp_path / "evil").exists() and hub.list_published() == []


def test_entry_tag_and_bare_entry_resolution(tmp_path):
    one = hub.publish(make_checkpoint(tmp_path / "a"), "solo", "only")
    assert hub.resolve("solo") == one

    first = hub.publish(make_checkpoint(tmp_path / "b"), "e2rank", "first")
    second = hub.publish(make_checkpoint(tmp_path / "c"), "e2rank", "second")
    assert hub.resolve("e2rank:second") == second and hub.resolve("e2rank:first") == first
    with pytest.raises(CheckpointError, match="several tags") as err:
        hub.resolve("e2rank")
    assert "first, second" in str(err.value)

    latest = hub.publish(make_checkpoint(tmp_path / "d"), "e2rank", "latest")
    assert hub.resolve("e2rank") == latest


def test_resolve_directory(tmp_path):
    folder = make_checkpoint(tmp_path / "run")
    assert hub.resolve(folder) == folder and hub.resolve(str(folder)) == folder
    with pytest.raises(CheckpointError, match="without config.yaml"):
        hub.resolve(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.resolve(tmp_path / "nowhere")


def test_unknown_name_lists_choices(tmp_path, _isolated_hub):
    hub.publish(make_checkpoint(tmp_path / "run"), "e2rank", "local")
    write_index(_isolated_hub, "https://example.invalid/x.tar.gz", "0" * 64, entry="other", tag="remote")
    for name in ("nope", "nope:tag", "e2rank:missing"):
        with pytest.raises(CheckpointError, match="unknown checkpoint") as err:
            hub.resolve(name)
        assert "e2rank:local" in str(err.value) and "other:remote" in str(err.value)


# --------------------------------------------------------------------------- index


def test_download_once_from_file_url(tmp_path, _isolated_hub):
    archive = make_tar(tmp_path)
    write_index(_isolated_hub, archive.as_uri(), sha256(archive))

    folder = hub.resolve("e2rank:minilm-scifact")
    assert folder.parent.parent == downloads() / sha256(archive)
    assert (folder / "config.yaml").read_text() == "model:\n  hidden: 4\n"

    archive.unlink()  # a second download would now fail
    assert hub.resolve("e2rank:minilm-scifact") == folder
    assert hub.resolve("e2rank") == folder


def test_zip_archive(tmp_path, _isolated_hub):
    source = make_checkpoint(tmp_path / "to-pack")
    archive = tmp_path / "ckpt.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in source.iterdir():
            bundle.write(path, path.name)
    write_index(_isolated_hub, archive.as_uri(), sha256(archive))
    assert (hub.download("e2rank", "minilm-scifact") / "model.safetensors").is_file()


def test_sha256_mismatch_refused_and_removed(tmp_path, _isolated_hub):
    archive = make_tar(tmp_path)
    write_index(_isolated_hub, archive.as_uri(), "ab" * 32)
    with pytest.raises(CheckpointError, match=f"expected {'ab' * 32}, got {sha256(archive)}"):
        hub.resolve("e2rank:minilm-scifact")
    assert [p for p in downloads().rglob("*") if p.is_file()] == []


def test_offline_message_then_manual_placement(tmp_path, _isolated_hub):
    archive = make_tar(tmp_path)
    sha = sha256(archive)
    url = (tmp_path / "gone.tar.gz").as_uri()
    write_index(_isolated_hub, url, sha)
    expected_path = downloads() / sha / "archive.tar.gz"

    with pytest.raises(CheckpointError) as err:
        hub.resolve("e2rank:minilm-scifact")
    message = str(err.value)
    for needle in (url, sha, str(expected_path), "python -m zoo publish DIR e2rank minilm-scifact"):
        assert needle in message

    expected_path.parent.mkdir(parents=True, exist_ok=True)
    expected_path.write_bytes(archive.read_bytes())
    assert (hub.resolve("e2rank:minilm-scifact") / "config.yaml").is_file()


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.addfile(member, io.BytesIO(payload) if payload else None)
    return archive


def _file_member(name: str, payload: bytes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    return member


def _link_member(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.SYMTYPE
    member.linkname = "/etc/passwd"
    return member


@pytest.mark.parametrize(
    "member, payload, why",
    [
        (_file_member("../evil", b"pwned"), b"pwned", "'..'"),
        (_file_member("/tmp/evil", b"pwned"), b"pwned", "absolute"),
        (_link_member("config.yaml"), b"", "link"),
    ],
)
def test_hostile_archive_members_refused(tmp_path, _isolated_hub, member, payload, why):
    archive = _tar_with(tmp_path, member, payload)
    write_index(_isolated_hub, archive.as_uri(), sha256(archive))
    with pytest.raises(CheckpointError, match=why):
        hub.download("e2rank", "minilm-scifact")
    assert not (downloads() / sha256(archive) / "evil").exists()
    assert not (downloads() / sha256(archive) / "extracted").exists()


def test_zip_member_escaping_refused(tmp_path, _isolated_hub):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../evil", b"pwned")
    write_index(_isolated_hub, archive.as_uri(), sha256(archive))
    with pytest.raises(CheckpointError, match="'..'"):
        hub.download("e2rank", "minilm-scifact")
    assert not (downloads() / sha256(archive) / "evil").exists()


# --------------------------------------------------------------------------- torch files


def test_safe_torch_load_refuses_hostile_pickle(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": Hostile(marker)}, path)

    with pytest.raises(CheckpointError, match="not plain tensors/values and will not be unpickled") as err:
        hub.safe_torch_load(path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # proves the payload is live
    assert marker.exists()


def test_safe_torch_load_plain_lightning_dict(tmp_path):
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {"encoder.weight": torch.randn(3, 2), "encoder.bias": torch.zeros(3)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}],
        "hyper_parameters": {"hidden": 4, "dropout": 0.1, "name": "tiny", "layers": [2, 2], "use_bias": True, "extra": None},
    }
    path = tmp_path / "plain.ckpt"
    torch.save(checkpoint, path)
    loaded = hub.safe_torch_load(path)
    assert torch.equal(loaded["state_dict"]["encoder.weight"], checkpoint["state_dict"]["encoder.weight"])
    assert loaded["hyper_parameters"] == checkpoint["hyper_parameters"]
    assert loaded["optimizer_states"] == checkpoint["optimizer_states"]


def test_safe_torch_load_missing_and_truncated(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.safe_torch_load(tmp_path / "absent.ckpt")
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        hub.safe_torch_load(path)


# --------------------------------------------------------------------------- command line


def _parse(argv):
    parser = argparse.ArgumentParser(prog="zoo")
    hub.add_hub_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_publish_and_checkpoints(tmp_path, _isolated_hub, capsys):
    source = make_checkpoint(tmp_path / "run")
    args = _parse(["publish", str(source), "e2rank", "local"])
    assert args.func(args) == 0
    assert str(tmp_path / "store" / "e2rank" / "local") in capsys.readouterr().out

    assert args.func(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    args = _parse(["publish", str(source), "e2rank", "local", "--overwrite"])
    assert args.func(args) == 0
    capsys.readouterr()

    write_index(_isolated_hub, "https://example.invalid/ckpt.tar.gz", "0" * 64)
    args = _parse(["checkpoints"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "e2rank:local" in table and "e2rank:minilm-scifact" in table and "tiny test" in table

    args = _parse(["checkpoints", "--json"])
    assert args.func(args) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [r["tag"] for r in listing["published"]] == ["local"]
    assert listing["index"][0]["url"] == "https://example.invalid/ckpt.tar.gz"
