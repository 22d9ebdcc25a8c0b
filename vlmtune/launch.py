"""`vlmtune launch`: compose `accelerate launch` from the recipe, so nothing is hand-edited per node.

The recipe names its accelerate config; this module adds the machine count, this machine's rank, the rendezvous
and the process count (from the flags, else the config, else the visible GPUs), plus environment defaults that
turn silent hangs into errors. It then runs the launcher as a child and supervises it: SIGTERM / SIGUSR1 (a
scheduler's preemption warning) become a STOP file in the run's output folder, which every rank honours at the
next step boundary (checkpoint, exit 75). Launchers neither forward SIGUSR1 nor wait long after SIGTERM, so
signalling the workers directly would lose the checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vlmtune.config.prepare import prepare
from vlmtune.engine.signals import LAUNCH_TIME_ENV, SIGNALS, STOP_FILE
from vlmtune.errors import UserError
from vlmtune.exit_report import EXIT_DIR_ENV, workers_exit_code
from vlmtune.logging import get_logger

log = get_logger(__name__)

DEFAULT_PORT = 29500

# Defaults for every worker; a value already in the environment wins. See docs/distributed.md.
DIST_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or hung collective raises instead of blocking forever
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # and says which collective it was
    "NCCL_DEBUG": "WARN",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str]  # only what differs from the caller's environment
    output_dir: Path
    world_size: int


def plan_launch(
    recipe_path: str,
    overrides: list[str],
    *,
    nodes: int | None = None,
    node_rank: int = 0,
    main_ip: str | None = None,
    main_port: int | None = None,
    procs_per_node: int | None = None,
) -> LaunchPlan:
    """The `accelerate launch` command and environment that run the recipe on this node."""
    prepared = prepare(recipe_path, overrides)
    recipe, spec = prepared.recipe, prepared.launch
    dist = spec.distributed_type

    nodes = nodes or spec.num_machines
    if not 0 <= node_rank < nodes:
        raise UserError(f"--node-rank {node_rank} is outside 0..{nodes - 1} for {nodes} node(s)")
    on_cpu = spec.use_cpu or _gpu_count() == 0
    if procs_per_node is None:
        # The config's total split over the nodes, capped at this node's GPUs; one for a single-process config.
        configured = spec.num_processes // nodes or 1
        procs_per_node = 1 if dist == "NO" else configured if on_cpu else min(configured, _gpu_count())
    world = nodes * procs_per_node
    if nodes > 1 and not main_ip:
        raise UserError("--main-ip is required with more than one node (the address of the node with rank 0)")

    cmd = [sys.executable, "-m", "vlmtune.launch"]  # `accelerate launch`, see accelerate_launch()
    if spec.path is not None:
        cmd += ["--config_file", str(spec.path)]
    cmd += ["--num_machines", str(nodes), "--num_processes", str(world), "--machine_rank", str(node_rank)]
    port = str(main_port or DEFAULT_PORT)
    cmd += ["--main_process_ip", main_ip or "127.0.0.1", "--main_process_port", port]
    # The recipe decides the precision; under DeepSpeed the config file's value would otherwise win.
    cmd += ["--mixed_precision", recipe.train.mixed_precision]
    env = {k: v for k, v in DIST_ENV_DEFAULTS.items() if k not in os.environ}
    if world > 1 and dist in ("NO", "MULTI_GPU", "MULTI_CPU"):
        cmd.append("--multi_gpu")  # plain DDP; with ACCELERATE_USE_CPU this is gloo DDP on CPU
    if spec.deepspeed and nodes > 1:
        cmd += ["--deepspeed_multinode_launcher", "standard"]  # one launcher per node, no pdsh / hostfile
    if on_cpu:
        # accelerate turns DeepSpeed off when told to use the CPU; without GPUs it runs there anyway.
        if not spec.deepspeed:
            env["ACCELERATE_USE_CPU"] = "true"
        if "OMP_NUM_THREADS" not in os.environ:
            # Processes sharing the cores each with all threads run many times slower (seen: 13× with DeepSpeed).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs_per_node))
    cmd += ["-m", "vlmtune.train", recipe_path, *overrides]
    output_dir = Path(recipe.train.output_dir).expanduser().resolve()
    return LaunchPlan(command=cmd, env=env, output_dir=output_dir, world_size=world)


def run_plan(plan: LaunchPlan) -> int:
    """Run the launcher and return the workers' exit code; preemption signals become a STOP file for them."""
    stop_file = plan.output_dir / STOP_FILE

    def request_stop(signum, _frame) -> None:
        log.warning("%s received: asking the run to checkpoint and stop", signal.Signals(signum).name)
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        stop_file.write_text(f"{signal.Signals(signum).name}\n")

    previous = {sig: signal.signal(sig, request_stop) for sig in SIGNALS}
    env = {**os.environ, **plan.env, LAUNCH_TIME_ENV: str(time.time())}
    # Schedulers signal every process of the job step (Slurm's proctrack does, whatever the session), and
    # SIGUSR1 would kill the launcher, orphaning the workers mid-checkpoint. So the launcher and workers start
    # with it ignored; the workers install their own handler once training runs, and this supervisor turns it
    # into a STOP file that every rank honours.
    child = subprocess.Popen(plan.command, env=env, start_new_session=True, preexec_fn=_ignore_sigusr1)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_sigusr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def format_plan(plan: LaunchPlan) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    return f"{env} {shlex.join(plan.command)}".strip()


def accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch argv`, returning the workers' own exit code, without torchrun's traceback.

    torchrun reports any worker failure as exit 1, which would hide a preemption (75: requeue) or a user error
    (2) from a scheduler, so each worker writes its code into a folder (`vlmtune.exit_report`). The workers
    have printed their own error (or traceback, for a bug); torchrun's `ChildFailedError` stack on top only
    buries it, so one line names the failed ranks instead.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlmtune-exit-") as exit_dir:
        os.environ[EXIT_DIR_ENV] = exit_dir  # inherited by the workers
        try:
            launch_command(args)
        except ChildFailedError as exc:
            failed = ", ".join(f"rank {rank}: exit {f.exitcode}" for rank, f in sorted(exc.failures.items()))
            print(f"launcher: workers stopped ({failed})", file=sys.stderr)
            return workers_exit_code(Path(exit_dir), 1)
        except subprocess.CalledProcessError as exc:  # the single-process launcher
            return workers_exit_code(Path(exit_dir), exc.returncode)
    return 0


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable CUDA means CPU
        return 0


if __name__ == "__main__":
    sys.exit(accelerate_launch(sys.argv[1:]))
