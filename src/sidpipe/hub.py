"""Hub models fetched before the jobs that load them (rule `fetch_model`).

On a cluster the compute nodes often have no internet, and a hundred jobs starting at once
would each download the same weights. So every Hugging Face hub id a run loads is fetched
once, by a local rule on the submitting host, into the Hugging Face cache (`HF_HOME`, which the
nodes must share), and the jobs that load it wait for its record
(`results/models/hub/<org>--<name>.json`: the revision, the files and their size). Jobs on
cluster nodes then load from that cache without asking the hub (`HF_HUB_OFFLINE=1`).

Only what `from_pretrained` reads is fetched: of a diffusers pipeline, `model_index.json` and
the component folders it names (not the single-file checkpoints at its root); safetensors where
a folder has them (not the same weights again as PyTorch pickles); no fp16/EMA variants and no
other frameworks' weights; of a model read only for its tokenizer (BLIP-Diffusion's BERT), only
the tokenizer's files. A file that no rule can fetch (ELITE's mappers) is checked instead
(`check_manual_file`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sidpipe.io import SidpipeError, atomic_file, log, looks_local, sha256_file

HUB_RECORDS = "results/models/hub"
# Other frameworks' weights and single-file checkpoints, which from_pretrained never reads.
_OTHER_FORMATS = re.compile(
    r"(^|/)(flax_model|tf_model|rust_model)[^/]*$"
    r"|\.(msgpack|h5|ot|tflite|onnx|onnx_data|ckpt|gguf)$"
    r"|(^|/)(onnx|coreml|openvino)/"
)
# Precision and EMA variants beside the default weights (`variant=` is never asked for).
_VARIANT = re.compile(r"\.(fp16|bf16|ema|non_ema|non-ema)[.-][^/]*$")
# Parts of a pipeline that sidpipe's loaders never load.
_UNUSED_PIPELINE_PARTS = ("safety_checker/",)
# A config key whose model is loaded only for its tokenizer: its weights are never read.
TOKENIZER_ONLY = " (its Q-Former tokenizer)"
# What a tokenizer's from_pretrained reads (config.json: the model type, for AutoTokenizer).
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer[^/]*\.json|special_tokens_map\.json|added_tokens\.json|config\.json"
    r"|vocab\.(txt|json)|merges\.txt|[^/]*\.model)$"
)
# Of those, the files that hold a vocabulary (without one, no tokenizer loads).
_VOCABULARY = re.compile(r"^(tokenizer\.json|vocab\.(txt|json)|[^/]*\.model)$")


def record_name(repo_id: str) -> str:
    """`org/name` -> `org--name` (the hub forbids "--" in ids, so this is reversible)."""
    return repo_id.replace("/", "--")


def repo_id_of(name: str) -> str:
    return name.replace("--", "/")


def record_path(repo_id: str) -> str:
    return f"{HUB_RECORDS}/{record_name(repo_id)}.json"


def is_hub_id(model: str | None, base_dir: str | Path = ".") -> bool:
    """A hub id ('name' or 'org/name') rather than a local folder or nothing."""
    return bool(model) and not looks_local(str(model), base_dir)


def select_files(
    files: list[str], components: list[str] | None = None, tokenizer_only: bool = False
) -> list[str]:
    """Of a repository's files, those `from_pretrained` reads (see the module docstring); of a
    pipeline, only its `components`' folders when given (those model_index.json names); with
    `tokenizer_only`, the tokenizer's files at the root."""
    if tokenizer_only:
        return [name for name in files if _TOKENIZER_FILES.match(name)]
    pipeline = "model_index.json" in files
    keep = []
    for name in files:
        if _OTHER_FORMATS.search(name) or _VARIANT.search(name):
            continue
        if pipeline and name != "model_index.json":
            folder, nested, _ = name.partition("/")
            if not nested or name.startswith(_UNUSED_PIPELINE_PARTS):
                continue  # a root file (a single-file checkpoint), or an unused part
            if components is not None and folder not in components:
                continue
        keep.append(name)
    with_safetensors = {name.rpartition("/")[0] for name in keep if name.endswith(".safetensors")}
    return [
        name
        for name in keep
        if not (
            name.endswith((".bin", ".pt", ".pth")) and name.rpartition("/")[0] in with_safetensors
        )
    ]


def pipeline_components(model_index: dict) -> list[str]:
    """The component folders a diffusers `model_index.json` names (a `[null, null]` entry, such
    as a pipeline saved without its safety checker, has none)."""
    return [
        key
        for key, value in model_index.items()
        if isinstance(value, list) and len(value) == 2 and all(value)
    ]


