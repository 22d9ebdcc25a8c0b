"""`python -m vlmtune.train RECIPE` with every step's micro-batches collated before step 1 and served from memory.

The in-memory contender of `vlm_data.py`: the same steps as the real data path with no data work while training,
so its step time is the floor the real pipeline is measured against. It is the one place the benchmark reaches
into vlmtune (the loop's `Trainer._steps`, as `contenders.run_vlmtune_in_memory` does for text); if a rewrite
removes that method this exits with code 3 and says so, and the other measurements are unaffected.
"""

from __future__ import annotations

import sys

EXIT_UNAVAILABLE = 3


def main(argv: list[str]) -> int:
    import vlmtune.engine.loop as loop

    steps = getattr(loop.Trainer, "_steps", None)
    if steps is None:
        print("in-memory contender unavailable: vlmtune.engine.loop.Trainer._steps is gone", file=sys.stderr)
        return EXIT_UNAVAILABLE
    loop.Trainer._steps = lambda self, start, total: iter(list(steps(self, start, total)))
    from vlmtune.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
