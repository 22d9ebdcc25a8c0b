"""`vlmtune.notebook_launch`: two processes forked from a fresh interpreter (as from a notebook kernel) train the
same model as one process with the same global batch."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import vlmtune
from tests.conftest import REPO
from tests.integration.helpers import tiny_recipe_for_processes

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import vlmtune

    recipe = vlmtune.load_recipe(json.loads(sys.argv[1]))
    two = vlmtune.notebook_launch(recipe, {"train.micro_batch_size": 2}, num_processes=2, port=int(sys.argv[2]))
    # After the launch, an in-process run in the same kernel (the reference: 1 process x 4 rows).
    one = vlmtune.run(recipe, {"train.micro_batch_size": 4, "train.output_dir": sys.argv[3]})
    print(json.dumps({
        name: {"adapter": str(r.adapter_dir), "steps": r.steps, "metrics": r.metrics, "history": r.history}
        for name, r in (("two", two), ("one", one))
    }))
    """
)


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb")
    recipe = tiny_recipe_for_processes(
        tiny_model_dir, tmp / "two", grad_accum=1, max_steps=3, checkpoint={"every": 0}
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(recipe), "29637", str(tmp / "one")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_two_notebook_processes_train_like_one_with_the_same_global_batch(launched):
    results, stderr = launched
    assert "ddp over 2 process(es)" in stderr and "train: 100%" in stderr  # DDP, and the progress bar
    two, one = results["two"], results["one"]
    assert two["steps"] == one["steps"] == 3
    assert [r["step"] for r in two["history"]] == [1, 2, 3] and two["metrics"] == two["history"][-1]
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-5)
    adapter_two, adapter_one = (load_file(f"{r['adapter']}/adapter_model.safetensors") for r in (two, one))
    assert adapter_two.keys() == adapter_one.keys()
    for key in adapter_one:
        torch.testing.assert_close(adapter_two[key], adapter_one[key], atol=2e-5, rtol=1e-4, msg=key)


def test_launch_problems_are_refused_before_forking(tiny_recipe, monkeypatch):
    with pytest.raises(vlmtune.RecipeError, match=r"train\.lrr: unknown key"):
        vlmtune.notebook_launch(tiny_recipe(), {"train.lrr": 1})
    monkeypatch.setitem(sys.modules, "bitsandbytes", sys.modules.get("bitsandbytes") or object())
    with pytest.raises(vlmtune.UserError, match="restart the kernel and call notebook_launch first"):
        vlmtune.notebook_launch(tiny_recipe())


def test_a_worker_error_reaches_the_notebook_as_the_same_exception(tmp_path):
    from vlmtune.notebook import _raise_worker_error

    (tmp_path / "rank-1.json").write_text(
        json.dumps({"error": "UserError", "message": "data.train.0: bad row 7"})
    )
    (tmp_path / "rank-0.json").write_text(
        json.dumps({"error": "TrainingDiverged", "message": "NaN at step 2"})
    )
    with pytest.raises(vlmtune.TrainingDiverged, match="NaN at step 2"):  # the lowest rank's error
        _raise_worker_error(tmp_path)
    (tmp_path / "rank-0.json").write_text(json.dumps({"error": "Preempted", "message": "stopped", "step": 4}))
    with pytest.raises(vlmtune.Preempted) as caught:
        _raise_worker_error(tmp_path)
    assert caught.value.step == 4


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VLMTUNE_RUNS", str(tmp_path))  # the kernel inherits it: the run goes here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(REPO / "examples/quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(REPO / "examples")}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "train.lrr: unknown key; did you mean `lr`?" in text  # a typo is caught in Python too
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curve
    history = vlmtune.read_metrics(tmp_path / "notebook/tiny_lora/metrics.jsonl")
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # 30 steps, logged every 5: the loss falls
    assert f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}" in text
    assert (
        "30 steps; adapter in" in text
        and (tmp_path / "notebook/tiny_lora/adapter/adapter_config.json").is_file()
    )
    assert re.search(r"^'.*'$", text, re.MULTILINE)  # the generated answer, printed as a repr
