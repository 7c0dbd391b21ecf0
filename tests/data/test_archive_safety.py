"""Hostile dataset archives: members that leave the extraction folder, links and special files are
refused with one line naming the archive and the member, and nothing is written outside the root."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from poisonflow.data.archives import extract, merge_into
from poisonflow.errors import DataSourceError


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def tar_with(path: Path, build) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, "train/cat/0.txt", b"benign")  # a benign member first: nothing of it may land either
        build(tar)
    return path


def zip_with(path: Path, build) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("train/cat/0.txt", b"benign")
        build(bundle)
    return path


def zip_symlink(bundle: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    bundle.writestr(info, target)


def outside_files(tmp_path: Path, root: Path) -> set[Path]:
    """Every path under tmp_path outside root, except root's parents and the archives themselves."""
    return {p for p in tmp_path.rglob("*") if root not in p.parents and p != root and p not in root.parents
            and p.suffix not in (".gz", ".zip")}


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data" / "root"


def _hostile_tars(tmp_path: Path) -> dict:
    victim = tmp_path / "victim.txt"
    return {
        "dotdot": (lambda tar: add_file(tar, "train/../../../victim.txt", b"pwned"), "train/../../../victim.txt",
                   r"leaves the extraction folder"),
        "absolute": (lambda tar: add_file(tar, str(victim), b"pwned"), str(victim), r"has an absolute path"),
        "symlink": (lambda tar: (add_link(tar, "train/escape", str(tmp_path)),
                                 add_file(tar, "train/escape/victim.txt", b"pwned")),
                    "train/escape", r"is a symbolic link"),
        "hardlink": (lambda tar: add_link(tar, "train/hard", str(victim), tarfile.LNKTYPE), "train/hard",
                     r"is a hard link"),
        "fifo": (lambda tar: add_link(tar, "train/pipe", "", tarfile.FIFOTYPE), "train/pipe",
                 r"is a device, FIFO or other special file"),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_hostile_tar_member_is_refused_and_nothing_lands(tmp_path, root, case):
    build, member, reason = _hostile_tars(tmp_path)[case]
    archive = tar_with(tmp_path / f"{case}.tar.gz", build)
    with pytest.raises(DataSourceError) as error:
        extract(archive, root, "datasets.x")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"datasets.x.root: refusing to extract {archive}: member '{member}' ")
    assert reason in message.split(f"'{member}'", 1)[1]
    assert outside_files(tmp_path, root) == set()
    assert not (tmp_path / "victim.txt").exists()
    assert list(root.iterdir()) == []  # not even the benign member, nor a staging folder


@pytest.mark.parametrize("case,member,reason", [
    ("dotdot", "../../victim.txt", "leaves the extraction folder"),
    ("absolute", "/tmp/poisonflow-victim.txt", "has an absolute path"),
    ("symlink", "train/escape", "is a symbolic link"),
])
def test_hostile_zip_member_is_refused(tmp_path, root, case, member, reason):
    def build(bundle):
        if case == "symlink":
            zip_symlink(bundle, member, str(tmp_path))
        else:
            bundle.writestr(zipfile.ZipInfo(member), b"pwned")

    archive = zip_with(tmp_path / f"{case}.zip", build)
    with pytest.raises(DataSourceError, match=rf"^datasets\.x\.root: refusing to extract .*{case}\.zip: "
                                              rf"member '{member}' {reason}"):
        extract(archive, root, "datasets.x")
    assert outside_files(tmp_path, root) == set() and list(root.iterdir()) == []
    assert not Path("/tmp/poisonflow-victim.txt").exists()


def test_benign_archives_still_extract_and_merge(tmp_path, root):
    tar = tar_with(tmp_path / "a.tar.gz", lambda t: add_file(t, "train/dog/1.txt", b"d"))
    bundle = zip_with(tmp_path / "b.zip", lambda z: z.writestr("val/dog/2.txt", b"v"))
    extract(tar, root, "k")
    extract(bundle, root, "k")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.txt"))
    assert names == ["train/cat/0.txt", "train/dog/1.txt", "val/dog/2.txt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".extract-")]


def test_merge_into_replaces_a_link_instead_of_following_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "root"
    target.mkdir()
    (target / "train").symlink_to(outside, target_is_directory=True)  # planted before extraction
    source = tmp_path / "staging" / "train"
    source.mkdir(parents=True)
    (source / "a.txt").write_text("a")
    merge_into(source, target / "train")
    assert list(outside.iterdir()) == []  # nothing written through the link
    assert not (target / "train").is_symlink() and (target / "train" / "a.txt").read_text() == "a"
    link = tmp_path / "staging2" / "l"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(OSError, match="symbolic link"):
        merge_into(link, target / "l")


def test_poisonflow_data_refuses_a_hostile_download_end_to_end(tmp_path, capsys):
    """`poisonflow data` on an imagefolder source whose (checksum-verified) archive escapes."""
    from poisonflow.cli import main

    archive = tar_with(tmp_path / "served" / "pets.tar.gz",
                       lambda tar: add_file(tar, "../../../victim.txt", b"pwned"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = {"source": "imagefolder", "download": True, "url": archive.as_uri(), "md5": md5,
            "root": str(tmp_path / "root"), "image_size": 4, "reserve": 0.0, "split_seed": 0}
    code = main(["data", "--name", "pets", "--spec", json.dumps(spec), "--out", str(tmp_path / "d.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"poisonflow data: error: datasets.pets.root: refusing to extract "
                      f"{tmp_path / 'root' / 'pets.tar.gz'}: member '../../../victim.txt' leaves the extraction "
                      f"folder ('..' in its path)")
    assert not (tmp_path / "victim.txt").exists() and not (tmp_path.parent / "victim.txt").exists()
    assert not (tmp_path / "d.zarr").exists()
