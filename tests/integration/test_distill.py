"""method: distill end to end on CPU: a tiny student learns from a tiny teacher by recipe, resumes exactly, trains
the same under two processes (ZeRO-3 shards the teacher like the student), and a vision-language student
distils from a vision-language teacher of its family, which sees the same images."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import adapter, cpu_config, launch, max_diff, tiny_recipe_for_processes
from tests.integration.test_vlm_train import _recipe as vlm_recipe
from tests.integration.test_vlm_train import vlm_data  # noqa: F401 (a fixture)
from vlmtune.families import get_family
from vlmtune.testing import build_tiny_llm
from vlmtune.testing.tiny_vlm import build_tiny_vlm
from vlmtune.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A wider tiny Llama with the student's tokenizer and other weights."""
    return build_tiny_llm(tmp_path_factory.mktemp("teacher") / "t", seed=1, hidden_size=96)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_student_learns_from_a_teacher_and_resumes_exactly(tiny_recipe, teacher_dir, tmp_path):
    recipe = tiny_recipe(
        method="distill",
        distill={"teacher": str(teacher_dir), "dtype": "float32", "alpha": 0.5, "temperature": 2.0},
        train={"max_steps": 8, "loss_chunk_tokens": 16, "eval_every": 4, "lr": 3e-2, "scheduler": "constant"},
        checkpoint={"every": 4, "keep_last": 2},
    )
    recipe["data"]["eval"] = [{"path": str(Path(recipe["data"]["train"][0]["path"]).parent / "eval.jsonl")}]
    out = run(recipe).output_dir
    train = [r for r in _records(out) if "loss" in r]
    assert len(train) == 8
    for key in ("loss", "kd_loss", "ce_loss"):
        first, last = sum(r[key] for r in train[:2]) / 2, sum(r[key] for r in train[-2:]) / 2
        assert last < first * 0.97, (key, [r[key] for r in train])
    for r in train:  # the loss is alpha × kd + (1 − alpha) × ce, per trained token
        assert r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"], rel=1e-5)
    evals = [r for r in _records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["eval_kd_loss"] < evals[0]["eval_kd_loss"]

    # Lose everything after step 4, as a crash would, and resume.
    final, records = adapter(out), _losses(out)
    shutil.rmtree(out / "checkpoints/step-8")
    shutil.rmtree(out / "adapter")
    run(recipe)
    assert max_diff(adapter(out), final) == 0.0
    assert _losses(out) == records


def _losses(out: Path) -> list[tuple]:
    keys = ("step", "loss", "kd_loss", "ce_loss", "eval_loss", "eval_kd_loss", "eval_ce_loss")
    return [tuple(r.get(k) for k in keys) for r in _records(out)]


def test_a_teacher_equal_to_the_student_gives_zero_kd(tiny_recipe, tiny_model_dir):
    """Before the first update the student is its base model (LoRA B is zero): kd is zero, every divergence."""
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        recipe = tiny_recipe(
            method="distill",
            distill={"teacher": str(tiny_model_dir), "dtype": "float32", "loss": kind, "temperature": 3.0},
            train={"max_steps": 1},
        )
        [record] = _records(run(recipe).output_dir)
        assert record["kd_loss"] == pytest.approx(0.0, abs=1e-6) and record["ce_loss"] > 1.0


def test_a_4bit_teacher_teaches(tiny_recipe, tmp_path, caplog):
    """`distill.quant`: the teacher loads in 4 bits (bitsandbytes, on CPU) and the student learns from it."""
    teacher = build_tiny_llm(tmp_path / "t128", seed=2, hidden_size=128)  # 4-bit on CPU packs 64-wide blocks
    quant = {"bits": 4, "compute_dtype": "float32", "storage_dtype": "float32"}
    recipe = tiny_recipe(
        method="distill",
        distill={"teacher": str(teacher), "dtype": "float32", "alpha": 1.0, "quant": quant},
        train={"max_steps": 8, "lr": 3e-2, "scheduler": "constant"},
    )
    with caplog.at_level("INFO"):
        kd = [r["kd_loss"] for r in _records(run(recipe).output_dir)]
    assert "(LlamaForCausalLM, 4-bit, torch.float32, a whole copy per process)" in caplog.text
    assert sum(kd[-2:]) / 2 < sum(kd[:2]) / 2 * 0.9, kd


def test_vlm_student_learns_from_a_vlm_teacher_that_sees_the_same_images(tiny_vlm_root, vlm_data, tmp_path):  # noqa: F811
    name = "qwen2_vl"
    family = get_family(name)
    student = build_tiny_vlm(name, tiny_vlm_root / name)
    # The student itself as teacher: kd is zero at step 1 only if the teacher got the same pixels.
    same = vlm_recipe(student, vlm_data, tmp_path / "same", family, train={"max_steps": 1})
    same.update(method="distill", distill={"teacher": str(student), "dtype": "float32"})
    [record] = _records(run(same).output_dir)
    assert record["kd_loss"] == pytest.approx(0.0, abs=1e-6)

    teacher = build_tiny_vlm(name, tmp_path / "teacher", seed=1)
    recipe = vlm_recipe(student, vlm_data, tmp_path / "run", family)
    recipe.update(method="distill", distill={"teacher": str(teacher), "dtype": "float32", "alpha": 1.0})
    kd = [r["kd_loss"] for r in _records(run(recipe).output_dir)]
    assert sum(kd[-2:]) / 2 < sum(kd[:2]) / 2 * 0.9, kd


@pytest.fixture(scope="module")
def two_process_recipe(tiny_model_dir, teacher_dir, tmp_path_factory) -> Path:
    recipe = tiny_recipe_for_processes(
        tiny_model_dir, tmp_path_factory.mktemp("unused"), grad_accum=2, max_steps=4,
        checkpoint={"every": 2, "keep_last": 2},
    )  # fmt: skip
    recipe.update(method="distill", distill={"teacher": str(teacher_dir), "dtype": "float32", "loss": "jsd"})
    recipe["train"]["loss_chunk_tokens"] = 7  # ranks with different token counts run different chunk counts
    path = tmp_path_factory.mktemp("distill_dist") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def one_process(two_process_recipe) -> Path:
    """Micro-batch 4 × accumulation 2 on one process: the same global batch of 8 as 2 processes × 2 × 2."""
    out = two_process_recipe.parent / "one"
    recipe = yaml.safe_load(two_process_recipe.read_text())
    recipe["train"].update(output_dir=str(out), micro_batch_size=4)
    run(recipe)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp2"])
def test_two_processes_train_like_one(name, two_process_recipe, one_process, tmp_path):
    """Under ZeRO-3 / FSDP2 the teacher is sharded like the student and every rank runs its forward (and
    gathers both heads) in step, whatever its token count; the losses and adapter are those of one process, and resume
    is exact."""
    two = tmp_path / "two"
    args = (f"train.output_dir={two}", f"launch.accelerate_config={cpu_config(name, tmp_path)}")
    proc = launch(two_process_recipe, *args, procs=2)
    assert {"ddp": "ddp", "zero3": "deepspeed", "fsdp2": "fsdp2"}[name] + " over 2 process(es)" in proc.stderr
    copies = "a whole copy per process" if name == "ddp" else "sharded like the student"
    assert f"float32, {copies})" in proc.stderr
    for key in ("loss", "kd_loss", "ce_loss"):
        got, want = [r[key] for r in _records(two)], [r[key] for r in _records(one_process)]
        assert got == pytest.approx(want, abs=1e-5), key
    final = adapter(two)
    assert max_diff(final, adapter(one_process)) < 2e-5
    if name != "zero3":
        return
    shutil.rmtree(two / "checkpoints/step-4")
    shutil.rmtree(two / "adapter")
    proc = launch(two_process_recipe, *args, procs=2)
    assert "at step 2" in proc.stderr
    assert max_diff(adapter(two), final) < 1e-6


@pytest.fixture(scope="module")
def four_bit_recipe(two_process_recipe, tmp_path_factory) -> Path:
    """The two-process recipe with a 4-bit teacher whose packed weights are stored in fp32 (so they can shard)."""
    # 4-bit on CPU packs 64-wide blocks
    teacher = build_tiny_llm(tmp_path_factory.mktemp("t4") / "t", seed=2, hidden_size=128)
    recipe = yaml.safe_load(two_process_recipe.read_text())
    quant = {"bits": 4, "compute_dtype": "float32", "storage_dtype": "float32"}
    recipe["distill"].update(teacher=str(teacher), quant=quant)
    recipe["train"]["max_steps"] = 2
    recipe["checkpoint"]["every"] = 0
    path = two_process_recipe.parent / "four_bit.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = path.parent / "four_bit_one"
    recipe["train"].update(output_dir=str(out), micro_batch_size=4)
    run(recipe)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "fsdp2"])
def test_a_4bit_teacher_shards_like_the_student(name, four_bit_recipe, tmp_path):
    two = tmp_path / "two"
    args = (f"train.output_dir={two}", f"launch.accelerate_config={cpu_config(name, tmp_path)}")
    proc = launch(four_bit_recipe, *args, procs=2)
    assert "4-bit, torch.float32, sharded like the student)" in proc.stderr
    one = four_bit_recipe.parent / "four_bit_one"
    for key in ("loss", "kd_loss", "ce_loss"):
        got, want = [r[key] for r in _records(two)], [r[key] for r in _records(one)]
        assert got == pytest.approx(want, abs=1e-5), key
    assert max_diff(adapter(two), adapter(one)) < 2e-5
