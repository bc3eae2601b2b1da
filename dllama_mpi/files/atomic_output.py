"""Temporaries beside a target: how a writer names and marks its own, and which may be removed.

Every file this program writes (a model file, a shard directory, saved logits) is written
first to `.<name>.tmp-<host>-<pid>-<tag>` beside its target (the tag random: two containers
of one hostname may run a writer of the same pid) and renamed over it when complete, so
an interrupted write never leaves a half-written target. A writer killed with SIGKILL
can't clean up, so the next write of the same target removes its leftover: but only that.

A name proves nothing (a user may have a file of that name; a node sharing the filesystem,
or another pid namespace, may run a writer with the same pid), so each temporary carries
its writer's record inside, written before anything else: an HDF5 file the attribute
MARKER, a directory a file MARKER. The record names the host, the pid, the process's start
time (so a reused pid is not taken for the writer), the boot and the pid namespace (whose
pids this host's /proc can vouch for). A temporary is removed only when its name and its
record agree, the record is this host's, this boot's and this pid namespace's, and its
writer is gone: no such process, or one that started at another time. Anything else (a
user's file, another node's or container's temporary, one whose record can't be read) is
left alone. The record is taken out before the rename, so a finished file carries none.

What stands at the target is replaced only with --force, and only if this program wrote it
(check_target, with the writer's own test of that: an Owner); install checks again just
before the rename, and a target that changed even then is refused, not replaced.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..errors import InputError
from .attributes import attribute_text

MARKER = "dllama_mpi_temporary"  # the HDF5 attribute, or the file inside a directory, holding the record


class Writer(NamedTuple):
    """The process that writes a temporary, as its record says: `host:pid:start:boot:pidns`."""

    host: str
    pid: int
    start: int  # the process's start time, in clock ticks after boot (field 22 of /proc/<pid>/stat)
    boot: str  # /proc/sys/kernel/random/boot_id
    pid_ns: str  # the inode of /proc/<pid>/ns/pid: pids mean something only within one namespace

    def __str__(self) -> str:
        return ":".join(map(str, self))

    @classmethod
    def parse(cls, record: str) -> Writer | None:
        parts = record.strip().split(":")
        if len(parts) != 5 or not (parts[1].isdigit() and parts[2].isdigit()):
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]), parts[3], parts[4])

    def is_gone(self) -> bool:
        """Whether this writer, seen from this host, boot and pid namespace, no longer runs.
        False (keep) wherever that can't be told from here."""
        here = this_writer()
        if (self.host, self.boot, self.pid_ns) != (here.host, here.boot, here.pid_ns):
            return False
        return _start_time(self.pid) != self.start  # None (no such process) differs too


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces and ')'


def this_writer() -> Writer:
    pid = os.getpid()
    return Writer(socket.gethostname(), pid, _start_time(pid), Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                  os.readlink("/proc/self/ns/pid").strip("pid:[]"))


def temporary_name(target: Path, writer: Writer, tag: str) -> str:
    return f".{target.name}.tmp-{writer.host}-{writer.pid}-{tag}"


def aside_path(target: Path) -> Path:
    """Where what stands at `target` waits while its replacement takes the name, until it is
    removed: `.<name>.replaced-<host>-<pid>-<tag>`, this writer's alone. Not a temporary's name:
    no later write removes it (it is what the user had)."""
    writer = this_writer()
    return target.with_name(f".{target.name}.replaced-{writer.host}-{writer.pid}-{secrets.token_hex(4)}")


def _name_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")


class Temporary:
    """This process's write of `target`, in progress at `path` (a file or a directory).

    create_file / create_directory make it, marked; unmark takes the record out just before
    the rename over `target`; discard removes it if the write did not finish."""

    def __init__(self, target: Path):
        self.target = target
        self.writer = this_writer()
        self.path = target.with_name(temporary_name(target, self.writer, secrets.token_hex(4)))
        self.created = False

    def create_file(self, **h5py_options):
        """The temporary as a new HDF5 file, open for writing, its record written and flushed first."""
        import h5py

        try:
            f = h5py.File(self.path, "x", **h5py_options)  # "x": never truncate a file that stands there
        except FileExistsError:
            raise self._in_the_way() from None
        self.created = True
        f.attrs[MARKER] = str(self.writer)
        f.flush()
        return f

    def create_directory(self) -> None:
        """The temporary as a new directory holding its record, written before anything else."""
        try:
            self.path.mkdir()
        except FileExistsError:
            raise self._in_the_way() from None
        self.created = True
        (self.path / MARKER).write_text(f"{self.writer}\n")

    def unmark(self, hdf5_file=None) -> None:
        """Take the record out (from `hdf5_file`, still open, or the directory): the write is
        complete and about to be renamed over the target."""
        if hdf5_file is not None:
            del hdf5_file.attrs[MARKER]
        else:
            (self.path / MARKER).unlink()

    def discard(self) -> None:
        """Remove the temporary, if this process made it and it is still there."""
        if not self.created:
            return  # whatever stands at the name is not ours
        try:
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            else:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass  # it stays, still marked (or renamed already): a later write of the target removes it

    def _in_the_way(self) -> InputError:
        return InputError(f"can't write {self.target}: {self.path} is in the way, a file this program did not "
                          "write (or can't tell it wrote); move it away or write elsewhere")


