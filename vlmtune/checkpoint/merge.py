"""`vlmtune merge`: fold a LoRA adapter into its base model and write a standalone model folder.

The result loads with plain `transformers` (`AutoModelForCausalLM`, or the family's class for a VLM, e.g.
`AutoModelForImageTextToText`): safetensors weights, config, generation config, and the tokenizer or processor
files with the chat template training used. Parts trained in full (a VLM projector saved as PEFT
`modules_to_save`) replace the base's copies; LoRA on the vision tower is merged like any other. A QLoRA adapter is
merged into the base loaded unquantised: the merged model is what the adapter computes on full-precision
weights, not a copy of the quantised model it was trained on.

The folder is written next to `out` under a temporary name and renamed into place, so `out` is either the old
folder or the complete new one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmtune.checkpoint.export import replace_dir
from vlmtune.checkpoint.source import Source, load_source_model, load_source_processor
from vlmtune.errors import UserError


@dataclass(frozen=True)
class MergeResult:
    """What `merge` wrote.

    Attributes:
        out: The merged model folder.
        model_class: The transformers class that loads it.
        notes: Things the user should know about the result (a QLoRA adapter merged unquantised).
    """

    out: Path
    model_class: str
    notes: tuple[str, ...] = ()


def merge(source: Source, out: str | Path, *, dtype: str, force: bool = False) -> MergeResult:
    """Merge `source`'s adapter into its base model in `dtype` and write the result to `out`.

    Raises:
        UserError: `source` is not an adapter, `out` is not empty (without `force`) or would overwrite the
            source or base, the base is a pre-quantised checkpoint, or the adapter does not fit the base.
    """
    if source.adapter_dir is None:
        raise UserError(f"{source.path} is already a full model (no adapter_config.json): nothing to merge")
    out = Path(out).expanduser().resolve()
    _check_out(out, source, force)
    _refuse_quantized_base(source)

    processor = load_source_processor(source)  # before the weights: the cheaper failure first
    model = load_source_model(source, dtype=dtype)
    # safe_merge: each merged weight is checked for NaN/Inf before it replaces the base weight.
    merged = model.merge_and_unload(safe_merge=True)
    merged.config.use_cache = True  # generation wants the KV cache, whatever training set

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed merge of this process id
    try:
        staging.mkdir()
        merged.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        _readable_as_umask_says(staging)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    notes = []
    if source.quant is not None:
        notes.append(
            f"the adapter was trained on a {source.quant} quantised base; it was merged into the base loaded "
            f"unquantised in {dtype}, so outputs differ slightly from the quantised model used in training"
        )
    return MergeResult(out, type(merged).__name__, tuple(notes))


def _readable_as_umask_says(folder: Path) -> None:
    """Some writers create files private (0600) whatever the umask; a model folder is usually shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _check_out(out: Path, source: Source, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    protected = [source.adapter_dir, source.path, source.run_dir]
    if Path(source.base).exists():
        protected.append(Path(source.base))
    for p in protected:
        if p is not None and _inside(Path(p).resolve(), out):
            raise UserError(f"--out {out} would replace {p}, which the merge reads; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it, or choose another folder")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _refuse_quantized_base(source: Source) -> None:
    """A checkpoint stored quantised (bitsandbytes, GPTQ, AWQ) has no full-precision weights to merge into."""
    import json

    config = Path(source.base) / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        raise UserError(
            f"the base model {source.base} (from {source.base_from}) is stored quantised; merging needs its "
            "unquantised weights: pass --base with the original model"
        )
