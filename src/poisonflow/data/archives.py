"""Fetching, verifying and extracting the files of downloadable sources.

``file://`` URLs are copied (for mirrors on a shared disk, and for tests); other URLs are fetched
with torchvision's downloader under :func:`~poisonflow.data.sourcing.download_guard`, so a stalled
or refused connection fails within ``download_timeout`` seconds with a one-line error. Every
fetched file is checked against its MD5 before anything reads it, and archives are extracted into
a temporary folder first, so an interrupted extraction never passes for a complete one.

A checksum says a file is the one the config names, not that it is harmless: every member of a tar
or zip archive is checked before anything is written, and an archive with a member that would land
outside the extraction folder (an absolute path, a ``..`` component), a symbolic or hard link, or a
device or FIFO is refused as a whole, with one line naming the archive and the member. Tar members
are then extracted through :mod:`tarfile`'s ``data`` filter as a second guard.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import DataSourceError
from .sourcing import download_guard, md5_of_file, one_line

EXTRACT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, RuntimeError)


def verify_md5(path: Path, md5: str, key: str) -> None:
    """Raise a one-line error naming ``key`` and ``path`` unless the file's MD5 is ``md5``."""
    actual = md5_of_file(path)
    if actual != md5:
        raise DataSourceError(f"{key}: {path} fails its MD5 check (got {actual}, expected {md5})")


def has_md5(path: Path, md5: str) -> bool:
    return path.is_file() and md5_of_file(path) == md5


def join_url(base: str, name: str) -> str:
    """``base`` (a folder URL, with or without a trailing slash) joined with a file name."""
    return base.rstrip("/") + "/" + name


def copy_local(url: str, destination: Path, key: str) -> None:
    """Fetch a ``file://`` URL, which torchvision's downloader does not handle, by copying."""
    source = Path(url2pathname(urlparse(url).path))
    if not source.is_file():
        raise DataSourceError(f"{key}.url: {source} does not exist")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    except OSError as error:
        raise DataSourceError(f"{key}.root: cannot copy {source} to {destination} ({one_line(error)})") from error


def download(url: str, destination: Path, md5: str, spec: dict, key: str, md5_key: str) -> None:
    from torchvision.datasets.utils import download_url

    with download_guard(spec, key, url, destination.parent):
        try:
            download_url(url, str(destination.parent), filename=destination.name, md5=md5)
        except RuntimeError:
            # Raised after a complete download whose checksum is wrong: name the file.
            if destination.is_file():
                verify_md5(destination, md5, md5_key)
            raise


def fetch(url: str, destination: Path, md5: str, spec: dict, key: str, md5_key: str) -> Path:
    """Make ``destination`` a verified copy of ``url`` (kept when a verified copy is already there).

    A file whose MD5 is not ``md5`` fails with an error naming ``md5_key`` (the config key that
    set the checksum, or the one that chose the mirror when the checksum is the published one).
    """
    if has_md5(destination, md5):
        return destination
    if urlparse(url).scheme == "file":
        copy_local(url, destination, key)
    else:
        download(url, destination, md5, spec, key, md5_key)
    verify_md5(destination, md5, md5_key)
    return destination


def merge_into(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; folders that exist on both sides are merged entry by entry.

    Each move is a rename, so a folder that was absent appears complete or not at all. Merging
    (not replacing) lets several archives fill one tree, as GTSRB's training and test archives do.
    Links are never followed: a symbolic link in ``source`` is refused, and one at ``target`` is
    replaced (the link itself, not what it points to).
    """
    if source.is_symlink():
        raise OSError(f"refusing to move the symbolic link {source}")
    if target.is_symlink():
        target.unlink()
    elif source.is_dir() and target.is_dir():
        for child in sorted(source.iterdir()):
            merge_into(child, target / child.name)
        return
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


class UnsafeMember(Exception):
    """An archive member that would be written outside the extraction folder, or is a link."""

    def __init__(self, member: str, reason: str):
        super().__init__(f"member '{member}' {reason}")


def member_problem(name: str) -> str | None:
    """Why an archive member name would leave the extraction folder, or None if it stays inside."""
    if not name or "\x00" in name:
        return "has an empty or invalid name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "leaves the extraction folder ('..' in its path)"
    return None


def check_tar_member(member: tarfile.TarInfo) -> None:
    problem = member_problem(member.name)
    if problem:
        raise UnsafeMember(member.name, problem)
    if member.issym():
        raise UnsafeMember(member.name, f"is a symbolic link (to '{member.linkname}')")
    if member.islnk():
        raise UnsafeMember(member.name, f"is a hard link (to '{member.linkname}')")
    if not (member.isfile() or member.isdir()):
        raise UnsafeMember(member.name, "is a device, FIFO or other special file")


def check_zip_member(info: zipfile.ZipInfo) -> None:
    problem = member_problem(info.filename)
    if problem:
        raise UnsafeMember(info.filename, problem)
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no file type
    if kind == stat.S_IFLNK:
        raise UnsafeMember(info.filename, "is a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeMember(info.filename, "is a device, FIFO or other special file")


def extract_tar(archive: Path, into: Path) -> None:
    """Extract a tar archive (any compression) after checking every member."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            check_tar_member(member)
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.10.12 / 3.11.4: the standard library's own guard
            tar.extractall(into, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; every member was checked above
            tar.extractall(into, members=members)


def extract_zip(archive: Path, into: Path) -> None:
    """Extract a zip archive after checking every member."""
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        for info in infos:
            check_zip_member(info)
        root = into.resolve()
        for info in infos:
            destination = (into / info.filename).resolve()
            if destination != root and root not in destination.parents:  # second guard
                raise UnsafeMember(info.filename, "leaves the extraction folder")
            bundle.extract(info, into)


def unpack(archive: Path, into: Path) -> None:
    """Extract ``archive`` into ``into``: zip or tar by content, anything else (a single compressed
    file) by torchvision's decompressor, which writes one file named after the archive."""
    if zipfile.is_zipfile(archive):
        extract_zip(archive, into)
    elif tarfile.is_tarfile(archive):
        extract_tar(archive, into)
    else:
        from torchvision.datasets.utils import extract_archive

        extract_archive(str(archive), str(into))


def extract(archive: Path, into: Path, key: str) -> None:
    """Extract ``archive`` (zip or tar, any compression) into ``into``.

    The archive is unpacked into a temporary folder inside ``into`` and then merged into place
    (:func:`merge_into`), so a killed extraction leaves nothing that looks like extracted data. An
    archive with an unsafe member (see the module docstring) is refused before anything is written.
    """
    try:
        into.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=into, prefix=f".extract-{archive.name}-"))
    except OSError as error:
        raise DataSourceError(f"{key}.root: cannot create a folder in {into} ({one_line(error)})") from error
    try:
        unpack(archive, staging)
        for entry in sorted(staging.iterdir()):
            merge_into(entry, into / entry.name)
    except UnsafeMember as error:
        raise DataSourceError(f"{key}.root: refusing to extract {archive}: {error}") from None
    except (tarfile.FilterError if hasattr(tarfile, "FilterError") else UnsafeMember) as error:
        raise DataSourceError(f"{key}.root: refusing to extract {archive}: {one_line(error)}") from None
    except EXTRACT_ERRORS as error:
        raise DataSourceError(f"{key}.root: cannot extract {archive} into {into} ({one_line(error)})") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
