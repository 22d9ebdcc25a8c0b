"""Run one command as a watched process tree: timestamped output, memory of every process, caps that kill.

Used by `vlm_data.py`. Everything is measured from outside (psutil and the run's files), so it measures any
version of vlmtune the same way.

- Output: stdout + stderr, split at newlines and carriage returns (progress bars), each piece stamped with the
  seconds since launch.
- Memory: every `interval` s, RSS and PSS of each process of the tree. The tree's sum of PSS counts pages
  shared between processes (forked DataLoader workers, a memory-mapped index) once; summed RSS counts them once
  per process. Per rank: the training process's own RSS, and the PSS of it plus its children (its workers).
- Files: new lines of `metrics.jsonl`, stamped when first seen (the first one ends "time to first step").
- Caps: past `timeout` s or `mem_cap_mb` of tree PSS, or when the machine has less than `min_free_mb`
  available (it is shared), the whole tree is killed (SIGKILL, pid by pid) and the
  run is recorded as such, with how far it got.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 2**20
# A training process (not a launcher): what `python -m vlmtune.train` or the in-memory wrapper run as.
TRAINER = re.compile(r"vlmtune\.train\b|vlm_in_memory\.py")
LAUNCHER = re.compile(r"vlmtune\.launch\b|vlmtune\.cli\b|accelerate|torchrun")
PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # tqdm: "... 450/1000 [00:30<00:40, ...]"


@dataclass
class Watched:
    status: str = "ok"  # ok | error | timeout | memory
    exit_code: int | None = None
    wall_s: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)
    metrics: list[tuple[float, dict]] = field(default_factory=list)
    peak_tree_rss_mb: float = 0.0
    peak_tree_pss_mb: float = 0.0
    peak_rank_rss_mb: dict[int, float] = field(default_factory=dict)  # the rank's own process
    peak_rank_pss_mb: dict[int, float] = field(default_factory=dict)  # the rank + its DataLoader workers
    max_procs: int = 0
    low_memory: bool = False  # killed because the machine ran short, not the tree itself
    # Every ~2 s: [t, tree PSS MB, rank-0 RSS MB, progress n, progress total].
    timeline: list[list[float]] = field(default_factory=list)
    # Every poll: (t, CPU s per rank with its workers, RSS MB of each rank's own process).
    ranks: list[tuple[float, dict[int, float], dict[int, float]]] = field(default_factory=list)

    def first(self, pattern: str) -> float | None:
        """Seconds at which an output line first matched `pattern`."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def _at(self, t: float) -> tuple[float, dict[int, float], dict[int, float]]:
        """The first per-rank sample at or after `t` (the last one if none)."""
        return next((s for s in self.ranks if s[0] >= t), self.ranks[-1] if self.ranks else (t, {}, {}))

    def cpu_between(self, t0: float, t1: float) -> dict[int, float]:
        """CPU seconds each rank (with its children) used between two times of the run."""
        start, end = self._at(t0)[1], self._at(t1)[1]
        return {r: round(end[r] - start.get(r, 0.0), 1) for r in sorted(end)}

    def rss_at(self, t: float) -> dict[int, float]:
        """RSS (MB) of each rank's process at time `t` of the run (the next sample)."""
        return {r: round(v) for r, v in sorted(self._at(t)[2].items())}

    def progress(self) -> tuple[int, int] | None:
        for _, line in reversed(self.lines):
            found = PROGRESS.findall(line)
            if found:
                n, total = found[-1]
                return int(n), int(total)
        return None


