"""`vlmtune merge`: the merged folder loads with plain transformers and computes what base + adapter computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlmtune.checkpoint.merge import merge
from vlmtune.checkpoint.source import load_source_processor, resolve_source
from vlmtune.cli import main
from vlmtune.errors import UserError
from vlmtune.families import get_family

pytestmark = pytest.mark.usefixtures("one_thread")


def _text_logits(model, tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of the island?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(**ids).logits


def test_text_merge_equals_base_plus_adapter(text_run, tiny_model_dir, tmp_path):
    result = merge(resolve_source(text_run), tmp_path / "merged", dtype="float32")

    assert {p.name for p in result.out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "chat_template.jinja",
    }
    merged = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(text_run / "adapter").chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, text_run / "adapter").eval()
    expected = _text_logits(reference, tokenizer)
    with reference.disable_adapter():  # the adapter is not a no-op, so equal logits mean it was merged
        assert (expected - _text_logits(reference, tokenizer)).abs().max() > 1e-3
    torch.testing.assert_close(_text_logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_run_adapter_and_checkpoint_sources_agree(text_run, tiny_model_dir, tmp_path):
    run, adapter, step = (
        resolve_source(p) for p in (text_run, text_run / "adapter", text_run / "checkpoints/step-3")
    )
    assert run.adapter_dir == adapter.adapter_dir == text_run / "adapter"
    assert step.adapter_dir == text_run / "checkpoints/step-3/adapter"
    assert run.base == adapter.base == step.base == str(tiny_model_dir)
    assert (
        run.base_from.startswith("model.path") and step.recipe is not None
    )  # the run's recipe found from below

    # A run that never finished: its checkpoint's adapter holds no tokenizer; the recipe and base provide it.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(text_run / "checkpoints/step-2", unfinished / "checkpoints/step-2")
    shutil.copy(text_run / "recipe.yaml", unfinished)
    template = AutoTokenizer.from_pretrained(text_run / "adapter").chat_template
    assert load_source_processor(resolve_source(unfinished / "checkpoints/step-2")).chat_template == template
    with pytest.raises(UserError, match=r"no final adapter/ yet .*checkpoints/step-2"):
        resolve_source(unfinished)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava"])
def test_vlm_merge_with_tower_lora_and_full_projector(name, vlm_run, tiny_vlm_root, image_file, tmp_path):
    family = get_family(name)
    adapter = vlm_run(name) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(family.projector[:1])  # how vlmtune saves a `full` projector

    source = resolve_source(adapter)
    assert source.family is family and source.base_from.startswith("base_model_name_or_path")
    result = merge(source, tmp_path / "merged", dtype="float32")

    merged = AutoModelForImageTextToText.from_pretrained(result.out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(result.out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(image_file).convert("RGB")]], return_tensors="pt")

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_root / name, dtype=torch.float32)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    reference = PeftModel.from_pretrained(base, adapter).eval()
    assert type(merged) is type(base) and type(merged).__name__ == result.model_class
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = merged(**inputs).logits
    # Every part changed: the merged language model, tower and projector all differ from the base's.
    for prefix in (family.language[0], family.vision[0], family.projector[0]):
        changed = [
            k
            for k, v in merged.state_dict().items()
            if k.startswith(prefix + ".") and not torch.equal(v, base_weights[k])
        ]
        assert changed, prefix
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_qlora_adapter_is_merged_unquantised_and_says_so(text_run, tmp_path, capsys):
    run = tmp_path / "qlora_run"
    shutil.copytree(text_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["quant"] = {"bits": 4, "type": "nf4"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "trained on a 4-bit nf4 quantised base" in out and "unquantised in bfloat16" in out
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def _merge_error(capsys, *args: str) -> str:
    assert main(["merge", *args]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_out_is_replaced_only_with_force_and_atomically(text_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "is not empty; pass --force" in _merge_error(capsys, str(text_run), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert "would replace" in _merge_error(
        capsys, str(text_run), "--out", str(text_run / "adapter"), "--force"
    )

    assert main(["merge", str(text_run), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left behind
    assert "already a full model" in _merge_error(capsys, str(out), "--out", str(tmp_path / "again"))


def test_bad_sources_are_user_errors(text_run, tmp_path, capsys):
    from vlmtune.testing import build_tiny_llm

    out = str(tmp_path / "out")
    assert "not found" in _merge_error(capsys, str(tmp_path / "nope"), "--out", out)
    assert "no adapter_config.json and no config.json" in _merge_error(capsys, str(tmp_path), "--out", out)

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(text_run / "adapter/adapter_config.json", incomplete)
    assert "incomplete: expected adapter_config.json and adapter_model.safetensors" in _merge_error(
        capsys, str(incomplete), "--out", out
    )

    partial = tmp_path / "run/checkpoints/step-2"
    shutil.copytree(text_run / "checkpoints/step-2", partial)
    (partial / "COMPLETE").unlink()
    assert "not a complete checkpoint" in _merge_error(capsys, str(partial), "--out", out)

    other = build_tiny_llm(tmp_path / "wider", hidden_size=32)
    err = _merge_error(capsys, str(text_run), "--base", str(other), "--out", out)
    assert "does not fit the base model" in err and "size mismatch" in err and "--base" in err
    assert not Path(out).exists()


def test_a_recipe_that_names_a_model_elsewhere_falls_back_to_the_adapter_config(
    text_run, tiny_model_dir, tmp_path
):
    run = tmp_path / "moved"
    shutil.copytree(text_run / "adapter", run / "adapter")
    recipe = yaml.safe_load((text_run / "recipe.yaml").read_text())
    recipe["model"]["path"] = "models/relative-to-a-recipe-elsewhere"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    source = resolve_source(run)
    assert source.base == str(tiny_model_dir) and "adapter_config.json" in source.base_from
    with pytest.raises(UserError, match=r"cannot load"):
        resolve_source(run, base=str(tmp_path / "missing-base"))
