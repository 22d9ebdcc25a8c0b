"""`vlmtune plan` for dpo and grpo: the pair, the rollouts' KV cache (against a real `generate`), the
reference and old-policy passes, and the step's phases (held + the largest phase)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.config.load import load_recipe
from vlmtune.model.meta import build_meta_model
from vlmtune.plan import format_plan, plan_json, plan_recipe
from vlmtune.plan.memory import layer_shape, peak_gpu, phase_totals
from vlmtune.plan.methods import kv_cache_bytes, logps_peak

# A 1B-class Llama with grouped-query attention, on the meta device (only its config is written).
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip
FORMATS = {"sft": "messages", "dpo": "preference", "grpo": "prompt"}


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_1b")
    (path / "config.json").write_text(json.dumps(LLAMA_1B))
    return path


def _recipe(model, tmp_path, method="sft", section=None, **train):
    raw = {
        "method": method,
        "model": {"path": str(model), "dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32},
        "data": {"train": [{"path": "unused.jsonl", "format": FORMATS[method]}], "max_length": 512},
        "train": {
            "output_dir": str(tmp_path),
            "micro_batch_size": 4,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            **train,
        },
    }
    if section is not None:
        raw[method] = section
    return load_recipe(raw)


def _grpo(model, tmp_path, **grpo):
    return _recipe(model, tmp_path, "grpo", {"rewards": [{"name": "format"}], **grpo})


@pytest.fixture(scope="module")
def meta(llama_1b, tmp_path_factory):
    return build_meta_model(_recipe(llama_1b, tmp_path_factory.mktemp("run")))


def _item(plan, name):
    return next((i for i in plan.items if i.name == name), None)


def test_grpo_kv_cache_grows_with_generations_and_completion_length(llama_1b, tmp_path, meta):
    plans = {
        (g, c): plan_recipe(_grpo(llama_1b, tmp_path, num_generations=g, max_completion_length=c), meta=meta)
        for g, c in ((8, 256), (16, 256), (8, 1024))
    }
    # layers × 2 × KV heads × head dim × tokens × sequences × bf16
    per_token = 16 * 2 * 8 * 64 * 2
    assert _item(plans[8, 256], "rollout: KV cache").gpu == per_token * (512 + 256) * 4 * 8
    assert _item(plans[16, 256], "rollout: KV cache").gpu == 2 * _item(plans[8, 256], "rollout: KV cache").gpu
    assert _item(plans[8, 1024], "rollout: KV cache").gpu == per_token * (512 + 1024) * 4 * 8
    # A loss micro-batch is one completion of each prompt: its activations do not depend on num_generations,
    # and grow with the completion length.
    act = {key: _item(p, "activations").gpu for key, p in plans.items()}
    assert act[16, 256] == act[8, 256] < act[8, 1024]
    for plan in plans.values():
        phases = phase_totals(plan.items)
        assert set(phases) == {"train", "rollout"}
        held = sum(i.gpu for i in plan.items if not i.phase)
        assert plan.total_gpu == held + max(phases.values())
    totals = {key: p.total_gpu for key, p in plans.items()}
    assert totals[8, 256] < totals[16, 256] and totals[8, 256] < totals[8, 1024]
    assert plans[8, 256].largest_micro_batch > plans[16, 256].largest_micro_batch > 0
    text = format_plan(plans[8, 256])
    assert "[rollout] 4 prompts × 8 generations = 32 sequences × (512 + 256) tokens" in text
    assert "held + the largest [phase]" in text


def test_grpo_beta_zero_drops_the_reference_pass(llama_1b, tmp_path, meta):
    off = plan_recipe(_grpo(llama_1b, tmp_path, beta=0.0), meta=meta)
    on = plan_recipe(_grpo(llama_1b, tmp_path, beta=0.04), meta=meta)
    assert _item(off, "reference forward") is None and "reference" not in phase_totals(off.items)
    ref = _item(on, "reference forward")
    assert ref.phase == "reference" and ref.gpu > 0
    assert [i for i in on.items if i is not ref] == off.items
    assert "+ a reference forward" in " ".join(on.notes) and "reference" not in " ".join(off.notes)
    # Reusing rollouts scores them with the generating policy first: the same no-grad pass, without the reference.
    reuse = plan_recipe(_grpo(llama_1b, tmp_path, beta=0.0, steps_per_generation=2), meta=meta)
    assert _item(reuse, "reference forward") is None
    assert _item(reuse, "old-policy forward").gpu == ref.gpu


def test_grpo_under_zero3_counts_the_whole_model_gathered_for_generation(llama_1b, tmp_path, meta):
    from pathlib import Path

    zero3 = Path(__file__).resolve().parents[3] / "accelerate_configs/zero3.yaml"

    def plan(**grpo):
        recipe = _grpo(llama_1b, tmp_path, **grpo)
        recipe = recipe.model_copy(
            update={"launch": recipe.launch.model_copy(update={"accelerate_config": str(zero3)})}
        )
        return plan_recipe(recipe, gpus=4, meta=meta)

    gathered, layer_by_layer = plan(), plan(gather_for_generation=False)
    item = _item(gathered, "rollout: gathered model")
    own = _item(gathered, "weights (frozen base)").gpu + _item(gathered, "trainable weights (LoRA)").gpu
    assert item.phase == "rollout" and item.gpu == pytest.approx(
        3 * own, rel=1e-3
    )  # the other 3 GPUs' shards
    assert _item(layer_by_layer, "rollout: gathered model") is None
    assert gathered.total_gpu == layer_by_layer.total_gpu + item.gpu  # the rollout phase is the largest
    assert _item(plan_recipe(_grpo(llama_1b, tmp_path), gpus=4, meta=meta), "rollout: gathered model") is None


def test_dpo_counts_the_pair_and_the_reference_forward(llama_1b, tmp_path, meta):
    dpo = plan_recipe(_recipe(llama_1b, tmp_path, "dpo", micro_batch_size=2), meta=meta)
    sft = plan_recipe(_recipe(llama_1b, tmp_path, micro_batch_size=4), meta=meta)
    # Two pairs are one forward of four rows (chosen and rejected).
    assert _item(dpo, "activations").gpu == _item(sft, "activations").gpu
    assert _item(dpo, "logits + loss").gpu == logps_peak(4, 512, 32000, 2)
    assert _item(dpo, "reference forward").phase == "reference"
    assert _item(sft, "reference forward") is None and len(phase_totals(sft.items)) == 1
    assert sft.total_gpu == sum(i.gpu for i in sft.items)  # one phase: the plain sum, as before
    simpo = plan_recipe(_recipe(llama_1b, tmp_path, "dpo", {"loss": "simpo"}, micro_batch_size=2), meta=meta)
    assert _item(simpo, "reference forward") is None  # SimPO is reference-free
    data = plan_json(dpo)
    assert data["method"] == "dpo" and data["total_gpu_bytes"] == peak_gpu(dpo.items)
    assert "method dpo, micro-batch 2 pairs = 4 rows × 512 tokens" in format_plan(dpo)


def test_the_kv_cache_formula_matches_a_real_generate(tiny_model_dir, tmp_path, one_thread):
    """The cache `generate` builds for B × G sequences of prompt + completion tokens (the last sampled token is
    never fed back, so the cache holds one fewer)."""
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tiny_model_dir, tmp_path)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "float32"})})
    shape = layer_shape(build_meta_model(recipe))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts, generations, prompt_len, new = 2, 3, 7, 5
    ids = torch.randint(10, 200, (prompts, prompt_len), generator=torch.Generator().manual_seed(0))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        num_return_sequences=generations,
        max_new_tokens=new,
        min_new_tokens=new,
        return_dict_in_generate=True,
        use_cache=True,
        pad_token_id=0,
    )
    cache = out.past_key_values
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert measured == kv_cache_bytes(shape, prompts * generations, prompt_len + new - 1, 4)