def _reader(stream, out: Watched, start: float, log) -> None:
    buf = b""
    while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
        buf += chunk
        *pieces, buf = re.split(rb"[\r\n]", buf)
        now = time.time() - start
        for piece in pieces:
            if piece.strip():
                text = piece.decode(errors="replace")
                out.lines.append((now, text))
                log.write(f"{now:9.2f} {text}\n")
    if buf.strip():
        out.lines.append((time.time() - start, buf.decode(errors="replace")))


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sample(procs: list[psutil.Process]) -> tuple[float, float, dict[int, float], dict[int, float], dict]:
    info = {}
    for p in procs:
        try:
            mem = p.memory_full_info()
            info[p.pid] = (p.ppid(), " ".join(p.cmdline()), mem.rss, getattr(mem, "pss", mem.rss), p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    trainers = {pid for pid, (_, cmd, *_) in info.items() if TRAINER.search(cmd) and not LAUNCHER.search(cmd)}
    rank_rss, rank_pss, rank_cpu = {}, {}, {}
    roots = sorted(pid for pid in trainers if info[pid][0] not in trainers)
    for k, pid in enumerate(roots):
        try:
            rank = int(info[pid][4].environ().get("RANK", k))
        except (psutil.Error, ValueError):
            rank = k
        group = {pid} | {c.pid for c in _tree(info[pid][4])}
        rank_rss[rank] = info[pid][2] / MB
        rank_pss[rank] = sum(info[q][3] for q in group if q in info) / MB
        rank_cpu[rank] = sum(_cpu(info[q][4]) for q in group if q in info)
    tree_rss, tree_pss = sum(v[2] for v in info.values()) / MB, sum(v[3] for v in info.values()) / MB
    return tree_rss, tree_pss, rank_rss, rank_pss, rank_cpu


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def kill_tree(root: psutil.Process) -> None:
    """SIGKILL the tree, each process by pid (launchers start their children in new sessions)."""
    for p in reversed(_tree(root)):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def watch(
    cmd: list[str],
    *,
    env: dict,
    cwd: Path,
    log_path: Path,
    metrics_path: Path,
    timeout: float,
    mem_cap_mb: float,
    min_free_mb: float = 0.0,
    interval: float = 0.5,
) -> Watched:
    out = Watched()
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        root = psutil.Process(proc.pid)
        reader = threading.Thread(target=_reader, args=(proc.stdout, out, start, log), daemon=True)
        reader.start()
        try:
            seen = _poll(out, proc, root, start, metrics_path, timeout, mem_cap_mb, min_free_mb, interval)
        except BaseException:  # Ctrl-C or SIGTERM of the benchmark: leave no training processes behind
            kill_tree(root)
            raise
        reader.join(timeout=10)
        out.exit_code = proc.returncode
        out.wall_s = time.time() - start
        if out.status == "ok" and proc.returncode != 0:
            out.status = "error"
        log.write(f"# exit {proc.returncode}, status {out.status}, {out.wall_s:.1f} s\n")
    # Lines written between the last poll and the exit.
    if metrics_path.is_file():
        records = metrics_path.read_text().splitlines()
        for line in records[seen:]:
            with contextlib.suppress(json.JSONDecodeError):
                out.metrics.append((out.wall_s, json.loads(line)))
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(out, proc, root, start, metrics_path, timeout, mem_cap_mb, min_free_mb, interval) -> int:
    """Sample the tree until it exits or a cap kills it; returns how many metrics lines were read."""
    seen, last_sample = 0, -1e9
    while True:
        now = time.time() - start
        procs = _tree(root)
        out.max_procs = max(out.max_procs, len(procs))
        tree_rss, tree_pss, rank_rss, rank_pss, rank_cpu = _sample(procs)
        if rank_cpu:
            out.ranks.append((now, rank_cpu, rank_rss))
        out.peak_tree_rss_mb = max(out.peak_tree_rss_mb, tree_rss)
        out.peak_tree_pss_mb = max(out.peak_tree_pss_mb, tree_pss)
        for r, v in rank_rss.items():
            out.peak_rank_rss_mb[r] = max(out.peak_rank_rss_mb.get(r, 0.0), v)
        for r, v in rank_pss.items():
            out.peak_rank_pss_mb[r] = max(out.peak_rank_pss_mb.get(r, 0.0), v)
        if metrics_path.is_file():
            lines = metrics_path.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    out.metrics.append((now, json.loads(line)))
                    seen += 1
                except json.JSONDecodeError:
                    break  # a line being written: read it next time
        if now - last_sample >= 2.0:
            prog = out.progress() or (0, 0)
            out.timeline.append([round(now, 1), round(tree_pss), round(rank_rss.get(0, 0.0)), *prog])
            last_sample = now
        if proc.poll() is not None:
            return seen
        out.low_memory = psutil.virtual_memory().available / MB < min_free_mb
        if now > timeout or tree_pss > mem_cap_mb or out.low_memory:
            out.status = "timeout" if now > timeout else "memory"
            prog = out.progress() or (0, 0)
            out.timeline.append([round(now, 1), round(tree_pss), round(rank_rss.get(0, 0.0)), *prog])
            kill_tree(root)
            proc.wait()
            return seen
        time.sleep(interval)
