"""Load the base model and its tokenizer (or a VLM's processor) as the recipe says (dtype, attention, revision,
quantisation, image size)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlmtune.config.paths import resolve_path
from vlmtune.config.schema import ModelConfig, QuantConfig, VisionConfig
from vlmtune.errors import UserError, first_line
from vlmtune.families import Family, find_family, get_family, set_image_size
from vlmtune.logging import get_logger
from vlmtune.model.quant import bnb_config, keep_compute_dtype_on_cpu

log = get_logger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_location(cfg: ModelConfig, base_dir: Path | None = None) -> str:
    """A local folder (resolved like every recipe path) or the hub id as given."""
    local = resolve_path(cfg.path, base_dir)
    return str(local) if local.exists() else cfg.path


def _tokenizer_location(cfg: ModelConfig, base_dir: Path | None) -> str:
    """`model.tokenizer_path` if given, else the model's own location."""
    if cfg.tokenizer_path is None:
        return model_location(cfg, base_dir)
    return str(resolve_path(cfg.tokenizer_path, base_dir))


def load_tokenizer(cfg: ModelConfig, base_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token and the recipe's chat template when it gives one."""
    where = _tokenizer_location(cfg, base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise UserError(f"model.path: cannot load a tokenizer from {where}: {first_line(exc)}") from None
    if cfg.chat_template:
        tok.chat_template = _chat_template(cfg.chat_template, base_dir)
    _set_padding(tok)
    return tok


def model_family(cfg: ModelConfig, base_dir: Path | None = None) -> Family | None:
    """The recipe's vision-language family: `model.family` if given, else detected from the model config;
    None for a text-only model."""
    if cfg.family is not None:
        return get_family(cfg.family)
    where = model_location(cfg, base_dir)
    try:
        config = AutoConfig.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: cannot load the config of {where}: {first_line(exc)}") from None
    return find_family(config)


def load_processor(
    cfg: ModelConfig, family: Family, vision: VisionConfig, base_dir: Path | None = None
) -> object:
    """A VLM's processor, with the recipe's chat template and image size, and a pad token.

    Raises:
        UserError: the processor cannot be loaded, has no chat template, or the family takes no such size key.
    """
    where = _tokenizer_location(cfg, base_dir)
    try:
        processor = AutoProcessor.from_pretrained(
            where, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model.path: cannot load a processor from {where}: {first_line(exc)}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise UserError(
            f"model.path: the processor of {where} holds no tokenizer; is it a {family.name} model?"
        )
    if cfg.chat_template:
        processor.chat_template = tokenizer.chat_template = _chat_template(cfg.chat_template, base_dir)
    if not getattr(processor, "chat_template", None):
        hint = "" if family.ships_chat_template else f" ({family.name} checkpoints ship none)"
        raise UserError(f"model.chat_template: the processor of {where} has no chat template{hint}; set one")
    try:
        set_image_size(processor, family, **vision.image_size())
    except UserError as exc:
        raise UserError(f"vision.{exc}") from None
    _set_padding(tokenizer)
    return processor


def _chat_template(template: str, base_dir: Path | None) -> str:
    """The recipe's chat template: inline Jinja, or the text of a .jinja file."""
    as_file = resolve_path(template, base_dir)
    if template.endswith(".jinja") or (len(template) < 256 and as_file.is_file()):
        if not as_file.is_file():
            raise UserError(f"model.chat_template: file not found: {template}")
        template = as_file.read_text()
    return template


def _set_padding(tok: PreTrainedTokenizerBase) -> None:
    if tok.pad_token_id is None:
        # Padding is masked by attention_mask and labels, so any existing token can serve as pad.
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"


def load_model(
    cfg: ModelConfig,
    quant: QuantConfig | None,
    *,
    device: torch.device,
    base_dir: Path | None = None,
    family: Family | None = None,
) -> PreTrainedModel:
    """The base causal LM, or a VLM through its family's class. Quantised weights are placed on `device` at load
    time (bitsandbytes needs that)."""
    where = model_location(cfg, base_dir)
    kwargs: dict = {
        "revision": cfg.revision,
        "dtype": DTYPES[cfg.dtype],
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if quant is not None:
        kwargs["quantization_config"] = bnb_config(quant, family)
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (and partitions) the weights itself
            kwargs["device_map"] = {"": device}
    cls = AutoModelForCausalLM if family is None else family.load_class()
    model = from_pretrained_complete(cls, where, origin="model.path", **kwargs)
    if quant is not None:
        keep_compute_dtype_on_cpu(model)
    # The KV cache is useless in training and breaks gradient checkpointing; a vision-language model's language
    # model reads its own config's flag, and with a cache its mask ignores packed-sequence boundaries.
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False
    return model


def from_pretrained_complete(cls, where: str, *, origin: str, **kwargs) -> PreTrainedModel:
    """`cls.from_pretrained(where, **kwargs)`, refusing weight files that lack parameters: transformers fills them
    with random values and only warns, and training or merging a partly random model would be silently wrong.

    Raises:
        UserError: starting with `origin` (where the location came from, e.g. `model.path`).
    """
    try:
        try:
            model, info = cls.from_pretrained(where, output_loading_info=True, **kwargs)
        except ValueError as exc:
            # Some architectures have no sdpa path (Gemma 2: its attention soft-capping); eager is what they run.
            if kwargs.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            log.warning("%s: %s; using eager attention", origin, first_line(exc).split(" yet.")[0])
            kwargs["attn_implementation"] = "eager"
            model, info = cls.from_pretrained(where, output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{origin}: cannot load {where}: {first_line(exc)}") from None
    missing = info.get("missing_keys") or []
    if missing:
        raise UserError(
            f"{origin}: {where} lacks weights for {len(missing)} parameter(s) (e.g. {sorted(missing)[0]}); its "
            "weight files are incomplete or corrupt (download the model again), or it is another kind of model"
        )
    return model
