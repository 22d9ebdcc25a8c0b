"""method: distill: the chunked KD + CE loss equals a hand computation from full logits (loss, metrics and
gradients), never holds more than a chunk of logits, and refuses a teacher with another vocabulary."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tests.unit.engine.test_loss import _randomise_adapters, _text_batch
from vlmtune.config.schema import DistillConfig, LoraConfig
from vlmtune.engine.loop import forward
from vlmtune.errors import UserError
from vlmtune.methods.distill import Distill, kd_sum
from vlmtune.methods.teacher import check_vocabulary, prepare_teacher
from vlmtune.model.lora import apply_lora
from vlmtune.testing import build_tiny_llm
from vlmtune.testing.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = SimpleNamespace(
    autocast=nullcontext, device=torch.device("cpu"), distributed_type="NO", num_processes=1
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another tiny Llama with the same tokenizer: other weights, another width."""
    return build_tiny_llm(tmp_path_factory.mktemp("teacher") / "t", seed=1, hidden_size=96)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    return prepare_teacher(CPU, model)


def _student(model_dir, trained_head: bool):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"] if trained_head else [])
    model = apply_lora(model, cfg, quantized=False, gradient_checkpointing=False)
    _randomise_adapters(model)
    return model.train()


@pytest.fixture(scope="module", params=["frozen head", "trained head"])
def student(request, tiny_model_dir):
    return _student(tiny_model_dir, request.param == "trained head")


def _hand(student, teacher, batch, cfg: DistillConfig):
    """loss, kd, ce straight from both models' full logits, with torch.nn.functional only."""
    T = cfg.temperature
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    s = forward(student, batch)[:, :-1][mask]
    with torch.no_grad():
        t = forward(teacher, batch)[:, :-1][mask]
    log_s, log_t = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if cfg.loss == "forward_kl":
        kd = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    elif cfg.loss == "reverse_kl":
        kd = F.kl_div(log_t, log_s, reduction="sum", log_target=True)
    else:
        mean = ((log_s.exp() + log_t.exp()) / 2).log()
        kd = 0.5 * F.kl_div(mean, log_t, reduction="sum", log_target=True)
        kd = kd + 0.5 * F.kl_div(mean, log_s, reduction="sum", log_target=True)
    kd = kd * T * T
    ce = F.cross_entropy(s, labels[mask], reduction="sum")
    return cfg.alpha * kd + (1 - cfg.alpha) * ce, kd, ce


