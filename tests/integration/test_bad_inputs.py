"""A catalogue of bad data, models and environments (the recipe catalogue is in test_entry_points.py).

Each case runs the real entry points in-process (`vlmtune.train.main`, and `vlmtune data-check` for data) over an
output folder that already holds an earlier run, and must: exit non-zero, print one message saying what is wrong,
where, and how to fix it, print no traceback, and leave the earlier run's files exactly as they were.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vlmtune.cli import main as cli_main
from vlmtune.train import main as train_main

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def _rows(tmp: Path, *rows, name="train.jsonl", raw: str = "") -> str:
    path = tmp / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in [GOOD] * 3 + list(rows)) + raw
    )
    return str(path)


def _data(*rows, raw: str = "", fmt: str = "messages", **data):
    def change(r, tmp):
        r["data"].update(train=[{"path": _rows(tmp, *rows, raw=raw), "format": fmt}], **data)

    return change


def _file(name: str, text: str, fmt: str = "messages"):
    def change(r, tmp):
        (tmp / name).write_text(text)
        r["data"]["train"] = [{"path": str(tmp / name), "format": fmt}]

    return change


def _msgs(*pairs):
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


def _vlm_data(edit):
    """The demo image-text set (LLaVA JSON) on a tiny LLaVA, with `edit(rows, folder)` applied."""

    def change(r, tmp):
        from vlmtune.testing.tiny_vlm import build_tiny_vlm

        data = tmp / "vlm"
        shutil.copytree(REPO / "data/demo/vlm", data)
        rows = json.loads((data / "train.json").read_text())
        edit(rows, data)
        (data / "train.json").write_text(json.dumps(rows))
        model = build_tiny_vlm("llava", Path(tempfile.gettempdir()) / "vlmtune-tests" / "tiny-llava")
        r["model"]["path"] = str(model)
        r["data"]["train"] = [{"path": str(data / "train.json"), "format": "llava"}]

    return change


def _huge_png(path: Path) -> None:
    from PIL import Image

    Image.new("1", (8000, 8000)).save(path)  # 64 M pixels, a few kB on disk


def _model_dir(r, tmp, edit) -> None:
    copy = tmp / "model"
    shutil.copytree(r["model"]["path"], copy)
    edit(copy)
    r["model"]["path"] = str(copy)


def _no_chat_template(d: Path) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()


def _bert(r, tmp) -> None:
    from transformers import BertConfig, BertModel

    d = tmp / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(d)
    for f in Path(r["model"]["path"]).glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d)
    r["model"]["path"] = str(d)


def _accel(cfg: dict):
    def change(r, tmp):
        path = tmp / "accel.yaml"
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
        r["launch"]["accelerate_config"] = str(path)

    return change


def _fake_checkpoint(strategy: str):
    def change(r, tmp):
        ckpt = tmp / "ckpt" / "step-3"
        ckpt.mkdir(parents=True)
        (ckpt / "COMPLETE").write_text(json.dumps({"step": 3, "world_size": 2, "strategy": strategy}))
        r["checkpoint"]["resume"] = str(ckpt)

    return change


# name → (change(recipe, tmp), expected message, data-check's: True for the same, None to not run it)
CASES = {
    # --- data ---
    "unparsable JSONL line": (_data(raw="{not json\n"), "row 3 (line 4)", True),
    "wrong format": (_data(fmt="alpaca"), "the row has no 'instruction'", "missing_key: 3"),
    "empty conversation": (_data({"messages": []}), "the conversation is empty", True),
    "no assistant turn": (_data(_msgs(("user", "hi"))), "no assistant message", True),
    "roles out of order": (
        _data(_msgs(("assistant", "hi"), ("user", "yo"), ("assistant", "x"))),
        "role 'assistant' at the start",
        True,
    ),
    "ends with the user": (
        _data(_msgs(("user", "a"), ("assistant", "b"), ("user", "c"))),
        "has role 'user'",
        True,
    ),
    "unknown role": (_data(_msgs(("robot", "beep"), ("assistant", "x"))), "unknown role 'robot'", True),
    "empty reply": (_data(_msgs(("user", "hi"), ("assistant", "  "))), "has empty content", True),
    "row is not an object": (_data([1, 2]), "expected a JSON object", True),
    "messages is a string": (_data({"messages": "hi"}), "'messages' is a string", True),
    "over-length under raise": (
        _data(_msgs(("user", "word " * 300), ("assistant", "ok")), on_overlength="raise"),
        "data.on_overlength",
        True,
    ),
    "too many bad rows skipped": (
        _data({"messages": []}, {"messages": []}, on_bad_row="skip", max_bad_fraction=0.2),
        "more than data.max_bad_fraction",
        True,
    ),
    "empty data file": (_file("e.jsonl", ""), "e.jsonl", True),
    "unsupported file type": (_file("d.csv", "a,b\n"), "d.csv", True),
    "bad row in the eval source": (
        lambda r, tmp: r["data"].update(eval=[{"path": _rows(tmp, {"messages": []}, name="eval.jsonl")}]),
        "eval.jsonl row 3",
        True,
    ),
    "sharegpt with an unknown speaker": (
        _file(
            "s.jsonl",
            json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
            + "\n"
            + json.dumps({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}),
            fmt="sharegpt",
        ),
        "robot",
        True,
    ),
    # --- images (a vision-language model) ---
    "missing image": (
        _vlm_data(lambda rows, d: rows[1].update(image="images/missing.png")),
        "missing.png",
        True,
    ),
    "corrupt image": (
        _vlm_data(
            lambda rows, d: (d / "images/red_circle.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        ),
        "red_circle.png",
        True,
    ),
    "huge image (decompression bomb)": (
        _vlm_data(lambda rows, d: _huge_png(d / "images/red_circle.png")),
        "too many pixels: 8000x8000",
        True,
    ),
    "placeholders and images disagree": (
        _vlm_data(lambda rows, d: rows[2]["conversations"][0].update(value="<image> <image> What is it?")),
        "2 <image> placeholder",
        True,
    ),
    # --- model ---
    "not a causal LM": (_bert, "model.path", None),
    "tokenizer without a chat template": (
        lambda r, tmp: _model_dir(r, tmp, _no_chat_template),
        "chat template",
        None,
    ),
    "corrupt weights": (
        lambda r, tmp: _model_dir(r, tmp, lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64)),
        "model.path: cannot load",
        None,
    ),
    "config.json not JSON": (
        lambda r, tmp: _model_dir(r, tmp, lambda d: (d / "config.json").write_text("{oops")),
        "model.path",
        None,
    ),
    "missing chat template file": (
        lambda r, tmp: r["model"].update(chat_template="templates/nope.jinja"),
        "model.chat_template: file not found",
        None,
    ),
    # --- environment ---
    "accelerate config not YAML": (
        _accel("distributed_type: [DEEPSPEED\n"),
        "launch.accelerate_config",
        None,
    ),
    "unknown distributed_type": (_accel({"distributed_type": "TPU_POD"}), "distributed_type", None),
    "single process for a multi-process config": (
        _accel({"distributed_type": "MULTI_GPU", "num_processes": 8}),
        "expects 8 processes",
        None,
    ),
    "resume from another sharding": (_fake_checkpoint("deepspeed"), "was saved under deepspeed", None),
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _earlier_run(out: Path) -> None:
    (out / "checkpoints/step-2/adapter").mkdir(parents=True)
    (out / "checkpoints/step-2/COMPLETE").write_text('{"step": 2}')
    (out / "checkpoints/step-2/adapter/adapter_model.safetensors").write_bytes(b"weights")
    (out / "adapter").mkdir()
    (out / "adapter/adapter_model.safetensors").write_bytes(b"final weights")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (out / "recipe.yaml").write_text("# the earlier run's recipe\n")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_exits_with_one_clear_message_and_damages_nothing(
    case, tiny_recipe, tmp_path, capsys, monkeypatch
):
    change, expected, data_check = CASES[case]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = tiny_recipe(train={"max_steps": 2})
    change(recipe, tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = Path(recipe["train"]["output_dir"])
    _earlier_run(out)
    before = _snapshot(out)

    runs = [(lambda: train_main([str(path)]), expected)]
    if data_check is not None:
        check = ["data-check", str(path), "--bad-rows", str(tmp_path / "bad_rows.jsonl")]
        runs.append((lambda: cli_main(check), expected if data_check is True else data_check))
    for run, message in runs:
        code = run()
        err = capsys.readouterr().err
        assert code == 2, (case, err[-3000:])
        assert message in err, err[-3000:]
        assert "Traceback" not in err
        assert _snapshot(out) == before  # the earlier run is untouched


def test_resume_with_another_lora_shape_names_the_mismatch(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(train={"max_steps": 2}, checkpoint={"every": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train_main([str(path)]) == 0
    before = _snapshot(Path(recipe["train"]["output_dir"]))
    capsys.readouterr()
    assert train_main([str(path), "lora.r=8", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert (
        "does not fit this recipe's adapter" in err
        and "checkpoint.resume=never" in err
        and "Traceback" not in err
    )
    assert _snapshot(Path(recipe["train"]["output_dir"])) == before
