"""Grounded-SAM on any images: GroundingDINO finds a box from a text prompt, SAM turns the box
into a mask, and the mask is cleaned up (holes filled, the largest component kept). Serves the
reference masks (`sidpipe.masks`) and the generated images' masks (`sidpipe.attention`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from sidpipe.io import SidpipeError

# Grounded-SAM's demo (the paper's [14]): GroundingDINO Swin-T OGC, the model its 0.3 / 0.25
# thresholds are set for, and SAM ViT-H.
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-huge"

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def grounding_prompt(text: str) -> str:
    """GroundingDINO's prompt format: lower case, single spaces, ending with '.'."""
    words = " ".join(text.lower().split()).rstrip(". ")
    if not words:
        raise SidpipeError(
            "the detector text prompt is empty; set the subject's `text_prompt` column in the "
            "subjects table, or leave it empty to use the class"
        )
    return words + "."


@dataclass
class Detection:
    box: Box | None
    score: float
    candidates: list[float]  # the best raw query scores, for the error message
    label: str


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def detect(
    images: list[Image.Image],
    prompt: str,
    detector_name: str,
    device: str,
    box_threshold: float,
    text_threshold: float,
    box_mode: str,
    batch_size: int,
    subject: str,
) -> list[Detection]:
    """One GroundingDINO box per image (the best, or the union of all above the threshold).

    `box_threshold` decides which boxes count; `text_threshold` only picks the prompt tokens
    that name a box (its label), as in Grounded-SAM.
    """
    import torch  # heavy imports, only for this backend (provided masks need neither)

    from sidpipe.models import load_grounding_dino

    detector, processor = load_grounding_dino(detector_name, device)
    detections: list[Detection] = []
    batches = _batches(len(images), batch_size)
    for batch in tqdm(batches, desc=f"detect {subject}", unit="batch", file=sys.stderr):
        chunk = [images[i] for i in batch]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt")
        inputs = inputs.to(detector.device)
        with torch.inference_mode():
            outputs = detector(**inputs)
        results = processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[(img.height, img.width) for img in chunk],
        )
        # The score post-processing thresholds: each query's best token probability.
        raw = outputs.logits.sigmoid().amax(dim=-1).float().cpu()
        for img, result, scores in zip(chunk, results, raw, strict=True):
            top = sorted(scores.tolist(), reverse=True)[:3]
            if len(result["scores"]) == 0:
                detections.append(Detection(None, top[0] if top else 0.0, top, ""))
                continue
            boxes = result["boxes"].float().cpu()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img.width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img.height)
            best = int(result["scores"].argmax())
            if box_mode == "union":
                box = (*boxes[:, :2].amin(dim=0).tolist(), *boxes[:, 2:].amax(dim=0).tolist())
            else:
                box = tuple(boxes[best].tolist())
            score = float(result["scores"][best])
            detections.append(Detection(box, score, top, result["text_labels"][best]))
    return detections


def segment_boxes(
    images: list[Image.Image],
    boxes: list[Box],
    segmenter_name: str,
    device: str,
    batch_size: int,
    subject: str,
) -> list[tuple[np.ndarray, float]]:
    """SAM's mask and its predicted IoU per image and box: one mask per box
    (multimask_output=False), as Grounded-SAM's demo asks SAM; its three-mask output, meant for
    an ambiguous point, leaves this one out and may return a part of the object."""
    import torch  # heavy imports, only for this backend

    from sidpipe.models import load_sam

    sam, processor = load_sam(segmenter_name, device)
    out: list[tuple[np.ndarray, float]] = []
    batches = _batches(len(images), batch_size)
    for batch in tqdm(batches, desc=f"segment {subject}", unit="batch", file=sys.stderr):
        chunk = [images[i] for i in batch]
        inputs = processor(
            images=chunk, input_boxes=[[list(boxes[i])] for i in batch], return_tensors="pt"
        )
        with torch.inference_mode():
            outputs = sam(
                pixel_values=inputs["pixel_values"].to(sam.device, sam.dtype),
                # The processor returns float64 boxes; the prompt encoder wants the model dtype.
                input_boxes=inputs["input_boxes"].to(sam.device, sam.dtype),
                multimask_output=False,
            )
        iou = outputs.iou_scores[:, 0, 0].float().cpu()  # (batch,): one box, one mask
        masks = processor.post_process_masks(
            outputs.pred_masks.float().cpu(),
            inputs["original_sizes"],
            inputs["reshaped_input_sizes"],
        )
        for k in range(len(chunk)):
            out.append((masks[k][0, 0].numpy().astype(bool), float(iou[k])))
    return out


