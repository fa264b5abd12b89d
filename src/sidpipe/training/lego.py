"""Lego (Motamed et al., ECCV 2024, arXiv 2311.13833): textual inversion of a concept that lives
on a subject without being its appearance ("frozen", "striped", "upside down").

There is no public code; every part below is a named setting (defaults in brackets).

The paper's ideas:
- a *multi-embedding* concept: several new tokens (the paper picks their number on a validation
  set); only their input-embedding rows train;
- *subject separation*: the subject's appearance, which a known subject description already
  accounts for, must not leak into the concept tokens;
- a *context loss*: the concept combined with random subject descriptions must stay
  semantically consistent with the concept.

Our readings of them:
- `num_tokens` [3], fixed (no validation-set selection: a researcher sweeps it as arms);
- consistency with the concept read as closeness, in the text encoder's states, to words naming
  it and distance from unrelated ones (the InfoNCE below); no generated image is involved;
- tokens `<{identifier}_1> ... <{identifier}_k>` (so several arms never collide; angle brackets
  of the identifier are dropped), token i initialised from the mean embedding of
  `initializer_words`[i mod len] [the class name]; `[V]` becomes the tokens joined by spaces;
- `subject_separation` ["mask"; needs `masked: true`]: the reconstruction MSE only on the
  concept region (1 - subject mask) under the concept prompt, plus `subject_weight` [1.0] x
  the MSE, on the subject region, between the UNet's prediction under the concept prompt and
  its stop-gradient prediction under the plain subject prompt (the caption with the concept
  tokens dropped). "none": the plain full-image MSE (an ablation). "subject_token" (the
  authors' later description): a subject token `<{identifier}_sub>` (from the class name's
  embedding) is learned first, alone, for `subject_steps` [half of `steps`] steps on the subject
  region (masked MSE under the caption without the concept tokens); then it is frozen and the
  concept tokens learn the whole image under the full caption, where `[V]` is
  "<sub> <tokens>"; the context loss only runs in this second phase; prompts are sampled with
  the concept tokens alone (`prompt_token`);
- the context loss: each step a random class of `context_classes`; z = the mean last hidden
  state over the concept tokens in "a <tokens> {class}", p_j / n_j = the same over word j in
  "a {word} {class}" for `positive_words` / `negative_words` [none: the term is skipped];
  InfoNCE on cosine similarities at `context_temperature` [0.07], weighted `context_weight`
  [0.01];
- `learning_rate` [5e-4] and no gradient clipping: the rate of textual_inversion.py's
  documented command before its `--scale_lr` (batch 1; the project's Textual Inversion takes
  the whole command, 2e-3 at 4 images a step: README).

Prior-preservation class images keep the plain MSE, times prior_loss_weight. Saved as one
diffusers textual-inversion file per token (`{identifier}_{i}.safetensors`, {token: (1, dim)})
plus lego.json listing the tokens in order; `LegoTrainer.load_into` loads them all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sidpipe.io import SidpipeError, log
from sidpipe.training.base import (
    PLACEHOLDER,
    Batch,
    FrozenRows,
    Trainer,
    prediction_target,
    train_rows,
)

DEFAULT_LR = 5e-4
MANIFEST = "lego.json"
SEPARATIONS = ("mask", "none", "subject_token")
CONTEXT_CLASSES = (
    "dog",
    "cat",
    "mug",
    "car",
    "robot",
    "ball",
    "lamp",
    "teapot",
    "backpack",
    "vase",
)


def concept_tokens(identifier: str, num_tokens: int) -> list[str]:
    """`sks`, 3 -> `<sks_1>`, `<sks_2>`, `<sks_3>` (an identifier's own `<...>` is dropped)."""
    stem = identifier.strip("<>")
    return [f"<{stem}_{i}>" for i in range(1, num_tokens + 1)]


def strip_tokens(input_ids: torch.Tensor, token_ids: list[int], pad_id: int) -> torch.Tensor:
    """Drop `token_ids` from each row of (B, L) ids, shift the rest left, pad with `pad_id`:
    the concept caption's ids -> the plain subject caption's."""
    keep = ~torch.isin(input_ids, torch.as_tensor(token_ids, device=input_ids.device))
    out = torch.full_like(input_ids, pad_id)
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
    out[rows[keep], (keep.cumsum(1) - 1)[keep]] = input_ids[keep]
    return out


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of (B, C, h, w) values under (B, 1, h, w) weights (0 if they sum to 0)."""
    weight = weight.expand_as(values).to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1e-8)


def subject_consistency(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    pred: torch.Tensor,
    subject_hidden: torch.Tensor,
    masks: torch.Tensor,
) -> torch.Tensor:
    """MSE on the subject region between `pred` (the UNet's under the concept prompt) and the
    frozen UNet's stop-gradient prediction under the plain subject prompt."""
    with torch.no_grad():
        reference = unet(noisy, timesteps, subject_hidden).sample
    return masked_mean((pred.float() - reference.float()) ** 2, masks)


def context_infonce(
    z: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """-log(sum_p exp(cos(z,p)/T) / (sum_p exp(cos(z,p)/T) + sum_n exp(cos(z,n)/T))) for a
    (dim,) z and (P, dim) / (N, dim) word encodings."""
    pos = F.cosine_similarity(z[None].float(), positives.float(), dim=-1) / temperature
    neg = F.cosine_similarity(z[None].float(), negatives.float(), dim=-1) / temperature
    return torch.logsumexp(torch.cat([pos, neg]), 0) - torch.logsumexp(pos, 0)


def _setting_list(settings: dict, name: str, default: list[str]) -> list[str]:
    value = settings.get(name)
    value = default if value is None else value
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SidpipeError(f"lego setting {name} must be a list of words, got {value!r}")
    return list(value)


class LegoTrainer(Trainer):
    """k concept tokens; masked concept MSE + subject consistency + context InfoNCE."""

    algorithm = "lego"
    max_grad_norm = 0.0  # as diffusers' textual_inversion.py
    log_fields = ("concept_loss", "subject_loss", "context_loss")

    def __init__(self, components: Any, settings: dict, identifier: str, class_name: str) -> None:
        super().__init__(components, settings, identifier, class_name)
        k = settings.get("num_tokens", 3)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SidpipeError(f"lego setting num_tokens must be an integer >= 1, got {k!r}")
        self.separation = settings.get("subject_separation", "mask")
        if self.separation not in SEPARATIONS:
            raise SidpipeError(
                f"lego setting subject_separation must be one of {', '.join(SEPARATIONS)}, "
                f"got {self.separation!r}"
            )
        self.needs_masks = self.separation in ("mask", "subject_token")
        steps = int(settings.get("steps", 1))
        self.subject_steps = 0
        if self.separation == "subject_token":
            self.subject_steps = settings.get("subject_steps", steps // 2)
            if (
                not isinstance(self.subject_steps, int)
                or isinstance(self.subject_steps, bool)
                or not 0 < self.subject_steps < steps
            ):
                raise SidpipeError(
                    "lego setting subject_steps (the subject token's phase of "
                    "subject_separation: subject_token) must be an integer in [1, steps - 1] = "
                    f"[1, {steps - 1}], got {self.subject_steps!r}"
                )
        self.subject_weight = float(settings.get("subject_weight", 1.0))
        self.context_weight = float(settings.get("context_weight", 0.01))
        self.temperature = float(settings.get("context_temperature", 0.07))
        if self.subject_weight < 0 or self.context_weight < 0 or self.temperature <= 0:
            raise SidpipeError(
                "lego settings subject_weight and context_weight must be >= 0 and "
                f"context_temperature > 0, got {self.subject_weight}, {self.context_weight}, "
                f"{self.temperature}"
            )
        self.initializer_words = _setting_list(settings, "initializer_words", [class_name])
        if not self.initializer_words:
            raise SidpipeError("lego setting initializer_words is empty; give at least one word")
        self.context_classes = _setting_list(settings, "context_classes", list(CONTEXT_CLASSES))
        self.positive_words = _setting_list(settings, "positive_words", [])
        self.negative_words = _setting_list(settings, "negative_words", [])
        self.use_context = bool(
            self.positive_words and self.negative_words and self.context_weight > 0
        )
        if self.use_context and not self.context_classes:
            raise SidpipeError("lego setting context_classes is empty; give at least one class")
        self.tokens = concept_tokens(identifier, k)
        # subject_token: the subject's own token comes first in every prompt's [V]
        self.subject_token = f"<{identifier.strip('<>')}_sub>" if self.subject_steps else None
        self.all_tokens = [self.subject_token, *self.tokens] if self.subject_token else self.tokens
        self.weight_files = (*(f"{t.strip('<>')}.safetensors" for t in self.all_tokens), MANIFEST)
        self.token_ids: list[int] = []
        self.subject_id: int | None = None
        self.step = 0  # optimizer steps taken (the phase of subject_token)
        self._word_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def trains_text_encoder(self) -> bool:
        return True  # only k embedding rows train, but the encoder's outputs change

    def caption(self, description: str) -> str:
        return description.replace(PLACEHOLDER, " ".join(self.all_tokens))

    def prompt_token(self) -> str:
        """The concept tokens alone: the subject token (subject_token) only absorbs the
        carrier's appearance in training, as the frozen subject prompt does in mask mode; in
        a prompt it would draw the carrier into every class the concept is carried to."""
        return " ".join(self.tokens)

    @property
    def in_subject_phase(self) -> bool:
        return self.step < self.subject_steps

    @property
    def _embeddings(self) -> torch.nn.Embedding:
        return self.c.text_encoder.get_input_embeddings()

    def _word_ids(self, text: str) -> list[int]:
        return self.c.tokenizer(text, add_special_tokens=False).input_ids

    def prepare(self) -> list[dict]:
        c = self.c
        known = [t for t in self.all_tokens if t in c.tokenizer.get_vocab()]
        if known:
            raise SidpipeError(
                f"lego tokens {', '.join(known)} are already in the tokenizer's vocabulary; "
                "choose another identifier in the config"
            )
        init = []
        for word in self.initializer_words:
            ids = self._word_ids(word)
            if not ids:
                raise SidpipeError(
                    f"lego setting initializer_words: {word!r} tokenizes to nothing; use real words"
                )
            init.append(ids)
        c.tokenizer.add_tokens(self.all_tokens)
        self.token_ids = c.tokenizer.convert_tokens_to_ids(self.tokens)
        c.text_encoder.resize_token_embeddings(len(c.tokenizer), mean_resizing=False)
        weight = self._embeddings.weight
        with torch.no_grad():
            for i, row in enumerate(self.token_ids):
                weight[row] = weight[init[i % len(init)]].mean(dim=0)
            if self.subject_token:
                self.subject_id = c.tokenizer.convert_tokens_to_ids(self.subject_token)
                weight[self.subject_id] = weight[self._word_ids(self.class_name)].mean(dim=0)
        for module in (c.vae, c.unet, c.text_encoder):
            module.requires_grad_(False)
        if self.subject_token:
            # Rows of the current phase only: a mask the backward hook reads at every step.
            self._grad_rows = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
            weight.requires_grad_(True)
            weight.register_hook(lambda grad: grad * self._grad_rows.to(grad.dtype))
            self._enter_phase()
        else:
            train_rows(weight, self.token_ids)
            self._frozen_rows = FrozenRows(weight, self.token_ids)
        c.text_encoder.train()
        if not self.use_context:
            log.info(
                "lego: no positive_words/negative_words (or context_weight 0): no context loss"
            )
        return [{"params": [weight], "lr": float(self.settings.get("learning_rate", DEFAULT_LR))}]

    def _phase_rows(self) -> list[int]:
        if self.subject_id is None:
            return self.token_ids
        return [self.subject_id] if self.in_subject_phase else self.token_ids

    def _enter_phase(self) -> None:
        """subject_token: train the current phase's rows; every other row, the subject token's
        learned one included, is put back after each step (AdamW's moments would move it)."""
        weight = self._embeddings.weight
        self._grad_rows.zero_()
        self._grad_rows[self._phase_rows()] = 1.0
        self._frozen_rows = FrozenRows(weight, self._phase_rows())

    def trained_parameter_count(self, params: list[torch.Tensor]) -> int:
        return len(self.all_tokens) * self._embeddings.weight.shape[1]

    def after_step(self) -> None:
        # AdamW's weight decay shrinks the other rows too: put them back.
        self._frozen_rows.restore(self._embeddings.weight)
        self.step += 1
        if self.subject_id is not None and self.step == self.subject_steps:
            log.info("lego: subject token learned (%d steps); concept tokens next", self.step)
            self._enter_phase()

    # --- the loss ---------------------------------------------------------------------------

    def _phrase(self, middle: list[int], cls: str) -> tuple[list[int], slice]:
        """ids of "a {middle} {cls}" with BOS/EOS, and the positions of `middle`."""
        tok = self.c.tokenizer
        head = [tok.bos_token_id, *self._word_ids("a")]
        ids = [*head, *middle, *self._word_ids(cls), tok.eos_token_id]
        return ids, slice(len(head), len(head) + len(middle))

    def _encode_mean(self, phrases: list[tuple[list[int], slice]]) -> torch.Tensor:
        """(n, dim): each phrase's mean last hidden state over its slice. Padding at the end
        does not change earlier positions (CLIP's text attention is causal)."""
        width = max(len(ids) for ids, _ in phrases)
        pad = self.c.tokenizer.pad_token_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in phrases])
        hidden = self.c.text_encoder(ids.to(self._embeddings.weight.device)).last_hidden_state
        return torch.stack([h[s].mean(dim=0) for h, (_, s) in zip(hidden, phrases, strict=True)])

    def context_loss(self, cls: str) -> torch.Tensor:
        """InfoNCE of the concept tokens in "a <tokens> {cls}" against the words'."""
        if cls not in self._word_cache:
            with torch.no_grad():
                words = [self._phrase(self._word_ids(w), cls) for w in self.positive_words]
                words += [self._phrase(self._word_ids(w), cls) for w in self.negative_words]
                encoded = self._encode_mean(words).float()
            n_pos = len(self.positive_words)
            self._word_cache[cls] = (encoded[:n_pos], encoded[n_pos:])
        positives, negatives = self._word_cache[cls]
        z = self._encode_mean([self._phrase(self.token_ids, cls)])[0]
        return context_infonce(z, positives, negatives, self.temperature)

    def compute_loss(
        self,
        batch: Batch,
        encoder_hidden_states: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        prior_loss_weight: float,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.subject_id is not None and self.in_subject_phase:
            return self._subject_phase_loss(batch, noise, timesteps, prior_loss_weight)
        unet, scheduler = self.c.unet, self.c.noise_scheduler
        noisy = scheduler.add_noise(batch.latents, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
        target = prediction_target(scheduler, batch.latents, noise, timesteps)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        inst = ~batch.is_prior
        parts: dict[str, float] = {}
        loss = pred.new_zeros((), dtype=torch.float32)
        if inst.any():
            if self.separation == "mask":
                if batch.masks is None:
                    raise SidpipeError("lego subject_separation: mask needs masked: true")
                masks = batch.masks[inst]
                concept = masked_mean(error[inst], 1.0 - masks)
                plain = strip_tokens(
                    batch.input_ids[inst], self.token_ids, self.c.tokenizer.pad_token_id
                )
                with torch.no_grad():
                    subject_hidden = self.encode_text(plain)
                subject = subject_consistency(
                    unet, noisy[inst], timesteps[inst], pred[inst], subject_hidden, masks
                )
                instance = concept + self.subject_weight * subject
                parts["subject_loss"] = float(subject.detach())
            else:
                concept = instance = error[inst].mean()
            loss = loss + instance
            parts["concept_loss"] = float(concept.detach())
            parts["instance_loss"] = float(instance.detach())
        if batch.is_prior.any():
            prior = error[batch.is_prior].mean()
            loss = loss + prior_loss_weight * prior
            parts["prior_loss"] = float(prior.detach())
        if self.use_context:
            context = self.context_loss(random.choice(self.context_classes))
            loss = loss + self.context_weight * context
            parts["context_loss"] = float(context.detach())
        return loss, parts

    def _subject_phase_loss(
        self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor, prior_loss_weight: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """subject_token's first phase: the caption without the concept tokens ("a <sub> mug
        on ..."), the MSE on the subject region only (class images: the plain MSE)."""
        if batch.masks is None:
            raise SidpipeError("lego subject_separation: subject_token needs masked: true")
        unet, scheduler = self.c.unet, self.c.noise_scheduler
        plain = strip_tokens(batch.input_ids, self.token_ids, self.c.tokenizer.pad_token_id)
        noisy = scheduler.add_noise(batch.latents, noise, timesteps)
        pred = unet(noisy, timesteps, self.encode_text(plain)).sample
        target = prediction_target(scheduler, batch.latents, noise, timesteps)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        inst = ~batch.is_prior
        loss = pred.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if inst.any():
            subject = masked_mean(error[inst], batch.masks[inst])
            loss = loss + subject
            parts["subject_loss"] = parts["instance_loss"] = float(subject.detach())
        if batch.is_prior.any():
            prior = error[batch.is_prior].mean()
            loss = loss + prior_loss_weight * prior
            parts["prior_loss"] = float(prior.detach())
        return loss, parts

    # --- state and files --------------------------------------------------------------------

    def _all_ids(self) -> list[int]:
        return self.token_ids if self.subject_id is None else [self.subject_id, *self.token_ids]

    def _rows(self) -> torch.Tensor:
        return self._embeddings.weight[self._all_ids()].detach().to("cpu", copy=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"token_embeddings": self._rows(), "step": torch.tensor(self.step)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            weight = self._embeddings.weight
            weight[self._all_ids()] = state["token_embeddings"].to(weight.device, weight.dtype)
        self.step = int(state.get("step", 0))
        if self.subject_id is not None:
            self._enter_phase()
        else:
            self._frozen_rows = FrozenRows(weight, self.token_ids)

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = list(self.weight_files[:-1])
        for token, row, name in zip(self.all_tokens, self._rows(), files, strict=True):
            save_file({token: row[None].float().contiguous()}, out_dir / name)
        manifest = {"algorithm": self.algorithm, "tokens": self.all_tokens, "files": files}
        if self.subject_token:
            manifest["subject_token"] = self.subject_token
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        manifest = json.loads((Path(weights_dir) / MANIFEST).read_text(encoding="utf-8"))
        for token, name in zip(manifest["tokens"], manifest["files"], strict=True):
            pipe.load_textual_inversion(str(weights_dir), weight_name=name, token=token)
        return pipe
