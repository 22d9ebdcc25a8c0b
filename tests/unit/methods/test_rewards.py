"""GRPO rewards: TRL's calling convention, None as NaN in a weighted nansum, the built-ins, the user's functions
from a file, the errors for bad functions, and the Qwen-VL box-coordinate corrections on a tiny processor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmtune.config.schema import RewardSpec
from vlmtune.errors import UserError
from vlmtune.families import get_family
from vlmtune.methods.rewards import (
    Reward,
    accuracy_reward,
    box_iou,
    format_reward,
    load_rewards,
    parse_box,
    score,
)

USER_REWARDS = '''
from __future__ import annotations

import dataclasses

def length_reward(prompts, completions, solution, **kwargs):
    """TRL-style: one float (or None) per completion; `solution` is a column."""
    return [None if s is None else float(len(c) == len(s)) for c, s in zip(completions, solution)]

def raising(prompts, completions, **kwargs):
    raise KeyError("no such field")

def too_short(prompts, completions, **kwargs):
    return [1.0]

def strings(prompts, completions, **kwargs):
    return ["high" for _ in completions]

def nothing(prompts, completions, **kwargs):
    return None

NOT_A_FUNCTION = 3


@dataclasses.dataclass
class Scorer:  # a dataclass needs its module registered, as an import would
    bonus: float

    def __call__(self, prompts, completions, **kwargs):
        return [self.bonus for _ in completions]


bonus = Scorer(0.5)
'''


def _load(specs: list[dict], base_dir: Path | None = None, family=None, processor=None) -> list[Reward]:
    return load_rewards(
        [RewardSpec(**spec) for spec in specs], base_dir=base_dir, family=family, processor=processor
    )


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipes" / "my_rewards.py"
    path.parent.mkdir()
    path.write_text(USER_REWARDS, encoding="utf-8")
    return path


def test_user_function_from_the_recipe_folder_gets_trl_arguments(user_file: Path, monkeypatch) -> None:
    monkeypatch.chdir(user_file.parent.parent)  # the path resolves relative to the recipe, not the cwd
    rewards = _load([{"function": "my_rewards.py:length_reward", "weight": 2.0}], base_dir=user_file.parent)
    assert [(r.name, r.weight) for r in rewards] == [("length_reward", 2.0)]
    total, per = score(rewards, ["p"] * 3, ["abc", "ab", "x"], {"solution": ["xyz", "xyz", None]})
    torch.testing.assert_close(per["length_reward"], torch.tensor([1.0, 0.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(total, torch.tensor([2.0, 0.0, 0.0]))


def test_a_callable_object_with_a_dataclass_module(user_file: Path) -> None:
    rewards = _load([{"function": "my_rewards.py:bonus"}], base_dir=user_file.parent)
    assert rewards[0].name == "bonus"  # an object without __name__ is named as the recipe names it
    assert score(rewards, ["p"], ["c"], {})[0].tolist() == [0.5]


def test_total_is_the_weighted_nansum() -> None:
    def first(prompts, completions, **kwargs):
        return [1.0, None, 0.5, None]

    def second(prompts, completions, **kwargs):
        return [0.0, 2, None, None]

    rewards = [Reward("first", 2.0, first), Reward("second", -0.5, second)]
    total, per = score(rewards, ["p"] * 4, ["a", "b", "c", "d"], {})
    torch.testing.assert_close(total, torch.tensor([2.0, -1.0, 1.0, 0.0]))
    assert per["first"].dtype == torch.float32 and torch.isnan(per["second"][2:]).all()


def test_rewards_see_their_own_arguments_and_infinity_stays() -> None:
    def greedy(prompts, completions, solution, **kwargs):
        solution.clear()  # edits its arguments: the next function must not notice
        return [math.inf, None]

    def counts(prompts, completions, solution, **kwargs):
        return [float(len(solution))] * len(completions)

    total, per = score(
        [Reward("greedy", 1.0, greedy), Reward("counts", 1.0, counts)],
        ["p", "q"],
        ["a", "b"],
        {"solution": ["1", "2"]},
    )
    assert per["counts"].tolist() == [2.0, 2.0]
    assert total.tolist() == [
        math.inf,
        2.0,
    ]  # an infinite reward is not made finite: the non-finite policy sees it


def test_bad_functions_name_the_reward_and_what_to_fix(user_file: Path) -> None:
    base = user_file.parent
    cases = {
        "missing.py:length_reward": "missing.py not found",
        "my_rewards.py:lenght_reward": "has no 'lenght_reward'; it defines: Scorer, bonus, length_reward, nothing",
        "my_rewards.py:NOT_A_FUNCTION": "NOT_A_FUNCTION is a int, not a function",
        "os.path:join": "not `path/to/file.py:func`",
        "my_rewards.py": "not `path/to/file.py:func`",
    }
    for function, message in cases.items():
        with pytest.raises(UserError, match="grpo\\.rewards") as err:
            _load([{"function": function}], base_dir=base)
        assert message in str(err.value), (function, str(err.value))
    (base / "broken.py").write_text("import no_such_module_here\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"importing .*broken\.py raised ModuleNotFoundError"):
        _load([{"function": "broken.py:f"}], base_dir=base)
    calls = {
        "raising": "reward 'raising' (my_rewards.py:raising) raised KeyError: 'no such field'",
        "too_short": "returned 1 values for 2 completions",
        "strings": "returned 'high' for completion 0: each value must be a number or None",
        "nothing": "returned a NoneType, not a list of 2 floats",
    }
    for name, message in calls.items():
        rewards = _load([{"function": f"my_rewards.py:{name}"}], base_dir=base)
        with pytest.raises(UserError) as err:
            score(rewards, ["p", "q"], ["a", "b"], {})
        assert message in str(err.value), (name, str(err.value))


def test_format_reward_default_and_configured_pattern() -> None:
    good = "<think>7 and 5 make 12</think>\n<answer>12</answer>\n"
    texts = [good, "<answer>12</answer>", "<think>a</think><answer>1</answer> extra", "12"]
    assert format_reward()([""] * 4, texts) == [1.0, 0.0, 0.0, 0.0]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    assert format_reward()([[]] * 4, messages) == [1.0, 0.0, 0.0, 0.0]
    rewards = _load([{"name": "format", "pattern": r"^\d+$"}, {"name": "format"}])
    assert [r.name for r in rewards] == ["format", "format_2"]
    _, per = score(rewards, [""] * 4, texts, {})
    assert per["format"].tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(UserError, match="not a valid regex"):
        _load([{"name": "format", "pattern": "(<think>"}])


def test_accuracy_numbers_as_numbers_else_normalised_text() -> None:
    cases = [
        ("<think>7 + 5</think><answer>12</answer>", "12", 1.0),
        ("<answer>12.0</answer>", "12", 1.0),
        ("<answer>7 + 5 = 12.</answer>", "12", 1.0),  # the answer's last number
        ("<answer>12</answer> and 13", "12", 1.0),  # inside <answer> only
        ("<answer>13</answer>", "12", 0.0),
        ("<answer>120</answer>", "12", 0.0),
        ("The total is 1,000", "1000", 1.0),
        ("<answer>0.5</answer>", "1/2", 1.0),
        ("<answer> Paris. </answer>", "paris", 1.0),
        ("<answer>Paris, France</answer>", "Paris", 0.0),
        ("<answer>Quenmarsh</answer>", ["Belvik", "quenmarsh"], 1.0),  # several accepted answers
        ("<answer>12</answer>", None, None),
    ]
    completions, solutions, expected = zip(*cases, strict=True)
    assert accuracy_reward([""] * len(cases), list(completions), solution=list(solutions)) == list(expected)
    with pytest.raises(UserError, match=r"needs a `solution` field .* the rows have: answer"):
        accuracy_reward(["p"], ["12"], answer=["12"])
    rewards = _load([{"name": "accuracy"}])
    with pytest.raises(UserError, match="reward 'accuracy' \\(built-in accuracy\\): needs a `solution`"):
        score(rewards, ["p"], ["12"], {})


def test_box_parsing_and_iou() -> None:
    assert parse_box('{"bbox_2d": [10, 20.5, 30, 40], "label": "red circle"}') == (10, 20.5, 30, 40)
    assert parse_box([1, 2, 3, 4]) == (1, 2, 3, 4) and parse_box("no box") is None
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # a degenerate prediction scores nothing
    rewards = _load([{"name": "iou"}])  # a text model: boxes as written
    completions = ["<answer>[0, 0, 10, 10]</answer>", "<answer>[5,0,15,10]</answer>", "none", "[0,0,1,1]"]
    columns = {"solution": [[0, 0, 10, 10], "[0, 0, 10, 10]", [0, 0, 10, 10], None], "image_sizes": [[]] * 4}
    _, per = score(rewards, [""] * 4, completions, columns)
    torch.testing.assert_close(per["iou"], torch.tensor([1.0, 50 / 150, 0.0, math.nan]), equal_nan=True)
    with pytest.raises(UserError, match="the solution 'left' holds no box"):
        score(rewards, [""], ["[0, 0, 1, 1]"], {"solution": ["left"]})


@pytest.fixture(scope="module")
def qwen_processors(tiny_vlm_root: Path) -> dict:
    from transformers import AutoProcessor

    from vlmtune.testing.tiny_vlm import build_tiny_vlm

    return {
        name: AutoProcessor.from_pretrained(build_tiny_vlm(name, tiny_vlm_root / name), local_files_only=True)
        for name in ("qwen2_5_vl", "qwen2_vl")
    }


def test_iou_converts_qwen2_5_vl_boxes_from_the_resized_image(qwen_processors: dict) -> None:
    """Qwen2.5-VL answers in the pixels of the image as its processor resized it (VLM-R1's correction)."""
    from vlmtune.data.vision_tokens import resized_size

    processor, family = qwen_processors["qwen2_5_vl"], get_family("qwen2_5_vl")
    assert family.box_coordinates == "resized"
    width, height = 300, 170
    # The resize is the processor's own: the patch grid of a real call, times the patch size.
    out = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
    patch = processor.image_processor.patch_size
    grid = out["image_grid_thw"][0]
    assert resized_size(processor, family, (height, width)) == (int(grid[1]) * patch, int(grid[2]) * patch)
    new_height, new_width = int(grid[1]) * patch, int(grid[2]) * patch
    assert (new_width / width, new_height / height) != (1.0, 1.0)

    truth = [60, 34, 180, 119]  # original pixels
    seen = [
        round(truth[0] * new_width / width),
        round(truth[1] * new_height / height),
        round(truth[2] * new_width / width),
        round(truth[3] * new_height / height),
    ]
    completion = f"<think>the box</think><answer>{seen}</answer>"
    columns = {"solution": [truth], "image_sizes": [[(width, height)]]}
    _, corrected = score(
        _load([{"name": "iou"}], family=family, processor=processor), [""], [completion], columns
    )
    _, as_written = score(_load([{"name": "iou"}]), [""], [completion], columns)
    assert corrected["iou"].item() > 0.95
    assert as_written["iou"].item() < 0.6  # without the correction the same answer looks wrong

    with pytest.raises(UserError, match="needs the qwen2_5_vl processor"):
        _load([{"name": "iou"}], family=family, processor=processor.tokenizer)
    with pytest.raises(UserError, match="needs the row's image"):
        score(
            _load([{"name": "iou"}], family=family, processor=processor),
            [""],
            [completion],
            {"solution": [truth], "image_sizes": [[]]},
        )


def test_iou_converts_relative_1000_boxes(qwen_processors: dict) -> None:
    family = get_family("qwen2_vl")
    assert family.box_coordinates == "relative_1000"
    rewards = _load([{"name": "iou"}], family=family, processor=qwen_processors["qwen2_vl"])
    columns = {"solution": [[100, 50, 300, 150]], "image_sizes": [[(400, 200)]]}
    _, per = score(rewards, [""], ["<answer>[250, 250, 750, 750]</answer>"], columns)
    assert per["iou"].item() == pytest.approx(1.0)


def test_validate_reports_a_missing_reward_file(user_file: Path, tmp_path: Path) -> None:
    from vlmtune.config.environment import environment_problems
    from vlmtune.config.load import load_recipe

    recipe_file = user_file.parent / "grpo.yaml"
    recipe_file.write_text(
        "method: grpo\n"
        "grpo:\n"
        "  rewards:\n"
        "    - {function: my_rewards.py:length_reward}\n"
        "    - {function: gone.py:f}\n"
        "    - {function: my_rewards:f}\n"
        f"model: {{path: {tmp_path / 'no-model'}}}\n"
        "data: {train: [{path: data.jsonl, format: prompt}]}\n"
        f"train: {{output_dir: {tmp_path / 'run'}}}\n",
        encoding="utf-8",
    )
    problems = [p for p in environment_problems(load_recipe(recipe_file)) if p.startswith("grpo.rewards")]
    assert problems == [
        f"grpo.rewards.1.function: file not found: gone.py (looked in {Path.cwd()} and the recipe's folder)",
        "grpo.rewards.2.function: 'my_rewards:f' is not path/to/file.py:func",
    ]


def test_iou_on_the_referring_box_set_through_the_data_pipeline(
    qwen_processors: dict, tmp_path: Path
) -> None:
    """The generated box set read by the data pipeline (`image_sizes` as the files are), answered as Qwen2.5-VL
    would: in the pixels of the patch grid the model is actually given (`image_grid_thw` of each example)."""
    from vlmtune.config.schema import DataConfig, DataSource
    from vlmtune.data import build_dataset
    from vlmtune.testing.rl_data import write_box_set

    processor, family = qwen_processors["qwen2_5_vl"], get_family("qwen2_5_vl")
    source = DataSource(path=str(write_box_set(tmp_path / "boxes", 3, seed=1)), format="prompt")
    dataset = build_dataset(
        [source], DataConfig(train=[source], cache=False), processor, family=family, seed=0
    )
    rewards = _load([{"name": "iou"}, {"name": "format"}], family=family, processor=processor)
    patch = processor.image_processor.patch_size
    for i in range(3):
        example = dataset[i]
        columns = {key: [value] for key, value in example["columns"].items()}
        (width, height), truth = example["columns"]["image_sizes"][0], example["columns"]["solution"]
        _, grid_h, grid_w = example["image_grid_thw"][0].tolist()
        sx, sy = grid_w * patch / width, grid_h * patch / height
        seen = [round(v, 2) for v in (truth[0] * sx, truth[1] * sy, truth[2] * sx, truth[3] * sy)]
        completion = [{"role": "assistant", "content": f"<think>found it</think>\n<answer>{seen}</answer>"}]
        total, per = score(rewards, [example["prompt"]], [completion], columns)
        assert per["iou"].item() > 0.99 and per["format"].item() == 1.0 and total.item() > 1.99


def test_accuracy_asks_math_verify_first_when_installed(monkeypatch) -> None:
    """A stand-in for math_verify: it parses LaTeX fractions only and says \\frac{1}{2} equals "one half"; a
    solution it cannot parse falls back to the plain comparison."""
    import sys
    import types

    fake = types.ModuleType("math_verify")
    fake.parse = lambda text: [text] if text.startswith("\\frac") or text == "one half" else []
    fake.verify = lambda gold, answer: gold == ["\\frac{1}{2}"] and answer == ["one half"]
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    completions = ["<answer>one half</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>12</answer>"]
    solutions = ["\\frac{1}{2}", "\\frac{1}{3}", "12"]
    assert accuracy_reward([""] * 3, completions, solution=solutions) == [1.0, 0.0, 1.0]
