"""Write and verify PEFT adapters: the final `adapter/` and the adapter inside each checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmtune.engine.distributed import trainable_state_dict
from vlmtune.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(peft_model, out_dir: Path, *, state_dict: dict | None = None) -> None:
    """Standard PEFT files (adapter_config.json + adapter_model.safetensors), then verified."""
    peft_model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)
    verify_adapter(out_dir)


def export_adapter(accelerator, model, processor, adapter_dir: Path) -> None:
    """Write the final adapter plus the processor's files (a text model's processor is its tokenizer), so the
    folder is usable on its own; swapped in whole."""
    weights = trainable_state_dict(
        accelerator, model
    )  # a collective under ZeRO-3 / FSDP2: every rank calls it
    if accelerator.is_main_process:
        staging = adapter_dir.with_name(adapter_dir.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        save_adapter(accelerator.unwrap_model(model), staging, state_dict=weights)
        processor.save_pretrained(str(staging))
        replace_dir(staging, adapter_dir)
    accelerator.wait_for_everyone()


def export_checkpoint_adapter(accelerator, checkpoint: Path, processor, adapter_dir: Path) -> None:
    """Write a checkpoint's adapter (`checkpoint.export: best`) as the final adapter, with the processor's files.

    The checkpoint's adapter is already standard PEFT files gathered from every shard, so this is a copy on the
    main process, whatever the sharding; swapped in whole like `export_adapter`.
    """
    if accelerator.is_main_process:
        staging = adapter_dir.with_name(adapter_dir.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(checkpoint / adapter_dir.name, staging)
        verify_adapter(staging)
        processor.save_pretrained(str(staging))
        replace_dir(staging, adapter_dir)
    accelerator.wait_for_everyone()


def verify_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Check an adapter on disk is usable: non-empty, finite, LoRA ranks matching its config.

    Raises:
        UserError: naming the problem; an empty adapter is never a silent success.
    """
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise UserError(
            f"adapter at {adapter_dir} is incomplete: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(str(weights_path))
    if not tensors or all(t.numel() == 0 for t in tensors.values()):
        raise UserError(
            f"adapter at {adapter_dir} holds no weights (size 0): the trainable parameters were not gathered "
            "before saving (a ZeRO-3 / FSDP sharding problem)"
        )
    rank_pattern = cfg.get("rank_pattern") or {}
    for name, t in tensors.items():
        if t.numel() == 0:
            raise UserError(f"adapter at {adapter_dir}: tensor {name} is empty (shape {tuple(t.shape)})")
        if not torch.isfinite(t.float()).all():
            raise UserError(f"adapter at {adapter_dir}: tensor {name} has NaN or Inf values")
        if "lora_A" in name and t.ndim == 2 and not rank_pattern and t.shape[0] != cfg.get("r"):
            raise UserError(
                f"adapter at {adapter_dir}: {name} has rank {t.shape[0]}, config says r={cfg.get('r')}"
            )
    return tensors


def replace_dir(src: Path, dst: Path) -> None:
    """Move a fully written `src` into place at `dst`, replacing an older `dst` without a window with neither."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)
