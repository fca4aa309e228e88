"""A folder of images as input: one row per image, ``{"id": <path>, "image": [<path>]}``.

The walk is recursive and sorted by relative path (with forward slashes), so the rows and their
indices, which the run journal resumes by, are the same on every run and platform. It streams:
one folder's sorted listing is held at a time per level, never a row per image. Hidden files
and folders (names starting with ".") are skipped, and so are symlinks that lead out of the
folder, since the image reader would refuse them anyway; symlinks inside it are followed, once
(a link to a folder above itself is not walked again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from capflow.errors import ConfigError
from capflow.rows import Row

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_SHOWN_SUFFIXES = ", ".join(sorted(IMAGE_SUFFIXES))


@dataclass(frozen=True)
class FolderScan:
    """What one full walk found: how many images, and a digest of their relative paths."""

    count: int
    digest: str


class ImageFolder:
    """The images under ``path``.

    :param path: the folder, as the user named it (for messages); it is walked through its
        real path, which is also the image root that row paths are relative to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.root = os.path.realpath(path)
        self.skipped_links = 0  # symlinks out of the folder passed over by the last walk

    def paths(self) -> Iterator[str]:
        """Every image's path relative to the folder, with "/" between parts, sorted.

        :raises ConfigError: a folder in it cannot be listed.
        """
        self.skipped_links = 0
        # One iterator per folder level being walked, with the folder's relative prefix.
        stack: list[tuple[Iterator[tuple[str, str, str]], str]] = [
            (iter(self._listing(self.root)), "")
        ]
        ancestors = [self.root]  # real paths of the folders on the stack (no link loops)
        while stack:
            entries, prefix = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                ancestors.pop()
                continue
            _, name, real = entry
            rel = prefix + name
            if real:  # a folder: walk it now, so that paths come out in sorted order
                if real in ancestors:
                    continue  # a link to a folder we are inside: it would never end
                stack.append((iter(self._listing(real)), rel + "/"))
                ancestors.append(real)
            else:
                yield rel

    def scan(self) -> FolderScan:
        """Walk the whole folder once: the number of images and a digest of their paths,
        which changes whenever an image is added, removed or renamed.

        :raises ConfigError: there is no image in it, or a folder in it cannot be listed.
        """
        digest = hashlib.sha256()
        count = 0
        for rel in self.paths():
            digest.update(rel.encode("utf-8", "surrogateescape") + b"\0")
            count += 1
        if self.skipped_links:
            links = "1 symlink leads" if self.skipped_links == 1 else (
                f"{self.skipped_links} symlinks lead")
            log.warning("%s: %s out of the folder: skipped", self.path, links)
        if not count:
            raise ConfigError(f"input folder {self.path} has no images ({_SHOWN_SUFFIXES};"
                              " hidden files and folders are skipped)")
        return FolderScan(count, digest.hexdigest())

    def rows(self) -> Iterator[Row]:
        """One row per image, in sorted order."""
        for index, rel in enumerate(self.paths()):
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                # A name in another encoding cannot be written to the output as it is.
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield Row(index, {"_raw": shown}, None, error=(
                    f"{self.path}/{shown}: the file name is not valid UTF-8; rename the file"))
                continue
            data = {"id": rel, "image": [rel]}
            yield Row(index, data, json.dumps(data, ensure_ascii=False))

    def _listing(self, folder: str) -> list[tuple[str, str, str]]:
        """The images and folders directly in ``folder``, as (sort key, name, real path of a
        folder or "" for an image), sorted so that walking them in order sorts the paths."""
        found = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    real = self._kind(entry)
                    if real is None:
                        continue
                    # "name/" for a folder: "a.png" then sorts before "a/b.png", as in a sort
                    # of whole paths ('.' < '/').
                    found.append((entry.name + "/" if real else entry.name, entry.name, real))
        except OSError as exc:
            where = folder if folder == self.root else os.path.relpath(folder, self.root)
            raise ConfigError(f"cannot list the folder {where} of the input {self.path}:"
                              f" {exc.strerror}; make it readable or move it out") from None
        found.sort()
        return found

    def _kind(self, entry: os.DirEntry[str]) -> str | None:
        """The real path of a folder to walk, "" for an image, None for anything else."""
        try:
            if entry.is_symlink():
                return self._link_kind(entry)
            if entry.is_dir(follow_symlinks=False):
                return entry.path  # its folder is walked by its real path: this is real too
            if entry.is_file(follow_symlinks=False) and _is_image_name(entry.name):
                return ""
        except OSError:
            pass  # gone since the listing, or unreadable: not an image we could send
        return None

    def _link_kind(self, entry: os.DirEntry[str]) -> str | None:
        real = os.path.realpath(entry.path)
        if real != self.root and not real.startswith(self.root.rstrip(os.sep) + os.sep):
            self.skipped_links += 1
            return None
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            return real
        if stat.S_ISREG(st.st_mode) and _is_image_name(entry.name):
            return ""
        return None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
