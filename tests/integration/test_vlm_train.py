"""End to end on CPU for every registered VLM family: recipe → LoRA training → adapter that reloads in plain PEFT.

Each family trains its tiny random-init model for a few steps on a small generated image-text set (coloured
shapes; text-only rows too where the family can train on them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoProcessor

from vlmtune.config.schema import DataConfig, DataSource
from vlmtune.data import Collator, build_dataset
from vlmtune.engine.loop import forward
from vlmtune.families import FAMILIES, get_family
from vlmtune.model.parts import part_of
from vlmtune.testing.tiny_vlm import build_tiny_vlm
from vlmtune.train import run

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "circle")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def vlm_data(tmp_path_factory) -> Path:
    """A LLaVA-style JSON file of shape / colour questions on generated images, plus a text-only file."""
    root = tmp_path_factory.mktemp("vlm_data")
    (root / "images").mkdir()
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            name = f"images/{colour}_{shape}.png"
            image = Image.new("RGB", (48, 40), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((8, 6, 40, 34), fill=rgb)
            image.save(root / name)
            rows.append(
                {
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is this?"},
                        {"from": "gpt", "value": f"A {colour} {shape}."},
                    ],
                }
            )
    (root / "train.json").write_text(json.dumps(rows))
    text = [
        {
            "messages": [
                {"role": "user", "content": f"Name a {c} thing."},
                {"role": "assistant", "content": f"A {c} {s}."},
            ]
        }
        for c in COLOURS
        for s in SHAPES[:1]
    ]
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text) + "\n")
    return root


def _recipe(model: Path, data: Path, out: Path, family, **sections) -> dict:
    train = [{"path": str(data / "train.json"), "format": "llava"}]
    if not family.needs_images:
        train.append({"path": str(data / "text.jsonl")})
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": train, "max_length": 512},
        "train": {
            "output_dir": str(out), "micro_batch_size": 3, "grad_accum": 1, "lr": 2.0e-2, "max_steps": 8,
            "warmup_ratio": 0.0, "mixed_precision": "no", "gradient_checkpointing": False, "log_every": 1,
            "report_to": [], "scheduler": "constant",
        },
        "checkpoint": {"every": 0, "keep_last": 1},
        "launch": {"accelerate_config": str(REPO / "accelerate_configs/cpu.yaml")},
    }  # fmt: skip
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vlm_lora_trains_and_reloads_in_plain_peft(name, tiny_vlm_root, vlm_data, tmp_path, monkeypatch):
    family = get_family(name)
    model_dir = build_tiny_vlm(name, tiny_vlm_root / name)
    recipe = _recipe(model_dir, vlm_data, tmp_path / "run", family)
    trained = _keep_trained_model(monkeypatch)
    result = run(recipe)

    losses = _losses(result.output_dir)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses

    adapter = result.adapter_dir
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}

    # Plain transformers + PEFT, from the folders alone: the base model, the adapter and its processor.
    base = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    lora_parts = {part_of(n, family) for n, _ in reloaded.named_parameters() if "lora_" in n}
    assert lora_parts == {"language"}  # vision.tower and vision.projector are frozen by default
    processor = AutoProcessor.from_pretrained(adapter)
    sources = [DataSource(**s) for s in recipe["data"]["train"]]
    data = build_dataset(sources, DataConfig(**recipe["data"]), processor, family=family, seed=0)
    rows = [0, len(data) - 1, 1]  # an image row, a text-only row (where the family has them), an image row
    batch = Collator(processor.tokenizer.pad_token_id, family)([data[i] for i in rows])
    with torch.no_grad():
        torch.testing.assert_close(
            forward(reloaded, batch), forward(trained["model"].eval(), batch), atol=1e-5, rtol=1e-4
        )


def _keep_trained_model(monkeypatch) -> dict:
    """Catch the model `run` exports (trained, in memory) to compare it with the reloaded adapter."""
    import vlmtune.checkpoint.export as export

    kept, original = {}, export.export_adapter

    def export_and_keep(accelerator, model, tokenizer, adapter_dir):
        kept["model"] = accelerator.unwrap_model(model)
        return original(accelerator, model, tokenizer, adapter_dir)

    monkeypatch.setattr(export, "export_adapter", export_and_keep)
    return kept


@pytest.mark.parametrize(
    ("name", "vision"), [("llava", {"tower": "lora", "projector": "full", "tower_lr": 1e-2})]
)
def test_trained_tower_and_projector_are_in_the_adapter(
    name, vision, tiny_vlm_root, vlm_data, tmp_path, monkeypatch
):
    family = get_family(name)
    model_dir = build_tiny_vlm(name, tiny_vlm_root / name)
    recipe = _recipe(model_dir, vlm_data, tmp_path / "run", family, vision=vision, train={"max_steps": 3})
    trained = _keep_trained_model(monkeypatch)
    result = run(recipe)

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "model.multi_modal_projector" in config["modules_to_save"]
    base = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    assert {part_of(n, family) for n, _ in reloaded.named_parameters() if "lora_" in n} == {
        "language",
        "vision",
    }
    processor = AutoProcessor.from_pretrained(result.adapter_dir)
    data = build_dataset(
        [DataSource(**s) for s in recipe["data"]["train"]],
        DataConfig(**recipe["data"]),
        processor,
        family=family,
        seed=0,
    )
    batch = Collator(processor.tokenizer.pad_token_id, family)([data[0], data[1]])
    with torch.no_grad():
        torch.testing.assert_close(
            forward(reloaded, batch), forward(trained["model"].eval(), batch), atol=1e-5, rtol=1e-4
        )


def test_a_datasets_folder_with_an_image_column_trains(tiny_vlm_root, vlm_data, tmp_path):
    """`datasets.save_to_disk` output whose `images` column holds decoded images (the datasets Image feature), as
    hub image-text sets come: no image files at all."""
    import datasets

    rows = json.loads((vlm_data / "train.json").read_text())
    table = datasets.Dataset.from_dict(
        {
            "images": [[Image.open(vlm_data / r["image"]).convert("RGB")] for r in rows],
            "messages": [
                [
                    {"role": "user", "content": r["conversations"][0]["value"]},
                    {"role": "assistant", "content": r["conversations"][1]["value"]},
                ]
                for r in rows
            ],
        },
        features=datasets.Features(
            {
                "images": datasets.Sequence(datasets.Image()),
                "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "hub_style"))
    family = get_family("qwen2_vl")
    model_dir = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    recipe = _recipe(model_dir, vlm_data, tmp_path / "run", family, train={"max_steps": 6})
    recipe["data"]["train"] = [{"path": str(tmp_path / "hub_style"), "format": "messages"}]
    result = run(recipe)
    losses = _losses(result.output_dir)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("vision", ["quantized", "float"])
def test_qlora_on_a_vlm(vision, tiny_vlm_root, vlm_data, tmp_path, monkeypatch):
    """A 4-bit NF4 base with LoRA on the language model. quant.vision quantized: bitsandbytes quantises tower and
    projector too; float: they stay unquantised, so the projector trains in full and the tower takes LoRA.
    The adapter reloads in plain PEFT on the unquantised base."""
    bnb = pytest.importorskip("bitsandbytes")
    family = get_family("qwen2_vl")
    model_dir = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    quant = {
        "bits": 4,
        "type": "nf4",
        "compute_dtype": "float32",
        "storage_dtype": "float32",
        "vision": vision,
    }
    parts = {"tower": "lora", "projector": "full"} if vision == "float" else {}
    recipe = _recipe(
        model_dir, vlm_data, tmp_path / "run", family, quant=quant, train={"max_steps": 6}, vision=parts
    )
    trained = _keep_trained_model(monkeypatch)
    result = run(recipe)
    quantised = {
        part_of(n, family) for n, m in trained["model"].named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }
    assert quantised == ({"language"} if vision == "float" else {"vision", "projector", "language"})
    losses = _losses(result.output_dir)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    base = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
    before = {n: p.clone() for n, p in base.named_parameters() if part_of(n, family) == "projector"}
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir)
    adapted = {part_of(n, family) for n, _ in reloaded.named_parameters() if "lora_" in n}
    assert adapted == ({"vision", "language"} if vision == "float" else {"language"})
    if vision == "float":  # the fully trained projector comes back with the adapter
        saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
        assert before and all(not torch.equal(saved[f"base_model.model.{n}"], p) for n, p in before.items())


def test_images_decoded_in_workers_skip_a_broken_one_and_resume_exactly(tiny_vlm_root, vlm_data, tmp_path):
    """Images are decoded as micro-batches are collated, here in 2 DataLoader workers: an image truncated after
    its header passes indexing, then is left out of its micro-batch under `skip` and counted, identically with
    or without workers and on a resumed run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(vlm_data, data)
    broken = data / "images" / "red_square.png"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    family = get_family("qwen2_vl")
    model_dir = build_tiny_vlm(family.name, tiny_vlm_root / family.name)

    def train(out: str, steps: int, workers: int) -> list[dict]:
        recipe = _recipe(
            model_dir, data, tmp_path / out, family, train={"max_steps": steps, "micro_batch_size": 2},
            checkpoint={"every": 3, "keep_last": 2},
        )  # fmt: skip
        recipe["data"] |= {"on_bad_row": "skip", "num_workers": workers}
        run(recipe)
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    inline, workers = train("inline", 6, 0), train("workers", 6, 2)
    assert [r["loss"] for r in inline] == pytest.approx([r["loss"] for r in workers], abs=1e-6)
    assert inline[-1]["bad_rows"] == workers[-1]["bad_rows"] > 0
    train("resumed", 3, 2)
    resumed = train("resumed", 6, 2)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in workers], abs=1e-6)
    assert resumed[-1]["bad_rows"] == workers[-1]["bad_rows"]


