"""SDXL's pooled text input, taken where the text encoder was trained to pool: the end token.

`CLIPTextModelWithProjection` finds the end token by its id, the first ``eos_token_id`` of a row, or,
in configs written before transformers fixed that id (``eos_token_id == 2``, as SDXL's published
`text_encoder_2` has), by the largest id of the row. A modifier token added to the vocabulary has a
larger id than the end token, so with those configs the pipeline pools a concept's token instead of
the end of the prompt. The trainer and the engine both pool here instead: at the row's first end
token, the same for every config and for any placeholder id.
"""

from __future__ import annotations

import torch
from torch import nn


def pooled_at_end(text_encoder: nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor,
                  eos_token_id: int) -> torch.Tensor:
    """The projected final state at each row's first `eos_token_id` (the tokenizer's), [rows, projection_dim].

    Args:
        text_encoder: a `CLIPTextModelWithProjection` (its ``text_projection``).
        last_hidden_state: its output's ``last_hidden_state`` [rows, tokens, hidden] (after the final norm).
        input_ids: [rows, tokens] the ids it ran on; each row holds `eos_token_id`.
    """
    end = (input_ids == eos_token_id).int().argmax(-1)
    rows = torch.arange(input_ids.shape[0], device=last_hidden_state.device)
    return text_encoder.text_projection(last_hidden_state[rows, end.to(last_hidden_state.device)])
