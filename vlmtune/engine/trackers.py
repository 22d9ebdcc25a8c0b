"""Experiment trackers (`train.report_to`) as accelerate tracker objects, each writing inside the run folder
where it can.

Built here rather than named by string to `Accelerator(log_with=...)`, because accelerate gives every tracker
the same `project_name`: TensorBoard would put its events in `<output_dir>/<project>` and wandb would call its
project after the folder. Constructing a tracker imports nothing; its package is imported on the main process
when `accelerator.init_trackers` starts it.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.tracking import (
    AimTracker,
    ClearMLTracker,
    CometMLTracker,
    DVCLiveTracker,
    GeneralTracker,
    MLflowTracker,
    SwanLabTracker,
    TensorBoardTracker,
    TrackioTracker,
    WandBTracker,
)

from vlmtune.config.schema import TrainConfig


def build_trackers(train: TrainConfig) -> list[GeneralTracker]:
    """One tracker per `train.report_to` entry; runs are named after the output folder."""
    out = Path(train.output_dir).expanduser().resolve()
    project, name = train.tracker_project, out.name
    make = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", out),  # <output_dir>/tensorboard/
        "wandb": lambda: WandBTracker(project, name=name, dir=str(out)),  # <output_dir>/wandb/
        "mlflow": lambda: MLflowTracker(experiment_name=project, run_name=name),  # MLFLOW_TRACKING_URI
        "comet_ml": lambda: CometMLTracker(project),
        "aim": lambda: AimTracker(name, logging_dir=str(out)),  # <output_dir>/.aim
        "clearml": lambda: ClearMLTracker(project, task_name=name),
        "dvclive": lambda: DVCLiveTracker(dir=str(out / "dvclive")),
        "swanlab": lambda: SwanLabTracker(project),
        "trackio": lambda: TrackioTracker(project),
    }
    return [make[tracker]() for tracker in train.report_to]
