"""The `transformers` backend: a local image-text-to-text model (LLaVA-style chat, or BLIP-2
captioning), loaded on first use, greedy `generate` in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import SidpipeError, expand_home, log, looks_local
from . import OnResponse, VLMRequest, VLMResponse, resolve_vlm, vlm_label


@contextlib.contextmanager
def _loading_vlm(label: str, model: str) -> Iterator[None]:
    """Turn a from_pretrained failure into an error naming the model string and config key."""
    if looks_local(model) and not Path(model).is_dir():
        raise SidpipeError(f"{label}.model: model folder {model!r} does not exist")
    try:
        yield
    except Exception as err:
        raise SidpipeError(
            f"cannot load the VLM {model!r} (config key {label}.model): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. It must be a Hugging Face hub id "
            "(already cached when HF_HUB_OFFLINE=1) or a folder written by save_pretrained."
        ) from err


class TransformersBackend:
    """A local image-text-to-text model, loaded on first use, greedy `generate` in batches."""

    name = "transformers"

    def __init__(self, vlm: dict) -> None:
        self.cfg = resolve_vlm(vlm)
        self.label = vlm_label(vlm)
        self.model = expand_home(str(self.cfg["model"]))
        self.base_url = ""
        self.mode = str(self.cfg["mode"])
        # BLIP-2 cannot follow instructions: it captions the image (the paper's setting).
        self.follows_instructions = self.mode == "chat"
        self.requests_sent = 0
        self._model: Any = None
        self._processor: Any = None
        self._device: Any = None
        self._dtype: Any = None

    def settings(self) -> dict[str, Any]:
        return {
            "decoding": "greedy",
            "max_new_tokens": int(self.cfg["max_new_tokens"]),
            "mode": self.mode,
            "dtype": str(self.cfg["dtype"]),
        }

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..models import pick_device, torch_dtype

        self._device, self._dtype = pick_device(self.cfg["device"]), torch_dtype(self.cfg["dtype"])
        log.info("loading VLM %s (%s) on %s", self.model, self.mode, self._device)
        with _loading_vlm(self.label, self.model):
            # PIL image processors: the torchvision ones are optional and differ slightly.
            processor = AutoProcessor.from_pretrained(self.model, backend="pil")
            model = AutoModelForImageTextToText.from_pretrained(self.model, dtype=self._dtype)
        if self.mode == "chat" and not getattr(processor, "chat_template", None):
            raise SidpipeError(
                f"{self.label}: model {self.model!r} has no chat template, so it cannot take an "
                f"instruction; for a captioning model such as BLIP-2 set {self.label}.mode: "
                "blip2_caption"
            )
        # Decoder-only models continue each row from its last token: pad on the left.
        processor.tokenizer.padding_side = "left"
        self._processor, self._model = processor, model.eval().to(self._device)

    def _inputs(self, batch: Sequence[VLMRequest]) -> Any:
        from PIL import Image

        images = []
        for request in batch:
            with Image.open(request.image_path) as image:
                images.append(image.convert("RGB"))
        if self.mode == "blip2_caption":
            return self._processor(images=images, return_tensors="pt")
        texts = [
            self._processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": r.instruction}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for r in batch
        ]
        return self._processor(images=images, text=texts, return_tensors="pt", padding=True)

    def generate(
        self, requests: Sequence[VLMRequest], on_response: OnResponse | None = None
    ) -> list[VLMResponse]:
        import torch

        if not requests:
            return []
        self._load()
        model, tokenizer = self._model, self._processor.tokenizer
        max_new = int(self.cfg["max_new_tokens"])
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        size = int(self.cfg["batch_size"])
        results: list[VLMResponse] = []
        for start in range(0, len(requests), size):
            batch = requests[start : start + size]
            inputs = self._inputs(batch).to(self._device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
            with torch.inference_mode():
                output = model.generate(
                    **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new
                )
            self.requests_sent += len(batch)
            if getattr(model.config, "is_encoder_decoder", False) or getattr(
                getattr(model.config, "text_config", None), "is_encoder_decoder", False
            ):
                prompt_len = 0  # encoder-decoder outputs hold only the new tokens
            elif "input_ids" in inputs:
                prompt_len = inputs["input_ids"].shape[1]
            else:  # BLIP-2 without text builds [image tokens] + BOS itself
                prompt_len = int(model.config.num_query_tokens) + 1
            for row in range(len(batch)):
                new = output[row, prompt_len:].tolist()
                stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
                used = new if stop is None else new[: stop + 1]
                if "attention_mask" in inputs:
                    prompt_tokens = int(inputs["attention_mask"][row].sum())
                else:
                    prompt_tokens = prompt_len
                response = VLMResponse(
                    text=tokenizer.decode(used, skip_special_tokens=True).strip(),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(used),
                    finish_reason="length" if stop is None and len(new) >= max_new else "stop",
                )
                results.append(response)
                if on_response is not None:
                    on_response(start + row, response)
            log.debug("%s: generated %d/%d", self.label, len(results), len(requests))
        return results

    def close(self) -> None:
        self._model = self._processor = None
