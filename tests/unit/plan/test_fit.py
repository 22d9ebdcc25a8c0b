"""`vlmtune plan` on hub-sized shapes (hand-written configs on the meta device: nothing is downloaded), the
sharding arithmetic, the verdict, and the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlmtune.cli import main
from vlmtune.config.accelerate import parse_launch_spec
from vlmtune.config.load import load_recipe
from vlmtune.errors import UserError
from vlmtune.model.meta import build_meta_model
from vlmtune.plan import plan_recipe
from vlmtune.plan.memory import GIB, Sharding, quantized_bytes

REPO = Path(__file__).resolve().parents[3]

QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip


QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "text_config": {
        "model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_configs")
    out = {}
    for name, config in (
        ("qwen2.5-7b", QWEN2_5_7B),
        ("llama-3-8b", LLAMA_3_8B),
        ("qwen2.5-vl-7b", QWEN2_5_VL_7B),
    ):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return out


def _recipe(model: Path, base: str = "7b_lora.yaml", *overrides: str):
    return load_recipe(REPO / "recipes" / base, [f"model.path={model}", *overrides])


def _gib(plan, name: str) -> float:
    return next(i for i in plan.items if i.name == name).gpu / GIB


@pytest.fixture(scope="module")
def qwen_meta(hub_models):
    """One meta Qwen2.5-7B with the recipes' LoRA (r 16, all-linear), shared by the plans below."""
    return build_meta_model(_recipe(hub_models["qwen2.5-7b"]))


@pytest.fixture(scope="module")
def qwen_plan(hub_models, qwen_meta):
    return plan_recipe(_recipe(hub_models["qwen2.5-7b"]), meta=qwen_meta)


# Published sizes; LoRA r=16 on all linear layers of the decoder (the output head excluded).
def test_hub_sized_parameter_counts(hub_models, qwen_plan):
    assert (qwen_plan.frozen_params, qwen_plan.trainable_params) == (7_615_616_512, 40_370_176)
    llama = plan_recipe(_recipe(hub_models["llama-3-8b"]))
    assert (llama.frozen_params, llama.trainable_params) == (8_030_261_248, 41_943_040)


def test_hub_sized_vlm_adapts_the_language_model_only(hub_models):
    """Qwen2.5-VL-7B (published: 8,292,166,656 parameters) with its recipe: `all-linear` adapts exactly the
    language model's layers (the same 40,370,176 as Qwen2.5-7B), the frozen tower keeps no activations."""
    plan = plan_recipe(
        load_recipe(REPO / "recipes/qwen2_5_vl_7b_lora.yaml", [f"model.path={hub_models['qwen2.5-vl-7b']}"])
    )
    assert plan.family == "qwen2_5_vl"
    assert (plan.frozen_params, plan.trainable_params) == (8_292_166_656, 40_370_176)
    assert plan.fits and 30 < plan.total_gpu / GIB < 45


def test_7b_lora_on_one_80gb_gpu_is_plausible(qwen_plan):
    p = qwen_plan
    assert _gib(p, "weights (frozen base)") == pytest.approx(7_615_616_512 * 2 / GIB)  # bf16
    assert _gib(p, "trainable weights (LoRA)") == pytest.approx(40_370_176 * 4 / GIB)  # fp32 adapters
    assert _gib(p, "optimizer states") == pytest.approx(2 * 40_370_176 * 4 / GIB)  # AdamW m + v, fp32
    # Checkpointed: 28 bf16 layer inputs of 4 × 4096 × 3584, plus one recomputed layer (~4.3 GiB).
    assert 3.07 + 3.5 < _gib(p, "activations") < 3.07 + 5.5
    # fp32 log-probs (4) + two fp32 gradients (8) per token and vocabulary entry; the bf16 logits are gone by then.
    assert _gib(p, "logits + loss") == pytest.approx(12 * 4 * 4096 * 152064 / GIB)
    assert p.fits and 50 < p.total_gpu / GIB < 60
    assert p.largest_micro_batch == 7


def test_a_chunked_loss_holds_one_chunk_of_logits(hub_models, qwen_meta, qwen_plan):
    chunked = plan_recipe(
        _recipe(hub_models["qwen2.5-7b"], "7b_lora.yaml", "train.loss=chunked"), meta=qwen_meta
    )
    assert _gib(chunked, "logits + loss") == pytest.approx(14 * 1024 * 152064 / GIB)  # loss_chunk_tokens 1024
    assert chunked.total_gpu == pytest.approx(qwen_plan.total_gpu - (12 * 4 * 4096 - 14 * 1024) * 152064)
    assert chunked.largest_micro_batch > qwen_plan.largest_micro_batch


