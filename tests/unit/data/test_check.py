"""`vlmtune data-check`: every problem counted and written out, lengths summarised, the recipe's verdict."""

import json

import yaml

from vlmtune.cli import main

GOOD = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
LONG = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
NO_REPLY = {"messages": [{"role": "user", "content": "anyone?"}]}


def _setup(tmp_path, tiny_recipe, **data):
    rows = [json.dumps(GOOD)] * 6 + ["{not json", json.dumps(NO_REPLY), json.dumps(LONG)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    recipe = tiny_recipe(data={"train": [{"path": str(tmp_path / "d.jsonl")}], "max_length": 64, **data})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "run" / "data-check" / "bad_rows.jsonl"


def test_all_problems_are_counted_written_and_the_verdict_follows_the_policy(tmp_path, tiny_recipe, capsys):
    recipe, bad_rows = _setup(tmp_path, tiny_recipe)  # on_bad_row: raise (the default)
    assert main(["data-check", str(recipe)]) == 2
    out, err = capsys.readouterr()
    assert "train: 9 rows read → 6 examples" in out
    assert "unparsable: 1" in out and "no_assistant_turn: 1" in out and "overlength: 1" in out
    assert "> max_length" in out  # the long row shows in the histogram past max_length
    assert "2 bad row(s) and data.on_bad_row is raise" in err and "line 7" in err
    problems = [json.loads(line) for line in bad_rows.read_text().splitlines()]
    assert sorted(p["kind"] for p in problems) == ["no_assistant_turn", "overlength", "unparsable"]
    assert all(p["split"] == "train" and "d.jsonl row" in p["where"] for p in problems)

    # Skipping bad rows within budget: training would accept it.
    recipe, _ = _setup(tmp_path, tiny_recipe, on_bad_row="skip", max_bad_fraction=0.3)
    assert main(["data-check", str(recipe)]) == 0
    assert "ok: training would accept this data" in capsys.readouterr().out
    # Over budget, or over-length rows under `raise`: refused, as training would.
    recipe, _ = _setup(tmp_path, tiny_recipe, on_bad_row="skip", max_bad_fraction=0.1)
    assert main(["data-check", str(recipe)]) == 2
    assert "more than data.max_bad_fraction=0.1" in capsys.readouterr().err
    recipe, _ = _setup(tmp_path, tiny_recipe, on_bad_row="skip", on_overlength="raise")
    assert main(["data-check", str(recipe)]) == 2
    assert "longer than data.max_length=64 and data.on_overlength is raise" in capsys.readouterr().err


def test_show_marks_exactly_the_assistant_reply(tmp_path, tiny_recipe, capsys):
    recipe, _ = _setup(tmp_path, tiny_recipe, on_bad_row="skip")
    main(["data-check", str(recipe), "--show", "1"])
    out = capsys.readouterr().out
    assert "⟦Hello!<|im_end|>⟧" in out
    assert out.count("⟦") == 1  # the prompt is not trained


def test_image_text_data_is_checked_with_images_expanded(tmp_path, tiny_recipe, capsys):
    import shutil

    from tests.conftest import REPO
    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    data = tmp_path / "vlm"
    shutil.copytree(REPO / "data/demo/vlm", data)
    rows = json.loads((data / "train.json").read_text())
    rows[1]["image"] = "images/missing.png"  # a missing image
    rows[2]["conversations"][0]["value"] += " <image>"  # two placeholders, one image
    (data / "train.json").write_text(json.dumps(rows))
    truncated = data / rows[3]["image"]  # its header reads, its pixels do not: only decoding finds it
    truncated.write_bytes(truncated.read_bytes()[:100])
    model = build_tiny_vlm("llava", tmp_path / "llava")
    recipe = tiny_recipe(
        model={"path": str(model), "dtype": "float32"},
        data={"train": [{"path": str(data / "train.json"), "format": "llava"}], "max_length": 256},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["data-check", str(path), "--show", "1"]) == 2
    out, err = capsys.readouterr()
    assert "bad_image: 2" in out and "image_count_mismatch: 1" in out
    assert "decoding images" in err  # every image decoded, with a progress bar
    assert "[16 image tokens]" in out and "⟦A red square.<|im_end|>⟧" in out  # LLaVA: 16 tokens per image
    assert "3 bad row(s) and data.on_bad_row is raise" in err and "missing.png" in err


def test_show_renders_both_sides_of_a_pair_and_a_prompts_columns(tmp_path, tiny_recipe, capsys):
    rows = {
        "preference": {"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go away."},
        "prompt": {"prompt": "Hi there", "solution": "Hello!"},
    }
    for method, fmt in (("dpo", "preference"), ("grpo", "prompt")):
        (tmp_path / f"{fmt}.jsonl").write_text(json.dumps(rows[fmt]) + "\n")
        recipe = tiny_recipe(data={"train": [{"path": str(tmp_path / f"{fmt}.jsonl"), "format": fmt}]})
        recipe["method"] = method
        if method == "grpo":
            recipe["grpo"] = {"rewards": [{"name": "format"}]}
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["data-check", str(path), "--show", "1"]) == 0
        out = capsys.readouterr().out
        if method == "dpo":
            assert "[chosen] " in out and "⟦Hello!" in out
            assert "[rejected] " in out and "⟦Go away." in out
        else:
            assert "⟦" not in out and '[columns] {"solution": "Hello!", "image_sizes": []}' in out
