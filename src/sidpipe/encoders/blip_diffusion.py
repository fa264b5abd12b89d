"""BLIP-Diffusion (Li et al. 2023), the encoder-based arm: no per-subject training.

The SID paper's single-reference experiment compares per-subject-trained methods with
BLIP-Diffusion, which turns one reference image and the subject's class into query embeddings
(BLIP-2 Q-Former) that are spliced into the prompt's CLIP embeddings. Rule `sample` calls
`load_blip_diffusion` and `generate` for `algorithm: blip_diffusion`;
`sidpipe.encoders.tiny.build_tiny_blip_diffusion` writes a tiny random checkpoint in
`Salesforce/blipdiffusion`'s layout for the tests and the demo.

diffusers 0.42.1 ships the pipeline only as a deprecated one
(`diffusers.pipelines.deprecated.blip_diffusion`, last supported in 0.33.1). With the pinned
transformers 5 it is broken in four places (1-4), and one older bug (5) bites SID's long
negative prompts. This module works around each without touching site-packages:

1. Loading: the real checkpoint's `model_index.json` names the library of `qformer`,
   `text_encoder` and `image_processor` "blip_diffusion", a module that no longer exists at
   `diffusers.pipelines.blip_diffusion`. `BlipDiffusionPipeline.from_pretrained` raises
   ("blip_diffusion is not one of the libraries Diffusers can load components from"), even
   when those components are passed in. `load_blip_diffusion` therefore loads every component
   from its subfolder and builds the pipeline with its constructor, taking `ctx_begin_pos`,
   `mean` and `std` from `model_index.json`.
2. Q-Former: diffusers' `Blip2QFormerModel` calls `invert_attention_mask` and `get_head_mask`
   (gone from transformers 5's `PreTrainedModel`: AttributeError), and its layers call
   transformers' `Blip2QFormerAttention` with the transformers-4 signature (head mask
   positionally, a tuple result), which in transformers 5 would feed the wrong tensors to
   cross-attention. `PatchedBlip2QFormerModel` keeps diffusers' embeddings, vision encoder and
   projection but runs transformers 5's own `Blip2QFormerEncoder` (with `use_qformer_text_input`
   it has exactly the old layers' parameter names, so checkpoints load unchanged), with the
   same additive -10000 padding mask as before.
3. Text encoder, silently: diffusers' `ContextCLIPTextModel` hands its causal mask to
   `CLIPEncoder` as `causal_attention_mask`, an argument transformers 5 no longer has; it is
   swallowed by `**kwargs`, so the CLIP text encoder attends bidirectionally and the
   embeddings are wrong without any error. `PatchedContextCLIPTextModel` passes the causal mask
   (plus any padding mask) as the attention mask, as transformers 4 combined them.
4. Q-Former tokenizer: diffusers' Q-Former loads a BERT tokenizer in `__init__`, from
   `config.tokenizer` or else the hub's `bert-base-uncased` (so the real checkpoint needs
   `bert-base-uncased` in the Hugging Face cache when offline). The tiny checkpoint ships its
   BERT tokenizer inside `qformer/`; `load_blip_diffusion` points `config.tokenizer` at it at
   load time (not in the saved config, so the folder stays relocatable).
5. Negative prompt: the pipeline tokenizes it without truncation, so one over 77 tokens
   crashes the text encoder (a size mismatch). `generate` cuts it to 77 tokens with a
   warning (`fit_negative_prompt`), as Stable Diffusion's pipelines do.

The scheduler is DDIM built from the checkpoint's (PNDM) scheduler config, with
`clip_sample=False` unless that config says otherwise (a PNDM config has no such key and DDIM's
default, True, would clip latents).

Importing this module imports torch, transformers and diffusers: import it only where the
`blip_diffusion` arm is sampled (and in tests).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.blip_diffusion import (
    Blip2QFormerModel,
    BlipDiffusionPipeline,
    BlipImageProcessor,
    ContextCLIPTextModel,
)
from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import (
    Blip2TextEmbeddings,
    Blip2VisionModel,
    ProjLayer,
)
from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import _expand_mask
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn
from transformers import BertTokenizer, CLIPTokenizer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.models.blip_2.configuration_blip_2 import Blip2Config
from transformers.models.blip_2.modeling_blip_2 import Blip2PreTrainedModel, Blip2QFormerEncoder

from sidpipe.descriptions.text import noun_regex
from sidpipe.encoders import QFORMER_DEFAULT_TOKENIZER
from sidpipe.io import SidpipeError, expand_home, log
from sidpipe.models import pick_device, torch_dtype

# Salesforce/blipdiffusion's model_index.json: its components (folders) as (library, class),
# and its pipeline settings. The hub repo also holds `controlnet/` and `vision_encoder/`
# folders, which model_index.json does not list and BlipDiffusionPipeline never loads.
REAL_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "BlipDiffusionPipeline",
    "ctx_begin_pos": 2,
    "image_processor": ["blip_diffusion", "BlipImageProcessor"],
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "qformer": ["blip_diffusion", "Blip2QFormerModel"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
COMPONENTS = tuple(k for k, v in REAL_MODEL_INDEX.items() if isinstance(v, list) and len(v) == 2)


# --- transformers-5 shims ------------------------------------------------------------------


class PatchedContextCLIPTextModel(ContextCLIPTextModel):
    """diffusers' ContextCLIPTextModel with its causal mask actually applied (workaround 3).

    Same modules and parameters; only `forward` is replaced, computing what transformers 4 did:
    embeddings with the context spliced in at `ctx_begin_pos`, causal (+ padding) additive mask,
    CLIP encoder, final layer norm, and the same (upstream) pooled output.
    """

    def forward(
        self,
        ctx_embeddings: torch.Tensor | None = None,
        ctx_begin_pos: list[int] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutputWithPooling:
        if input_ids is None:
            raise ValueError("input_ids are required")
        text = self.text_model
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        hidden = text.embeddings(
            input_ids=input_ids,
            position_ids=position_ids,
            ctx_embeddings=ctx_embeddings,
            ctx_begin_pos=ctx_begin_pos,
        )
        batch, length = hidden.shape[:2]
        mask = text._build_causal_attention_mask(batch, length, hidden.dtype).to(hidden.device)
        if attention_mask is not None:  # transformers 4 added the two additive masks
            mask = mask + _expand_mask(attention_mask, hidden.dtype)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, input_ids.to(torch.int).argmax(dim=-1)]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class PatchedBlip2QFormerModel(Blip2QFormerModel):
    """diffusers' Q-Former on transformers 5's Q-Former encoder (workaround 2).

    Same parameter names as diffusers' class (checkpoints load unchanged). `forward` keeps the
    pipeline's call, `qformer(image_input=..., text_input=[class, ...], return_dict=False)`,
    returning the projected query embeddings, one row per text.
    """

    def __init__(self, config: Blip2Config) -> None:
        # Not Blip2QFormerModel.__init__: its encoder layers use the transformers-4 API.
        Blip2PreTrainedModel.__init__(self, config)
        self.config = config
        qformer_config = copy.deepcopy(config.qformer_config)
        qformer_config.use_qformer_text_input = True  # text FFN (intermediate/output) as before
        # Plain matmul attention, as diffusers' transformers-4 Q-Former computed it (the copied
        # sub-config would otherwise carry no implementation and warn on every call).
        qformer_config._attn_implementation = "eager"
        hidden = qformer_config.hidden_size
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.visual_encoder = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        source = getattr(config, "tokenizer", None) or QFORMER_DEFAULT_TOKENIZER
        self.tokenizer = BertTokenizer.from_pretrained(source, truncation_side="right")
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.proj_layer = ProjLayer(
            in_dim=hidden, out_dim=hidden, hidden_dim=hidden * 4, drop_p=0.1, eps=1e-12
        )
        self.encoder = Blip2QFormerEncoder(qformer_config)
        self.post_init()

    def _image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.visual_encoder
        hidden = vision.pre_layernorm(vision.embeddings(pixel_values))
        hidden = vision.encoder(inputs_embeds=hidden).last_hidden_state
        return vision.post_layernorm(hidden)

    def forward(
        self,
        text_input: str | list[str] | None = None,
        image_input: torch.Tensor | None = None,
        return_dict: bool = False,
        **_: Any,
    ) -> torch.Tensor | BaseModelOutputWithPoolingAndCrossAttentions:
        text = self.tokenizer(text_input, return_tensors="pt", padding=True).to(self.device)
        batch = text.input_ids.shape[0]
        query_length = self.query_tokens.shape[1]
        embeds = self.embeddings(input_ids=text.input_ids, query_embeds=self.query_tokens)
        query_mask = torch.ones(
            (batch, query_length), dtype=text.attention_mask.dtype, device=self.device
        )
        mask = torch.cat([query_mask, text.attention_mask], dim=1)
        mask = self.get_extended_attention_mask(mask, embeds.shape[:-1], embeds.device)
        image_embeds = self._image_embeds(image_input)
        if image_embeds.shape[0] == 1 and batch > 1:  # one reference image for every text
            image_embeds = image_embeds.expand(batch, -1, -1)
        hidden = self.encoder(
            embeds,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            query_length=query_length,
        ).last_hidden_state
        if not return_dict:
            return self.proj_layer(hidden[:, :query_length, :])
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden, pooler_output=hidden[:, 0, :]
        )


# --- loading and sampling ------------------------------------------------------------------


def _is_local(model: str) -> bool:
    return Path(model).is_dir()


def _load_complete(cls: type, model: str, subfolder: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` that refuses a checkpoint missing some of the class' weights
    (transformers would only warn and leave them random: wrong images, no error)."""
    loaded, info = cls.from_pretrained(
        model, subfolder=subfolder, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise SidpipeError(
            f"{model!r} {subfolder}/ lacks {len(missing)} weights of {cls.__name__}, "
            f"e.g. {', '.join(missing[:5])}"
        )
    return loaded.eval()


def load_blip_diffusion(
    model: str, dtype: str = "float32", device: str = "cpu"
) -> BlipDiffusionPipeline:
    """BlipDiffusionPipeline from a hub id (`Salesforce/blipdiffusion`) or a local folder in that
    layout (`sidpipe.encoders.tiny.build_tiny_blip_diffusion`), with a DDIM scheduler, on
    `device`, progress bar off.

    Half precision only on an accelerator: on CPU it falls back to float32. The components are
    loaded one by one (see the module docstring for why not `from_pretrained` on the pipeline).
    """
    dev, model = pick_device(device), expand_home(model)
    if dev.type == "cpu" and dtype != "float32":
        log.warning("BLIP-Diffusion on CPU: using float32 instead of %s", dtype)
        dtype = "float32"
    dt = torch_dtype(dtype)
    if Path(model).is_absolute() and not _is_local(model):
        raise SidpipeError(f"BLIP-Diffusion model folder {model!r} does not exist")
    try:
        index = BlipDiffusionPipeline.load_config(model)
        if index.get("_class_name") != "BlipDiffusionPipeline":
            raise SidpipeError(f"{model!r} holds a {index.get('_class_name')}, not BLIP-Diffusion")
        qformer_config = Blip2Config.from_pretrained(model, subfolder="qformer")
        bundled = Path(model) / "qformer"
        if (
            _is_local(model)
            and not getattr(qformer_config, "tokenizer", None)
            and (bundled / "vocab.txt").is_file()
        ):
            qformer_config.tokenizer = str(bundled)  # workaround 4
        qformer = _load_complete(
            PatchedBlip2QFormerModel, model, "qformer", config=qformer_config, dtype=dt
        )
        text_encoder = _load_complete(PatchedContextCLIPTextModel, model, "text_encoder", dtype=dt)
        scheduler_config = DDIMScheduler.load_config(model, subfolder="scheduler")
        overrides = {} if "clip_sample" in scheduler_config else {"clip_sample": False}
        pipe = BlipDiffusionPipeline(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=text_encoder,
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dt),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dt),
            scheduler=DDIMScheduler.from_config(scheduler_config, **overrides),
            qformer=qformer,
            image_processor=BlipImageProcessor.from_pretrained(model, subfolder="image_processor"),
            ctx_begin_pos=index.get("ctx_begin_pos", 2),
            mean=index.get("mean"),
            std=index.get("std"),
        )
    except SidpipeError:
        raise
    except Exception as err:
        raise SidpipeError(
            f"cannot load BLIP-Diffusion from {model!r}: {type(err).__name__}: {err}. It must be "
            "a hub id (cached when HF_HUB_OFFLINE=1; the Q-Former also needs "
            f"{QFORMER_DEFAULT_TOKENIZER!r} cached) or a folder in Salesforce/blipdiffusion's "
            "layout (build_tiny_blip_diffusion writes one)."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def vae_scale_factor(pipe: BlipDiffusionPipeline) -> int:
    """Pixels per latent cell (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def seed_latents(
    pipe: BlipDiffusionPipeline, seeds: Sequence[int], resolution: int
) -> torch.Tensor:
    """Starting latents, one seeded CPU generator per image (as `sidpipe.sampling.seed_latents`
    for the other arms): an image depends on its seed only, not on its batch or device."""
    factor = vae_scale_factor(pipe)
    shape = (1, pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    cpu = torch.device("cpu")
    noise = [
        randn_tensor(shape, generator=torch.Generator(cpu).manual_seed(int(s)), device=cpu)
        for s in seeds
    ]
    return torch.cat(noise).to(pipe._execution_device, pipe.unet.dtype)


def fit_negative_prompt(pipe: BlipDiffusionPipeline, text: str) -> str:
    """`text`, cut to what the text encoder can take (77 tokens for CLIP) with a warning.

    Upstream tokenizes the negative prompt without truncation (the prompt itself is
    truncated), so a longer one crashes the text encoder (workaround 5); Stable Diffusion's
    pipelines truncate it instead, and so does this.
    """
    limit = pipe.text_encoder.config.max_position_embeddings
    tokenizer = pipe.tokenizer
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= limit:
        return text
    keep = limit - 2  # without <|startoftext|> and <|endoftext|>
    while True:
        kept = tokenizer.decode(ids[1 : 1 + keep], skip_special_tokens=True).strip()
        if len(tokenizer(kept)["input_ids"]) <= limit:  # decoding can merge tokens differently
            break
        keep -= 1
    log.warning(
        "negative prompt cut to %d tokens (the text encoder's limit): dropped %r",
        limit,
        tokenizer.decode(ids[1 + keep : -1], skip_special_tokens=True).strip(),
    )
    return kept


def subject_and_context(prompt_plain: str, class_name: str) -> tuple[str, str]:
    """A plain prompt as BLIP-Diffusion takes it: the target subject (the words up to the class
    noun, less the article: "red mug") and the context after it ("on the beach"). The pipeline
    writes "a {target subject} {context}" itself and puts the reference's subject embedding
    after its "a"; the whole plain prompt would read "a mug a mug on the beach"."""
    noun = noun_regex(class_name)  # a whole word, plural allowed ("two mugs")
    match = re.fullmatch(
        rf"(?:(?:an?|the)\s+)?(.*?{noun})\s*(.*)", prompt_plain.strip(), re.IGNORECASE
    )
    if match is None:
        raise SidpipeError(
            f"BLIP-Diffusion: the prompt {prompt_plain!r} does not name the subject's class "
            f"{class_name!r} as a word"
        )
    return match[1], match[2]


def generate(
    pipe: BlipDiffusionPipeline,
    reference: Image.Image,
    class_name: str,
    prompts: list[str],
    seeds: list[int],
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    negative_prompt: str = "",
    batch_size: int = 4,
    targets: list[str] | None = None,
) -> list[Image.Image]:
    """One image per (prompts[i], seeds[i]), conditioned on `reference`.

    `class_name` is the source subject category (what the Q-Former looks for in the reference)
    and, unless `targets` gives one per prompt ("red mug"), the target one; `prompts` are the
    contexts after the subject ("on the beach": the pipeline writes "a {target} {prompt}"; see
    `subject_and_context`). Up to `batch_size` images per
    pipeline call; each starts from its own seeded latents, so batching changes nothing.
    The pipeline's image processor converts the reference to RGB (transparency onto white),
    resizes it to the Q-Former's input size and normalizes it with the pipeline's mean/std.
    """
    if len(prompts) != len(seeds):
        raise SidpipeError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
    targets = [class_name] * len(prompts) if targets is None else list(targets)
    if len(targets) != len(prompts):
        raise SidpipeError(f"{len(prompts)} prompts but {len(targets)} target subjects")
    if batch_size < 1:
        raise SidpipeError(f"batch_size must be at least 1, got {batch_size}")
    factor = vae_scale_factor(pipe)
    if resolution < factor or resolution % factor:
        raise SidpipeError(f"resolution={resolution} must be a positive multiple of {factor}")
    negative_prompt = fit_negative_prompt(pipe, negative_prompt)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        with torch.no_grad():
            output = pipe(
                prompt=chunk,
                reference_image=reference,
                source_subject_category=[class_name] * len(chunk),
                target_subject_category=targets[start : start + batch_size],
                latents=seed_latents(pipe, seeds[start : start + batch_size], resolution),
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                num_inference_steps=steps,
                neg_prompt=negative_prompt,
                output_type="pil",
            )
        images.extend(output.images)
    return images
