"""Small I/O helpers shared by every stage: atomic outputs, hashing, manifests, job logs."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("sidpipe")


class SidpipeError(RuntimeError):
    """An error a user can fix; its message names the file, the field and the fix."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def looks_local(model: str, base_dir: str | os.PathLike = ".") -> bool:
    """Hub ids are 'name' or 'org/name'; anything else path-like is meant as a local folder, and
    so is 'a/b' where a folder `a` exists (`world/sdx` is a typo of `world/sd`, not a hub id).
    Relative paths are read from `base_dir`."""
    org = model.split("/")[0]
    return (
        Path(model).is_absolute()
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (Path(base_dir) / model).exists()
        or (model.count("/") == 1 and org != "" and (Path(base_dir) / org).is_dir())
    )


def redact_url(url: str) -> str:
    """`url` as a log or result file may show it: a user:password@ and a query string (a
    presigned download's token) become ***; a URL without either comes back unchanged."""
    parts = urlsplit(url)
    if not (parts.username or parts.password or parts.query):
        return url
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username or parts.password:
        netloc = f"***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def expand_home(model: str) -> str:
    """`model` with a leading `~` expanded: from_pretrained takes `~/models/sd` for a hub id."""
    return str(Path(model).expanduser()) if model.startswith("~") else model


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc),
    else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _cleanup_hint(path: Path, err: OSError) -> str:
    return (
        f"{path} could not be removed ({err.strerror or err}: {err.filename or path}); "
        f"delete it yourself (rm -rf '{path}'; a read-only folder needs chmod -R u+w first, a "
        "file still open on a network filesystem goes once the process holding it exits)"
    )


def _take_the_umask(tree: Path, umask: int) -> None:
    """Give `tree` and everything in it the modes the umask gives. mkdtemp makes the folder
    private, and libraries write private files too (safetensors 0.8 saves 0600 through its own
    temporary file), so a lab mate in the group could not read the weights. A setgid bit on a
    folder stays (in a shared group folder new files then keep the project's group), and so does
    a file's executable bit; links are left alone."""

    def chmod_dir(path: str) -> None:
        os.chmod(path, (0o777 & ~umask) | (os.stat(path).st_mode & stat.S_ISGID))

    chmod_dir(str(tree))
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                chmod_dir(path)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.lstat(path).st_mode & stat.S_IXUSR
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    A failing job therefore leaves no partial output for Snakemake (or a user) to mistake
    for a finished one, and no temporary folder either. A previous `final` is first renamed
    aside, so it is replaced as a whole even if part of it cannot be deleted. The new folder
    and everything in it get the permissions the umask gives (`_take_the_umask`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        _take_the_umask(tmp, current_umask())
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.replace(final, old)  # a rename: the previous output stays whole until replaced
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:
                os.replace(old, final)
            raise
    except BaseException:
        try:
            _remove(tmp)
        except OSError as err:
            log.error("the temporary folder %s", _cleanup_hint(tmp, err))
        raise
    if old is not None:
        try:
            _remove(old)
        except OSError as err:
            # The new output is complete and in place; only the previous one lingers.
            log.warning(
                "%s was replaced, but its previous version, moved aside to %s",
                final,
                _cleanup_hint(old, err),
            )


def remove_incomplete(folder: str | os.PathLike, marker: str) -> None:
    """Remove an output folder that lacks its `marker` file (its manifest).

    Snakemake deletes a job's declared output before a rerun and after a failure; when that is
    a file inside a folder written by `atomic_dir`, the rest of the folder stays behind, neither
    the previous complete output nor a new one. A stage calls this before it starts and when it
    fails, so a failed job leaves the previous complete output or nothing.
    """
    folder = Path(folder)
    if not folder.is_dir() or (folder / marker).is_file():
        return
    log.info("%s has no %s (an incomplete earlier output): removing it", folder, marker)
    try:
        shutil.rmtree(folder)
    except OSError as err:
        raise SidpipeError(
            f"{folder} holds an incomplete earlier output (no {marker}) and "
            f"{_cleanup_hint(folder, err)}; then rerun"
        ) from err


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary sibling file for writing; rename it to `final` on success.

    The final file gets the permissions the umask gives (mkstemp makes it private)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: list[str]) -> None:
    """Write a tidy CSV atomically (header always written, even with no rows)."""
    with atomic_file(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _yaml_loader(path: Path, what: str, refuse_leading_zeros: bool) -> type:
    """yaml.SafeLoader refusing a key written twice in one mapping (YAML keeps the last one
    silently) and, with `refuse_leading_zeros`, a number written with a leading zero (YAML 1.1
    reads 03 as 3 and 010 as 8, but 08 as the text "08")."""
    import yaml

    checked: set[int] = set()

    def where(mark: Any) -> str:
        return f"{path}, line {mark.line + 1}, column {mark.column + 1}"

    class Loader(yaml.SafeLoader):
        def flatten_mapping(self, node: Any) -> None:
            # Every mapping passes here before its merges are spliced in (a merge's source
            # first, from its parent's call): its own keys, as written, are checked once.
            if id(node) not in checked:
                checked.add(id(node))
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                        key_node, yaml.ScalarNode
                    ):
                        continue  # `<<: *anchor` may be overridden: that is what a merge is for
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise SidpipeError(
                            f"{where(key_node.start_mark)}: {key_node.value!r} is written twice "
                            f"in one mapping of the {what} (first at line {seen[key]}); YAML "
                            "would keep only the last one: merge the two or rename one"
                        )
                    seen[key] = key_node.start_mark.line + 1
            super().flatten_mapping(node)

    if refuse_leading_zeros:

        def integer(loader: Loader, node: Any) -> int:
            value = loader.construct_yaml_int(node)
            digits = node.value.lstrip("+-").replace("_", "")
            if len(digits) > 1 and digits.startswith("0") and digits.isdigit():
                raise SidpipeError(
                    f"{where(node.start_mark)}: {node.value} has a leading zero, which YAML "
                    f"reads as the number {value}; quote it ('{node.value}') for a name or an "
                    "image id, or drop the zero for a number"
                )
            return value

        Loader.add_constructor("tag:yaml.org,2002:int", integer)
    return Loader


