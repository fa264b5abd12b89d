"""ELITE inference (sidpipe.encoders.elite) on tiny random checkpoints in the official layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sidpipe.encoders import elite as E
from sidpipe.encoders.tiny import build_tiny_elite
from sidpipe.io import SidpipeError

# The official parameter names (csyxwei/ELITE train_global.Mapper / train_local.MapperLocal:
# five `mapping_i` and `mapping_patch_i` = Sequential(Linear, LayerNorm, LeakyReLU, Linear,
# LayerNorm, LeakyReLU, Linear), width 1024), plus the scripts' `add_module(
# f'{_name.replace(".", "_")}_to_k')` / `_to_v` (bias-free nn.Linear of to_k's shape) for every
# UNet CrossAttention not named attn1.
SD14_CROSS_ATTENTION = {  # SD v1-4's 16 attn2 layers -> their inner width (to_k.weight rows)
    **{f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w for b, w in
       ((0, 320), (1, 640), (2, 1280)) for a in (0, 1)},
    **{f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2": w for b, w in
       ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)},
    "mid_block.attentions.0.transformer_blocks.0.attn2": 1280,
}  # fmt: skip
TINY_CROSS_ATTENTION = {  # tiny_models' UNet: (32, 64) channels, one cross-attn down/up block
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": 32,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 32,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2": 32,
    "mid_block.attentions.0.transformer_blocks.0.attn2": 64,
}
SEQUENTIAL = {0: "linear_in", 1: "norm", 3: "linear", 4: "norm", 6: "linear_out"}
PROMPTS = ["a photo of a S on the beach", "a S in the jungle"]


def official_shapes(attn: dict, input_dim: int, output_dim: int, hidden: int, text: int) -> dict:
    shapes = {}
    for i in range(5):
        for head in (f"mapping_{i}", f"mapping_patch_{i}"):
            for j, kind in SEQUENTIAL.items():
                rows = output_dim if kind == "linear_out" else hidden
                cols = {"linear_in": input_dim, "linear": hidden, "linear_out": hidden}.get(kind)
                shapes[f"{head}.{j}.weight"] = (rows, cols) if cols else (rows,)
                shapes[f"{head}.{j}.bias"] = (rows,)
    for name, width in attn.items():
        for proj in ("to_k", "to_v"):
            shapes[f"{name.replace('.', '_')}_{proj}.weight"] = (width, text)
    return shapes


def shapes_of(state: dict) -> dict:
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_elite(tmp_path_factory.mktemp("elite"), seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    return E.load_elite(
        tiny["sd"], tiny["image_encoder"], tiny["global_mapper"], tiny["local_mapper"]
    )


def _reference(seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    mask = np.zeros((48, 40), np.uint8)
    mask[10:40, 8:30] = 255
    return image, Image.fromarray(mask)


def _gen(model, prompts, seeds, reference=None, **kwargs):
    image, mask = reference or _reference(0)
    kwargs = {"steps": 4, "resolution": 64, **kwargs}
    return [np.array(x) for x in model.generate(image, mask, prompts, seeds, **kwargs)]


def test_official_layout_at_sd14_dims():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD v1-4's UNet (the defaults but 768-d text), no memory
        unet = UNet2DConditionModel(cross_attention_dim=768)
        mappers = [E.Mapper(1024, 768), E.MapperLocal(1024, 768)]
    expected = official_shapes(SD14_CROSS_ATTENTION, 1024, 768, 1024, 768)
    assert len(expected) == 5 * 2 * 10 + 16 * 2
    for mapper in mappers:
        E.add_projections(mapper, unet)
        assert shapes_of(mapper.state_dict()) == expected


def test_tiny_checkpoints_have_the_official_layout(tiny):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet")
    expected = official_shapes(TINY_CROSS_ATTENTION, 32, 32, 32, 32)
    for cls, name in ((E.Mapper, "global_mapper"), (E.MapperLocal, "local_mapper")):
        state = torch.load(tiny[name], map_location="cpu", weights_only=True)
        assert shapes_of(state) == expected
        ours = cls(32, 32, hidden_dim=32)
        E.add_projections(ours, unet)
        assert shapes_of(ours.state_dict()) == expected
        ours.load_state_dict(state)  # strict
        to_k = "mid_block_attentions_0_transformer_blocks_0_attn2_to_k.weight"
        assert torch.equal(
            state[to_k], unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight
        )


def test_a_mapper_file_that_is_a_web_page_is_named(tiny, tmp_path):
    """A Drive link saves its confirmation page: the check job names it before any ELITE job,
    and the loader names a file torch cannot read instead of torch's unpickling advice."""
    from sidpipe.hub import check_manual_file

    page = tmp_path / "global_mapper.pt"
    page.write_text("\n<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(
        SidpipeError, match=r"global_mapper\.pt \(methods\.elite\.global_mapper\) is a web page"
    ):
        check_manual_file(
            str(page), "methods.elite.global_mapper", "the ELITE repo", tmp_path / "r.json"
        )
    assert not (tmp_path / "r.json").exists()
    check_manual_file(
        tiny["global_mapper"], "methods.elite.global_mapper", "x", tmp_path / "r.json"
    )
    page.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        SidpipeError, match=r"global_mapper\.pt: not a readable ELITE Mapper checkpoint \(\w"
    ):
        E.load_elite(tiny["sd"], tiny["image_encoder"], str(page), tiny["local_mapper"])


