"""The training loop: one optimizer step = one full accumulation window, normalised by trained tokens."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from vlmtune.config.schema import Recipe
from vlmtune.data.batching import layout
from vlmtune.data.encode import IGNORE_INDEX
from vlmtune.data.sampler import StepSampler
from vlmtune.engine.distributed import params_without_grad, strategy, unused_parameters_error
from vlmtune.engine.early_stop import judge_eval
from vlmtune.engine.flops import flop_counter, peak_flops, sequence_lengths
from vlmtune.engine.loss import LeanLoss, unwrap
from vlmtune.engine.method import Batch, Method
from vlmtune.engine.metrics import MetricsWriter, peak_memory_mb
from vlmtune.engine.offload import OffloadActivations
from vlmtune.engine.samples import SampleWriter
from vlmtune.engine.signals import StopWatcher
from vlmtune.engine.state import TrainState
from vlmtune.errors import DataError, Preempted, TrainingDiverged
from vlmtune.families import Family
from vlmtune.layout import step_of
from vlmtune.logging import get_logger

log = get_logger(__name__)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over trained positions (labels are aligned with inputs).

    The labels are shifted, not the logits: `logits[:, :-1]` is not contiguous, so flattening it copied the whole
    (batch, length, vocab) tensor every micro-batch (with a 32k vocabulary, more time and memory than the
    LoRA matmuls on CPU). The last position gets label IGNORE_INDEX, so the sum is unchanged.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) input tokens: padded batches mark them in `attention_mask`; packed ones count them."""
    if "n_tokens" in batch:
        return int(batch["n_tokens"])
    return int(batch["attention_mask"].sum())


# Batch entries that are not model inputs: the loss is computed here from the logits.
_NOT_INPUTS = ("labels", "length", "n_tokens", "bad_rows")


def forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = None, **extra
) -> torch.Tensor:
    """The logits of `batch`: every collated input (text, and a VLM's vision inputs) goes to the model.

    Floating inputs (pixel values) are cast to `dtype`, the model's weights dtype, which the vision tower needs.
    `extra` keyword arguments go to the model as well (the lean loss asks for `logits_to_keep=1`).
    """
    inputs = {
        k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
        for k, v in batch.items()
        if k not in _NOT_INPUTS
    }
    return model(**inputs, **extra).logits


def weights_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's (first) floating weights; None when it has none (all packed 4-bit)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def collate(collator, data, rows: list) -> dict[str, torch.Tensor]:
    """Collate the examples of `rows`: row indices, or for packed batches a list of bins of row indices."""
    if rows and isinstance(rows[0], list):
        return collator([[data[i] for i in unit] for unit in rows])
    return collator([data[i] for i in rows])


class StepBatches(torch.utils.data.Dataset):
    """Step `start + i` → (its row indices, its collated micro-batches) for one rank: a DataLoader's items."""

    def __init__(self, sampler: StepSampler, data, collator, rank: int, start: int, total: int) -> None:
        self.sampler, self.data, self.collator = sampler, data, collator
        self.rank, self.start, self.total = rank, start, total

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __getitem__(self, i: int) -> tuple[list, list[dict[str, torch.Tensor]] | DataError]:
        rows = self.sampler.micro_batches(self.start + i, self.rank)
        try:
            return rows, [collate(self.collator, self.data, r) for r in rows]
        except DataError as exc:
            # Handed to the loop, which raises it: raised in a DataLoader worker, it would reach the user
            # wrapped in the worker's traceback.
            return rows, DataError(str(exc))


