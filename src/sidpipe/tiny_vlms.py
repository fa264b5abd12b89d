"""Tiny random LLaVA and BLIP-2 folders, for tests and the demo of the `transformers` backend.

Same classes as the real checkpoints (llava-hf/llava-1.5-*, Salesforce/blip2-opt-*), saved with
`save_pretrained` and loaded back with AutoProcessor / AutoModelForImageTextToText; random
weights, so their text is gibberish. A few hundred KB each, byte-identical per seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .io import SidpipeError, atomic_dir

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:") for content-list messages.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_VISION = {
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def train_tiny_tokenizer(
    corpus: list[str], specials: list[str], bos: str, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE (GPT-2 style) with `specials` appended and BOS prepended.

    The 256 byte symbols are registered up front and the vocab rebuilt from the merge list, so
    ids do not depend on the trainer's hash-map order.
    """
    if not corpus:
        raise SidpipeError("the tiny tokenizer needs a non-empty corpus")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer_model = Tokenizer(BPE())
    trainer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=alphabet,
    )
    trainer_model.train_from_iterator(corpus, trainer)
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for left, right in json.loads(trainer_model.to_str())["model"]["merges"]:
        if len(vocab) >= vocab_size - len(specials):
            break
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    for special in specials:
        vocab[special] = len(vocab)

    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def _text_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_llava(out_dir: Path, corpus: list[str], seed: int = 0) -> str:
    """Write a tiny LlavaForConditionalGeneration (CLIP vision tower + Llama) and its processor."""
    out_dir = Path(out_dir)
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tokenizer = train_tiny_tokenizer(corpus, specials, bos="<s>")
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "projection_dim": 16, **_VISION},
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            **_text_ids(tokenizer),
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # drop CLS, as LLaVA-1.5
        vision_feature_layer=-2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token the processor then drops again
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return str(out_dir)


def build_tiny_blip2(out_dir: Path, corpus: list[str], seed: int = 0) -> str:
    """Write a tiny Blip2ForConditionalGeneration (ViT + Q-Former + OPT) and its processor."""
    out_dir = Path(out_dir)
    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
    tokenizer = train_tiny_tokenizer(corpus, specials, bos="<s>")
    num_query_tokens = 4
    config = Blip2Config(
        vision_config=dict(_VISION),
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": _VISION["hidden_size"],
            "max_position_embeddings": 64,
            "vocab_size": len(tokenizer),
        },
        text_config={
            "model_type": "opt",
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            # Untied random weights: tied ones keep repeating the last input token (BOS), which
            # decodes to nothing and hides the caption path from tests.
            "tie_word_embeddings": False,
            **_text_ids(tokenizer),
        },
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return str(out_dir)