def test_generate_sizes_determinism_and_batch_independence(model):
    images = _gen(model, PROMPTS, [0, 1])
    assert [x.shape for x in images] == [(64, 64, 3)] * 4
    assert np.array_equal(images[0], _gen(model, PROMPTS[:1], [0])[0])  # same prompt + seed
    assert np.array_equal(images[3], _gen(model, PROMPTS[1:], [1])[0])  # alone = in a batch
    assert not np.array_equal(images[0], images[1])  # seeds differ
    assert not np.array_equal(images[0], images[2])  # prompts differ
    ddim = _gen(model, PROMPTS[:1], [0], scheduler="ddim")[0]  # the SID experiment's sampler
    assert ddim.shape == (64, 64, 3) and not np.array_equal(ddim, images[0])
    batched = _gen(model, PROMPTS, [0, 1], batch_size=4)  # one UNet batch of 8 rows
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(images, batched, strict=True)) <= 2


def test_reference_and_local_branch_reach_the_output(model, tiny):
    base = _gen(model, PROMPTS[1:], [1])[0]
    assert not np.array_equal(base, _gen(model, PROMPTS[1:], [1], reference=_reference(5))[0])
    no_local = _gen(model, PROMPTS[1:], [1], llambda=0.0)[0]
    assert not np.array_equal(base, no_local)
    # lambda 0 adds nothing: the global-only inference (inference_global.py with w0).
    global_only = E.load_elite(tiny["sd"], tiny["image_encoder"], tiny["global_mapper"], None)
    assert np.array_equal(no_local, _gen(global_only, PROMPTS[1:], [1])[0])
    # The unconditional pass sees neither the reference nor the local branch (guidance 0: only it).
    uncond = _gen(model, PROMPTS[1:], [1], guidance_scale=0.0)[0]
    assert np.array_equal(uncond, _gen(model, PROMPTS[1:], [1], guidance_scale=0.0, llambda=0)[0])
    assert np.array_equal(
        uncond, _gen(global_only, PROMPTS[:1], [1], _reference(5), guidance_scale=0)[0]
    )
    other_mask = Image.new("L", (40, 48), 255)
    assert not np.array_equal(
        base, _gen(model, PROMPTS[1:], [1], (_reference(0)[0], other_mask))[0]
    )


def test_reference_features_follow_the_official_layers(model, tiny):
    """w0 = Mapper(last, h4, h8, h12, h16)[:, 0] of the unmasked image; local = MapperLocal of the
    masked object's same layers times the 16x16 mask, computed here from the checkpoints."""
    from transformers import CLIPVisionModel

    image, mask = _reference(0)
    vision = CLIPVisionModel.from_pretrained(tiny["image_encoder"]).eval()
    keep = np.array(mask.convert("RGB")) > 0
    rgb = np.array(image)

    def feats(pixels: np.ndarray) -> list[torch.Tensor]:
        small = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))
        x = torch.tensor(small, dtype=torch.float32).permute(2, 0, 1)[None] / 255
        x = (x - torch.tensor(E.CLIP_MEAN)[:, None, None]) / torch.tensor(E.CLIP_STD)[:, None, None]
        out = vision(x, output_hidden_states=True)
        return [out[0], out[2][4], out[2][8], out[2][12], out[2][16]]

    def loaded(cls, name):
        mapper = cls(32, 32, hidden_dim=32)
        E.add_projections(mapper, model.unet)
        mapper.load_state_dict(torch.load(tiny[name], weights_only=True))
        return mapper

    with torch.no_grad():
        word = loaded(E.Mapper, "global_mapper")(feats(rgb))[:, 0:1]
        local = loaded(E.MapperLocal, "local_mapper")(feats((rgb * keep).astype(np.uint8)))
    seg = torch.tensor(keep[..., 0], dtype=torch.float32)[None, None]
    seg = F.interpolate(F.interpolate(seg, size=(128, 128)), size=(16, 16))
    got_word, got_local = model.encode_reference(image, mask)
    torch.testing.assert_close(got_word, word)
    torch.testing.assert_close(got_local, local * seg.reshape(1, 256, 1))
    assert 0 < int(seg.sum()) < 256 and got_local.abs().sum(-1).eq(0).sum() == 256 - seg.sum()


