"""Stage `score`: SA, NSD, TA, CLIP-I and DINO of every generated image of one arm and subject.

With f the L2-normalised embedding of an encoder and r running over the subject's references
(SID paper, Sec. 6 and App. C; CLIP-I and DINO as in DreamBooth):

* SA (subject alignment)   = mean_r cos(f_clip(subject segment_r), f_clip(generated))
* NSD (non-subject disent.) = 1 - mean_r cos(f_clip(non-subject segment_r), f_clip(generated))
* TA (text alignment)       = cos(f_clip_text(prompt_plain), f_clip(generated))
* CLIP-I = mean_r cos(f_clip(reference_r), f_clip(generated))
* DINO   = mean_r cos(f_dino(reference_r), f_dino(generated))

Higher is better for all five. TA's prompt is `prompt_plain`, the prompt without the
identifier ("a dog in the jungle"), so the rare token cannot move the score. DreamBooth's
CLIP-T is omitted: it is the same cosine with the same identifier-free prompt, i.e. TA.

Encoders: CLIP (`models.clip`, ViT-B/32 in the paper) gives the image embedding `image_embeds`
and the text embedding `text_embeds` (projected EOS token); DINO (`models.dino`, ViT-S/16)
the CLS token of the last hidden state. Preprocessing is each model's own processor:

* CLIP images: RGB, resize the shortest side to 224 px (bicubic), centre crop 224x224,
  rescale to [0, 1], normalise with CLIP's mean/std. References and generated images are
  square, so nothing is cropped away; subject segments are already 224 px squares.
* CLIP texts: CLIP's BPE tokenizer, padded to the longest prompt of the batch, truncated to
  CLIP's 77-token window.
* DINO images: ViTImageProcessor, resize to 224x224 (bilinear), rescale, normalise with the
  ImageNet mean/std.

Every generated image, reference, segment and distinct prompt goes through each of its encoders
exactly once per `score_arm` call, in batches; all scores are then cosine matrices.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sidpipe.io import SidpipeError, log, read_manifest
from sidpipe.metric_tables import FIELDS, METRICS, gather_metrics, image_keys
from sidpipe.models import load_clip, load_dino
from sidpipe.subsets import select_references, split_name

DIGITS = 6  # float32 cosines carry ~7 significant digits; more would only be noise in the CSV
_EPS = 1e-12


# --- pure metric functions on embeddings ---------------------------------------------------


def _unit(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """Rows of `x` as float64 unit vectors (a zero row stays zero)."""
    arr = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), _EPS)


def cosine_matrix(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """cos(a_i, b_j) for every row pair: shape (len(a), len(b))."""
    return _unit(a) @ _unit(b).T


def mean_cosine(gen: np.ndarray | torch.Tensor, refs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per generated row, the mean cosine to all reference rows (CLIP-I, DINO)."""
    return cosine_matrix(gen, refs).mean(axis=1)


