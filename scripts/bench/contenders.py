"""One training run of one contender, inside a fresh child process of `cpu_compare.py`.

Each `run_*` trains on the same model folder and the same token ids, and returns the same measurements: a
timestamp after every optimizer step, the step losses, and what its collator produced (`BatchRecorder`).
"""

from __future__ import annotations

import time
from pathlib import Path

from common import BatchRecorder, read_jsonl


class Clock:
    """Step-end timestamps and losses, filled by whichever hook the contender offers."""

    def __init__(self) -> None:
        self.stamps: list[float] = []  # perf_counter after each optimizer step
        self.first_step_wall: float | None = None  # time.time() after step 1, for time-to-first-step
        self.losses: list[float] = []

    def step_done(self) -> None:
        self.stamps.append(time.perf_counter())
        if self.first_step_wall is None:
            self.first_step_wall = time.time()


def run_vlmtune(spec: dict, clock: Clock) -> BatchRecorder:
    """vlmtune through its recipe and `vlmtune.train.run`; its Trainer is wrapped (in this process only) to read
    the step boundary and the collator's output, the same two things the HF callbacks below read."""
    import vlmtune.engine.loop as loop
    from vlmtune.train import run

    recorders: list[BatchRecorder] = []
    init, train_step = loop.Trainer.__init__, loop.Trainer.train_step

    def wrapped_init(self, c, total_steps):
        c.train_collator = BatchRecorder(c.train_collator)
        recorders.append(c.train_collator)
        init(self, c, total_steps)

    def wrapped_step(self, micro_batches):
        out = train_step(self, micro_batches)
        clock.step_done()
        clock.losses.append(out["loss_sum"] / max(out["tokens"], 1))
        return out

    loop.Trainer.__init__, loop.Trainer.train_step = wrapped_init, wrapped_step
    run(spec["recipe"], overrides=[f"train.output_dir={spec['output_dir']}"])
    return recorders[0]


def _hf_args(spec: dict) -> dict:
    """TrainingArguments shared by TRL and Trainer: the recipe's settings, sequential order, no extras."""
    return {
        "output_dir": spec["output_dir"],
        "per_device_train_batch_size": spec["micro_batch"],
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "train_sampling_strategy": "sequential",  # rows are stored in vlmtune's order already
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 42,
    }


def _callback(clock: Clock):
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return Stamp()


def _model_and_data(spec: dict):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    data = Dataset.from_list(read_jsonl(Path(spec["tokens"])))
    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules=spec["lora_targets"],
        task_type="CAUSAL_LM",
    )
    return model, tokenizer, data, lora


def run_trl(spec: dict, clock: Clock) -> BatchRecorder:
    """TRL's SFTTrainer on the pre-tokenised rows (`input_ids` + `labels`: TRL neither re-tokenises nor
    re-masks them); padded, `padding_free=True`, or `packing=True` (BFD, which is padding-free too)."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, data, lora = _model_and_data(spec)
    mode = spec["mode"]
    args = SFTConfig(
        **_hf_args(spec),
        padding_free=mode == "padding_free",
        packing=mode == "packed",
        max_length=spec["pack_length"] if mode == "packed" else None,
        shuffle_dataset=False,
    )
    if mode == "packed":
        args.per_device_train_batch_size = 1  # one pack of pack_length tokens per step
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[_callback(clock)],
    )
    trainer.data_collator = BatchRecorder(trainer.data_collator)
    trainer.train()
    return trainer.data_collator


def run_hf(spec: dict, clock: Clock) -> BatchRecorder:
    """transformers Trainer + PEFT: `DataCollatorForSeq2Seq` (padded) or `DataCollatorWithFlattening`."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    model, tokenizer, data, lora = _model_and_data(spec)
    if spec["mode"] == "padded":
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    elif spec["mode"] == "padding_free":
        collator = DataCollatorWithFlattening()
    else:
        raise ValueError(f"transformers Trainer has no {spec['mode']} mode")
    recorder = BatchRecorder(collator)
    trainer = Trainer(
        model=get_peft_model(model, lora),
        args=TrainingArguments(**_hf_args(spec)),
        train_dataset=data,
        data_collator=recorder,
        callbacks=[_callback(clock)],
    )
    trainer.train()
    return recorder


def run_vlmtune_in_memory(spec: dict, clock: Clock) -> BatchRecorder:
    """vlmtune with every step's batches collated before step 1 and served from memory: the same steps with no
    data work while training, to set against `run_vlmtune` (tokenised rows, sampler and collator as it goes)."""
    import vlmtune.engine.loop as loop

    steps = loop.Trainer._steps
    loop.Trainer._steps = lambda self, start, total: iter(list(steps(self, start, total)))
    return run_vlmtune(spec, clock)


CONTENDERS = {"vlmtune": run_vlmtune, "in-memory": run_vlmtune_in_memory, "trl": run_trl, "hf": run_hf}
