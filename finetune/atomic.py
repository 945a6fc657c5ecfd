"""Safe outputs: check an output path before any work, write under a temporary name, rename into place when complete.

The rules every command follows (docs/architecture.md):
- no command writes over one of its own inputs (`check_output` with `inputs=`);
- an existing output is replaced only when the user says so (`force=True`, the CLI's --force), and an existing
  directory only when it is one this toolkit wrote (it holds the command's marker file): a directory is never
  emptied;
- every write is flushed and fsync'ed before the rename, and the directory entry after it; a failure raises a
  one-line `FinetuneError` naming the file, leaves the previous output intact and removes the temporary;
- outputs get the permissions of a normal file/directory under the user's umask (mkstemp would make them 0600);
- temporary names stay short whatever the output name (a 250-character name must not overflow NAME_MAX).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from finetune.errors import FinetuneError, first_line


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_name(path: Path, kind: str) -> Path:
    # at most ~60 characters whatever the target's name: NAME_MAX is 255 bytes
    stem = path.name.encode()[:32].decode(errors="ignore")
    return path.parent / f".{stem}.{kind}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some filesystems cannot fsync a directory; the data itself was synced
        pass


def write_error(path: Path, e: BaseException) -> FinetuneError:
    """A one-line error for a failed write (full disk, file too large, permissions, ...)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = f"{os.strerror(e.errno)}; the previous output, if any, is unchanged"
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = first_line(e)
    return FinetuneError(f"{path}: cannot write ({reason})")


def _is_write_failure(e: BaseException) -> bool:
    """OS errors, and the RuntimeErrors torch/safetensors raise when a write comes up short."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("write", "space", "file too large", "errno", "unexpected pos"))


def check_output(path: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = (),
                 marker: str | None = None, flag: str = "--force") -> Path:
    """Refuse, before any work, an output that would destroy data: one of the command's own inputs (or a directory
    holding one, or a path inside an input directory), the current directory, an existing file without `force`,
    or an existing directory that is not this toolkit's output (it lacks `marker`) even with `force`. `marker` is
    given for directory outputs: a file (or a link) in their place is refused too. Returns the path."""
    path = Path(path)
    if str(path) in ("", ".", "..") or path.name in ("", ".", ".."):
        raise FinetuneError(f"{path}: not a valid output name (give a file or a new directory name)")
    target = path.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if target == inp or target in inp.parents or (inp.is_dir() and inp in target.parents) or (
                target.exists() and inp.exists() and os.path.samefile(target, inp)):
            raise FinetuneError(f"{path}: is also an input of this command, or inside one ({inp}); choose another "
                                f"output")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise FinetuneError(f"{path}: is the current directory (or holds it); choose a new output name")
    if marker is not None and (path.is_symlink() or (path.exists() and not path.is_dir())):
        raise FinetuneError(f"{path}: exists and is not a directory; this command writes a directory there (choose "
                            f"a new output name)")
    if path.is_symlink() or path.exists():
        if not force:
            raise FinetuneError(f"{path}: exists; pass {flag} to replace it")
        if path.is_dir() and not path.is_symlink():
            if marker is None or not (path / marker).is_file():
                raise FinetuneError(f"{path}: an existing directory that rwkv-lora did not write; it is never "
                                    f"replaced or emptied (choose a new output name)")
    return path


def check_inputs_outside(out_dir: Path, inputs: dict[str, str | None]) -> None:
    """For a command that keeps writing inside out_dir (a training run: config.json, last.ckpt, step-N/, final/):
    none of its inputs may live there, or a save would replace the very file being read (resuming with
    `--model out/final/model.pth`, say). `inputs`: setting name -> path (None or "" for a setting not given)."""
    root = out_dir.resolve()
    for name, value in inputs.items():
        if value and root in Path(value).resolve().parents:
            raise FinetuneError(f"{name}: {value} is inside out_dir {out_dir}, which this run writes; copy it out "
                                f"of there first, or choose another out_dir")


def _finish_file(tmp: Path, mode: int) -> None:
    with open(tmp, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block succeeds it is fsync'ed, given umask permissions and
    renamed onto `path`; on any error it is removed and write failures become a one-line FinetuneError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    tmp = _tmp_name(path, "file")
    try:
        yield str(tmp)
        _finish_file(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(e) and not isinstance(e, FinetuneError):
            raise write_error(path, e) from None
        raise


def _finish_dir(tmp: Path) -> None:
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for name in files:
            f = Path(root) / name
            _fsync_path(f)
            os.chmod(f, 0o666 & ~mask)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    _fsync_dir(tmp)


def replace_dir(src: Path, dest: Path) -> None:
    """Move directory `src` onto `dest`. An existing `dest` is moved aside first and removed only once `src` is in
    place (callers have checked with `check_output` that it is an output of ours)."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):  # check_output refuses these first
        raise FinetuneError(f"{dest}: exists and is not a directory; it is never replaced by one")
    if dest.exists():
        old = _tmp_name(dest, "old")
        os.replace(dest, old)
        try:
            os.replace(src, dest)
        except BaseException:
            os.replace(old, dest)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
    _fsync_dir(dest.parent)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; when the block succeeds its files are fsync'ed and given umask
    permissions and it replaces `path`; on error it is removed and write failures become a one-line
    FinetuneError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path, "dir")
        tmp.mkdir()
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        _finish_dir(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e) and not isinstance(e, FinetuneError):
            raise write_error(path, e) from None
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove temporaries a killed run of ours left in `directory` (names made by `_tmp_name`): only those."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and any(f".{k}-" in p.name for k in
                                                                       ("file", "dir", "old")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