def _hint(repo_id: str, used_by: str, err: Exception, cache: str, offline: bool) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return (
            f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and put "
            "a token in the environment (HF_TOKEN; never in the config)"
        )
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"the hub has no model {repo_id!r} (or it is private): check {used_by}; a private "
            "one needs HF_TOKEN in the environment"
        )
    if isinstance(err, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub cannot be reached"
        return (
            f"{repo_id} is not in the Hugging Face cache {cache} and {why}: run the workflow "
            f"where the internet is reachable (unset HF_HUB_OFFLINE), or download it there "
            f"with `hf download {repo_id}` into the same HF_HOME, or point {used_by} at a local "
            "folder written by save_pretrained"
        )
    if isinstance(err, HFValidationError):
        return f"{repo_id!r} is not a hub id nor a local folder: check {used_by}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the hub refused the token (HTTP {status}): check HF_TOKEN in the environment"
    return f"the hub answered with an error ({err}); run it again later"


def _hub_listing(repo_id: str) -> tuple[list[str], str] | None:
    """The repository's files and commit on the hub, or None when the hub cannot be reached (an
    HTTP answer, such as a missing or gated repository, is raised)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id)
    except httpx2.TransportError as err:  # no connection, a timeout, a proxy refusing
        log.warning("%s: the hub cannot be reached (%s); looking in the cache", repo_id, err)
        return None
    return [sibling.rfilename for sibling in info.siblings or []], str(info.sha)


def _cached_listing(repo_id: str) -> list[str] | None:
    """The file list snapshot_download cached for the repository, or None (never listed)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [entry.path for entry in get_cached_repo_tree(repo_id)]
    except CachedRepoTreeNotFoundError:
        return None


def _wanted(
    repo_id: str, files: list[str], revision: str | None, local: bool, tokenizer_only: bool
) -> list[str]:
    """select_files, a pipeline's limited to the components its model_index.json names."""
    from huggingface_hub import hf_hub_download

    components = None
    if "model_index.json" in files and not tokenizer_only:
        index = hf_hub_download(
            repo_id, "model_index.json", revision=revision, local_files_only=local
        )
        components = pipeline_components(json.loads(Path(index).read_text()))
    return select_files(files, components, tokenizer_only)


def _record_default_branch(snapshot: Path) -> None:
    """Point the cache's refs/main at the snapshot's commit. The jobs load the bare hub id
    offline, which finds its snapshot through that ref, and huggingface_hub writes refs only
    for downloads by branch name, not by commit hash (as here: the listing and the files are
    one commit)."""
    from huggingface_hub import constants

    ref = snapshot.parent.parent / "refs" / constants.DEFAULT_REVISION
    if ref.is_file() and ref.read_text().strip() == snapshot.name:
        return
    try:
        with atomic_file(ref) as handle:
            handle.write(snapshot.name)
    except OSError as err:
        raise SidpipeError(
            f"cannot write {ref} ({err.strerror}): the jobs find the model offline through it; "
            "use a Hugging Face cache you can write (HF_HOME), or ask its owner to fetch the model"
        ) from err


def fetch_model(repo_id: str, out: Path, used_by: list[str]) -> dict[str, Any]:
    """Download what `from_pretrained` reads of `repo_id` into the Hugging Face cache (or find
    it there when offline or the hub is unreachable) and write its record to `out`. `used_by`
    names the config keys that load it, for the messages; where each loads only its tokenizer
    (TOKENIZER_ONLY), only the tokenizer's files are fetched."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    where = ", ".join(used_by) or "the config"
    offline = bool(constants.HF_HUB_OFFLINE)
    tokenizer_only = bool(used_by) and all(key.endswith(TOKENIZER_ONLY) for key in used_by)
    try:
        listing = None if offline else _hub_listing(repo_id)
        if listing is None:  # what the cache holds, checked against the files chosen then
            files, revision, local = _cached_listing(repo_id), None, True
        else:
            (files, revision), local = listing, False
        wanted = None if files is None else _wanted(repo_id, files, revision, local, tokenizer_only)
        if tokenizer_only and wanted is not None and not any(map(_VOCABULARY.match, wanted)):
            raise SidpipeError(
                f"{repo_id} ({where}) has no tokenizer files at its top level (vocab.*, "
                "tokenizer*.json, *.model): point the setting at a tokenizer's repository or folder"
            )
        if not local:
            log.info("%s: fetching %d files into %s", repo_id, len(wanted), constants.HF_HUB_CACHE)
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=wanted, local_files_only=local
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as err:
        raise SidpipeError(
            f"cannot fetch {repo_id} ({where}): "
            + _hint(repo_id, where, err, constants.HF_HUB_CACHE, offline)
        ) from err
    folder = Path(folder)
    if not local:
        _record_default_branch(folder)
    files_here = sorted(p for p in folder.rglob("*") if p.is_file())
    record = {
        "repo_id": repo_id,
        "revision": folder.name,
        "snapshot": str(folder),
        "files": [p.relative_to(folder).as_posix() for p in files_here],
        "bytes": sum(p.stat().st_size for p in files_here),
        "used_by": used_by,
        "tokenizer_only": tokenizer_only,
        "from_cache_only": local,  # offline, or the hub unreachable
    }
    log.info(
        "%s: revision %s, %d files, %.2f GB in %s",
        repo_id,
        record["revision"],
        len(files_here),
        record["bytes"] / 1e9,
        folder,
    )
    with atomic_file(out) as handle:
        json.dump(record, handle, indent=1)
    return record


def encoder_hub_ids(algorithm: str, settings: dict, base_dir: str | Path = ".") -> dict[str, str]:
    """The hub ids an encoder arm (`methods.*` of an encoder algorithm) loads, by the setting
    that names each."""
    from sidpipe.encoders import ENCODER_MODEL_KEYS, QFORMER_DEFAULT_TOKENIZER

    ids = {
        key: str(settings[key])
        for key in ENCODER_MODEL_KEYS.get(algorithm, ())
        if is_hub_id(settings.get(key), base_dir)
    }
    if algorithm == "blip_diffusion" and ids:  # the hub checkpoint names no Q-Former tokenizer
        ids["model" + TOKENIZER_ONLY] = QFORMER_DEFAULT_TOKENIZER
    return ids


def hub_models(config: dict, base_dir: str | Path = ".") -> dict[str, list[str]]:
    """Every hub id the config names a model by -> the config keys that name it."""
    users: dict[str, list[str]] = {}

    def add(model: Any, key: str) -> None:
        if is_hub_id(model, base_dir):
            users.setdefault(str(model), []).append(key)

    for key, model in config.get("models", {}).items():
        add(model, f"models.{key}")
    for name, vlm in config.get("vlms", {}).items():
        if vlm.get("backend") == "transformers":  # an API backend's model is not downloaded
            add(vlm.get("model"), f"vlms.{name}.model")
    for name, method in config.get("methods", {}).items():
        for key, repo_id in encoder_hub_ids(method.get("algorithm", ""), method, base_dir).items():
            add(repo_id, f"methods.{name}.{key}")
    return users


def manual_files(config: dict) -> dict[str, str]:
    """Files the user downloads by hand (ELITE's mappers): the config key naming each -> its
    path. Paths under results/ are the workflow's own (the tiny demo's)."""
    from sidpipe.encoders import ELITE_MAPPER_KEYS

    return {
        f"methods.{name}.{key}": str(method[key])
        for name, method in config.get("methods", {}).items()
        if method.get("algorithm") == "elite"
        for key in ELITE_MAPPER_KEYS
        if method.get(key) and not str(method[key]).startswith("results/")
    }


def check_manual_file(path: str, key: str, source: str, out: Path) -> dict[str, Any]:
    """A file the user downloads by hand (no rule can fetch it): its size and sha256 to `out`,
    or, when it is missing, an error naming it, the config key and where to get it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SidpipeError(
            f"{path} ({key}) does not exist: it is not on the hub; download it from {source} to "
            f"that path (or point {key} at it), or leave its arms out of `experiments`"
        )
    with open(file, "rb") as handle:
        start = handle.read(512).lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")):
        # Google Drive and the like answer a large file's link with a confirmation page.
        raise SidpipeError(
            f"{path} ({key}) is a web page, not the file: the download saved the page its link "
            f"shows (a confirmation or sign-in page); download it again from {source}, "
            "through the page's own download button"
        )
    record = {"path": str(file), "key": key, "bytes": file.stat().st_size}
    record["sha256"] = sha256_file(file)
    log.info("%s (%s): %d bytes, sha256 %s", file, key, record["bytes"], record["sha256"])
    with atomic_file(out) as handle:
        json.dump(record, handle, indent=1)
    return record
