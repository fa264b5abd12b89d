"""Tiny random models: built deterministically, loaded back through the production loaders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from transformers import (
    BertTokenizer,
    CLIPImageProcessorPil,
    CLIPTokenizer,
    GroundingDinoImageProcessorPil,
    SamImageProcessorPil,
    ViTImageProcessorPil,
)

from sidpipe.io import SidpipeError, sha256_file
from sidpipe.models import (
    SD_SCHEDULER_KWARGS,
    load_clip,
    load_dino,
    load_grounding_dino,
    load_sam,
    load_sd_components,
    load_sd_pipeline,
    pick_device,
    torch_dtype,
)
from sidpipe.tiny_models import build_tiny_models, train_bert_tokenizer, train_clip_tokenizer

CORPUS = [
    "a photo of sks dog",
    "a photo of a dog on the beach",
    "a sks dog sleeping on a red sofa",
    "a painting of a cat in the style of van gogh",
    "the backpack is on the table next to a cup",
    "a dog running in the park, high quality photo",
]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("models") / "tiny", CORPUS, seed=0)


@pytest.fixture(scope="module")
def pipe(tiny: dict[str, str]):
    pipe = load_sd_pipeline(tiny["sd"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _generate(pipe, seed: int) -> Image.Image:
    return pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


def test_build_is_byte_identical_across_processes(tiny: dict[str, str], tmp_path: Path) -> None:
    # A second *process*: the BPE trainer's hash maps are seeded per process, so an in-process
    # rebuild would miss the non-determinism this guards against.
    script = (
        "import sys; from pathlib import Path; from sidpipe.tiny_models import build_tiny_models; "
        "build_tiny_models(Path(sys.argv[1]), sys.argv[2:], seed=0)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-c", script, str(again), *CORPUS], check=True, env=env)
    first = _hashes(Path(tiny["sd"]).parent)
    assert first == _hashes(again)
    assert {
        "sd/unet/diffusion_pytorch_model.safetensors",
        "clip/model.safetensors",
        "grounding_dino/model.safetensors",
        "grounding_dino/vocab.txt",
        "sam/model.safetensors",
    } <= set(first)
    assert not list(Path(tiny["sd"]).parent.parent.glob(".tiny.tmp-*"))  # atomic: no leftovers


def test_tiny_models_are_small(tiny: dict[str, str]) -> None:
    total = sum(p.stat().st_size for p in Path(tiny["sd"]).parent.rglob("*") if p.is_file())
    assert total < 8_000_000


def test_tokenizer_round_trip_identifier_and_truncation(tiny: dict[str, str]) -> None:
    tok = CLIPTokenizer.from_pretrained(tiny["sd"], subfolder="tokenizer")
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    text = "a photo of sks dog on the beach"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # unk is <|endoftext|>: nothing fell back to it
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok("A Photo of SKS Dog").input_ids, skip_special_tokens=True) == (
        "a photo of sks dog"  # CLIP lowercases
    )
    # The identifier was in the corpus: one whole word; unseen words still encode (byte-level).
    assert tok.tokenize("sks") == ["sks</w>"]
    for word in ("xqzv", "ünïcödé", "🦓"):
        pieces = tok(word).input_ids[1:-1]
        assert pieces and tok.eos_token_id not in pieces
        assert tok.decode(pieces) == word
    long = tok("dog " * 200, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id


def _openai_bpe_ids(tok: CLIPTokenizer, vocab: dict[str, int], merges: list[str], text: str):
    """Encode like OpenAI's simple_tokenizer.bpe: the last symbol of a word carries '</w>'."""
    ranks = {tuple(line.split()): i for i, line in enumerate(merges)}
    backend = tok.backend_tokenizer
    words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ids = []
    for word, _ in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(pairwise(symbols))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[s] for s in symbols]
    return ids


def test_tokenizer_files_match_clip_bpe_conventions(tiny: dict[str, str], tmp_path: Path) -> None:
    folder = Path(tiny["sd"]) / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    # OpenAI layout: 256 byte symbols, the same with </w>, merges, then the two specials.
    by_id = sorted(vocab, key=vocab.get)
    assert all(len(t) == 1 for t in by_id[:256])
    assert by_id[256:512] == [t + "</w>" for t in by_id[:256]]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]

    tok = CLIPTokenizer.from_pretrained(folder)
    only_files = tmp_path / "vocab_merges_only"  # the loader's other path: no tokenizer.json
    only_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / name, only_files / name)
    from_files = CLIPTokenizer.from_pretrained(only_files)
    for text in [*CORPUS, "Sks dogs, 3 cats & a zebra!"]:
        ids = tok(text).input_ids
        assert ids[1:-1] == _openai_bpe_ids(tok, vocab, lines[1:], text)
        assert from_files(text).input_ids == ids


