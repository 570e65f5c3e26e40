"""Where a screen reads and writes: the photos under a folder, and the place its report may go.

:func:`find_photos` walks the folder given, never a system folder and never out of it through a
link, and stops at a set number of photos unless the caller allows more (screening "/" walked the
whole file system through /proc). :func:`check_out` keeps a report out of run folders and system
folders and off files a screen did not write; :func:`report_lock` keeps two screens off one report.
Every refusal is one :class:`ScreenError` line, before a model is loaded or a file written.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import unicodedata
from pathlib import Path

from ..paths import runs_root
from ..data.names import IMAGE_EXTS
from .screen_report import ScreenError, error_row, report_paths

MAX_FILES = 5000  # photos a screen takes without being asked: a clinic's day is hundreds; "/" is millions
# Folders that hold the system, not photographs: screening them walks devices and /proc, and a report
# written there could replace system files. Refused with everything under them; "/" itself too.
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys")
NAME_MAX, PATH_MAX = 255, 4095  # bytes, as Linux file systems allow (limits.h)
_PARTIAL = re.compile(r"\.rank(\d+)-of-(\d+)\.csv")  # a torchrun rank's share (retino.screening.shard)
RUN_FILES = ("config.json", "best.pt", "status.json", "last.pt", "metrics.jsonl")  # a folder holding one is a run


class TooManyPhotos(ScreenError):
    """The folder holds more photos than the caller allowed: ask the user, then screen with a higher limit."""


def default_report(folder, run_dir) -> Path:
    """``<runs>/screens/<folder name>-<hash>/screen-<run id>.csv``: one place a folder's screens resume from.

    Under the runs folder, not beside the photos: the folder screened may be read-only, shared, or a
    place a report must not land. The hash of the folder's full path keeps two folders of one name apart.
    """
    full = os.path.realpath(os.path.expanduser(str(folder)))
    tag = hashlib.sha1(os.fsencode(full)).hexdigest()[:8]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(full).name)[:60].lstrip(".") or "root"
    return runs_root() / "screens" / f"{name}-{tag}" / f"screen-{Path(run_dir).name}.csv"


def short(path) -> str:
    """A path shortened for a one-line message (a 5,000-character path stays one readable line)."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}…{text[-40:]} ({len(text):,} characters)"


