"""How much GPU (and CPU) memory one training process needs: the formulas behind `vlmtune plan`.

Everything is derived from a meta-device model (`vlmtune.model.meta`), so parameter counts, dtypes and the
adapted layers are exact; what remains a model is activation memory, documented on `activation_bytes`.

Dtypes follow what training does: PEFT keeps LoRA weights in fp32 on a bf16/fp16 base; k-bit preparation
(QLoRA / 8-bit) upcasts every frozen weight that is not quantised (embeddings, norms, output head) to fp32;
DeepSpeed with bf16/fp16 casts the whole module to that half type and keeps fp32 master copies of the
trainable weights in its optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from vlmtune.config.accelerate import LaunchSpec, Strategy
from vlmtune.config.schema import Recipe
from vlmtune.engine.loss import unwrap
from vlmtune.model.meta import MetaModel
from vlmtune.model.parts import part_of
from vlmtune.plan.methods import logps_peak, method_rows

GIB = 1024**3
# Outside PyTorch's allocator: the CUDA context and kernels (~0.5 GiB), cuBLAS workspaces, and fragmentation.
CUDA_OVERHEAD = GIB
# NCCL's communicator buffers per process once there is more than one.
NCCL_OVERHEAD = GIB // 2
# bitsandbytes: 4-bit weights are quantised in blocks of 64 (one absmax each), 8-bit optimizer states in blocks
# of 256, and tensors under 4,096 elements keep 32-bit optimizer states.
QUANT_BLOCK, OPTIM_BLOCK, OPTIM_8BIT_MIN = 64, 256, 4096


@dataclass(frozen=True)
class Sharding:
    """How the training state is split over processes (from the accelerate config)."""

    strategy: Strategy = "none"
    world: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True

    @classmethod
    def from_spec(cls, spec: LaunchSpec, gpus: int | None = None) -> Sharding:
        """The sharding the recipe's accelerate config asks for; `gpus` overrides its process count."""
        world = gpus or spec.num_processes
        sharded = spec.strategy in ("deepspeed", "fsdp2")
        return cls(
            spec.strategy if sharded else "ddp" if world > 1 else "none",
            world,
            zero_stage=spec.zero_stage,
            offload_optimizer=spec.offload_optimizer,
            offload_params=spec.offload_params,
            reshard_after_forward=spec.reshard_after_forward,
        )

    @property
    def label(self) -> str:
        if self.strategy == "deepspeed":
            off = [
                k for k, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on
            ]
            return f"DeepSpeed ZeRO-{self.zero_stage}" + (
                f" (offload {', '.join(off)} to CPU)" if off else ""
            )
        if self.strategy == "fsdp2":
            return "FSDP2" + (" (offload to CPU)" if self.offload_params else "")
        return {"none": "one process", "ddp": "DDP"}[self.strategy]

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy == "fsdp2" or (self.strategy == "deepspeed" and self.zero_stage >= 1)

    @property
    def shards_gradients(self) -> bool:
        return self.strategy == "fsdp2" or (self.strategy == "deepspeed" and self.zero_stage >= 2)

    @property
    def shards_weights(self) -> bool:
        return self.strategy == "fsdp2" or (self.strategy == "deepspeed" and self.zero_stage == 3)


@dataclass(frozen=True)
class Item:
    """One line of the plan: bytes per GPU (per process) and in CPU RAM (per process, when offloaded).

    `phase`: empty for what is held all step; else the part of the step whose tensors these are (`train`, and
    for some methods `rollout`, `reference`), freed before the next part starts (`peak_gpu`).
    """

    name: str
    gpu: int
    cpu: int = 0
    note: str = ""
    phase: str = ""


def phase_totals(items: list[Item]) -> dict[str, int]:
    """GPU bytes of each phase of the step, in the order the items name them."""
    totals: dict[str, int] = {}
    for item in items:
        if item.phase:
            totals[item.phase] = totals.get(item.phase, 0) + item.gpu
    return totals


def peak_gpu(items: list[Item]) -> int:
    """The step's peak per GPU: what is held all step plus the largest of its phases."""
    return sum(i.gpu for i in items if not i.phase) + max(phase_totals(items).values(), default=0)