def test_train_clip_tokenizer_standalone(tmp_path: Path) -> None:
    tok = train_clip_tokenizer(CORPUS, tmp_path / "tok", vocab_size=540)
    assert len(tok) == 540
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("a sks dog").input_ids == tok("a sks dog").input_ids
    with pytest.raises(SidpipeError, match="514"):
        train_clip_tokenizer(CORPUS, tmp_path / "small", vocab_size=100)


def test_pipeline_generates_and_is_seed_reproducible(pipe) -> None:
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    first, again, other = (np.asarray(_generate(pipe, s)) for s in (0, 0, 1))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_scheduler_config_is_stable_diffusions(tiny: dict[str, str]) -> None:
    config = DDIMScheduler.from_pretrained(tiny["sd"], subfolder="scheduler").config
    assert {key: config[key] for key in SD_SCHEDULER_KWARGS} == SD_SCHEDULER_KWARGS


def test_sd_components_for_training(tiny: dict[str, str]) -> None:
    parts = load_sd_components(tiny["sd"], device="cpu")
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert torch.equal(parts.noise_scheduler.betas, DDIMScheduler(**SD_SCHEDULER_KWARGS).betas)
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    latents = parts.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    ids = parts.tokenizer("a sks dog", padding="max_length", return_tensors="pt").input_ids
    hidden = parts.text_encoder(ids).last_hidden_state
    noise = parts.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert noise.shape == latents.shape


def _images() -> list[Image.Image]:
    gradient = np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (40, 1))
    return [
        Image.new("RGB", (50, 40), (200, 30, 30)),
        Image.fromarray(np.stack([gradient, gradient[::-1], np.zeros_like(gradient)], axis=-1)),
    ]


def test_clip_embeddings(tiny: dict[str, str]) -> None:
    model, processor = load_clip(tiny["clip"], device="cpu")
    assert not model.training
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)  # works w/o torchvision
    images = processor(images=_images(), return_tensors="pt")
    texts = processor(text=["a sks dog", "a red sofa"], padding=True, return_tensors="pt")
    with torch.no_grad():
        # transformers 5: get_*_features return a ModelOutput; the embedding is pooler_output.
        image_emb = model.get_image_features(**images).pooler_output
        text_emb = model.get_text_features(**texts).pooler_output
    dim = model.config.projection_dim
    assert images["pixel_values"].shape == (2, 3, 32, 32)
    assert image_emb.shape == (2, dim) and text_emb.shape == (2, dim)
    assert not torch.allclose(image_emb[0], image_emb[1])
    assert not torch.allclose(text_emb[0], text_emb[1])


def test_dino_cls_embedding(tiny: dict[str, str]) -> None:
    model, processor = load_dino(tiny["dino"], device="cpu")
    assert not model.training and model.pooler is None
    assert isinstance(processor, ViTImageProcessorPil)
    inputs = processor(images=_images(), return_tensors="pt")
    with torch.no_grad():
        cls = model(**inputs).last_hidden_state[:, 0]
    assert cls.shape == (2, model.config.hidden_size)
    assert not torch.allclose(cls[0], cls[1])