def _run(model, fn):
    model.zero_grad(set_to_none=True)
    loss, *rest = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return [loss.detach(), *(float(x.detach()) for x in rest)], grads


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [5, 4096])  # many chunks (one cut mid-row), and one for all
def test_loss_metrics_and_gradients_equal_a_hand_computation(student, teacher, kind, temperature, chunk):
    cfg = DistillConfig(teacher="t", temperature=temperature, alpha=0.7, loss=kind)
    batch = _text_batch(student.config.vocab_size)
    method = Distill(CPU, student, teacher, cfg, chunk=chunk, vocab=student.config.vocab_size)
    ours, ours_g = _run(student, lambda: (lambda loss, m: (loss, *m))(*method.loss_sum(batch)))
    hand, hand_g = _run(student, lambda: _hand(student, teacher, batch, cfg))
    assert hand[1] > 1.0 and hand[2] > 1.0  # the two models really differ
    torch.testing.assert_close(ours[0], hand[0], rtol=1e-5, atol=1e-5)
    assert ours[1:] == pytest.approx(hand[1:], rel=1e-5)
    assert hand_g.keys() == ours_g.keys() and all(g.abs().max() > 0 for g in hand_g.values())
    for name, g in hand_g.items():
        torch.testing.assert_close(ours_g[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_sum_of_identical_distributions_is_zero_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=g)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(kd_sum(z, z, kind, 3.0)) == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(6, 11, generator=g)
    at_2 = float(
        F.kl_div(F.log_softmax(z / 2, -1), F.log_softmax(other / 2, -1), reduction="sum", log_target=True)
    )
    assert float(kd_sum(z, other, "forward_kl", 2.0)) == pytest.approx(4 * at_2, rel=1e-5)


def test_alpha_one_learns_from_the_teacher_alone(tiny_model_dir, teacher):
    """alpha 1: the labels do not matter (only which positions are trained); ce is still reported."""
    student = _student(tiny_model_dir, trained_head=False)
    cfg = DistillConfig(teacher="t", alpha=1.0)
    method = Distill(CPU, student, teacher, cfg, chunk=7, vocab=student.config.vocab_size)
    batch = _text_batch(student.config.vocab_size)
    other = {**batch, "labels": torch.where(batch["labels"] >= 0, (batch["labels"] + 1) % 100, -100)}
    (a, sums_a), (b, sums_b) = method.loss_sum(batch), method.loss_sum(other)
    torch.testing.assert_close(a, b)
    assert float(a.detach()) == pytest.approx(float(sums_a[0]), rel=1e-6) and float(sums_a[1]) != float(
        sums_b[1]
    )
    summary = method.summarise(1.0, {"kd_loss": 30.0, "ce_loss": 60.0}, 10.0, eval=False)
    assert summary == {"kd_loss": 3.0, "ce_loss": 6.0}
    assert method.weight(batch) == int((batch["labels"][:, 1:] != -100).sum())


def test_eval_without_grad_equals_training_value(student, teacher):
    cfg = DistillConfig(teacher="t", loss="jsd", temperature=2.0)
    method = Distill(CPU, student, teacher, cfg, chunk=6, vocab=student.config.vocab_size)
    batch = _text_batch(student.config.vocab_size)
    loss, sums = method.loss_sum(batch)
    with torch.no_grad():
        loss_ng, sums_ng = method.loss_sum(batch)
    torch.testing.assert_close(loss_ng, loss.detach())
    torch.testing.assert_close(sums_ng, sums)


class _LogitRows(TorchDispatchMode):
    """The most rows of any (..., vocab) tensor made in forward or backward, the heads' weights (seen as
    (hidden, vocab) in a matmul) left out."""

    def __init__(self, vocab: int, hiddens: tuple[int, ...]) -> None:
        super().__init__()
        self.vocab, self.hiddens, self.largest = vocab, hiddens, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            logits = isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
            if logits and not (t.dim() == 2 and t.shape[0] in self.hiddens):
                self.largest = max(self.largest, t.numel() // self.vocab)
        return out


def test_never_holds_more_than_a_chunk_of_logits(tiny_model_dir, teacher):
    student = _student(tiny_model_dir, trained_head=False)
    vocab = student.config.vocab_size
    method = Distill(CPU, student, teacher, DistillConfig(teacher="t"), chunk=4, vocab=vocab)
    batch = _text_batch(vocab)
    method.loss_sum(batch)  # the one-time head checks run outside the measurement
    hiddens = (student.config.hidden_size, teacher.config.hidden_size)
    with _LogitRows(vocab, hiddens) as rows:
        method.loss_sum(batch)[0].backward()
    assert rows.largest == 4  # one chunk; each model computes one position per row (3 rows)
    with _LogitRows(vocab, hiddens) as full:
        forward(student, batch).sum().backward()
    assert full.largest >= 3 * 24  # the meter does see full logits
    student.zero_grad(set_to_none=True)


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_vocabulary(ours, str(tiny_model_dir))  # the same tokenizer passes
    other = build_tiny_tokenizer([f"zebra quokka {i} narwhal axolotl" for i in range(200)])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(
        UserError, match=r"does not share the student's tokenizer vocabulary .* differ; e\.g\."
    ):
        check_vocabulary(ours, str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"distill.teacher: cannot load a tokenizer from .*empty"):
        check_vocabulary(ours, str(tmp_path / "empty"))


def test_the_teacher_is_frozen_and_in_eval_mode(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).train()
    teacher = prepare_teacher(CPU, model)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_plan_counts_the_teachers_weights_sharded_like_the_students(tmp_path):
    """A teacher of the student's own shape (a small Qwen2, config only, on the meta device): its weights as the
    student's frozen base, a quarter per GPU under ZeRO-3 on 4 GPUs (plus two gathered layers), and a forward
    without gradients plus one KD chunk."""
    from tests.unit.plan.test_fit import QWEN2_5_7B, REPO
    from vlmtune.config.load import load_recipe
    from vlmtune.model.meta import build_meta_model
    from vlmtune.plan import plan_recipe
    from vlmtune.plan.memory import GIB, Sharding
    from vlmtune.plan.teacher import teacher_items

    small = {**QWEN2_5_7B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4}
    small.update(num_attention_heads=8, num_key_value_heads=2, vocab_size=32000)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen/config.json").write_text(__import__("json").dumps(small))
    common = [f"model.path={tmp_path / 'qwen'}", "method=distill", f"distill.teacher={tmp_path / 'qwen'}"]
    recipe = load_recipe(REPO / "recipes/7b_lora.yaml", common)
    meta = build_meta_model(recipe)
    # The student's own head runs a chunk at a time in distillation, as with train.loss: chunked.
    sft = plan_recipe(
        load_recipe(REPO / "recipes/7b_lora.yaml", [common[0], "train.loss=chunked"]), meta=meta
    )
    plan = plan_recipe(recipe, meta=meta)
    items = {i.name: i.gpu for i in plan.items}
    assert items["teacher weights"] == items["weights (frozen base)"] > 0  # bf16 both
    # 4 rows × 4,096 tokens: one layer's forward (residual in and out, three intermediates), the kept hidden
    # states, and one KD chunk (1,024 trained tokens × 32,000) in 8 fp32 tensors.
    tokens = 4 * 4096
    expected = tokens * (2 * 512 + 3 * 1536) * 2 + tokens * 512 * 2 + 8 * 1024 * 32000 * 4
    assert items["teacher forward + KD"] == expected
    assert plan.total_gpu == sft.total_gpu + items["teacher weights"] + items["teacher forward + KD"]
    assert not any("train.loss=chunked" in note for note in plan.notes)
    [weights, _] = teacher_items(recipe, Sharding("deepspeed", 4, zero_stage=3))
    assert items["teacher weights"] // 4 < weights.gpu < items["teacher weights"] // 4 + GIB // 4
    nowhere = load_recipe(REPO / "recipes/7b_lora.yaml", [*common, "distill.teacher=/nowhere"])
    [line] = teacher_items(nowhere, Sharding())  # an unreadable teacher config is a note, not a failed plan
    assert line.gpu == 0 and "not counted" in line.note
