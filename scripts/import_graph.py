"""The package's module dependencies, folded to its layers, with the arrows that run upward.

Data flows one way (docs: STYLE): recipe → config → model → data → engine → methods → checkpoint → the entry points. A
module may import from its own layer or a lower one; an import from a higher layer is an upward arrow. Every
import that runs counts, function-local ones included; imports under `if TYPE_CHECKING:` do not run and do not
count. The package root (`vlmtune/__init__.py`: the lazy public API) is an entry point.

    python scripts/import_graph.py             # the working tree
    python scripts/import_graph.py --at main   # a commit, branch or tag (read with git show)
    python scripts/import_graph.py --modules   # module-level edges instead of layer-level ones
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lowest first. Modules not listed under a package are the entry points (train, cli, launch, ...).
LAYERS = ["base", "config", "model", "data", "engine", "methods", "checkpoint", "plan", "entry", "testing"]
BASE = {"errors", "logging", "layout", "exit_report", "families"}


def layer(module: str) -> str:
    """`vlmtune.engine.loop` → `engine`; `vlmtune.errors` → `base`; `vlmtune.train` → `entry`."""
    parts = module.split(".")[1:]
    if not parts:
        return "entry"
    if len(parts) > 1 or parts[0] in LAYERS:
        return parts[0]
    return "base" if parts[0] in BASE else "entry"


def sources(at: str | None) -> dict[str, str]:
    """Module name → source text of every vlmtune module, from the working tree or a git revision."""
    if at is None:
        files = {p.relative_to(REPO).as_posix(): p.read_text() for p in (REPO / "vlmtune").rglob("*.py")}
    else:
        listing = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", at, "vlmtune"], cwd=REPO, text=True, capture_output=True
        )
        if listing.returncode:
            sys.exit(listing.stderr.strip())
        names = [n for n in listing.stdout.split() if n.endswith(".py")]
        files = {n: _git_show(at, n) for n in names}
    return {
        n.removesuffix(".py").removesuffix("/__init__").replace("/", "."): text for n, text in files.items()
    }


def _git_show(at: str, name: str) -> str:
    return subprocess.run(["git", "show", f"{at}:{name}"], cwd=REPO, text=True, capture_output=True).stdout


def imports(module: str, text: str, known: set[str]) -> set[str]:
    """The vlmtune modules that `module` imports (`from pkg import mod` counts as importing `pkg.mod`)."""
    found = set()
    tree = ast.parse(text)
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vlmtune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmtune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != module and m in known}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", help="a git revision (default: the working tree)")
    p.add_argument("--modules", action="store_true", help="print module-level edges")
    args = p.parse_args(argv)

    texts = sources(args.at)
    known = set(texts)
    edges = {(m, dep) for m, text in texts.items() for dep in imports(m, text, known)}
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted((m, d) for m, d in edges if rank[layer(d)] > rank[layer(m)])

    if args.modules:
        for m, d in sorted(edges):
            print(f"{m} -> {d}")
    else:
        folded: dict[tuple[str, str], int] = defaultdict(int)
        for m, d in edges:
            if layer(m) != layer(d):
                folded[layer(m), layer(d)] += 1
        print(f"layers (lowest first): {' < '.join(LAYERS)}")
        for (a, b), n in sorted(folded.items(), key=lambda e: (rank[e[0][0]], rank[e[0][1]])):
            mark = "   UPWARD" if rank[b] > rank[a] else ""
            print(f"  {a:>10} -> {b:<10} {n:3d} import(s){mark}")
    print(f"upward arrows: {len(upward)}")
    for m, d in upward:
        print(f"  {m} -> {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
