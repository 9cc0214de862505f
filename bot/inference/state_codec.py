"""Model states as bytes for the store, with the checks that keep a corrupt or mismatched blob from
ever being loaded into the model."""

from __future__ import annotations

import io

import torch

from bot.errors import StateError
from bot.inference.backend import ModelState


def encode_state(model: ModelState) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": [t.contiguous() for t in model.state], "logits": model.logits,
                "token_count": model.token_count}, buffer)
    return buffer.getvalue()


def decode_state(blob: bytes, template: list[torch.Tensor], vocab_size: int) -> ModelState:
    """Parse a stored blob and check it against the model's own state layout."""
    try:
        data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StateError(f"state blob is unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("state"), list):
        raise StateError("state blob has the wrong structure")
    state, logits = data["state"], data.get("logits")
    if len(state) != len(template):
        raise StateError(f"state has {len(state)} tensors, the model expects {len(template)}")
    for index, (tensor, expected) in enumerate(zip(state, template, strict=True)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape:
            raise StateError(f"state tensor {index} has the wrong shape")
        if torch.isnan(tensor).any():
            raise StateError(f"state tensor {index} holds NaN")
    if not isinstance(logits, torch.Tensor) or logits.shape != (vocab_size,):
        raise StateError("stored logits have the wrong shape")
    return ModelState([t.to(expected.dtype) for t, expected in zip(state, template, strict=True)],
                      logits.float(), int(data.get("token_count", 0)))