@dataclass(frozen=True)
class Parameters:
    """Parameter counts and their training-time bytes, before sharding."""

    total: int
    trainable: int
    quantized: int  # parameters stored in 4 or 8 bits
    frozen_bytes: int
    trainable_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # AdamW states (+ fp32 master copies under DeepSpeed mixed precision)
    largest_layer_bytes: int  # the biggest decoder layer: what ZeRO-3 / FSDP2 gather at once
    weights_note: str = ""


def _half(recipe: Recipe, sharding: Sharding) -> bool:
    """DeepSpeed with bf16/fp16 casts the whole module to the half type (2 bytes), whatever model.dtype says."""
    return sharding.strategy == "deepspeed" and recipe.train.mixed_precision in ("bf16", "fp16")


def dtype_bytes(recipe: Recipe, sharding: Sharding) -> tuple[int, int, bool]:
    """(weights bytes, residual-stream bytes, autocast on) as training runs the recipe."""
    half = _half(recipe, sharding)
    model = 2 if half else {"bfloat16": 2, "float16": 2, "float32": 4}[recipe.model.dtype]
    # k-bit preparation makes embeddings and norms fp32, so the residual stream is fp32 too.
    residual = 4 if recipe.quant is not None and not half else model
    # accelerate autocasts for every strategy but DeepSpeed, which runs the cast module instead.
    autocast = recipe.train.mixed_precision in ("bf16", "fp16") and sharding.strategy != "deepspeed"
    return model, residual, autocast


