"""One loading path for every model: a config string handed to the library's `from_pretrained`.

On the cluster the string is a hub id; in tests and the demo it is a local folder written by
`build_tiny_models`, which saves tiny *random* models of the very same classes with
`save_pretrained`, so the demo exercises exactly the code the real runs use.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    PreTrainedConfig,
    SamConfig,
    SamImageProcessorPil,
    SamModel,
    SamProcessor,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .io import SidpipeError, atomic_dir, log

# DDIM with the noise schedule Stable Diffusion v1 was trained with.
SD_SCHEDULER_KWARGS: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# CLIP's special tokens and context length (transformers' CLIPTokenizer defaults, OpenAI's vocab).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
_EOW = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix


def torch_dtype(name: str) -> torch.dtype:
    """Map a config dtype name ("float32", "float16", "bfloat16") to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise SidpipeError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def pick_device(prefer: str = "auto") -> torch.device:
    """'auto' gives cuda when available, else cpu; an explicit device must exist."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(prefer)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SidpipeError(f"device {prefer!r} requested but CUDA is not available; use 'auto'")
    return device


def _looks_local(model: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else path-like is meant as a local folder."""
    return (
        Path(model).is_absolute()
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or Path(model).exists()
    )


@contextlib.contextmanager
def _loading(what: str, model: str, key: str) -> Iterator[None]:
    """Turn any from_pretrained failure into an error naming the model string and config key."""
    if _looks_local(model) and not Path(model).expanduser().is_dir():
        # Otherwise the hub client reports a confusing "Repo id must be in the form ..." error.
        raise SidpipeError(
            f"{what}: model folder {model!r} (config key models.{key}) does not exist; "
            "point it at a hub id or a folder written by save_pretrained / build_tiny_models"
        )
    try:
        yield
    except Exception as err:
        raise SidpipeError(
            f"cannot load {what} from {model!r} (config key models.{key}): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. It must be a Hugging Face hub id "
            "(already cached when HF_HUB_OFFLINE=1) or a local folder written by "
            "save_pretrained / build_tiny_models."
        ) from err


def _half_on_cpu(dtype: torch.dtype, device: torch.device) -> None:
    if dtype != torch.float32 and device.type == "cpu":
        log.warning("%s on CPU is slow and some ops lack kernels; prefer float32 there", dtype)


def load_sd_pipeline(
    model: str, dtype: str = "float32", device: str = "auto"
) -> StableDiffusionPipeline:
    """Stable Diffusion pipeline with a DDIM scheduler and no safety checker, on `device`."""
    dev, dt = pick_device(device), torch_dtype(dtype)
    _half_on_cpu(dt, dev)
    with _loading("the Stable Diffusion pipeline", model, "sd"):
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler")
        # feature_extractor only feeds the safety checker; skipping it also avoids loading a
        # CLIP image processor (torchvision-backed by default in transformers 5).
        pipe = StableDiffusionPipeline.from_pretrained(
            model,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=dt,
        )
    return pipe.to(dev)


def load_sd_components(model: str, dtype: str = "float32", device: str = "auto") -> SimpleNamespace:
    """What fine-tuning needs: tokenizer, text_encoder, vae, unet and a DDPM noise_scheduler."""
    dev, dt = pick_device(device), torch_dtype(dtype)
    _half_on_cpu(dt, dev)
    with _loading("Stable Diffusion components", model, "sd"):
        parts = SimpleNamespace(
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dt),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dt),
            unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dt),
            # Training adds noise with the same schedule the sampler removes it with.
            noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        )
    for name in ("text_encoder", "vae", "unet"):
        getattr(parts, name).to(dev)
    return parts


def load_clip(model: str, device: str = "auto") -> tuple[CLIPModel, CLIPProcessor]:
    """CLIP model (eval mode) and its processor, with the PIL image backend (no torchvision)."""
    dev = pick_device(device)
    with _loading("the CLIP model", model, "clip"):
        clip = CLIPModel.from_pretrained(model)
        processor = CLIPProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil"),
            tokenizer=CLIPTokenizer.from_pretrained(model),
        )
    return clip.eval().to(dev), processor


def load_dino(model: str, device: str = "auto") -> tuple[ViTModel, ViTImageProcessorPil]:
    """DINO ViT (eval mode, no pooler: use the CLS token) and its PIL-backed image processor."""
    dev = pick_device(device)
    with _loading("the DINO model", model, "dino"):
        # DINO checkpoints carry no pooler weights; asking for one would add random layers.
        dino = ViTModel.from_pretrained(model, add_pooling_layer=False)
        processor = AutoImageProcessor.from_pretrained(model, backend="pil")
    return dino.eval().to(dev), processor


def _expect_model_type(model: str, expected: str) -> None:
    """Refuse a checkpoint of another architecture: from_pretrained would only warn and fill
    the whole model with random weights (a CLIP folder loads "fine" as SAM)."""
    found = PreTrainedConfig.get_config_dict(model)[0].get("model_type")
    if found != expected:
        raise ValueError(f"its config.json is for model_type {found!r}, not {expected!r}")


