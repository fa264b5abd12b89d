"""Fetch the paper's public subject datasets into `resources/`, verifying checksums."""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from sidpipe.io import SidpipeError, atomic_dir, log, redact_url, sha256_file, write_csv

MANIFEST_FIELDS = ["dataset", "path", "sha256", "size", "source_url"]


def _download(url: str, target: Path, timeout: float) -> None:
    """Stream `url` (http(s) or file://) to `target` with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            desc = redact_url(url)
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SidpipeError(
            f"could not download {redact_url(url)}: {reason}. This machine may be offline or the "
            "address may have moved. Fix: run the download where the internet is reachable, or put "
            "a copy somewhere local and point the entry's `url` in the config to it "
            "(file:///path/to/copy)."
        ) from err


def _strip(name: str, components: int) -> PurePosixPath | None:
    """Member path with leading folders removed; None when nothing is left; refuses escapes."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise SidpipeError(f"archive member {name!r} would be written outside the dataset folder")
    parts = path.parts[components:]
    return PurePosixPath(*parts) if parts else None


def _extract(archive: Path, dest: Path, strip_components: int, url: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in tqdm(zf.infolist(), desc="extract", file=sys.stderr):
                rel = _strip(info.filename, strip_components)
                if rel is None or info.is_dir():
                    continue
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tqdm(tf.getmembers(), desc="extract", file=sys.stderr):
                rel = _strip(member.name, strip_components)
                if rel is None or not member.isfile():
                    continue  # links and devices are never needed for image datasets
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        raise SidpipeError(
            f"{redact_url(url)} is marked `extract: true` but is neither a zip nor a tar archive"
        )


def fetch_dataset(
    name: str, downloads: list[dict], dest: Path, manifest: Path, timeout: float = 60.0
) -> list[dict]:
    """Download every entry of dataset `name` into `dest` and write a manifest of its files.

    Each entry: `url`, `sha256` (hex, or None to record it on first use), and either
    `extract: true` (+ `strip_components`) for archives or `path` for single files.
    The folder appears only when everything was downloaded and verified.
    """
    with atomic_dir(dest) as tmp_dest, tempfile.TemporaryDirectory() as scratch:
        for index, entry in enumerate(downloads):
            url = entry["url"]
            field = f"datasets.{name}.downloads[{index}].sha256"
            fetched = Path(scratch) / f"download-{index}"
            _download(url, fetched, timeout)
            digest = sha256_file(fetched)
            expected = entry.get("sha256")
            if expected is None:
                log.warning(
                    "%s has sha256 %s; pin it in the config as %s", redact_url(url), digest, field
                )
            elif digest != expected.lower():
                raise SidpipeError(
                    f"checksum mismatch for {redact_url(url)}: expected {expected}, got {digest} "
                    f"(config field {field}). The file changed upstream or the download is "
                    "corrupt: retry, and update the pinned value only if the new file is trusted."
                )
            if entry.get("extract", False):
                _extract(fetched, tmp_dest, int(entry.get("strip_components", 0)), url)
            else:
                # The URL's own file name, without a query (a presigned token) or %-escapes.
                file_name = PurePosixPath(unquote(urlsplit(url).path)).name
                rel = _strip(entry.get("path") or file_name, 0)
                (tmp_dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(fetched, tmp_dest / rel)
            log.info("fetched %s (sha256 %s)", redact_url(url), digest)
        rows = [
            {
                "dataset": name,
                "path": str(path.relative_to(tmp_dest)),
                "sha256": sha256_file(path),
                "size": path.stat().st_size,
                "source_url": ";".join(redact_url(e["url"]) for e in downloads),
            }
            for path in sorted(p for p in tmp_dest.rglob("*") if p.is_file())
        ]
    write_csv(manifest, rows, MANIFEST_FIELDS)
    return rows