def test_placeholder_word_replaces_s_in_the_text_encoder_input(model):
    image, mask = _reference(0)
    word, _ = model.encode_reference(image, mask)
    embedding = model.text_encoder.get_input_embeddings()
    seen = []
    handle = embedding.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        model.generate(image, mask, PROMPTS[:1], [0], steps=1, resolution=64)
    finally:
        handle.remove()
    ids = {tuple(i[0].tolist()): out[0] for i, out in seen}
    prompt_ids = model.tokenizer(PROMPTS[0], padding="max_length", max_length=77).input_ids
    s_index = prompt_ids.index(model.placeholder_id)
    assert s_index == 5 == model.placeholder_index(PROMPTS[0])  # [BOS] a photo of a S
    out = ids[tuple(prompt_ids)]
    torch.testing.assert_close(out[s_index], word[0, 0])
    plain = embedding.weight[torch.tensor(prompt_ids)]
    rest = [i for i in range(77) if i != s_index]
    assert torch.equal(out[rest], plain[rest])
    assert not torch.allclose(out[s_index], plain[s_index])
    uncond_ids = tuple(model.tokenizer("", padding="max_length", max_length=77).input_ids)
    assert torch.equal(ids[uncond_ids], embedding.weight[torch.tensor(uncond_ids)])


def test_placeholder_position_rules(model, caplog):
    with pytest.raises(SidpipeError, match="standalone"):
        model.placeholder_index("a photo of a dog")
    with pytest.raises(SidpipeError, match="standalone"):
        model.placeholder_index("a photo of a S, on the beach")
    prompt = "a qzxjv S on the beach"  # an unseen word: several tokens before S
    before = model.tokenizer("a qzxjv", add_special_tokens=False).input_ids
    assert len(before) > 2
    assert model.placeholder_index(prompt) == 1 + len(before)
    assert "word index 3" in caplog.text
    with pytest.raises(SidpipeError, match="scheduler"):
        _gen(model, PROMPTS, [0], scheduler="pndm")


def test_processor_matches_the_official_cross_attention():
    """EliteAttnProcessor against train_local.inj_forward_crossattention, line by line."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    proj = [torch.nn.Linear(12, 16, bias=False) for _ in range(4)]
    hidden, context = torch.randn(1, 10, 16), torch.randn(1, 7, 12)
    local, index, llambda = torch.randn(1, 9, 12), torch.tensor([3]), 0.8

    def official(hidden_states):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(proj[0](context))
        value = attn.head_to_batch_dim(proj[1](context))
        attention_probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(-1)
        hidden_states = torch.matmul(attention_probs, value)
        key_local = attn.head_to_batch_dim(proj[2](local))
        value_local = attn.head_to_batch_dim(proj[3](local))
        probs_local = (torch.matmul(query, key_local.transpose(-1, -2)) * attn.scale).softmax(-1)
        index_local = index.reshape(1, 1).repeat((1, attn.heads)).reshape(-1)
        mask = attention_probs.clone().permute((0, 2, 1))[torch.arange(2), index_local]
        mask = mask.unsqueeze(2) / mask.max()
        hidden_states += torch.matmul(probs_local * mask * llambda, value_local)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(hidden_states)))

    ctx = E._LocalContext()
    processor = E.EliteAttnProcessor(*proj, ctx)
    ctx.local, ctx.index, ctx.start, ctx.llambda = local, index, 0, llambda
    with torch.no_grad():
        torch.testing.assert_close(processor(attn, hidden, context), official(hidden))
        # a batch (uncond row first): each conditional row as if alone
        ctx.local, ctx.index, ctx.start = torch.cat([local, local]), torch.tensor([3, 3]), 1
        two = torch.cat([hidden, 3 * hidden, hidden])
        out = processor(attn, two, torch.cat([context] * 3))
        torch.testing.assert_close(out[1:2], official(3 * hidden))
        torch.testing.assert_close(out[2:], official(hidden))
        ctx.clear()
        assert not torch.allclose(processor(attn, hidden, context), official(hidden))


def test_exact_lms_coefficients_match_numerical_integration():
    sched = E.lms_scheduler()
    sched.set_timesteps(E.OFFICIAL_STEPS)
    sigmas = sched.sigmas.double()
    nodes, weights = np.polynomial.legendre.leggauss(8)
    for t in (0, 1, 2, 3, 50, 98):
        order = min(t + 1, 4)
        for current in range(order):
            lo, hi = float(sigmas[t]), float(sigmas[t + 1])
            tau = (hi - lo) / 2 * nodes + (hi + lo) / 2
            value = np.ones_like(tau)
            for k in range(order):
                if k != current:
                    value *= (tau - float(sigmas[t - k])) / float(
                        sigmas[t - current] - sigmas[t - k]
                    )
            expected = (hi - lo) / 2 * float((weights * value).sum())
            assert sched.get_lms_coefficient(order, t, current) == pytest.approx(expected, rel=1e-6)
    assert float(sched.init_noise_sigma) == pytest.approx(float(sigmas.max()))
