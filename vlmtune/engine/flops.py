"""Model FLOPs of a (LoRA) fine-tuning step and model FLOPs utilisation (MFU); docs/performance.md derives them.

Per token, a weight matrix with N entries costs 2N FLOPs forward and 2N for the gradient of its input; only a
trained weight also costs 2N for its own gradient. So the dense part is 4·N_frozen + 6·N_trainable per token.
Causal attention adds, per sequence of T tokens, 6·L·d·T(T+1) (forward 2·L·d·T(T+1), backward twice that),
with L layers and d = heads × head_dim. Recomputation by gradient checkpointing is not counted (it is not
model work), so MFU is comparable with and without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from vlmtune.errors import UserError
from vlmtune.families import Family
from vlmtune.model.parts import part_of

# Dense bf16/fp16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets (no sparsity). The first
# name contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM; NVL is 835
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "MI300X": 1307.0,
}
PEAK_ENV = "VLMTUNE_PEAK_TFLOPS"


@dataclass(frozen=True)
class FlopCounter:
    """What the FLOP count of a step needs to know about the model.

    Attributes:
        trainable: Matmul weights that get a gradient (LoRA adapters, fully trained modules).
        frozen: Matmul weights without one. Input embeddings are lookups and count nowhere (a head tied to them
            counts once, as the head); a VLM's vision tower and projector see image patches, not tokens, and are
            left out too (their FLOPs are not counted, so a VLM's MFU is a lower bound).
        layers: Decoder layers of the language model.
        attn_dim: Query heads × head dimension.
    """

    trainable: int
    frozen: int
    layers: int
    attn_dim: int

    def dense_per_token(self) -> int:
        return 6 * self.trainable + 4 * self.frozen

    def attention(self, lengths: list[int]) -> int:
        """Causal attention FLOPs (forward + backward) of sequences of these lengths."""
        return sum(6 * self.layers * self.attn_dim * t * (t + 1) for t in lengths)

    def step(self, lengths: list[int]) -> int:
        """Model FLOPs of forward + backward over sequences of these lengths (padding excluded)."""
        return self.dense_per_token() * sum(lengths) + self.attention(lengths)


def flop_counter(model: nn.Module, family: Family | None = None) -> FlopCounter:
    """Count the parameters of `model` (the transformers model, unwrapped) as `FlopCounter` needs them."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    skip = set() if embeddings is None else {id(embeddings.weight)}
    if head is not None:
        skip -= {id(p) for p in head.parameters()}  # a tied head is a matmul once per token
    trainable = frozen = 0
    for name, p in model.named_parameters():  # shared parameters are listed once
        if id(p) in skip or (family is not None and part_of(name, family) in ("vision", "projector")):
            continue
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves an empty shard in `p`
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit weights per stored byte
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    text = getattr(model.config, "text_config", None) or model.config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return FlopCounter(trainable, frozen, text.num_hidden_layers, heads * head_dim)


def sequence_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the attended sequences of a batch: rows without padding, or the documents of packed rows.

    Packed rows (position_ids and no attention_mask) hold several documents, each starting at position 0.
    """
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return [int(n) for n in mask.sum(-1).tolist()]
    positions = batch.get("position_ids")
    if positions is not None:
        rows = positions[0] if positions.dim() == 3 else positions  # multimodal RoPE: (3, batch, tokens)
        lengths = []
        for row in rows.reshape(-1, rows.shape[-1]).tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            if starts[0] != 0:
                starts.insert(0, 0)
            lengths += [b - a for a, b in pairwise(starts) if b > a]
        return lengths
    ids = batch["input_ids"]
    return [ids.shape[-1]] * ids.shape[0]


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device: $VLMTUNE_PEAK_TFLOPS if set, else the table for a known GPU, else None."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            raise UserError(f"${PEAK_ENV}={override!r}: expected a number of TFLOP/s, such as 989") from None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)