def load_grounding_dino(
    model: str, device: str = "auto"
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """GroundingDINO detector (eval mode) and its processor, with the PIL image backend."""
    dev = pick_device(device)
    with _loading("the GroundingDINO detector", model, "grounding_dino"):
        _expect_model_type(model, "grounding-dino")
        detector = GroundingDinoForObjectDetection.from_pretrained(model)
        # Built from its parts, like CLIP's: AutoProcessor would hand `backend` to the tokenizer.
        processor = GroundingDinoProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil"),
            tokenizer=AutoTokenizer.from_pretrained(model),
        )
    return detector.eval().to(dev), processor


def load_sam(model: str, device: str = "auto") -> tuple[SamModel, SamProcessor]:
    """SAM (eval mode) and its processor, with the PIL image backend (no torchvision)."""
    dev = pick_device(device)
    with _loading("the SAM segmenter", model, "sam"):
        _expect_model_type(model, "sam")
        sam = SamModel.from_pretrained(model)
        processor = SamProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model, backend="pil")
        )
    return sam.eval().to(dev), processor


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in GPT-2/CLIP `bytes_to_unicode` order.

    That order is printable bytes first, then the rest mapped to U+0100..; it equals code point
    order, so sorting the `tokenizers` alphabet reproduces OpenAI's vocab layout.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    return alphabet


def train_clip_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1000) -> CLIPTokenizer:
    """Train a byte-level BPE in CLIP's format on `texts` and save it as a CLIPTokenizer folder.

    Deterministic. The vocab is laid out like OpenAI's: 256 bytes, the same with "</w>", the
    merges in order, then <|startoftext|>, <|endoftext|>; so no text ever maps to unknown.
    """
    alphabet = _byte_alphabet()
    if vocab_size < 2 * len(alphabet) + 2:
        raise SidpipeError(f"vocab_size={vocab_size} is below CLIP's 514 base tokens")
    # Pre-tokenize exactly as CLIPTokenizer does (NFC, whitespace, lowercase, CLIP's word regex,
    # byte-level), so the merges apply to the same words at encode time.
    reference = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=_EOW))
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(alphabet),  # room for the "</w>" tokens registered below
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix=_EOW,
        # The trainer creates "x</w>" ids in hash-map order, which changes tie-breaks between
        # runs (huggingface/tokenizers#1794); registering them all up front fixes their ids.
        special_tokens=[char + _EOW for char in alphabet],
    )
    bpe.train_from_iterator(texts, trainer)
    trained = json.loads(bpe.to_str())["model"]["merges"]

    vocab = {token: i for i, token in enumerate(alphabet + [c + _EOW for c in alphabet])}
    merges: list[tuple[str, str]] = []
    for left, right in trained:
        if len(vocab) >= vocab_size - 2:
            break
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS, EOS):
        vocab[special] = len(vocab)

    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(
            json.dumps(vocab, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        # Built from the same vocab/merges (not from_pretrained, whose call kwargs such as
        # local_files_only would leak into tokenizer_config.json); adds tokenizer.json + config.
        tokenizer = CLIPTokenizer(
            vocab=vocab,
            merges=merges,
            model_max_length=MAX_LENGTH,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            unk_token=EOS,
        )
        tokenizer.save_pretrained(tmp)
    return tokenizer


# bert-base-uncased's layout of its first 1067 ids. GroundingDINO hard-codes the ids of [CLS],
# [SEP], "." and "?" (101, 102, 1012, 1029) to split prompts into phrases, so a tiny tokenizer
# must put them exactly there.
_BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_BERT_FIRST_CHAR_ID = 999  # "!"; then printable ASCII without upper case, "." lands on 1012


def _bert_base_vocab() -> dict[str, int]:
    vocab = {"[PAD]": 0, **{f"[unused{i}]": 1 + i for i in range(99)}}
    vocab.update({k: v for k, v in _BERT_SPECIALS.items() if k != "[PAD]"})
    vocab.update({f"[unused{i}]": 5 + i for i in range(99, _BERT_FIRST_CHAR_ID - 5)})
    for char in (chr(c) for c in range(33, 127) if not chr(c).isupper()):
        vocab[char] = len(vocab)
    assert (vocab["."], vocab["?"], len(vocab)) == (1012, 1029, 1067)
    return vocab


def train_bert_tokenizer(texts: list[str], out_dir: Path, max_length: int = 32) -> BertTokenizer:
    """Build a tiny uncased WordPiece tokenizer in bert-base-uncased's layout from `texts`.

    Deterministic: the vocab is BERT's special and ASCII ids, the corpus' other characters, every
    character as a "##" continuation, then the corpus' words (split by BERT's own normalizer and
    pre-tokenizer) in sorted order. No merge learning is needed: unseen words still encode
    character by character, and WordPieceTrainer's tie-breaks depend on hash-map order.
    """
    reference = BertTokenizer().backend_tokenizer
    words: set[str] = set()
    for text in texts:
        normalized = reference.normalizer.normalize_str(text)
        words.update(word for word, _ in reference.pre_tokenizer.pre_tokenize_str(normalized))
    vocab = _bert_base_vocab()
    chars = sorted({char for word in words for char in word} - set(vocab))
    for token in chars:
        vocab[token] = len(vocab)
    for token in sorted(t for t in vocab if len(t) == 1):
        vocab["##" + token] = len(vocab)
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))

    with atomic_dir(out_dir) as tmp:
        tokenizer = BertTokenizer(vocab=vocab, model_max_length=max_length)
        tokenizer.save_pretrained(tmp)
        # The classic BERT file too (hub repos ship it; transformers 5 only writes tokenizer.json).
        ordered = sorted(vocab, key=vocab.get)
        (tmp / "vocab.txt").write_text("".join(f"{token}\n" for token in ordered), "utf-8")
    return tokenizer