def test_qlora_keeps_unquantised_weights_in_fp32(hub_models, qwen_meta):
    recipe = _recipe(hub_models["qwen2.5-7b"], "7b_qlora.yaml")
    plan = plan_recipe(recipe, gpu_mem_gib=24, meta=qwen_meta)
    embed = head = 152064 * 3584
    norms = 28 * 2 * 3584 + 3584
    biases = 28 * (3584 + 2 * 512)  # q/k/v biases stay float too
    quantized = 7_615_616_512 - embed - head - norms - biases
    expected = 4 * (embed + head + norms + biases) + quantized * 0.5 * (1 + 1 / 32 + 1 / 8192)
    assert _gib(plan, "weights (frozen base)") == pytest.approx(expected / GIB, rel=1e-3)
    assert _gib(plan, "optimizer states") < 0.1  # paged 8-bit AdamW: ~2 bytes per trainable parameter
    assert plan.fits  # the recipe's own claim: a 24 GB GPU at 2048 tokens


def test_quantized_bytes():
    assert quantized_bytes(4096 * 4096, 4096, 8, False) == 4096 * 4096 + 4 * 4096
    n = 4096 * 4096
    assert quantized_bytes(n, 4096, 4, False) == n // 2 + 4 * n // 64 + 64
    assert quantized_bytes(n, 4096, 4, True) == n // 2 + n // 64 + 4 * n // 64 // 256 + 1024 + 4 + 64


@pytest.mark.parametrize(
    ("config", "divided"),
    [
        ("ddp.yaml", set()),
        ("zero1.yaml", {"optimizer states"}),
        ("zero2.yaml", {"optimizer states", "gradients"}),
        (
            "zero3.yaml",
            {"optimizer states", "gradients", "weights (frozen base)", "trainable weights (LoRA)"},
        ),
        (
            "fsdp2.yaml",
            {"optimizer states", "gradients", "weights (frozen base)", "trainable weights (LoRA)"},
        ),
    ],
)
def test_sharding_divides_what_each_strategy_shards(hub_models, qwen_meta, qwen_plan, config, divided):
    plan = plan_recipe(
        _recipe(
            hub_models["qwen2.5-7b"], "7b_lora.yaml", f"launch.accelerate_config=accelerate_configs/{config}"
        ),
        gpus=4,
        meta=qwen_meta,
    )
    assert plan.sharding.world == 4
    one = {i.name: i.gpu for i in qwen_plan.items}
    deepspeed = config.startswith("zero")
    assert one["weights (frozen base)"] == 2 * 7_615_616_512  # bf16 either way
    # DeepSpeed runs the module cast to bf16 (adapters included) with fp32 master copies in its optimizer
    # (12 bytes per trainable parameter with m and v); the others keep fp32 adapters and m, v (8 bytes).
    expected = {
        "weights (frozen base)": one["weights (frozen base)"],
        "trainable weights (LoRA)": (2 if deepspeed else 4) * 40_370_176,
        "optimizer states": (12 if deepspeed else 8) * 40_370_176,
    }
    for item, nbytes in expected.items():
        nbytes = nbytes / 4 if item in divided else nbytes
        assert _gib(plan, item) == pytest.approx(nbytes / GIB, rel=1e-6), item
    assert any(i.name == "gathered layers" for i in plan.items) == ("weights (frozen base)" in divided)


def test_offload_moves_state_to_cpu(hub_models, qwen_meta):
    recipe = _recipe(
        hub_models["qwen2.5-7b"],
        "7b_lora.yaml",
        "launch.accelerate_config=accelerate_configs/zero3_offload.yaml",
    )
    plan = plan_recipe(recipe, gpus=2, meta=qwen_meta)
    for name in ("weights (frozen base)", "optimizer states", "gradients"):
        item = next(i for i in plan.items if i.name == name)
        assert item.gpu == 0 and item.cpu > 0
    # Per process, half of: bf16 weights; bf16 adapters, bf16 + fp32 gradients, fp32 master + m + v (20 bytes).
    expected = (2 * 7_615_616_512 + 20 * 40_370_176) / 2
    assert plan.total_cpu == pytest.approx(expected, rel=1e-6)
    assert any("CPU RAM" in n for n in plan.notes)


def test_does_not_fit_names_the_biggest_item_and_what_helps(hub_models, qwen_meta):
    recipe = _recipe(
        hub_models["qwen2.5-7b"],
        "7b_lora.yaml",
        "train.gradient_checkpointing=false",
        "train.micro_batch_size=8",
    )
    plan = plan_recipe(recipe, gpu_mem_gib=80, meta=qwen_meta)
    assert not plan.fits
    assert plan.biggest.name == "activations"
    assert 0 < plan.largest_micro_batch < 8
    assert any(s.startswith("train.micro_batch_size=") for s in plan.suggestions)
    # The suggested micro-batch really fits: planning it again says so.
    b = plan.largest_micro_batch
    again = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch_size": b})})
    assert plan_recipe(again, meta=qwen_meta).fits
    bigger = recipe.model_copy(update={"train": recipe.train.model_copy(update={"micro_batch_size": b + 1})})
    assert not plan_recipe(bigger, meta=qwen_meta).fits