def test_bert_tokenizer_has_bert_ids_and_covers_any_ascii(tiny: dict[str, str]) -> None:
    tok = BertTokenizer.from_pretrained(tiny["grounding_dino"])
    # GroundingDINO hard-codes these ids ([CLS], [SEP], ".", "?") to split prompts into phrases.
    ids = tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"])
    assert ids == [0, 100, 101, 102, 103, 1012, 1029]
    encoded = tok("A sks Dog. a cat?").input_ids
    assert encoded[0] == 101 and encoded[-1] == 102 and 1012 in encoded and 1029 in encoded
    assert tok.tokenize("a sks dog.") == ["a", "sks", "dog", "."]  # corpus words are whole
    assert tok.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]  # unseen: by character
    assert tok.unk_token_id not in tok("Zebras & 3 #robots!").input_ids
    lines = (Path(tiny["grounding_dino"]) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines == sorted(tok.get_vocab(), key=tok.get_vocab().get)
    from_txt = BertTokenizer(vocab=str(Path(tiny["grounding_dino"]) / "vocab.txt"))
    assert from_txt("a sks dog.").input_ids == tok("a sks dog.").input_ids


def test_train_bert_tokenizer_standalone(tmp_path: Path) -> None:
    tok = train_bert_tokenizer(["Crème brûlée, please", "a toy car"], tmp_path / "tok")
    assert tok.tokenize("Crème brûlée") == ["creme", "brulee"]  # uncased, accents stripped
    assert BertTokenizer.from_pretrained(tmp_path / "tok")("a toy car").input_ids == (
        tok("a toy car").input_ids
    )


def _detect_one(model, processor, image: Image.Image, prompt: str):
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return inputs, outputs


def test_grounding_dino_detects_on_a_single_image(tiny: dict[str, str]) -> None:
    model, processor = load_grounding_dino(tiny["grounding_dino"], device="cpu")
    assert not model.training
    assert isinstance(processor.image_processor, GroundingDinoImageProcessorPil)
    assert isinstance(processor.tokenizer, BertTokenizer)
    assert model.config.decoder_layers >= 2 and model.config.text_config.model_type == "bert"
    # A batch of one: the 4th feature level must be larger than 1x1 for its GroupNorm.
    inputs, outputs = _detect_one(model, processor, _images()[0], "dog.")
    assert inputs["pixel_values"].shape[-2:] == (102, 128)  # 50x40: long side capped at 128
    queries = model.config.num_queries
    assert outputs.logits.shape[:2] == (1, queries) and outputs.pred_boxes.shape == (1, queries, 4)
    results = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(40, 50)]
    )
    boxes = results[0]["boxes"]
    assert boxes.shape == (queries, 4) and len(results[0]["scores"]) == queries
    assert results[0]["text_labels"] and all(isinstance(t, str) for t in results[0]["text_labels"])
    assert float(boxes[:, 2].max()) <= 50 + 1e-3 and float(boxes[:, 3].max()) <= 40 + 1e-3


def test_sam_segments_a_box(tiny: dict[str, str]) -> None:
    model, processor = load_sam(tiny["sam"], device="cpu")
    assert not model.training
    assert isinstance(processor.image_processor, SamImageProcessorPil)
    image = _images()[1]  # 48x40
    inputs = processor(images=[image], input_boxes=[[[5.0, 4.0, 30.0, 36.0]]], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)  # long side 64, padded square
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_boxes=inputs["input_boxes"].float(),
            multimask_output=True,
        )
    assert outputs.pred_masks.shape == (1, 1, 3, 32, 32) and outputs.iou_scores.shape == (1, 1, 3)
    masks = processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (1, 3, 40, 48) and masks[0].dtype == torch.bool


