"""Tiny *random* models for the demo and the tests: SD, CLIP, DINO, GroundingDINO and SAM.

`build_tiny_models` saves them with `save_pretrained` as the very same classes the paper's
models are, so `sidpipe.models`' loaders read them exactly as they read hub checkpoints and the
demo exercises the code the real runs use. Only rule `build_tiny_models` and the tests import
this module: it pulls in diffusers, transformers' model classes and tokenizers' trainers, which
no other job needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
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
    SamConfig,
    SamImageProcessorPil,
    SamModel,
    SamProcessor,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .io import SidpipeError, atomic_dir
from .models import SD_SCHEDULER_KWARGS

# CLIP's special tokens and context length (transformers' CLIPTokenizer defaults, OpenAI's vocab).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
_EOW = "</w>"  # CLIP's BPE marks the last symbol of every word with this suffix


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