def _label(binary: np.ndarray) -> np.ndarray:
    """4-connected component labels of `binary` (label = smallest flat index in the component;
    -1 off the mask).

    Vectorised union-find: hook every edge's larger root onto the smaller one, then compress
    paths by pointer jumping; repeats until no edge joins two roots, which takes a few rounds.
    """
    height, width = binary.shape
    index = np.arange(height * width).reshape(height, width)
    right = binary[:, :-1] & binary[:, 1:]
    down = binary[:-1, :] & binary[1:, :]
    a = np.concatenate([index[:, :-1][right], index[:-1, :][down]])
    b = np.concatenate([index[:, 1:][right], index[1:, :][down]])
    parent = np.arange(height * width)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        split = root_a != root_b
        if not split.any():
            break
        low = np.minimum(root_a[split], root_b[split])
        high = np.maximum(root_a[split], root_b[split])
        # Roots only ever point to smaller indices, so no cycles can form.
        np.minimum.at(parent, high, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return np.where(binary, parent.reshape(height, width), -1)


def postprocess_mask(mask: np.ndarray, fill_holes: bool, largest_component: bool) -> np.ndarray:
    """Fill holes (background not 4-connected to the border), then keep only the largest
    4-connected component (ties: the first in raster order). Returns a bool array."""
    keep = np.asarray(mask) != 0
    if fill_holes and keep.any():
        background = _label(~keep)
        border = np.concatenate(
            [background[0], background[-1], background[:, 0], background[:, -1]]
        )
        outside = np.isin(background, border[border >= 0])
        keep = keep | ((background >= 0) & ~outside)
    if largest_component and keep.any():
        labels = _label(keep)
        values, counts = np.unique(labels[keep], return_counts=True)
        keep = labels == values[np.argmax(counts)]  # unique is sorted: ties -> raster order
    return keep


def segment_detections(
    images: list[Image.Image],
    detections: list[Detection],
    segmenter_name: str,
    device: str,
    batch_size: int,
    subject: str,
    fill_holes: bool,
    largest_component: bool,
) -> list[tuple[np.ndarray, float] | None]:
    """SAM on every image with a box, then `postprocess_mask`: (mask, SAM's IoU) per image,
    None where the detector found no box (SAM is not loaded when none has one)."""
    found = [i for i, det in enumerate(detections) if det.box is not None]
    out: list[tuple[np.ndarray, float] | None] = [None] * len(images)
    if found:
        boxes = [detections[i].box for i in found]
        chunk = [images[i] for i in found]
        segmented = segment_boxes(chunk, boxes, segmenter_name, device, batch_size, subject)
        for i, (mask, iou) in zip(found, segmented, strict=True):
            out[i] = (postprocess_mask(mask, fill_holes, largest_component), iou)
    return out


def generated_subject_mask(
    images: list[Image.Image],
    class_name: str,
    detector: str,
    segmenter: str,
    box_threshold: float = 0.3,
    text_threshold: float = 0.25,
    box_mode: str = "best",
    fill_holes: bool = True,
    largest_component: bool = True,
    batch_size: int = 8,
    device: str = "auto",
    text_prompt: str | None = None,
) -> list[np.ndarray | None]:
    """The subject's mask in each generated image (GroundingDINO box -> SAM -> the same
    post-processing as the references); None where no box scores above `box_threshold`
    (unlike references, a generated image may well lack the subject: no error)."""
    prompt = grounding_prompt(text_prompt or class_name)
    rgb = [image.convert("RGB") for image in images]
    detections = detect(
        rgb,
        prompt,
        detector,
        device,
        box_threshold,
        text_threshold,
        box_mode,
        batch_size,
        "generated",
    )
    segmented = segment_detections(
        rgb, detections, segmenter, device, batch_size, "generated", fill_holes, largest_component
    )
    return [None if found is None else found[0] for found in segmented]