def quantized_bytes(numel: int, out_features: int, bits: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes-quantised weight, quantisation state included.

    8-bit: int8 weights plus one fp32 scale per output row. 4-bit: two weights per byte plus one absmax per block
    of 64; with double quantisation the absmaxes are themselves 8-bit, with one fp32 absmax per 256 of them, a
    256-entry fp32 code and an fp32 offset; the 4-bit code itself is 16 fp32 values.
    """
    if bits == 8:
        return numel + 4 * out_features
    blocks = math.ceil(numel / QUANT_BLOCK)
    state = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + state + 4 * 16


def _optimizer_state_bytes(numel: int, param_bytes: int, optimizer: str) -> int:
    """AdamW m and v for one tensor: in the parameter's dtype (torch), or 8-bit blockwise (bitsandbytes)."""
    if optimizer == "adamw":
        return 2 * numel * param_bytes
    if numel < OPTIM_8BIT_MIN:
        return 2 * numel * 4
    return 2 * (numel + 4 * math.ceil(numel / OPTIM_BLOCK))


def parameters(meta: MetaModel, recipe: Recipe, sharding: Sharding) -> Parameters:
    """Count every parameter of the meta model and the bytes it takes in training (weights, grads, optimizer)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    q, half = recipe.quant, _half(recipe, sharding)
    model = meta.model
    quantized_weights: dict[int, int] = {}  # id(weight) → out_features, for the layers bitsandbytes replaces
    if q is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not hasattr(module, "lora_A"):
                plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                if should_convert_module(plain, meta.unquantized) and "lora_" not in plain:
                    quantized_weights[id(module.weight)] = module.out_features
    total = trainable = quantized = frozen_bytes = trainable_bytes = grad_bytes = optim = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            size = 2 if half else p.element_size()
            trainable += n
            trainable_bytes += n * size
            grad_bytes += n * size
            if half:  # DeepSpeed: fp32 master copy and fp32 states, plus an fp32 gradient partition
                optim += 4 * n + _optimizer_state_bytes(n, 4, recipe.train.optimizer)
                grad_bytes += 4 * n
            else:
                optim += _optimizer_state_bytes(n, size, recipe.train.optimizer)
        else:
            quantized += n if id(p) in quantized_weights else 0
            frozen_bytes += _frozen_bytes(p, quantized_weights, q, half)
    layers = decoder_layers(meta)
    largest = max(
        (
            sum(
                p.numel() * (2 if half else p.element_size())
                if p.requires_grad
                else _frozen_bytes(p, quantized_weights, q, half)
                for p in m.parameters()
            )
            for m in layers
        ),
        default=0,
    )
    kept = total - trainable - quantized
    note = (
        recipe.model.dtype
        if q is None
        else _quant_note(q, quantized, kept, "bf16/fp16" if half else "fp32", vlm=meta.family is not None)
    )
    return Parameters(
        total, trainable, quantized, frozen_bytes, trainable_bytes, grad_bytes, optim, largest, note
    )


def _frozen_bytes(p: torch.nn.Parameter, quantized_weights: dict[int, int], q, half: bool) -> int:
    if id(p) in quantized_weights:
        return quantized_bytes(p.numel(), quantized_weights[id(p)], q.bits, q.double_quant)
    # k-bit preparation upcasts the frozen float weights that stay unquantised to fp32.
    return p.numel() * (2 if half else 4 if q is not None else p.element_size())


def _quant_note(q, quantized: int, kept: int, kept_dtype: str, vlm: bool) -> str:
    kind = f"4-bit {q.type}" + (" double-quant" if q.double_quant else "") if q.bits == 4 else "8-bit"
    parts = "embeddings, norms, head" + (", vision tower, projector" if vlm and q.vision == "float" else "")
    return f"{kind}: {quantized:,} quantised; {kept:,} unquantised in {kept_dtype} ({parts})"


def decoder_layers(meta: MetaModel) -> list[torch.nn.Module]:
    """The language model's decoder layers: the `layers` ModuleList with the most parameters."""
    part = "language" if meta.family is not None else None
    return largest_blocks(meta, part, suffixes=("layers", "layer", ".h"))


def largest_blocks(
    meta: MetaModel, part: str | None, suffixes: tuple[str, ...] = ()
) -> list[torch.nn.Module]:
    """The `ModuleList` with the most parameters (in a VLM's `part`, named with one of `suffixes` if given)."""
    best: list[torch.nn.Module] = []
    best_size = -1
    for name, module in meta.model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or (suffixes and not name.endswith(suffixes)):
            continue
        if part is not None:
            try:
                if part_of(name, meta.family) != part:
                    continue
            except ValueError:
                continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


@dataclass(frozen=True)
class LayerShape:
    """What the activation formula reads from the model config and one decoder layer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    norms: int  # hidden-wide norms per layer
    gated: bool  # SwiGLU-style MLP (gate, up, down)
    # Per adapted linear layer of one decoder layer: (group, in_features, rank, dropout, adapter dtype bytes).
    lora: list[tuple[str, int, int, float, int]] = field(default_factory=list)
    sdpa: bool = True  # the architecture has an sdpa path (Gemma 2 has not: it loads with eager attention)


_OUT_NAMES = ("o_proj", "out_proj", "dense", "wo", "down_proj", "fc2", "w2", "c_proj")


def layer_shape(meta: MetaModel) -> LayerShape:
    """Sizes for `activation_bytes`, from the text config and the first decoder layer of the meta model."""
    cfg = meta.config.get_text_config()
    heads = cfg.num_attention_heads
    layers = decoder_layers(meta)
    first = layers[0] if layers else torch.nn.Module()
    norms = sum(
        1
        for m in first.modules()
        if "norm" in type(m).__name__.lower()
        and getattr(m, "weight", None) is not None
        and m.weight.numel() == cfg.hidden_size
    )
    linear_names = [n for n, m in first.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = []
    for name, m in first.named_modules():
        if not hasattr(m, "lora_A") or not m.lora_A:
            continue
        adapter = next(iter(m.lora_A))
        a = m.lora_A[adapter]
        dropout = m.lora_dropout[adapter]
        leaf, parent = name.rsplit(".", 1)[-1], name.lower()
        where = "attn" if "attn" in parent or "attention" in parent else "mlp"
        group = f"{where}_{'out' if leaf in _OUT_NAMES else 'in'}"
        lora.append(
            (group, a.in_features, a.out_features, float(getattr(dropout, "p", 0.0)), a.weight.element_size())
        )
    return LayerShape(
        layers=len(layers) or cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab=cfg.vocab_size,
        norms=norms or 2,
        gated=any("gate" in n for n in linear_names),
        lora=lora,
        sdpa=getattr(unwrap(meta.model), "_supports_sdpa", True),
    )


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch (see `activation_bytes`)."""

    per_layer: int  # everything one decoder layer keeps for backward
    stored: int  # what the whole forward keeps until backward (checkpointed: the layer inputs only)
    recompute: int  # one layer recomputed during backward (gradient checkpointing), else 0
    logits_saved: int  # fp32 log-probabilities the loss keeps for backward
    logits_peak: int  # logits + loss at their peak, during the loss's backward


def activation_bytes(
    shape: LayerShape,
    *,
    batch: int,
    seq: int,
    checkpointing: bool,
    autocast: bool,
    model_bytes: int,
    residual_bytes: int,
    attention: str = "sdpa",
    padded: bool = True,
    adapter_bytes: int | None = None,
    loss_chunk: int | None = None,
) -> Activations:
    """Bytes saved for backward, derived per decoder layer (T = batch × seq tokens).

    e = bytes of matmul outputs (2 under bf16/fp16 autocast, else the weights' dtype), er = bytes of the
    residual stream (the weights' dtype; fp32 after k-bit preparation), a / k = attention / KV heads, d = head
    dim, h = hidden, i = intermediate, r = LoRA rank:

    - norms: each RMSNorm keeps its input upcast to fp32 and 1/rms:      norms × (4·T·h + 4·T)
    - attention (sdpa / flash): q, k, v after RoPE and the output, and the fp32 log-sum-exp:
      e·T·(2·a·d + 2·k'·d) + 4·T·a, with k' = a when transformers repeats the KV heads (sdpa with a padding
      mask; eager) and k' = k otherwise (flash_attention_2, no padding); eager adds the attention
      probabilities, fp32 and cast: (4 + e)·batch·a·seq²
    - MLP: gated (SwiGLU) keeps gate, act(gate) and up: 3·e·T·i; a plain MLP keeps fc1's output: e·T·i
    - LoRA, per adapted layer: A's output e·T·r, and the layer input x, which a frozen linear layer alone would
      not keep. PEFT casts x to the adapter's dtype and autocast casts it back, so each adapted layer keeps its
      own copy (e·T·in) when either cast happens; otherwise layers reading the same tensor share it (q/k/v
      read the first norm's output, gate/up the second's; o_proj reads the attention output, already counted;
      down_proj reads act(gate)·up, e·T·i). Dropout > 0 adds a bool mask (T·in) and its own copy of x.
      With a padding mask, sdpa converts it to a float bias in every layer and keeps it: e·batch·seq².
    - the final norm: 4·T·h + 4·T.

    `adapter_bytes` overrides the adapters' dtype read from the model (DeepSpeed casts them to bf16/fp16).

    With checkpointing, the forward keeps only each layer's input (er·T·h) and backward recomputes one layer at
    a time, so `recompute` = one layer. Logits: the model's logits (e·T·V), the loss's fp32 log-probabilities
    (4·T·V, kept for backward), and in the loss's backward their fp32 gradient and the gradient of the fp32
    copy (2 × 4·T·V): peak (e + 12)·T·V. A chunked loss (`loss_chunk` tokens at a time, recomputed in backward)
    keeps none of them for backward and peaks at one chunk's worth: (e + 12)·min(chunk, T)·V.
    """
    s = shape
    T = batch * seq
    e = 2 if autocast else model_bytes
    er = residual_bytes
    kv = s.heads if (attention == "eager" or (attention == "sdpa" and padded)) else s.kv_heads
    norms = s.norms * (4 * T * s.hidden + 4 * T)
    attn = e * T * (2 * s.heads + 2 * kv) * s.head_dim + 4 * T * s.heads
    if attention == "eager":
        attn += (4 + e) * batch * s.heads * seq * seq
    elif attention == "sdpa" and padded:
        attn += e * batch * seq * seq  # sdpa turns the bool padding mask into a float bias, kept per layer
    mlp = (3 if s.gated else 1) * e * T * s.intermediate
    lora = 0
    shared: dict[str, int] = {}
    for group, width, rank, dropout, adapter in s.lora:
        adapter = adapter_bytes or adapter
        x_bytes = er if group.endswith("_in") else e
        peft_cast = x_bytes != adapter  # PEFT casts x to the adapter's dtype: a new tensor
        autocast_cast = autocast and (adapter if peft_cast else x_bytes) != 2  # autocast casts it down again
        copy_bytes = 2 if autocast else adapter
        lora += copy_bytes * T * rank
        if dropout > 0:
            lora += T * width
        if peft_cast or autocast_cast or dropout > 0:
            lora += copy_bytes * T * width
        elif group != "attn_out":  # o_proj's input is the attention output, counted above
            shared[group] = (e if group == "mlp_out" else er) * T * width
    per_layer = norms + attn + mlp + lora + sum(shared.values())
    once = 4 * T * s.hidden + 4 * T  # the final norm
    if checkpointing:
        stored, recompute = s.layers * er * T * s.hidden + once, per_layer
    else:
        stored, recompute = s.layers * per_layer + once, 0
    return Activations(
        per_layer=per_layer,
        stored=stored,
        recompute=recompute,
        logits_saved=0 if loss_chunk else 4 * batch * (seq - 1) * s.vocab,
        logits_peak=(e + 12) * min(loss_chunk or T, T) * s.vocab,
    )


def micro_batch_shape(recipe: Recipe) -> tuple[int, int, str]:
    """(rows, tokens per row, description) of the largest micro-batch the recipe's batching can form.

    padded: micro_batch_size rows of data.max_length (with train.micro_batch_tokens: as many max-length rows as
    the budget holds); packed: micro_batch_size bins of data.pack_length; padding_free: one row of all the
    micro-batch's tokens, so attention terms that grow with the square of the row length grow with it. dpo and
    grpo (padded only): one loss forward's rows, `plan.methods.method_rows`.
    """
    d, t = recipe.data, recipe.train
    if (rows := method_rows(recipe)) is not None:  # dpo: pairs; grpo: prompt + completion
        return rows
    if d.batching == "packed":
        length = d.pack_length or d.max_length
        return t.micro_batch_size, length, f"{t.micro_batch_size} packed bins × {length} tokens"
    tokens = t.micro_batch_tokens or t.micro_batch_size * d.max_length
    if d.batching == "padding_free":
        return 1, tokens, f"one padding-free row of {tokens} tokens"
    if t.micro_batch_tokens:
        rows = max(1, t.micro_batch_tokens // d.max_length)
        return rows, d.max_length, f"≤ {t.micro_batch_tokens} tokens ({rows} × {d.max_length} at most)"
    return t.micro_batch_size, d.max_length, f"{t.micro_batch_size} × {d.max_length} tokens"


def batch_activations(
    shape: LayerShape, recipe: Recipe, sharding: Sharding, checkpointing: bool | None = None
) -> Activations:
    """Activation and logits bytes of the recipe's fullest micro-batch (`checkpointing` overrides the recipe's)."""
    model_bytes, residual_bytes, autocast = dtype_bytes(recipe, sharding)
    rows, seq, _ = micro_batch_shape(recipe)
    attention = recipe.model.attn_implementation
    if attention == "sdpa" and not shape.sdpa:  # as `load_model` falls back for an architecture without sdpa
        attention = "eager"
    act = activation_bytes(
        shape,
        batch=rows,
        seq=seq,
        checkpointing=recipe.train.gradient_checkpointing if checkpointing is None else checkpointing,
        autocast=autocast,
        model_bytes=model_bytes,
        residual_bytes=residual_bytes,
        attention=attention,
        # DeepSpeed runs the whole module, adapters included, in the half type.
        adapter_bytes=2 if sharding.strategy == "deepspeed" and model_bytes == 2 else None,
        loss_chunk=None if recipe.train.loss == "standard" else recipe.train.loss_chunk_tokens,
    )
    if method_rows(recipe) is None:
        return act
    # dpo / grpo score completions with `methods.logps`, not the loop's token loss.
    e = 2 if autocast else model_bytes
    return replace(
        act,
        logits_saved=e * rows * seq * shape.vocab,
        logits_peak=logps_peak(rows, seq, shape.vocab, e),
    )
