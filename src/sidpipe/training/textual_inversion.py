"""Textual Inversion: one new token whose input embedding is the only thing that trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sidpipe.io import SidpipeError
from sidpipe.training.base import PLACEHOLDER, FrozenRows, Trainer, train_one_row

DEFAULT_LR = 5e-4
WEIGHT_NAME = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


def placeholder_token(identifier: str) -> str:
    """`sks` -> `<sks>`: a new token, distinct from any word the tokenizer already knows."""
    return (
        identifier if identifier.startswith("<") and identifier.endswith(">") else f"<{identifier}>"
    )


class TextualInversionTrainer(Trainer):
    """Saves `{token: (1, dim)}` as learned_embeds.safetensors (diffusers' own format)."""

    algorithm = "textual_inversion"
    weight_files = (WEIGHT_NAME,)
    max_grad_norm = 0.0  # diffusers' textual_inversion.py does not clip

    def __init__(self, components: Any, settings: dict, identifier: str, class_name: str) -> None:
        super().__init__(components, settings, identifier, class_name)
        self.token = placeholder_token(identifier)
        self.token_id: int | None = None

    @property
    def trains_text_encoder(self) -> bool:
        # Only one embedding row trains, but the encoder's outputs change: nothing to cache.
        return True

    def caption(self, description: str) -> str:
        return description.replace(PLACEHOLDER, self.token)

    @property
    def _embeddings(self) -> torch.nn.Embedding:
        return self.c.text_encoder.get_input_embeddings()

    def prepare(self) -> list[dict]:
        c = self.c
        if c.tokenizer.add_tokens([self.token]) != 1:
            raise SidpipeError(
                f"textual inversion token {self.token!r} is already in the tokenizer's vocabulary; "
                "choose another identifier in the config"
            )
        self.token_id = c.tokenizer.convert_tokens_to_ids(self.token)
        init_ids = c.tokenizer(self.class_name, add_special_tokens=False).input_ids
        if not init_ids:
            raise SidpipeError(f"class name {self.class_name!r} tokenizes to nothing")
        # mean_resizing samples from the embeddings' distribution: pointless, we set the row.
        c.text_encoder.resize_token_embeddings(len(c.tokenizer), mean_resizing=False)
        weight = self._embeddings.weight
        with torch.no_grad():
            # A multi-token class ("teddy bear") starts from the mean of its tokens.
            weight[self.token_id] = weight[init_ids].mean(dim=0)
        for module in (c.vae, c.unet, c.text_encoder):
            module.requires_grad_(False)
        train_one_row(weight, self.token_id)
        c.text_encoder.train()
        self._frozen_rows = FrozenRows(weight, [self.token_id])
        return [{"params": [weight], "lr": float(self.settings.get("learning_rate", DEFAULT_LR))}]

    def trained_parameter_count(self, params: list[torch.Tensor]) -> int:
        return self._embeddings.weight.shape[1]  # one row

    def after_step(self) -> None:
        # AdamW's weight decay shrinks the other rows too; put them back so only the new
        # token's embedding ever changes.
        self._frozen_rows.restore(self._embeddings.weight)

    def _row(self) -> torch.Tensor:
        return self._embeddings.weight[self.token_id].detach().to("cpu", copy=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"token_embedding": self._row()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self._embeddings.weight[self.token_id] = state["token_embedding"]

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({self.token: self._row()[None].float().contiguous()}, out_dir / WEIGHT_NAME)

    @staticmethod
    def load_into(pipe: Any, weights_dir: Path) -> Any:
        # The file's single key is the token, so no `token=` is needed.
        pipe.load_textual_inversion(str(weights_dir), weight_name=WEIGHT_NAME)
        return pipe
