"""sidpipe.io: atomic outputs (permissions, replacement, cleanup) and YAML errors."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from sidpipe import attention, class_images, masks
from sidpipe.descriptions.cache import write_cache
from sidpipe.io import (
    SidpipeError,
    atomic_dir,
    atomic_file,
    current_umask,
    looks_local,
    read_yaml,
    write_csv,
)
from sidpipe.references import prepare_references


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_outputs_take_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) files and folders; a lab mate in the same group
    must be able to read the results, as with any file the user writes."""
    with atomic_file(tmp_path / "a.txt") as handle:
        handle.write("x")
    write_csv(tmp_path / "t.csv", [{"a": 1}], ["a"])
    write_cache(tmp_path / "cache", "k", {"response": {"text": "a [V] mug"}})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("y")
    for name in ("a.txt", "t.csv", "cache/k.json"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "folder") == 0o777 & ~umask
    assert mode(tmp_path / "folder" / "inside.txt") == 0o666 & ~umask


def test_atomic_dir_gives_private_files_inside_the_umask_mode(tmp_path: Path, umask: int) -> None:
    """Libraries write private files (safetensors saves 0600): weights a lab mate in the group
    cannot read. Everything the folder holds takes the umask's mode; an executable stays one,
    and a link's target is not touched."""
    import torch
    from safetensors.torch import save_file

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    with atomic_dir(tmp_path / "weights") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "unet").mkdir(mode=0o700)
        fd = os.open(tmp / "unet" / "config.json", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        fd = os.open(tmp / "run.sh", os.O_WRONLY | os.O_CREAT, 0o700)
        os.close(fd)
        (tmp / "link").symlink_to(outside)
    out = tmp_path / "weights"
    assert mode(out / "model.safetensors") == 0o666 & ~umask
    assert mode(out / "unet") == 0o777 & ~umask
    assert mode(out / "unet" / "config.json") == 0o666 & ~umask
    assert mode(out / "run.sh") == 0o777 & ~umask
    assert mode(outside) == 0o600


def test_stage_outputs_are_readable_by_the_group(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        src = tmp_path / "src"
        src.mkdir()
        for n, color in enumerate([(255, 0, 0), (0, 0, 255)]):
            Image.new("RGB", (70, 70), color).save(src / f"{n}.png")
        out = tmp_path / "results" / "references" / "dog"
        prepare_references(src, out, subject="dog", resolution=64, min_images=2)
    finally:
        os.umask(old)
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "0.png": 0o644,
        "1.png": 0o644,
        "manifest.csv": 0o644,
    }


def test_atomic_dir_replaces_a_previous_file_or_folder_whole(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    (tmp_path / "file").write_text("a file where the folder goes")
    with atomic_dir(tmp_path / "file") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "file" / "x").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_failed_atomic_dir_keeps_the_previous_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_atomic_dir_keeps_the_setgid_bit_of_a_shared_folder(tmp_path: Path) -> None:
    """In a setgid project folder new folders inherit the bit (and so the group); resetting
    the mode to the umask's must not drop it."""
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o2775)
    if not parent.stat().st_mode & stat.S_ISGID:
        pytest.skip(f"the filesystem of {tmp_path} does not keep a setgid bit on folders")
    with atomic_dir(parent / "out") as tmp:
        (tmp / "x").write_text("x")
    assert (parent / "out").stat().st_mode & stat.S_ISGID


def test_class_images_take_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        class_images._save_png(Image.new("RGB", (8, 8)), tmp_path / "0000.png", {"k": "v"})
    finally:
        os.umask(old)
    assert mode(tmp_path / "0000.png") == 0o644
    with Image.open(tmp_path / "0000.png") as img:
        assert img.text == {"k": "v"}
    assert [p.name for p in tmp_path.iterdir()] == ["0000.png"]


@pytest.mark.parametrize("module", [masks, attention])
def test_failed_overlay_grid_leaves_no_partial_file(tmp_path: Path, monkeypatch, module) -> None:
    """A job killed or failing while it saves the report figure must not leave half a PNG."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    row = {
        "overlay_path": "a.png",
        "image_path": "a.png",
        "image_id": "a",
        "mask_fraction": "0.5",
        "attention_mass_in_mask": "0.5",
        "prompt_id": "0",
        "seed": "0",
        "flag": "",
    }
    module.write_overlay_grid(tmp_path, [row], tmp_path / "report" / "overlays.png")
    assert (tmp_path / "report" / "overlays.png").is_file()

    def half_save(self, fp, *args, **kwargs) -> None:
        if isinstance(fp, (str, os.PathLike)):
            Path(fp).write_bytes(b"\x89PNG half")
        else:
            fp.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(OSError, match="No space"):
        module.write_overlay_grid(tmp_path, [row], tmp_path / "new" / "overlays.png")
    assert list((tmp_path / "new").iterdir()) == []


def test_read_yaml_accepts_a_byte_order_mark_and_names_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfa: 1\n")
    assert read_yaml(path) == {"a": 1}
    path.write_text("a: 1\nb: [2\n")
    with pytest.raises(SidpipeError, match=r"c\.yaml, line 3, column 1: the x file is not valid"):
        read_yaml(path, "x file")
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(SidpipeError, match="not UTF-8"):
        read_yaml(path)
    with pytest.raises(SidpipeError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_read_yaml_refuses_a_key_written_twice(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys silently (a pasted prompt list, a description)."""
    path = tmp_path / "p.yaml"
    path.write_text("object:\n  - a {}\nlive:\n  - b {}\nobject:\n  - c {}\n")
    with pytest.raises(SidpipeError) as err:
        read_yaml(path, "prompts file")
    assert str(err.value).startswith(f"{path}, line 5, column 1: 'object' is written twice")
    assert "mapping of the prompts file (first at line 1)" in str(err.value)
    # nested mappings too; the same key in two mappings, and a merge's override, are fine
    path.write_text('"01":\n  case1: a\n  case1: b\n')
    with pytest.raises(SidpipeError, match="line 3, column 3: 'case1' is written twice"):
        read_yaml(path)
    path.write_text("a:\n  <<: {b: 1, b: 2}\n")  # a merge's source is checked too
    with pytest.raises(SidpipeError, match="line 2, column 14: 'b' is written twice"):
        read_yaml(path)
    path.write_text("top: {<<: &m {<<: {x: 1}, x: 2}, y: 3}\nother: *m\n")  # merged, then reused
    assert read_yaml(path) == {"top": {"x": 2, "y": 3}, "other": {"x": 2}}
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nthird: {x: 4}\n")
    assert read_yaml(path) == {
        "base": {"x": 1, "y": 2},
        "other": {"x": 3, "y": 2},
        "third": {"x": 4},
    }