def test_cli_plan_json_and_table(hub_models, tiny_model_dir, capsys):
    recipe = str(REPO / "recipes/7b_lora.yaml")
    args = ["plan", recipe, "--json", "--gpus", "2", "--gpu-mem-gib", "40"]
    assert main([*args, f"model.path={hub_models['qwen2.5-7b']}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["biggest_item"] == "logits + loss"
    assert data["largest_micro_batch"] == 2 and data["sharding"]["world"] == 2
    assert data["total_gpu_bytes"] == sum(i["gpu"] for i in data["items"]) > data["gpu_budget_bytes"]
    assert main(["plan", recipe, f"model.path={tiny_model_dir}", "model.dtype=float32"]) == 0
    out = capsys.readouterr().out
    # A 2-layer model at 4096 tokens: a few MiB per row, against 79 GiB left after the CUDA context.
    assert "verdict: fits (1.3 of 80 GiB)" in out
    assert int(re.search(r"largest micro-batch that fits: train.micro_batch_size=(\d+)", out).group(1)) > 1000
    assert "weights (frozen base)" in out and "trainable weights (LoRA)" in out


def test_cli_plan_user_errors(tmp_path, capsys):
    recipe = str(REPO / "recipes/7b_lora.yaml")
    assert main(["plan", recipe, "lora.rank=8"]) == 2
    assert "lora.rank: unknown key; did you mean `r`?" in capsys.readouterr().err
    assert main(["plan", recipe, f"model.path={tmp_path}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["plan", recipe, f"model.path={tmp_path / 'missing'}"]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert main(["plan", recipe, "model.path=nobody/not-a-cached-model"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the config of nobody/not-a-cached-model" in err and "config.json" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["plan", recipe, "--gpus", "0"])
    assert "expected a positive int" in capsys.readouterr().err


def test_sharding_from_a_deepspeed_json_file(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    accel = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": "ds.json"}}
    sharding = Sharding.from_spec(parse_launch_spec(accel, base_dir=tmp_path), 4)
    assert (sharding.zero_stage, sharding.world, sharding.offload_optimizer, sharding.offload_params) == (
        3,
        4,
        True,
        False,
    )
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(UserError, match=r"deepspeed_config_file ds\.json cannot be read as JSON"):
        parse_launch_spec(accel, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "gpu_mem_gib", "expected"),
    [
        (
            ["train.gradient_checkpointing=false", "train.micro_batch_size=2"],
            48,
            ["train.gradient_checkpointing"],
        ),
        (
            ["train.micro_batch_size=1", "data.max_length=1024"],
            16,
            ["quant.bits", "launch.accelerate_config"],
        ),
    ],
)
def test_every_suggestion_fits_when_applied(hub_models, qwen_meta, overrides, gpu_mem_gib, expected):
    """Each suggested change, applied as the overrides it names, makes a plan that fits at the stated total."""
    base = [f"model.path={hub_models['qwen2.5-7b']}", *overrides]
    plan = plan_recipe(
        load_recipe(REPO / "recipes/7b_lora.yaml", base), gpu_mem_gib=gpu_mem_gib, meta=qwen_meta
    )
    assert not plan.fits
    assert [s.split("=")[0] for s in plan.suggestions] == expected
    for suggestion in plan.suggestions:
        change, total = suggestion.rsplit(": ", 1)
        fixed = load_recipe(REPO / "recipes/7b_lora.yaml", base + [t for t in change.split() if "=" in t])
        # The same number of GPUs: a suggested accelerate config says 8 processes, the plan was for one.
        again = plan_recipe(fixed, gpus=plan.sharding.world, gpu_mem_gib=gpu_mem_gib, meta=qwen_meta)
        assert again.fits, suggestion
        assert again.total_gpu / GIB == pytest.approx(float(total.removesuffix(" GiB")), abs=0.05)


def test_activations_are_reported_with_and_without_checkpointing(qwen_plan):
    both = qwen_plan.activations
    assert both["checkpointed"] == next(i.gpu for i in qwen_plan.items if i.name == "activations")
    # Without checkpointing all 28 layers keep everything: far more than 28 layer inputs + one layer.
    assert both["not_checkpointed"] > 15 * both["checkpointed"]


def test_batching_layouts_shape_the_micro_batch(hub_models, qwen_meta):
    base = [f"model.path={hub_models['qwen2.5-7b']}"]

    def plan(*overrides: str):
        return plan_recipe(load_recipe(REPO / "recipes/7b_lora.yaml", base + list(overrides)), meta=qwen_meta)

    padded = plan()
    assert plan("data.batching=packed").activations == padded.activations  # 4 bins × 4096: the same tokens
    # One padding-free row of 16,384 tokens: the same tokens, but sdpa's float mask bias grows with the square
    # of the row length (kept by the one recomputed layer under checkpointing; bf16).
    free = plan("data.batching=padding_free")
    assert free.activations["checkpointed"] - padded.activations["checkpointed"] == 2 * (
        16384**2 - 4 * 4096**2
    )
    budget = plan("train.micro_batch_tokens=16384")
    assert budget.activations == padded.activations and budget.batch_key == "train.micro_batch_tokens"
    assert budget.largest_micro_batch == 7 * 4096  # the same 7 rows of 4096 as the row-count plan