def path_problem(path) -> str | None:
    """Why the file system cannot take ``path`` (a name or the whole path too long), or None."""
    long = next((p for p in Path(path).parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long is not None:
        return f"a name in the path is {len(os.fsencode(long)):,} bytes long; at most {NAME_MAX} are allowed"
    if len(os.fsencode(str(path))) > PATH_MAX:
        return f"the path is {len(os.fsencode(str(path))):,} bytes long; at most {PATH_MAX} are allowed"
    return None


def system_folder(path) -> str | None:
    """The system folder ``path`` is (or is under), following links; None for an ordinary folder."""
    real = os.path.realpath(path)
    if real == "/":
        return "/"
    return next((s for s in SYSTEM_FOLDERS if real == s or real.startswith(s + "/")), None)


def check_out(paths: tuple[Path, Path, Path]) -> None:
    """Refuse a report that would land in a run folder or a system folder, or replace a file no screen wrote.

    A resumed report (its ``.csv`` and ``.json`` both there) is checked further by :func:`open_report`.
    """
    photos, patients, meta = paths
    for p in paths:
        why = path_problem(p)
        if why:
            raise ScreenError(f"{short(p)}: cannot be a report file: {why}")
    parent = photos.parent if str(photos.parent) else Path(".")
    system = system_folder(parent)
    if system:
        raise ScreenError(f"{short(photos)}: {system} is a system folder; write the report elsewhere")
    present = [f for f in RUN_FILES if (parent / f).exists()]
    if present:
        raise ScreenError(f"{short(photos)}: {short(parent)} is a run folder (it holds {present[0]}); a report "
                          f"written there could replace the run's files: choose another folder for --out")
    for p in paths:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ScreenError(f"{short(p)}: is {'a link' if p.is_symlink() else 'not a file'}; a report is "
                              f"written only to plain files: choose another report file")
    if not photos.exists():
        foreign = [p.name for p in (patients, meta) if p.exists()]
        if foreign:
            raise ScreenError(f"{short(photos)}: {' and '.join(foreign)} already exist beside it and this screen did "
                              f"not write them; choose another report file")


def lock_path(photos: Path) -> Path:
    """The lock file :func:`report_lock` holds for the photo report ``photos``."""
    return photos.with_name(f".{photos.name}.lock")


@contextlib.contextmanager
def report_lock(paths: tuple[Path, Path, Path]):
    """Hold ``.<name>.csv.lock`` beside the report while screening: a second screen on it is refused.

    Two screens appending to one report would interleave their rows (every photo twice). flock is
    released by the kernel when its holder dies, so a killed screen never locks its report.
    """
    photos = paths[0]
    lock = lock_path(photos)
    try:
        photos.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise ScreenError(f"{short(photos)}: cannot write the report there ({e.strerror or e}); choose another --out")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ScreenError(f"{short(photos)}: is being written by another screen ({holder}); wait for it to "
                              f"finish or choose another report file") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


# ----------------------------------------------------------------------------- a sharded screen's partial reports

def partial_paths(out, rank: int, world: int) -> tuple[Path, Path, Path]:
    """Rank ``rank``'s report files beside ``out`` = ``x.csv``: ``x.rank<r>-of-<N>.csv`` and its two."""
    photos = report_paths(out)[0]
    return report_paths(photos.with_name(f"{photos.name[:-len(photos.suffix)]}.rank{rank}-of-{world}.csv"))


def partial_reports(out) -> dict[int, list[Path]]:
    """The partial photo reports beside ``out``, by the number of ranks that wrote them."""
    photos = report_paths(out)[0]
    stem = photos.name[:-len(photos.suffix)]
    found: dict[int, list[Path]] = {}
    for name in sorted(glob.glob(glob.escape(str(photos.parent / stem)) + ".rank*-of-*.csv")):
        m = _PARTIAL.fullmatch(name[len(str(photos.parent / stem)):])
        if m:
            found.setdefault(int(m.group(2)), []).append(Path(name))
    return found


def refuse_partials(out, world: int) -> None:
    """Refuse a screen over ``world`` processes on a report holding another number of ranks' partials.

    Their rows would be neither resumed nor merged, and a later merge would mix two screens.
    """
    other = {n: files for n, files in partial_reports(out).items() if n != world}
    if other:
        n, files = min(other.items())
        raise ScreenError(f"{short(report_paths(out)[0])}: holds the unmerged partial reports of a screen over {n} "
                          f"processes ({files[0].name}...); finish it with the same number "
                          f"(torchrun --nproc_per_node ... giving {n} ranks in all), or remove them to start again")


# ----------------------------------------------------------------------------- the photos

def _display(text: str) -> tuple[str, str | None]:
    """A name a CSV row can hold, and why the file cannot be screened under its own name (or None)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "the file name is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in text):
        return "".join("?" if unicodedata.category(c) == "Cc" else c for c in text), \
            "the file name holds control characters"
    return text, None


def find_photos(folder, limit: int | None = None) -> tuple[list[tuple[str, str]], list[dict]]:
    """Every JPEG/PNG under ``folder``, recursively, and error rows for what cannot be screened.

    Names starting with "." (hidden files and folders) are skipped. Folders are followed through
    symlinks once: a folder reached a second time (a symlink loop, or two links) is an error row, as
    is a file whose name is not UTF-8 or holds control characters, and a folder that cannot be read.
    A link (file or folder) leading out of ``folder`` is an error row, not followed. A system folder
    (``/``, ``/dev``, ``/etc`` ... or a link to one) is refused, and so is a folder of more than
    ``limit`` photos (:class:`TooManyPhotos`), before the rest is walked.

    Returns:
        ``([(image, path)], [row])``: ``image`` is the path relative to ``folder`` with "/" (the
        report's key), ``path`` the one to open; sorted by ``image``.
    """
    root = Path(folder)
    why = path_problem(root)
    if why:
        raise ScreenError(f"{short(folder)}: cannot be a folder: {why}")
    try:
        is_dir = root.is_dir()
    except OSError as e:
        raise ScreenError(f"{short(folder)}: cannot be read ({e.strerror or e}); expected a folder of photographs")
    if not is_dir:
        raise ScreenError(f"{short(folder)}: {'does not exist' if not os.path.exists(root) else 'is not a folder'}; "
                          f"expected a folder of JPEG or PNG photographs")
    system = system_folder(root)
    if system:
        raise ScreenError(f"{short(folder)}: {system} is a system folder, not a folder of photographs; refused")
    real_root = os.path.realpath(root)
    photos, problems, visited = [], [], {}

    def outside(path: str) -> bool:  # only a link can lead out: links out of the tree are never walked into
        if not os.path.islink(path):
            return False
        real = os.path.realpath(path)
        return real != real_root and not real.startswith(real_root.rstrip("/") + "/")

    def rel(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    def unreadable(e: OSError) -> None:
        problems.append(error_row(_display(rel(e.filename) + "/")[0], f"the folder cannot be read ({e.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = rel(dirpath)
        try:
            st = os.stat(dirpath)
        except OSError as e:
            problems.append(error_row(_display(here + "/")[0], f"the folder cannot be read ({e.strerror})"))
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:
            problems.append(error_row(_display(here + "/")[0], f"the same folder as {visited[st.st_dev, st.st_ino]}/ "
                                                             f"(a symlink loop or a second link): screened once"))
            dirnames[:] = []
            continue
        visited[st.st_dev, st.st_ino] = here
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            if outside(os.path.join(dirpath, d)):  # a link out: the walk stays inside the folder given
                problems.append(error_row(_display(rel(os.path.join(dirpath, d)) + "/")[0],
                                          "a link to a folder outside the folder screened: not followed"))
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                continue
            image, bad = _display(rel(os.path.join(dirpath, name)))
            if not bad and outside(os.path.join(dirpath, name)):
                bad = "a link to a file outside the folder screened: not read"
            if bad:
                problems.append(error_row(image, bad))
            else:
                photos.append((image, os.path.join(dirpath, name)))
            if limit is not None and len(photos) > limit:
                raise TooManyPhotos(f"{short(folder)}: holds more than {limit:,} photos; screen them all only if "
                                    f"that is meant (CLI: --max-files N or --yes)")
    return sorted(photos), problems
