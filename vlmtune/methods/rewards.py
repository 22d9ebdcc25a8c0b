"""GRPO's rewards: the built-ins (`format`, `accuracy`, `iou`) and the user's functions, scored together.

A reward function follows TRL's convention, so one written for TRL works here unchanged:

    func(prompts, completions, **columns) -> list[float | None]

called with keyword arguments. `prompts` are the rows' prompts as written (a string, or a list of messages),
`completions` the generated texts (a string for a string prompt, else `[{"role": "assistant", "content": text}]`),
and `columns` every other field of the rows (`solution`, `image_sizes`: the (width, height) of each of the row's
images as the original files are, ...), each a list with one entry per completion. `None` means "does not
apply" (NaN); the total is the weighted sum over the rewards that apply (NaN counts as 0, as in TRL).

A user's function comes only from the file the recipe names (`path/to/file.py:func`, relative to the recipe),
never from an import path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlmtune.config.paths import resolve_path
from vlmtune.data.vision_tokens import resized_size
from vlmtune.errors import UserError, first_line

if TYPE_CHECKING:
    from vlmtune.config.schema import RewardSpec
    from vlmtune.families import Family

RewardFn = Callable[..., Sequence[float | None]]

FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBERS = re.compile(rf"{_NUMBER}(?:\s*/\s*\d+(?!\.\d))?")
_BOX = re.compile(rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


@dataclass(frozen=True)
class Reward:
    """One reward of the recipe.

    Attributes:
        name: Its key in the metrics (`reward/<name>`): the built-in's name or the user function's, made unique.
        weight: Its weight in the total.
        fn: The function, TRL's convention.
        source: Where it came from, for messages: `built-in format`, `rewards.py:my_reward`.
    """

    name: str
    weight: float
    fn: RewardFn
    source: str = ""


def load_rewards(
    specs: Sequence[RewardSpec], *, base_dir: Path | None, family: Family | None, processor: Any
) -> list[Reward]:
    """The recipe's `grpo.rewards`, ready to score.

    Args:
        specs: The recipe's reward entries.
        base_dir: The recipe's folder (a user function's file is looked for there when not found as given).
        family: The model's family (None for a text model): where its boxes are, for `iou`.
        processor: The model's processor (or tokenizer): its resize, for `iou` in the `resized` families.

    Raises:
        UserError: a user function's file or function is missing, the file fails to import, the name is not
            callable, or a `format` pattern is not a valid regex.
    """
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.function is not None:
            fn, source = _user_function(spec.function, base_dir), spec.function
            name = getattr(fn, "__name__", None) or spec.function.rpartition(":")[2]
        elif spec.name == "format":
            fn, name, source = format_reward(spec.pattern or FORMAT_PATTERN), "format", "built-in format"
        elif spec.name == "accuracy":
            fn, name, source = accuracy_reward, "accuracy", "built-in accuracy"
        else:
            fn, name, source = iou_reward(family, processor), "iou", "built-in iou"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # two entries with one name (two patterns, say) keep apart in the metrics
            name = f"{name}_{seen[name]}"
        rewards.append(Reward(name=name, weight=float(spec.weight), fn=fn, source=source))
    return rewards


def score(
    rewards: Sequence[Reward],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, Sequence[Any]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every reward of every completion, and their weighted total.

    Args:
        rewards: From `load_rewards`.
        prompts: One per completion (each prompt repeated for its group).
        completions: The completions, TRL's form (see the module docstring).
        columns: The rows' other fields, name -> one value per completion.

    Returns:
        The total, float32 [n] (the weighted nansum: a reward that returned None adds nothing), and each
        reward's values by name, float32 [n] with NaN where it returned None.

    Raises:
        UserError: a reward function raised, or did not return one number (or None) per completion.
    """
    n = len(completions)
    if len(prompts) != n or any(len(values) != n for values in columns.values()):
        lengths = {key: len(values) for key, values in columns.items()}
        raise ValueError(f"{n} completions for {len(prompts)} prompts and columns of lengths {lengths}")
    per_reward: dict[str, torch.Tensor] = {}
    for reward in rewards:
        try:
            # Fresh lists for each function: one that edits its arguments cannot change what the next one sees.
            fresh = {key: list(column) for key, column in columns.items()}
            values = reward.fn(prompts=list(prompts), completions=list(completions), **fresh)
        except UserError as exc:
            raise UserError(f"reward {reward.name!r} ({reward.source}): {exc}") from exc
        except Exception as exc:  # the user's code: say whose, keep the cause for --debug
            raise UserError(
                f"reward {reward.name!r} ({reward.source}) raised {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        per_reward[reward.name] = _as_tensor(reward, values, n)
    if not rewards:
        return torch.zeros(n, dtype=torch.float32), per_reward
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float32)
    # As TRL: NaN (None) adds nothing; an infinite reward stays infinite for the non-finite policy to see.
    total = torch.nansum(torch.stack(list(per_reward.values())) * weights[:, None], dim=0)
    return total, per_reward