def test_read_yaml_refuses_leading_zeros_where_asked(tmp_path: Path) -> None:
    """YAML 1.1 reads 03 as 3 and 010 as 8 (but 08 as text): in a config `references: 03`
    would train on the first three images, not image 03."""
    path = tmp_path / "c.yaml"
    path.write_text("experiments:\n  single:\n    - references: 03\n")
    assert read_yaml(path) == {"experiments": {"single": [{"references": 3}]}}
    with pytest.raises(SidpipeError) as err:
        read_yaml(path, "config file", refuse_leading_zeros=True)
    assert str(err.value) == (
        f"{path}, line 3, column 19: 03 has a leading zero, which YAML reads as the number 3; "
        "quote it ('03') for a name or an image id, or drop the zero for a number"
    )
    path.write_text("a: '03'\nb: 0\nc: 30\nd: -0\ne: 0.5\n")
    assert read_yaml(path, refuse_leading_zeros=True) == {
        "a": "03",
        "b": 0,
        "c": 30,
        "d": 0,
        "e": 0.5,
    }
    with pytest.raises(SidpipeError, match="cannot be read .*; name a file"):
        read_yaml(tmp_path, "prompts file")


def test_looks_local_tells_hub_ids_from_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for hub_id in ("openai/clip-vit-base-patch32", "bert-base-uncased"):
        assert not looks_local(hub_id)
    for folder in ("/models/sd", "./sd", "~/sd", "results/world/models/clip"):
        assert looks_local(folder)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a folder shaped like a hub id
    assert looks_local("org/name")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1"),
        ("https://user:pa55@host.example:8443/v1", "https://***@host.example:8443/v1"),
        (
            "https://b.s3.amazonaws.com/x.zip?X-Amz-Signature=abc#f",
            "https://b.s3.amazonaws.com/x.zip?***",
        ),
        ("file:///data/copy.zip", "file:///data/copy.zip"),
    ],
)
def test_redact_url_hides_credentials_and_query_tokens(url, shown):
    from sidpipe.io import redact_url

    assert redact_url(url) == shown


JOB = """
import sys
from sidpipe.io import SidpipeError, job_log
error = {"user": SidpipeError("refs/02.png: truncated; re-export it"), "bug": KeyError("k")}
with job_log(sys.argv[1]):
    if sys.argv[2] == "interrupt":
        raise KeyboardInterrupt
    if sys.argv[2] == "wrapped":
        try:
            {}["weights"]
        except KeyError as err:
            raise SidpipeError("cannot load the model from m; fix m") from err
    raise error[sys.argv[2]]
"""


@pytest.mark.parametrize("kind", ["user", "wrapped", "bug", "interrupt"])
def test_a_failing_job_says_why_in_its_log(tmp_path: Path, kind: str) -> None:
    """A user's error (SidpipeError) ends the job with its message as one line, no traceback
    to bury it (a library error it wraps keeps that one's); a bug keeps its traceback; a
    Ctrl-C is named in the log too."""
    import subprocess
    import sys

    log_file = tmp_path / "job.log"
    result = subprocess.run(
        [sys.executable, "-c", JOB, str(log_file), kind], capture_output=True, text=True
    )
    text = log_file.read_text()
    assert result.returncode != 0
    if kind == "user":
        assert result.returncode == 1 and not result.stderr
        assert "ERROR sidpipe: job failed: refs/02.png: truncated; re-export it" in text
        assert "Traceback" not in text
    elif kind == "wrapped":  # a library error behind the user's line keeps its traceback
        assert result.returncode == 1 and not result.stderr
        assert "ERROR sidpipe: job failed: cannot load the model from m; fix m\n" in text
        assert "Traceback" in text and "KeyError: 'weights'" in text
    elif kind == "bug":
        assert "job failed" in text and "Traceback" in text and "KeyError: 'k'" in text
    else:
        assert "ERROR sidpipe: job interrupted (SIGINT, e.g. Ctrl-C)" in text


def test_a_path_under_an_existing_folder_is_local_not_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "world").mkdir()
    assert looks_local("world/sdx", tmp_path)  # a typo of world/sd
    assert not looks_local("openai/clip-vit-base-patch32", tmp_path)
    assert not looks_local("gpt2", tmp_path)
    assert looks_local("./sd", tmp_path) and looks_local("a/b/c", tmp_path)
