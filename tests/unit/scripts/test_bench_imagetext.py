"""The image-text benchmark's generated data: valid rows in the documented layout, the same for the same seed."""

import importlib.util
import json
import sys

from PIL import Image

from tests.conftest import REPO

BENCH = REPO / "scripts" / "bench"


def _load(name: str, file: str):
    # Loaded from their files under their own names: scripts/ is not a package. vlm_data imports its siblings.
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


imagetext = _load("bench_imagetext", "imagetext.py")


def test_twenty_rows_are_messages_with_one_image_file_per_placeholder(tmp_path):
    jsonl = imagetext.generate(20, seed=3, root=tmp_path, workers=1, quiet=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[::2] == ["user"] * (len(roles) // 2) and roles[1::2] == ["assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        assert row["messages"][0]["content"].count("<image>") == len(row["images"]) <= 2
        for rel in row["images"]:
            with Image.open(jsonl.parent / rel) as im:
                assert im.format == "JPEG" and all(64 <= side <= 2000 for side in im.size)
    assert sum(len(r["images"]) for r in rows) >= 15


def test_same_seed_same_files_and_a_larger_set_extends_a_smaller_one(tmp_path):
    a = imagetext.generate(8, seed=3, root=tmp_path / "a", workers=1, quiet=True)
    b = imagetext.generate(12, seed=3, root=tmp_path / "b", workers=1, quiet=True)
    assert b.read_text().splitlines()[:8] == a.read_text().splitlines()
    first = next(img for line in a.read_text().splitlines() for img in json.loads(line)["images"])
    assert (a.parent / first).read_bytes() == (b.parent / first).read_bytes()
    mtime = a.stat().st_mtime_ns
    assert imagetext.generate(8, seed=3, root=tmp_path / "a", workers=1, quiet=True) == a
    assert a.stat().st_mtime_ns == mtime  # reused, not regenerated


def test_sizes_and_reply_lengths_spread_like_real_data():
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [imagetext.image_size(rng) for _ in range(2000)]
    assert all(64 <= w <= 2000 and 64 <= h <= 2000 for w, h in sizes)
    portrait = sum(h > w for w, h in sizes) / len(sizes)
    square = sum(w == h for w, h in sizes) / len(sizes)
    assert 0.2 < portrait < 0.4 and 0.1 < square < 0.3
    words = imagetext._words(0)
    replies = sorted(len(imagetext._text(rng, words, 30, 1.1, 1500).split()) for _ in range(2000))
    assert 20 <= replies[1000] <= 40 and replies[1900] > 150  # many short replies, a long tail


def test_capped_runs_are_extrapolated_from_their_data_progress():
    vlm_data = _load("bench_vlm_data", "vlm_data.py")
    capped = {
        "tag": "r0-1000-p1-w0-cold", "rows": 1000, "status": "memory", "measure": "startup", "procs": 1,
        "note": "did not finish", "timeline": [[10, 0, 1000, 0, 0], [20, 0, 2000, 100, 1000], [30, 0, 3000, 200, 1000]],
    }  # fmt: skip
    (line,) = vlm_data.extrapolate([capped])
    assert "10.00 MB and took 100 ms per row" in line and "~11.0 GB per rank and ~1.8 min" in line