def sa(gen: np.ndarray | torch.Tensor, subject_segs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Subject alignment per generated image: mean cosine to the subject segments."""
    return mean_cosine(gen, subject_segs)


def nsd(gen: np.ndarray | torch.Tensor, nonsubject_segs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Non-subject disentanglement per generated image: 1 - mean cosine to the backgrounds."""
    return 1.0 - mean_cosine(gen, nonsubject_segs)


def ta(gen: np.ndarray | torch.Tensor, texts: np.ndarray | torch.Tensor) -> np.ndarray:
    """Text alignment: cos(gen_i, texts_i), row by row (texts[i] is image i's prompt)."""
    g, t = _unit(gen), _unit(texts)
    if g.shape != t.shape:
        raise SidpipeError(f"ta: {len(g)} image embeddings but {len(t)} text embeddings")
    return np.einsum("ij,ij->i", g, t)


# --- encoders ------------------------------------------------------------------------------


def _l2(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Encoders:
    """CLIP image / text and optional DINO image encoders; every method returns L2-normalised
    float32 CPU embeddings, one row per input, in batches of `batch_size`."""

    def __init__(
        self,
        clip: torch.nn.Module,
        clip_processor,
        dino: torch.nn.Module | None = None,
        dino_processor=None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise SidpipeError(f"batch_size must be at least 1, got {batch_size}")
        self.clip, self.clip_processor = clip, clip_processor
        self.dino, self.dino_processor = dino, dino_processor
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        clip_model: str,
        dino_model: str | None = None,
        batch_size: int = 32,
        device: str = "auto",
    ) -> Encoders:
        """Load CLIP (and DINO when `dino_model` is given) with `sidpipe.models`' loaders."""
        clip, clip_processor = load_clip(clip_model, device)
        dino, dino_processor = load_dino(dino_model, device) if dino_model else (None, None)
        return cls(clip, clip_processor, dino, dino_processor, batch_size)

    @staticmethod
    def _device(model: torch.nn.Module) -> torch.device:
        return next(model.parameters()).device

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings, shape (len(images), projection_dim)."""
        out = []
        for chunk in _batches(images, self.batch_size):
            pixels = self.clip_processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            # transformers 5: a ModelOutput whose pooler_output is the projected embedding.
            feats = self.clip.get_image_features(pixel_values=pixels.to(self._device(self.clip)))
            out.append(_l2(getattr(feats, "pooler_output", feats)))
        return torch.cat(out) if out else torch.empty(0, self.clip.config.projection_dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings, shape (len(texts), projection_dim)."""
        out = []
        for chunk in _batches(texts, self.batch_size):
            tokens = self.clip_processor(
                text=list(chunk), padding=True, truncation=True, return_tensors="pt"
            )
            device = self._device(self.clip)
            feats = self.clip.get_text_features(
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
            )
            out.append(_l2(getattr(feats, "pooler_output", feats)))
        return torch.cat(out) if out else torch.empty(0, self.clip.config.projection_dim)

    @torch.inference_mode()
    def encode_dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINO embeddings (CLS token of the last hidden state), shape (len(images), hidden)."""
        if self.dino is None:
            raise SidpipeError("no DINO model was loaded; pass dino_model (config models.dino)")
        out = []
        for chunk in _batches(images, self.batch_size):
            pixels = self.dino_processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            hidden = self.dino(pixel_values=pixels.to(self._device(self.dino))).last_hidden_state
            out.append(_l2(hidden[:, 0]))
        return torch.cat(out) if out else torch.empty(0, self.dino.config.hidden_size)


# --- the stage -----------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except OSError as exc:
        raise SidpipeError(f"{path}: cannot read the image ({exc})") from exc


def _encode_files(
    paths: Sequence[Path], encoders: Sequence[Callable], batch_size: int, what: str = "images"
) -> list[torch.Tensor]:
    """Open `paths` a batch at a time (an arm's 500 images need not sit in memory together) and
    run every encoder on each batch; one concatenated embedding matrix per encoder."""
    parts: list[list[torch.Tensor]] = [[] for _ in encoders]
    chunks = _batches(list(paths), batch_size)
    for chunk in tqdm(chunks, desc=f"encode {what}", unit="batch", file=sys.stderr):
        images = [_open(path) for path in chunk]
        for part, encode in zip(parts, encoders, strict=True):
            part.append(encode(images))
    return [torch.cat(part) for part in parts]


def score_arm(
    samples_dir: Path,
    masks_dir: Path,
    references_dir: Path,
    subject: str,
    method: str,
    descriptions: str,
    inference: str,
    clip_model: str,
    dino_model: str | None,
    batch_size: int = 32,
    device: str = "auto",
    encoders: Encoders | None = None,
    reference_subset: int | str | None = None,
) -> list[dict]:
    """Score every image of one arm and subject; return tidy long rows (`FIELDS`), one per
    image and metric. DINO is skipped when `dino_model` is None or empty. `encoders` (tests,
    benchmarks) replaces loading `clip_model` / `dino_model`. `reference_subset` (a count or
    an image id, `sidpipe.subsets`) scores against part of the references: SA, NSD and DINO
    against the one reference of a single-reference arm; by default it is the one a subset
    method's name carries (`dreambooth--first1`).
    """
    if reference_subset is None:
        reference_subset = split_name(method)[1]
    samples_dir, masks_dir = Path(samples_dir), Path(masks_dir)
    references_dir = Path(references_dir)
    sample_columns = ["prompt_id", "prompt", "prompt_plain", "seed", "path"]
    samples = read_manifest(samples_dir, "samples", "sample_arm", sample_columns)
    segments = read_manifest(
        masks_dir,
        "segments",
        "segment_references",
        ["image_id", "subject_segment_path", "non_subject_segment_path"],
    )
    references = read_manifest(
        references_dir, "references", "prepare_references", ["image_id", "path"]
    )
    for rows, folder in ((segments, masks_dir), (references, references_dir)):
        others = sorted({row.get("subject") or subject for row in rows} - {subject})
        if others:
            raise SidpipeError(
                f"{folder}/manifest.csv belongs to subject(s) {', '.join(others)}, not {subject!r}"
            )
    ref_ids = [row["image_id"] for row in references]
    by_id = {row["image_id"]: row for row in segments}
    if set(by_id) != set(ref_ids):
        raise SidpipeError(
            f"{masks_dir}/manifest.csv covers image ids {sorted(by_id)} but the references are "
            f"{sorted(ref_ids)}; re-run segment_references for subject {subject!r}"
        )
    ref_ids = select_references(ref_ids, reference_subset, f"subject {subject!r}")
    references = [row for row in references if row["image_id"] in ref_ids]
    blank = [row["prompt_id"] for row in samples if not row["prompt_plain"].strip()]
    if blank:
        raise SidpipeError(
            f"{samples_dir}/manifest.csv has no prompt_plain for prompt id(s) "
            f"{sorted(set(blank))}; TA needs the prompt without the identifier: re-run sampling"
        )

    gen_paths = [samples_dir / row["path"] for row in samples]
    ref_paths = [references_dir / row["path"] for row in references]
    subj_paths = [masks_dir / by_id[i]["subject_segment_path"] for i in ref_ids]
    bg_paths = [masks_dir / by_id[i]["non_subject_segment_path"] for i in ref_ids]
    missing = [p for p in gen_paths + ref_paths + subj_paths + bg_paths if not p.is_file()]
    if missing:  # before loading any model: a missing file should fail in seconds
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise SidpipeError(f"{len(missing)} image(s) listed in a manifest are missing: {shown}")

    if encoders is None:
        encoders = Encoders.load(clip_model, dino_model, batch_size, device)
    use_dino = bool(dino_model)
    with_dino = [encoders.encode_images] + ([encoders.encode_dino] if use_dino else [])

    gen = _encode_files(gen_paths, with_dino, batch_size, "generated images")
    ref = _encode_files(ref_paths, with_dino, batch_size, "references")
    (subj,) = _encode_files(subj_paths, [encoders.encode_images], batch_size, "subject segments")
    (bg,) = _encode_files(bg_paths, [encoders.encode_images], batch_size, "non-subject segments")
    plains = sorted({row["prompt_plain"] for row in samples})
    text = encoders.encode_texts(plains)
    text_rows = text[[plains.index(row["prompt_plain"]) for row in samples]]

    scores = {
        "SA": sa(gen[0], subj),
        "NSD": nsd(gen[0], bg),
        "TA": ta(gen[0], text_rows),
        "CLIP-I": mean_cosine(gen[0], ref[0]),
    }
    if use_dino:
        scores["DINO"] = mean_cosine(gen[1], ref[1])

    out = []
    for i, row in enumerate(samples):
        base = image_keys(row, gen_paths[i], subject, method, descriptions, inference)
        for metric, values in scores.items():
            out.append({**base, "metric": metric, "value": round(float(values[i]), DIGITS)})
    means = {metric: float(np.mean(values)) for metric, values in scores.items()}
    log.info(
        "%s/%s/%s/%s: %d images x %d references: %s",
        method,
        descriptions,
        inference,
        subject,
        len(samples),
        len(references),
        ", ".join(f"{k} {v:.4f}" for k, v in means.items()),
    )
    return out


__all__ = [
    "DIGITS",
    "FIELDS",
    "METRICS",
    "Encoders",
    "cosine_matrix",
    "gather_metrics",
    "mean_cosine",
    "nsd",
    "sa",
    "score_arm",
    "ta",
]
