"""Dataset download: checksums, archives, offline failure, nothing half-written."""

import hashlib
import io
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest

from sidpipe.download import fetch_dataset
from sidpipe.io import SidpipeError, read_csv


def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path):
    """A local copy laid out like the DreamBooth repository archive."""
    path = tmp_path / "dreambooth-main.zip"
    digest = _zip(
        path,
        {
            "dreambooth-abc/dataset/cat/00.jpg": b"cat0",
            "dreambooth-abc/dataset/cat/01.jpg": b"cat1",
            "dreambooth-abc/README.md": b"readme",
        },
    )
    return path, digest


def test_zip_is_verified_stripped_and_listed(tmp_path, archive):
    path, digest = archive
    dest, manifest = (
        tmp_path / "resources/dreambooth",
        tmp_path / "resources/dreambooth.manifest.csv",
    )
    entry = {"url": path.as_uri(), "sha256": digest, "extract": True, "strip_components": 1}
    rows = fetch_dataset("dreambooth", [entry], dest, manifest)
    assert (dest / "dataset/cat/01.jpg").read_bytes() == b"cat1"
    assert [r["path"] for r in read_csv(manifest)] == [
        "README.md",
        "dataset/cat/00.jpg",
        "dataset/cat/01.jpg",
    ]
    assert rows[1]["sha256"] == hashlib.sha256(b"cat0").hexdigest()


def test_single_files_and_unpinned_checksum_is_logged(tmp_path, caplog):
    entries = []
    for stem, data in (("1", b"toy"), ("2", b"toy2")):
        source = tmp_path / f"{stem}.jpeg"
        source.write_bytes(data)
        entries.append({"url": source.as_uri(), "sha256": None, "path": f"cat_toy/{stem}.jpeg"})
    with caplog.at_level("WARNING"):
        fetch_dataset("ti", entries, tmp_path / "out", tmp_path / "out.csv")
    assert (tmp_path / "out/cat_toy/1.jpeg").read_bytes() == b"toy"
    # Every file's pinning hint names the dataset's own field, the second file's too.
    for index, data in enumerate((b"toy", b"toy2")):
        digest = hashlib.sha256(data).hexdigest()
        assert f"{digest}; pin it in the config as datasets.ti.downloads[{index}].sha256" in (
            caplog.text
        )
    assert {row["dataset"] for row in read_csv(tmp_path / "out.csv")} == {"ti"}


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path, archive):
    path, _ = archive
    dest = tmp_path / "resources/dreambooth"
    entry = {"url": path.as_uri(), "sha256": "0" * 64, "extract": True}
    with pytest.raises(
        SidpipeError, match=r"checksum mismatch .*datasets\.dreambooth\.downloads\[0\]"
    ):
        fetch_dataset("dreambooth", [entry], dest, tmp_path / "m.csv")
    assert not dest.exists() and not (tmp_path / "m.csv").exists()
    assert list((tmp_path / "resources").iterdir()) == []


def test_offline_fails_with_a_clear_message(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused, as offline
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = {"url": f"http://127.0.0.1:{port}/data.zip", "sha256": None, "extract": True}
    with pytest.raises(SidpipeError, match=r"could not download .*offline.*file:///"):
        fetch_dataset("cd", [entry], tmp_path / "cd", tmp_path / "cd.csv", timeout=5)
    assert not (tmp_path / "cd").exists()


def test_archive_escaping_the_folder_is_refused(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("../../etc/owned")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    entry = {"url": path.as_uri(), "sha256": None, "extract": True}
    with pytest.raises(SidpipeError, match="outside the dataset folder"):
        fetch_dataset("x", [entry], tmp_path / "x", tmp_path / "x.csv")
    assert not (tmp_path / "x").exists()


def test_not_an_archive(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html>not found</html>")
    entry = {"url": path.as_uri(), "sha256": None, "extract": True}
    with pytest.raises(SidpipeError, match="neither a zip nor a tar"):
        fetch_dataset("x", [entry], tmp_path / "x", tmp_path / "x.csv")


def test_a_presigned_urls_token_reaches_no_log_and_no_manifest(tmp_path, caplog):
    """A presigned download (`?X-Amz-Signature=...`) is a secret in the config's URL: the logs,
    errors and the manifest show the address without it."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "served"
    served.mkdir()
    (served / "toy.bin").write_bytes(b"toy")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        # no `path`: the file takes the URL's own name, which must not carry the token
        entry = {"url": f"{base}/toy.bin?X-Amz-Signature=SECRET123", "sha256": None}
        with caplog.at_level("INFO"):
            fetch_dataset("ds", [entry], tmp_path / "out", tmp_path / "out.csv")
        missing = {"url": f"{base}/gone.bin?X-Amz-Signature=SECRET123", "sha256": None}
        with pytest.raises(SidpipeError) as err:
            fetch_dataset("ds", [missing], tmp_path / "gone", tmp_path / "gone.csv")
    finally:
        server.shutdown()
    assert (tmp_path / "out/toy.bin").read_bytes() == b"toy"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["toy.bin"]
    row = read_csv(tmp_path / "out.csv")[0]
    assert row["path"] == "toy.bin" and row["source_url"] == f"{base}/toy.bin?***"
    assert f"{base}/toy.bin?***" in caplog.text and "SECRET123" not in caplog.text
    assert f"{base}/gone.bin?***" in str(err.value) and "SECRET123" not in str(err.value)