def remove_stale(target: Path, entries: re.Pattern | None = None) -> list[Path]:
    """Remove the temporaries of earlier writes of `target` whose writer is gone (see the
    module's docstring for when that is known). A directory is removed only if it holds
    nothing but its record and plain files whose names match `entries`. Returns what was
    removed."""
    removed = []
    pattern = _name_pattern(target)
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        named = pattern.fullmatch(path.name)
        if named is None or path.is_symlink():
            continue
        writer = _record_of(path, entries)
        if (writer is None or (writer.host, writer.pid) != (named["host"], int(named["pid"]))
                or not writer.is_gone()):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:  # removed first by another writer of the target, or it can't be (read-only): the write
            continue  # that follows says so, if it can't write either
        removed.append(path)
    return removed


def _record_of(path: Path, entries: re.Pattern | None) -> Writer | None:
    """The writer's record inside the temporary at `path`, or None where there is none to trust."""
    if path.is_dir():
        inside = list(path.iterdir())
        if any(p.is_symlink() or not p.is_file() or (p.name != MARKER and not (entries and entries.fullmatch(p.name)))
               for p in inside):
            return None  # something not ours is inside
        try:
            return Writer.parse((path / MARKER).read_text())
        except (OSError, UnicodeDecodeError):
            return None
    import h5py

    if not path.is_file() or not h5py.is_hdf5(path):
        return None
    try:
        with h5py.File(path, "r") as f:  # fails while a writer holds it open (HDF5's file lock): kept
            record = attribute_text(f.attrs.get(MARKER))
    except Exception:  # HDF5 that can't be read: not one to judge
        return None
    return None if record is None else Writer.parse(record)


def is_hdf5_of(path: Path, format_name: str) -> bool:
    """Whether `path` is a plain HDF5 file whose `format` attribute is `format_name`: a file of
    that kind this program wrote (what --force may replace)."""
    import h5py

    if path.is_symlink() or not path.is_file() or not h5py.is_hdf5(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return attribute_text(f.attrs.get("format")) == format_name
    except Exception:  # HDF5 that can't be read (truncated, damaged): not one to replace either
        return False


class Owner(NamedTuple):
    """A writer, as check_target and install see it: how its messages name its target, and its
    own test of whether what stands there is one it wrote."""

    label: str  # names the target in messages: "output", "--save-logits"
    only: str  # what --force replaces, as messages say it: "--force replaces only what the converter wrote"
    foreign: Callable[[Path], str | None]  # why what stands at the target (not a link) is not this writer's, or None
    race: str  # after the target's path: that it changed under the final rename, and what to do
    error: type[InputError] = InputError  # what its refusals are raised as
    replaced: str = "files"  # what a directory it replaces held, in messages: "shards"


def check_target(path: Path, force: bool, owner: Owner, directory: bool = False) -> None:
    """Whether a write may put its result at `path`: its directory exists, and whatever stands
    there is replaced only with `force` and only if `owner` wrote it. A write of a `directory`
    takes an empty one without `force` (nothing there to lose). owner.error says what stands
    in the way."""
    parent = path.parent
    if not parent.is_dir():
        missing = parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        if missing.exists():
            raise owner.error(f"can't write {path}: {missing} is a file, not a directory; write elsewhere")
        raise owner.error(f"can't write {path}: {missing} does not exist; create the directory first "
                          f"(mkdir -p {parent}) or write elsewhere")
    if not path.exists() and not path.is_symlink():
        return
    if directory and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if path.is_symlink():
        raise owner.error(f"{owner.label} {path} is a symbolic link; {owner.only}: remove the link or choose another name")
    if problem := owner.foreign(path):
        raise owner.error(problem)
    if not force:
        raise owner.error(f"{owner.label} {path} exists; pass --force to overwrite it")


def install(tmp: Path, path: Path, owner: Owner) -> None:
    """Move a finished write (`tmp`, a file or a directory) to `path`, checked again first:
    something may have been put there meanwhile (by hand, or another write of the same
    target). A file replaces what stands there atomically. A directory replacing a directory
    first moves it aside, takes its name, and only then are the old files removed one by one
    and the old directory with rmdir: a failure at any step leaves one complete set at
    `path`, and nothing else is ever deleted."""
    check_target(path, True, owner, directory=tmp.is_dir())
    if not (tmp.is_dir() and path.is_dir()):
        with _raced(path, owner):
            os.replace(tmp, path)
        return
    old = aside_path(path)
    with _raced(path, owner):
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    try:
        for entry in old.iterdir():
            entry.unlink()
        old.rmdir()
    except OSError as exc:
        raise owner.error(f"wrote {path}; the {owner.replaced} it replaced were moved to {old} but can't be removed "
                          f"({exc.strerror or exc}): remove {old} yourself") from None


@contextlib.contextmanager
def _raced(path: Path, owner: Owner):
    """A rename that found `path` changed since install checked it (another write of the same
    target got there first) as owner.error: nothing was replaced."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
        raise owner.error(f"{path} {owner.race}") from None