def _as_tensor(reward: Reward, values: Any, n: int) -> torch.Tensor:
    """One reward's values as float32 [n], None -> NaN; a clear error for anything else."""
    where = f"reward {reward.name!r} ({reward.source})"
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise UserError(f"{where} returned a {type(values).__name__}, not a list of {n} floats (or None)")
    if len(values) != n:
        raise UserError(
            f"{where} returned {len(values)} values for {n} completions: return one per completion"
        )
    out = torch.empty(n, dtype=torch.float32)
    for i, value in enumerate(values):
        if value is None:
            out[i] = math.nan
            continue
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            out[i] = float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{where} returned {value!r} for completion {i}: each value must be a number or None"
            ) from None
    return out


def _user_function(reference: str, base_dir: Path | None) -> RewardFn:
    """`path/to/file.py:func`, loaded from that file (and only from a file)."""
    path_text, sep, attr = reference.rpartition(":")
    if not sep or not path_text or not attr or not path_text.endswith(".py"):
        raise UserError(
            f"grpo.rewards: function {reference!r} is not `path/to/file.py:func`; user rewards are loaded "
            "from a Python file the recipe names (relative to the recipe), not from an import path"
        )
    path = resolve_path(path_text, base_dir)
    if not path.is_file():
        looked = f" (also looked in {base_dir})" if base_dir is not None else ""
        raise UserError(f"grpo.rewards: reward file {path_text} not found{looked}")
    # One module per file, named after its resolved path: two files called rewards.py do not collide.
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"vlmtune_user_rewards_{digest}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"grpo.rewards: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, as an import would be: dataclasses and pickling look their module up there.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[spec.name]
        raise UserError(
            f"grpo.rewards: importing {path} raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        hint = f"; it defines: {', '.join(found)}" if found else ""
        raise UserError(f"grpo.rewards: {path} has no {attr!r}{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"grpo.rewards: {path}:{attr} is a {type(fn).__name__}, not a function")
    return fn


# --- built-ins -----------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion in TRL's form: the string, or the last message's content (text parts joined)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def answer_text(text: str) -> str:
    """The content of the last `<answer>…</answer>` in `text`, else all of it."""
    answers = _ANSWER.findall(text)
    return (answers[-1] if answers else text).strip()


def format_reward(pattern: str = FORMAT_PATTERN) -> RewardFn:
    """1.0 for a completion (stripped of surrounding whitespace) that `pattern` matches from its start
    (`re.match`, DOTALL), else 0.0.

    Raises:
        UserError: `pattern` is not a valid regular expression.
    """
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"grpo.rewards: the format pattern {pattern!r} is not a valid regex: {exc}") from None

    def format(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        return [float(compiled.match(completion_text(c).strip()) is not None) for c in completions]

    return format


def accuracy_reward(
    prompts: Sequence[Any], completions: Sequence[Any], solution: Sequence[Any] | None = None, **columns: Any
) -> list[float | None]:
    """1.0 when the answer (inside `<answer>` if there is one) equals the row's `solution`, else 0.0.

    A numeric solution is compared as a number with the answer's last number (`7 + 5 = 12` answers 12; `1,000`,
    `0.5` and `1/2` are numbers); any other is compared as text, case, punctuation and spacing aside. A list
    solution holds several accepted answers. With `math_verify` installed, a solution it parses is verified
    with it first (LaTeX, fractions, sets). A row without a solution (None) gets None.

    Raises:
        UserError: the rows have no `solution` field.
    """
    if solution is None:
        raise UserError(
            f"needs a `solution` field in each data row; the rows have: {', '.join(columns) or 'no other fields'}"
        )
    return [_accurate(answer_text(completion_text(c)), s) for c, s in zip(completions, solution, strict=True)]


def _accurate(answer: str, solution: Any) -> float | None:
    if solution is None:
        return None
    accepted = solution if isinstance(solution, (list, tuple)) else [solution]
    return float(any(_matches(answer, answer_text(str(s))) for s in accepted if s is not None))


def _matches(answer: str, solution: str) -> bool:
    verified = _math_verify(answer, solution)
    if verified is not None:
        return verified
    expected = _number(solution)
    if expected is not None and _NUMBERS.fullmatch(_THOUSANDS.sub("", solution).strip().rstrip(".")):
        numbers = _NUMBERS.findall(_THOUSANDS.sub("", answer))
        got = _number(numbers[-1]) if numbers else None
        return got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    return _normalised(answer) == _normalised(solution)


def _math_verify(answer: str, solution: str) -> bool | None:
    """math_verify's verdict, None when it is not installed or cannot parse the solution."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        gold = parse(solution)
        return bool(verify(gold, parse(answer))) if gold else None
    except Exception:  # its parser on text that is no math: fall back to the plain comparison
        return None


def _number(text: str) -> float | None:
    text = _THOUSANDS.sub("", text).strip().rstrip(".")
    match = _NUMBERS.search(text)
    if match is None:
        return None
    value = match.group(0)
    if "/" in value:
        num, den = (float(part) for part in value.split("/"))
        return num / den if den else None
    return float(value)


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _normalised(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION)
    return " ".join(text.split())


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """A box `[x1, y1, x2, y2]`: a list of four numbers, or the first such bracketed list in a string."""
    if isinstance(value, (list, tuple)) and len(value) == 4 and not any(isinstance(v, str) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, str):
        match = _BOX.search(value)
        if match:
            return tuple(float(v) for v in match.groups())  # type: ignore[return-value]
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes `[x1, y1, x2, y2]` (x2, y2 exclusive: the width is x2 - x1)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union -= inter
    return inter / union if union > 0 else 0.0


def iou_reward(family: Family | None, processor: Any) -> RewardFn:
    """The IoU of the box in the answer with the row's `solution` box, in the original image's pixels.

    The answer's box (the first `[x1, y1, x2, y2]` inside `<answer>`, else in the completion; 0.0 without one)
    is in the space the family's checkpoints write boxes in (`Family.box_coordinates`), converted here to the
    row's first image's original pixels (column `image_sizes`): `resized` (Qwen2.5-VL: the image as the
    processor resized it, the correction VLM-R1 makes) and `relative_1000` (Qwen2-VL, Qwen3-VL) scale by the
    image's size; `original` (and a text model) is taken as is. A row without a solution gets None.
    """
    space = family.box_coordinates if family is not None else "original"
    if space == "resized" and getattr(processor, "image_processor", None) is None:
        raise UserError(
            f"the iou reward needs the {family.name} processor: its boxes are in resized-image pixels"
        )
    resized: dict[tuple[int, int], tuple[int, int]] = {}

    def to_original(box: tuple[float, ...], sizes: Any) -> tuple[float, ...]:
        if space == "original":
            return box
        if not sizes:
            raise UserError(
                f"{family.name} models write boxes in {space} coordinates; converting them needs the row's "
                "image (column image_sizes is empty)"
            )
        width, height = (int(v) for v in sizes[0])
        if space == "relative_1000":
            sx, sy = width / 1000, height / 1000
        else:
            if (width, height) not in resized:
                resized[(width, height)] = resized_size(processor, family, (height, width))
            new_height, new_width = resized[(width, height)]
            sx, sy = width / new_width, height / new_height
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    def iou(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        solution: Sequence[Any] | None = None,
        image_sizes: Sequence[Any] | None = None,
        **columns: Any,
    ) -> list[float | None]:
        if solution is None:
            raise UserError("needs a `solution` field (the box [x1, y1, x2, y2]) in each data row")
        sizes = image_sizes if image_sizes is not None else [[]] * len(completions)
        out: list[float | None] = []
        for completion, target, size in zip(completions, solution, sizes, strict=True):
            if target is None:
                out.append(None)
                continue
            truth = parse_box(target)
            if truth is None:
                raise UserError(f"the solution {target!r} holds no box [x1, y1, x2, y2]")
            box = parse_box(answer_text(completion_text(completion)))
            out.append(0.0 if box is None else box_iou(to_original(box, size), truth))
        return out

    return iou