@pytest.mark.parametrize(
    "loader",
    [load_sd_pipeline, load_sd_components, load_clip, load_dino, load_grounding_dino, load_sam],
)
def test_missing_folder_error_names_path(loader, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(SidpipeError, match="no_such_model") as info:
        loader(str(missing), device="cpu")
    assert "models." in str(info.value)


def test_a_home_relative_model_folder_loads(
    tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/models/sd` passes the folder check and must reach from_pretrained expanded (the hub
    client would take the raw string for a malformed repo id)."""
    from sidpipe.descriptions.text import load_base_tokenizer

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for name in ("sd", "clip", "dino"):
        (home / "models" / name).symlink_to(tiny[name])
    monkeypatch.setenv("HOME", str(home))
    assert load_sd_components("~/models/sd", device="cpu").unet is not None
    assert load_sd_pipeline("~/models/sd", device="cpu").tokenizer is not None
    assert load_clip("~/models/clip", device="cpu")[0] is not None
    assert load_dino("~/models/dino", device="cpu")[0] is not None
    assert load_base_tokenizer("~/models/sd") is not None


@pytest.mark.parametrize("loader", [load_sd_pipeline, load_sd_components])
def test_base_model_errors_name_the_config_key_that_sets_it(loader, tmp_path: Path) -> None:
    """The schema's key is models.base (an encoder arm's is its method's base_model)."""
    for model in (str(tmp_path / "no_such_model"), str(tmp_path)):
        with pytest.raises(SidpipeError, match=r"config key models\.base, or an encoder"):
            loader(model, device="cpu")


@pytest.mark.parametrize(
    ("loader", "key"),
    [(load_clip, "clip"), (load_grounding_dino, "grounding_dino"), (load_sam, "sam")],
)
def test_existing_folder_without_model_is_wrapped(loader, key: str, tmp_path: Path) -> None:
    with pytest.raises(SidpipeError, match=re.escape(str(tmp_path)) + f".*models.{key}"):
        loader(str(tmp_path), device="cpu")


def test_loaders_refuse_the_wrong_model_kind(tiny: dict[str, str]) -> None:
    with pytest.raises(SidpipeError, match=r"GroundingDINO.*models\.grounding_dino"):
        load_grounding_dino(tiny["sam"], device="cpu")
    with pytest.raises(SidpipeError, match=r"SAM.*models\.sam.*model_type 'clip', not 'sam'"):
        load_sam(tiny["clip"], device="cpu")


def test_dtype_and_device() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(SidpipeError, match="float64"):
        torch_dtype("float64")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_hidden_bitsandbytes_is_skipped_by_diffusers_and_peft_until_asked_for() -> None:
    """Jobs hide it (diffusers' quantizers and peft import it, and torch._inductor with it,
    whenever it is installed); 8-bit Adam still gets the real module."""
    code = (
        "import sys\n"
        "from sidpipe.models import hide_bitsandbytes, import_bitsandbytes\n"
        "hide_bitsandbytes()\n"
        "import diffusers.quantizers.bitsandbytes.utils, peft.helpers\n"
        "from diffusers import UNet2DConditionModel\n"
        "assert sys.modules['bitsandbytes'] is None, 'imported'\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "print(import_bitsandbytes().optim.AdamW8bit.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "AdamW8bit"


def test_tiny_model_builders_still_resolve_from_models() -> None:
    import sidpipe.models
    import sidpipe.tiny_models

    assert sidpipe.models.build_tiny_models is sidpipe.tiny_models.build_tiny_models
    assert sidpipe.models.train_clip_tokenizer is sidpipe.tiny_models.train_clip_tokenizer
    with pytest.raises(AttributeError, match="no_such_name"):
        sidpipe.models.no_such_name  # noqa: B018


@pytest.mark.parametrize("torch_first", [False, True])
def test_setup_job_runs_torch_on_the_jobs_threads(torch_first: bool) -> None:
    code = (
        ("import torch\n" if torch_first else "")
        + "import sys\nfrom sidpipe.models import setup_job\nsetup_job(1)\n"
        + "import torch\nprint(torch.get_num_threads(), sys.modules['bitsandbytes'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "None"]


def test_jobs_drop_only_the_torchvision_fallback_warning() -> None:
    """Importing diffusers' pipelines warned "`CLIPImageProcessor` requires torchvision ...
    Install torchvision" in every sampling log; sidpipe runs without torchvision on purpose.
    Without `setup_job` the warning is there (so the test sees it at all); with it, it is gone
    and another warning of the same logger still gets through."""
    warn = (
        "import logging\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another warning')\n"
    )
    code = "from diffusers import StableDiffusionPipeline\n" + warn
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    setup = "from sidpipe.models import setup_job\nsetup_job(1)\n"
    plain, quiet = (
        subprocess.run(
            [sys.executable, "-c", prefix + code], capture_output=True, text=True, env=env
        )
        for prefix in ("from sidpipe.models import hide_bitsandbytes\nhide_bitsandbytes()\n", setup)
    )
    assert plain.returncode == 0 and quiet.returncode == 0, plain.stderr[-2000:] + quiet.stderr
    assert "`CLIPImageProcessor` requires torchvision" in plain.stderr
    assert "requires torchvision" not in quiet.stderr
    assert "another warning" in quiet.stderr


def test_a_gpu_given_but_unusable_fails_instead_of_running_on_the_cpu(monkeypatch) -> None:
    """With a CUDA build of torch, a job given a GPU (CUDA_VISIBLE_DEVICES, as SLURM sets it)
    that CUDA cannot use (a driver older than the wheels) fails naming what to check, instead
    of "auto" running it on the CPU until its time limit; a CPU build of torch (this machine's,
    the demo's, the test cluster's fake GPU) runs on the CPU as before."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(SidpipeError) as err:
        pick_device("auto")
    message = str(err.value)
    assert "CUDA_VISIBLE_DEVICES=0" in message and "built for CUDA 12.8" in message
    assert "nvidia-smi" in message
    for hidden in ("", "-1", "NoDevFiles"):  # no GPU given: the CPU, as asked
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert pick_device("auto").type == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pick_device("auto").type == "cpu"