def read_yaml(
    path: str | os.PathLike, what: str = "YAML file", *, refuse_leading_zeros: bool = False
) -> Any:
    """Parse a YAML file (a UTF-8 byte-order mark is fine); a syntax error names the file, the
    line and the column (1-based), as an editor shows them. A key written twice in one mapping
    is an error; so is a number with a leading zero with `refuse_leading_zeros` (config files:
    `references: 03` would be the count 3, not image 03)."""
    import yaml

    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return yaml.load(handle, Loader=_yaml_loader(path, what, refuse_leading_zeros))
    except FileNotFoundError:
        raise SidpipeError(f"{what} {path} does not exist") from None
    except (IsADirectoryError, PermissionError) as err:
        raise SidpipeError(f"{what} {path} cannot be read ({err.strerror}); name a file") from None
    except UnicodeDecodeError as err:
        raise SidpipeError(
            f"{path}: byte {err.start} is not UTF-8 ({err.reason}); save the {what} as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(
            str(part)
            for part in (getattr(err, "context", None), getattr(err, "problem", None))
            if part
        ) or str(err)
        raise SidpipeError(
            f"{path}{where}: the {what} is not valid YAML ({problem}); fix the syntax there "
            "(indent with spaces, not tabs; quote values that contain ': ' or ' #')"
        ) from None


def read_manifest(
    folder: str | os.PathLike, what: str, stage: str, columns: Iterable[str] = ()
) -> list[dict[str, str]]:
    """An upstream stage's `manifest.csv`, checked to exist, list rows and have `columns`."""
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        raise SidpipeError(f"{path} does not exist; run {stage} for these {what} first")
    rows = read_csv(path)
    if not rows:
        raise SidpipeError(f"{path} lists no {what}; re-run {stage}")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise SidpipeError(f"{path} lacks column(s) {', '.join(missing)}; re-run {stage}")
    return rows


@contextlib.contextmanager
def job_log(path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Send this job's logging, warnings, stderr (tqdm) and stdout to its Snakemake log file.
    A `SidpipeError` ends the job with its message as one ERROR line and exit status 1; any
    other error is logged with its traceback and raised."""
    if path is None:
        yield log
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        old_level = root.level
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = handle
        # Where the job ran: on a cluster this ties the log to the scheduler's job and GPU (and
        # says whether it may ask the hub for models).
        log.info(
            "host=%s SLURM_JOB_ID=%s CUDA_VISIBLE_DEVICES=%s HF_HUB_OFFLINE=%s",
            os.uname().nodename,
            os.environ.get("SLURM_JOB_ID", "-"),
            os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
            os.environ.get("HF_HUB_OFFLINE", "-"),
        )
        try:
            yield log
        except SidpipeError as err:
            # The user's error is one line naming the file, the field and the fix; its own
            # traceback (printed again by show-failed-logs) would only bury it. A library error
            # it wraps keeps its traceback, after that line, for a bug report.
            log.error("job failed: %s", err, exc_info=err.__cause__)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            log.error("job interrupted (SIGINT, e.g. Ctrl-C)")
            raise
        except Exception:
            log.exception("job failed")
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            root.removeHandler(handler)
            root.setLevel(old_level)