def _save_tiny_grounding_dino(out: Path, corpus: list[str], seed: int) -> None:
    """Tiny random GroundingDINO (Swin + BERT) and its processor, for 128 px inputs.

    128 px, not 64: the extra fourth feature level (a stride-2 conv on the last Swin stage)
    must be larger than 1x1, or its GroupNorm fails on a batch of one image.
    """
    max_text_len = 32
    tokenizer = train_bert_tokenizer(corpus, out, max_length=max_text_len)
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": 128,
            "patch_size": 4,
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 2,
            "out_indices": [2, 3, 4],  # the three feature levels the real model uses
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": max_text_len,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_queries=10,
        d_model=32,
        encoder_layers=1,
        # The per-layer box heads are tied to layer 0's; with a single decoder layer there is
        # nothing to tie and transformers refuses to build the model.
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 128, "longest_edge": 128}
        ),
        tokenizer=tokenizer,
    ).save_pretrained(out)


def _save_tiny_sam(out: Path, seed: int) -> None:
    """Tiny random SAM (64 px input, 8x8 embedding, 32x32 low-res masks) and its processor."""
    hidden = 32
    config = SamConfig(
        vision_config={
            "hidden_size": hidden,
            "output_channels": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": 64,
            "patch_size": 8,
            "window_size": 4,
            "global_attn_indexes": [1],
            # The shared positional embedding is [sin, cos] of these: half the prompt width.
            "num_pos_feats": hidden // 2,
        },
        prompt_encoder_config={
            "hidden_size": hidden,
            "image_size": 64,
            "patch_size": 8,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": hidden,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    torch.manual_seed(seed)
    SamModel(config).save_pretrained(out)
    # As in facebook/sam-*: resize the long side to the encoder's input and pad to a square;
    # mask prompts at the decoder's low-res mask size (4x the 8x8 embedding).
    SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 32},
            mask_pad_size={"height": 32, "width": 32},
        )
    ).save_pretrained(out)


def _tiny_text_config(tokenizer: CLIPTokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_models(
    out_dir: Path, corpus: list[str], seed: int = 0, resolution: int = 64
) -> dict[str, str]:
    """Write tiny random SD, CLIP, DINO, GroundingDINO and SAM folders under `out_dir`.

    Byte-identical per seed and corpus.
    """
    out_dir = Path(out_dir)
    if resolution % 8:
        raise SidpipeError(f"resolution={resolution} must be a multiple of 8 (VAE downsampling)")
    with atomic_dir(out_dir) as tmp:
        tokenizer = train_clip_tokenizer(corpus, tmp / "sd" / "tokenizer")
        text_config = _tiny_text_config(tokenizer)

        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        torch.manual_seed(seed)
        # SD's VAE at 1/16 of its width: four blocks (three 2x downsamplings, 64 px -> 8x8x4
        # latents), widths 1:2:4:4, two layers per block. So the VAE's share of a training
        # step's compute is close to SD-2.1-base's at 512 px (benchmarks/bench_training.py).
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=resolution,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=text_config["hidden_size"],
            attention_head_dim=8,
            norm_num_groups=32,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**SD_SCHEDULER_KWARGS),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp / "sd")

        torch.manual_seed(seed)
        clip_config = CLIPConfig(
            text_config=text_config,
            vision_config={
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
            projection_dim=16,
        )
        CLIPModel(clip_config).save_pretrained(tmp / "clip")
        CLIPProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=tokenizer,
        ).save_pretrained(tmp / "clip")
        for name in ("vocab.json", "merges.txt"):  # keep the usual CLIP repo layout
            shutil.copyfile(tmp / "sd" / "tokenizer" / name, tmp / "clip" / name)

        torch.manual_seed(seed)
        vit_config = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        ViTModel(vit_config, add_pooling_layer=False).save_pretrained(tmp / "dino")
        # DINO normalises with the ImageNet statistics (facebook/dino-* preprocessor configs).
        ViTImageProcessorPil(
            size={"height": 32, "width": 32},
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        ).save_pretrained(tmp / "dino")

        _save_tiny_grounding_dino(tmp / "grounding_dino", corpus, seed)
        _save_tiny_sam(tmp / "sam", seed)
    names = ("sd", "clip", "dino", "grounding_dino", "sam")
    return {name: str(out_dir / name) for name in names}