@pytest.mark.parametrize(
    ("batching", "extra", "train"),
    [
        ("packed", {"pack_length": 512}, {}),
        ("padding_free", {}, {}),
        ("padding_free", {}, {"micro_batch_tokens": 512}),  # micro-batches bounded in tokens, images included
    ],
    ids=["packed", "padding_free", "padding_free-micro_batch_tokens"],
)
def test_packed_image_text_rows_train_qwen2_vl_and_reload(
    batching, extra, train, tiny_vlm_root, vlm_data, tmp_path, monkeypatch
):
    """Image and text-only rows of Qwen2-VL in shared rows (3-D rope positions per example) train like padded
    ones: the loss falls, and the adapter reloads in plain PEFT with the trained model's logits."""
    family = get_family("qwen2_vl")
    model_dir = build_tiny_vlm(family.name, tiny_vlm_root / family.name)
    recipe = _recipe(model_dir, vlm_data, tmp_path / "run", family, train={"micro_batch_size": 2, **train})
    recipe["data"].update(batching=batching, **extra)
    trained = _keep_trained_model(monkeypatch)
    result = run(recipe)
    losses = _losses(result.output_dir)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses

    base = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    processor = AutoProcessor.from_pretrained(result.adapter_dir)
    sources = [DataSource(**s) for s in recipe["data"]["train"]]
    data = build_dataset(sources, DataConfig(**recipe["data"]), processor, family=family, seed=0)
    batch = Collator(processor.tokenizer.pad_token_id, family)([data[0], data[len(data) - 1]])
    with torch.no_grad():
        torch.testing.assert_close(
            forward(reloaded, batch), forward(trained["model"].eval(), batch), atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_sample_answers_of_a_vlm_see_the_image(name, tiny_vlm_root, vlm_data, tmp_path):
    """train.eval_samples on image questions: the answers are the trained model's greedy answers to the prompt
    and image as the processor prepares them from the plain conversation."""
    family = get_family(name)
    model_dir = build_tiny_vlm(name, tiny_vlm_root / name)
    train = {"max_steps": 2, "eval_samples": 2, "eval_max_new_tokens": 5}
    recipe = _recipe(model_dir, vlm_data, tmp_path / "run", family, train=train)
    recipe["data"]["eval"] = [{"path": str(vlm_data / "train.json"), "format": "llava"}]
    result = run(recipe)

    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    rows = json.loads((vlm_data / "train.json").read_text())[:2]
    assert [s["step"] for s in samples] == [2, 2]
    assert [s["reference"].strip() for s in samples] == [r["conversations"][-1]["value"] for r in rows]
    assert all("What is this?" in s["prompt"] for s in samples)

    processor = AutoProcessor.from_pretrained(result.adapter_dir)
    base = family.load_class().from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    for sample, row in zip(samples, rows, strict=True):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.open(vlm_data / row["image"]).convert("RGB")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert sample["completion"] == answer
