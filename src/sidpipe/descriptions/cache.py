"""The cache of accepted model answers: one JSON file per exact request (image, model, server,
instruction, case, settings; never the API key), so reruns and other description sets that need
the same answer send no request."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..io import atomic_file, log, redact_url, sha256_text
from ..vlm import Backend, VLMResponse
from .inputs import Reference

CACHE_VERSION = 1


def cache_key(
    image_sha256: str,
    backend: str,
    model: str,
    base_url: str,
    instruction_sha256: str,
    case: int,
    settings: Mapping[str, Any],
) -> str:
    """sha256 of everything that determines a model's answer (never the API key)."""
    fields = {
        "cache_version": CACHE_VERSION,
        "image_sha256": image_sha256,
        "backend": backend,
        "model": model,
        "base_url": base_url,
        "instruction_sha256": instruction_sha256,
        "case": int(case),
        "settings": dict(settings),
    }
    return sha256_text(json.dumps(fields, sort_keys=True, separators=(",", ":")))


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def read_cache(cache_dir: Path, key: str) -> VLMResponse | None:
    path = cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        return VLMResponse(**json.loads(path.read_text(encoding="utf-8"))["response"])
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable cache entry %s (%s); asking the model again", path, err)
        return None


def write_cache(cache_dir: Path, key: str, entry: dict[str, Any]) -> None:
    with atomic_file(cache_path(cache_dir, key), encoding="utf-8") as handle:
        json.dump(entry, handle, indent=2, ensure_ascii=False, sort_keys=True)
        handle.write("\n")


def cache_entry(
    key: str,
    ref: Reference,
    backend: Backend,
    case: int,
    settings: dict[str, Any],
    instruction: str,
    response: VLMResponse,
) -> dict[str, Any]:
    """What a cache file holds: the request's identity, its exact instruction and the answer."""
    return {
        "cache_version": CACHE_VERSION,
        "key": key,
        "image_id": ref.image_id,
        "image_sha256": ref.sha256,
        "backend": backend.name,
        "model": backend.model,
        "base_url": redact_url(backend.base_url),
        "case": case,
        "settings": settings,
        "instruction": instruction,
        "instruction_sha256": sha256_text(instruction),
        "response": asdict(response),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