class Rows(Protocol):
    """An encoded dataset: row i is a mapping of token ids, labels and (for a VLM) vision inputs."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


# Rows (or, for packed batches, bins of rows) → one micro-batch of tensors.
Collate = Callable[[list], dict[str, torch.Tensor]]


class Checkpointer(Protocol):
    """What the loop needs of checkpoints (`vlmtune.checkpoint.manager.CheckpointManager` is one)."""

    def save(self, step: int, model, optimizer, scheduler, state: TrainState) -> Path: ...

    def load(self, path: Path, model, optimizer, scheduler, state: TrainState) -> None: ...

    def latest(self) -> Path | None: ...


@dataclass
class Components:
    """What the loop works with, built by `vlmtune.train`."""

    recipe: Recipe
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    sampler: StepSampler
    train_data: Rows
    eval_data: Rows | None
    train_collator: Collate
    checkpoints: Checkpointer
    metrics: MetricsWriter
    output_dir: Path  # the run folder: the STOP file and non-finite diagnostics are there
    eval_collator: Collate | None = None  # padded, for evaluation (default: `train_collator`)
    # The VLM family (None for a text model): the FLOP count leaves out its vision tower and projector.
    family: Family | None = None
    method: Method | None = None  # the recipe's training method (default: supervised, `Supervised` below)
    samples: SampleWriter | None = None  # train.eval_samples: answers generated at each evaluation


class Supervised:
    """method: sft, next-token cross-entropy normalised by the window's trained tokens (`Method`)."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def prepare(self, step: int, micro_batches: list[Batch], *, training: bool) -> list[Batch]:
        return micro_batches

    def weight(self, batch: Batch) -> int:
        return trained_tokens(batch["labels"])

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.loss_sum(batch), torch.zeros(0)

    def summarise(
        self, loss: float, sums: dict[str, float], weight: float, *, eval: bool
    ) -> dict[str, float]:
        return {"ppl": math.exp(min(loss, 50.0))} if eval else {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    def __init__(self, c: Components, total_steps: int) -> None:
        self.c = c
        self.acc = c.accelerator
        self.sampler = c.sampler
        self.state = TrainState(
            global_batch=self.sampler.global_batch, total_steps=total_steps, data_layout=layout(c.recipe)
        )
        self.strategy = strategy(self.acc)
        # fp16 overflow is the loss scaler's business (accelerate's, or DeepSpeed's own), not the NaN policy's.
        self.loss_scaling = self.acc.scaler is not None or (
            self.strategy == "deepspeed" and self.acc.mixed_precision == "fp16"
        )
        # Trainable parameters the first step left without a gradient, named if DDP then fails on them.
        self._no_grad: list[str] = []
        self._dtype = weights_dtype(c.model)
        t = c.recipe.train
        self._lean = None if t.loss == "standard" else LeanLoss(c.model, t.loss, t.loss_chunk_tokens)
        # On the CPU, activations already live in CPU memory: offloading would only copy them.
        self._offloading = t.activation_offloading and self.acc.device.type == "cuda"
        if t.activation_offloading and not self._offloading:
            log.info(
                "train.activation_offloading: no effect on %s (activations are in CPU memory)",
                self.acc.device,
            )
        self._flops = flop_counter(unwrap(c.model), c.family)
        self._peak_flops = peak_flops(self.acc.device)
        # The stop requests of this rank (set while `fit` runs), and whether any rank asked in the last step.
        self._stop: StopWatcher | None = None
        self._stop_agreed = False
        self.method: Method = c.method or Supervised(self)

    def _batch(self, data, rows: list[int], collator=None) -> dict[str, torch.Tensor]:
        batch = collate(collator or self.c.train_collator, data, rows)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    # --- one step ------------------------------------------------------------------------------------

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of one micro-batch, as `train.loss` computes it."""
        if self._lean is None:
            return token_loss_sum(forward(self.c.model, batch, self._dtype), batch["labels"])
        # The head now runs outside the model's forward, which accelerate wraps in autocast: wrap it the same way.
        with self.acc.autocast():
            return self._lean(partial(forward, self.c.model, batch, self._dtype), batch)

    def _offload(self) -> AbstractContextManager:
        return OffloadActivations() if self._offloading else nullcontext()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """Forward/backward every micro-batch of the window, then one optimizer step.

        Each micro-batch's summed loss is divided by the trained-token count of the whole global window, so the
        update is the same however the window is split into micro-batches and ranks. accelerate (or DeepSpeed)
        divides by grad_accum and DDP / ZeRO / FSDP average over ranks; the `scale` factor undoes both. Under
        DeepSpeed the optimizer steps inside the last `backward` (and skips a non-finite step itself).
        """
        try:
            return self._train_step(micro_batches)
        except RuntimeError as exc:
            err = unused_parameters_error(exc, self._no_grad)
            if err is None:
                raise
            raise err from None

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        acc, model, method = self.acc, self.c.model, self.method
        micro_batches = method.prepare(self.state.step, micro_batches, training=True)
        # Counted from the collated batches while they are still on the host: no device→host copy (for sft; a
        # method that generates has its batches on the device already).
        local_weight = sum(method.weight(mb) for mb in micro_batches)
        local_tokens = sum(trained_tokens(mb["labels"]) for mb in micro_batches)
        lengths = [n for mb in micro_batches for n in sequence_lengths(mb)]
        local_inputs = sum(input_tokens(mb) for mb in micro_batches)
        micro_batches = [{k: v.to(acc.device) for k, v in mb.items()} for mb in micro_batches]
        # The window's normaliser stays on the device: the loss scale needs it, no host decision does.
        window = acc.reduce(torch.tensor([local_weight, local_tokens], device=acc.device), "sum")
        # In float64, then float32 like the loss: the same factor as computing it on the host.
        n_weight = window[0].to(torch.float64).clamp(min=1)
        scale = (acc.num_processes * acc.gradient_accumulation_steps / n_weight).float()
        loss_sum = torch.zeros((), device=acc.device)
        sums = torch.zeros(len(method.metric_names), device=acc.device)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            acc.sync_gradients = last  # all-reduce gradients and step only at the end of the window
            with nullcontext() if last else acc.no_sync(model):
                with self._offload():  # saved tensors go to the CPU during the forward, come back in backward
                    loss, extra = method.loss_sum(mb)
                acc.backward(loss * scale)
            loss_sum += loss.detach()
            sums += extra.to(acc.device)

        if self.strategy == "ddp" and self.state.step == 0:
            self._no_grad = params_without_grad(model)
        max_norm = self.c.recipe.train.max_grad_norm
        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm if max_norm else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # One reduction for the summed loss and every rank's stop request, then the step's one device→host
        # copy: the skip decision needs the loss and the (already global) gradient norm on the host.
        stop = torch.tensor([float(self._stop is not None and self._stop.requested())], device=acc.device)
        reduced = acc.reduce(torch.cat([loss_sum.float()[None], stop, sums.float()]), "sum")
        total_loss, grad_norm, weight, tokens, stops, *method_sums = self._to_host(
            torch.cat([reduced[:1].double(), torch.as_tensor(grad_norm, device=acc.device).double()[None],
                       window.double(), reduced[1:].double()])
        )  # fmt: skip
        self._stop_agreed = stops > 0
        # Both values are global (summed loss, all-reduced gradients), so every rank takes the same decision.
        nonfinite = not self.loss_scaling and not (math.isfinite(total_loss) and math.isfinite(grad_norm))
        if nonfinite:
            skipped = True  # never apply NaN/Inf (DeepSpeed has already skipped it: see _deepspeed_plugin)
        else:
            self.c.optimizer.step()
            skipped = acc.optimizer_step_was_skipped  # fp16 overflow: the scaler skipped it
        if not skipped:
            self.c.scheduler.step()  # a skipped step does not advance the schedule
        self.c.optimizer.zero_grad(set_to_none=True)
        return {
            "loss_sum": total_loss,
            "weight": weight,
            "tokens": int(tokens),
            "method_sums": method_sums,
            # This rank's counts only: summed over ranks when a record is written (`_record`).
            "local_input_tokens": local_inputs,
            "local_flops": self._flops.step(lengths),
            "grad_norm": grad_norm,
            "skipped": skipped,
            "nonfinite": nonfinite,
        }

    @staticmethod
    def _to_host(values: torch.Tensor) -> list[float]:
        """The step's device→host copy (one `.tolist()` of a few numbers); a seam for counting syncs."""
        return values.tolist()

    def _handle_nonfinite(self, out: dict, rows: list[list[int]]) -> None:
        """Apply train.nonfinite: skip (count; stop after too many in a row) or abort (diagnostics, stop)."""
        t, state = self.c.recipe.train, self.state
        if not out["nonfinite"]:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        where = f"step {state.step}: loss {out['loss_sum']}, grad_norm {out['grad_norm']}"
        log.warning("non-finite %s; update skipped (%d so far)", where, state.nonfinite_steps)
        if t.nonfinite == "abort" or state.nonfinite_in_a_row > t.max_nonfinite_in_a_row:
            path = self.c.output_dir / f"nonfinite-step-{state.step}.json"
            if self.acc.is_main_process:
                diag = {
                    "step": state.step,
                    "loss_sum": str(out["loss_sum"]),
                    "grad_norm": str(out["grad_norm"]),
                    "in_a_row": state.nonfinite_in_a_row,
                    "lr": self.c.scheduler.get_last_lr(),
                    "rank0_rows": rows,
                }
                path.write_text(json.dumps(diag, indent=2))
            raise TrainingDiverged(
                f"non-finite loss or gradient at {where} ({state.nonfinite_in_a_row} in a row, "
                f"train.nonfinite={t.nonfinite}); diagnostics in {path}. Lower train.lr, check the data rows "
                "listed there, or use mixed_precision bf16 instead of fp16"
            )

    # --- eval ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The method's loss (for sft token-weighted, with perplexity) and metrics over the eval set, by rank.

        In the model's eval mode (no dropout) and without autograd (no graph, no gradients kept), with
        `train.eval_micro_batch_size` rows per forward (default: the training micro-batch).
        """
        data, acc, model, method = self.c.eval_data, self.acc, self.c.model, self.method
        t = self.c.recipe.train
        mb = t.eval_micro_batch_size or t.micro_batch_size
        n_batches = math.ceil(len(data) / mb)
        per_rank = math.ceil(n_batches / acc.num_processes)
        model.eval()
        # [loss, weight, *metric sums], on the device: no copy per batch.
        totals = torch.zeros(2 + len(method.metric_names), device=acc.device, dtype=torch.float64)
        for k in range(per_rank):
            b = k * acc.num_processes + acc.process_index
            # Ranks past the end still run a forward (weight 0) so sharded models gather parameters in step.
            real = b < n_batches
            rows = list(range(b * mb, min((b + 1) * mb, len(data)))) if real else [0]
            batch = collate(self.c.eval_collator or self.c.train_collator, data, rows)
            batch = method.prepare(self.state.step, [batch], training=False)[0]
            weight = method.weight(batch)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            loss, extra = method.loss_sum(batch)
            if real:
                totals += torch.cat(
                    [loss.detach().double()[None], totals.new_tensor([weight]), extra.to(totals)]
                )
        model.train()
        loss_sum, weight, *sums = self._to_host(acc.reduce(totals, "sum"))
        loss = loss_sum / max(weight, 1.0)
        summary = method.summarise(loss, dict(zip(method.metric_names, sums, strict=True)), weight, eval=True)
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in summary.items()}}

    # --- the loop ------------------------------------------------------------------------------------

    def resume(self, path) -> None:
        """Restore the model, optimizer, schedule, counters and RNGs from a complete checkpoint."""
        c, state, total = self.c, self.state, self.state.total_steps
        c.checkpoints.load(path, c.model, c.optimizer, c.scheduler, state)
        if state.global_batch != self.sampler.global_batch:
            log.warning(
                "resuming with global batch %d (checkpoint used %d): the data order differs from the original",
                self.sampler.global_batch,
                state.global_batch,
            )
        if state.data_layout and state.data_layout != layout(c.recipe):
            log.warning(
                "resuming with %s (checkpoint used %s): the data order differs from the original",
                layout(c.recipe),
                state.data_layout,
            )
        state.global_batch, state.total_steps = self.sampler.global_batch, total
        state.data_layout = layout(c.recipe)
        log.info("resumed from %s at step %d", path, state.step)

    def fit(self) -> dict:
        """Train from the current step (0, or where `resume` left it) to the last, checkpointing on the way."""
        c, acc, t, state = self.c, self.acc, self.c.recipe.train, self.state
        total = state.total_steps
        c.metrics.rewind(state.step)
        if c.samples is not None:
            c.samples.rewind(state.step)

        c.model.train()
        every, final = c.recipe.checkpoint.every, {}
        stopping = t.early_stopping is not None  # a run it stopped stays stopped when run again
        bar = tqdm(
            total=total, initial=state.step, desc="train", disable=not acc.is_main_process, dynamic_ncols=True
        )
        window = self._new_window()
        steps = iter(self._steps(state.step, total))
        with StopWatcher(c.output_dir) as stop:
            self._stop = stop
            while state.step < total and not (stopping and state.stopped_early):
                waiting = time.perf_counter()
                rows, batches = next(steps)
                window["data_wait"] += time.perf_counter() - waiting
                if isinstance(batches, DataError):
                    raise batches
                state.bad_rows += sum(int(b.pop("bad_rows", 0)) for b in batches)  # on the CPU: no sync
                out = self.train_step(batches)  # host batches: it counts tokens before moving them
                state.step += 1
                self._handle_nonfinite(out, rows)
                state.trained_tokens += out["tokens"]
                state.skipped_steps += int(out["skipped"])
                for key in ("loss_sum", "weight", "tokens", "local_input_tokens", "local_flops"):
                    window[key] += out[key]
                sums = zip(window["method_sums"], out["method_sums"], strict=True)
                window["method_sums"] = [a + b for a, b in sums]
                bar.update(1)

                record = None
                if state.step % t.log_every == 0 or state.step == total:
                    record = self._record(out, window)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    window = self._new_window()
                paused = time.perf_counter()  # eval and checkpoints are not training throughput
                best = False
                if c.eval_data is not None and (
                    (t.eval_every and state.step % t.eval_every == 0) or state.step == total
                ):
                    record, best = self._evaluate_into(record)
                if record is not None:
                    c.metrics.log(record)
                    final.update(record)
                saved = every and state.step % every == 0 and state.step < total
                # checkpoint.keep_best: the best weights are on disk whatever the checkpoint schedule.
                saved = saved or (best and c.recipe.checkpoint.keep_best and state.step < total)
                if saved:
                    c.checkpoints.save(state.step, c.model, c.optimizer, c.scheduler, state)
                window["start"] += time.perf_counter() - paused
                if stopping and state.stopped_early:
                    log.info("early stopping at step %d: %s", state.step, state.stopped_early)
                    break  # done, not preempted: the final checkpoint and the adapter follow, as at the last step
                if state.step < total and self._stop_agreed:
                    if not saved:
                        c.checkpoints.save(state.step, c.model, c.optimizer, c.scheduler, state)
                    stop.clear(acc)
                    bar.close()
                    raise Preempted(state.step, stop.reason or "another rank was asked to stop")
        self._stop = None
        bar.close()
        latest = c.checkpoints.latest()
        if total > 0 and (latest is None or step_of(latest) != state.step):
            c.checkpoints.save(state.step, c.model, c.optimizer, c.scheduler, state)
        return final

    def _evaluate_into(self, record: dict | None) -> tuple[dict, bool]:
        """Evaluate, judge the loss (best so far, early stopping) and add both to this step's record."""
        record = {**(record or {"step": self.state.step}), **self.evaluate()}
        if self.c.samples is not None:
            self.c.samples.write(self.c.model, self.state.step, self._dtype)
        best = judge_eval(self.state, record["eval_loss"], self.c.recipe.train.early_stopping)
        record.update(best_eval_loss=self.state.best_eval_loss, best_step=self.state.best_step)
        if self.state.stopped_early:
            record.update(early_stopped=True, stop_reason=self.state.stopped_early)
        return record, best

    def _steps(self, start: int, total: int):
        """(rows, collated micro-batches) of steps start..total-1, from `data.num_workers` processes or this one."""
        d = self.c.recipe.data
        steps = StepBatches(
            self.sampler, self.c.train_data, self.c.train_collator, self.acc.process_index, start, total
        )
        if d.num_workers == 0:
            return (steps[i] for i in range(len(steps)))
        # Items are whole steps, a pure function of the step number, so the order and resume stay exact.
        return torch.utils.data.DataLoader(
            steps,
            batch_size=None,
            shuffle=False,
            num_workers=d.num_workers,
            prefetch_factor=d.prefetch_factor,
            persistent_workers=False,
            pin_memory=self.acc.device.type == "cuda",
        )

    def _new_window(self) -> dict:
        return {
            "loss_sum": 0.0, "weight": 0.0, "tokens": 0, "local_input_tokens": 0, "local_flops": 0.0,
            "data_wait": 0.0, "method_sums": [0.0] * len(self.method.metric_names), "start": time.perf_counter(),
        }  # fmt: skip

    def _record(self, out: dict, window: dict) -> dict:
        """The metrics record of the window that ends at this step (a collective: every rank calls it)."""
        # Input tokens and FLOPs are summed over ranks here, once per record rather than once per step.
        local = torch.tensor([window["local_input_tokens"], window["local_flops"]], dtype=torch.float64)
        inputs, flops = self._to_host(self.acc.reduce(local.to(self.acc.device), "sum"))
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        state = self.state
        record = {
            "step": state.step,
            "epoch": round(state.step / self.sampler.steps_per_epoch, 4),
            "loss": (loss := window["loss_sum"] / max(window["weight"], 1)),
            "lr": self.c.scheduler.get_last_lr()[0],
            "grad_norm": out["grad_norm"],
            "trained_tokens": state.trained_tokens,
            "tokens_per_sec": inputs / elapsed,
            "trained_tokens_per_sec": window["tokens"] / elapsed,
            "peak_mem_mb": round(peak_memory_mb(self.acc.device), 1),
            # Share of the time spent waiting for batches (sampling + collating): near 0 when data keeps up.
            "data_wait_frac": round(window["data_wait"] / elapsed, 4),
            "skipped_steps": state.skipped_steps,
            "bad_rows": state.bad_rows,
            "nonfinite_steps": state.nonfinite_steps,
        }
        sums = dict(zip(self.method.metric_names, window["method_sums"], strict=True))
        record.update(self.method.summarise(loss, sums, window["weight"], eval=False))
        if (
            self.sampler.costs is not None
        ):  # several processes: the logged step's work per rank, from the sampler
            loads = self.sampler.rank_loads(state.step - 1)
            record["rank_imbalance"] = round(max(loads) * len(loads) / max(sum(loads), 1), 4)
        if self._peak_flops:  # a known GPU, or $VLMTUNE_PEAK_TFLOPS
            record["mfu"] = flops / elapsed / (self._peak_flops * self.acc.num_processes)
        return record
