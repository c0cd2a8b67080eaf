"""App. A's loss filter, measured: L(D) on the fixed G sample before and after the update that follows a checkpoint.

App. A says "manually filter out training steps with decreased L when computing G", motivated by "during some
training steps, loss values may increase, where a probed negative G may better indicate that the PO objective is
contributive". Decision: the G figures keep only the checkpoints whose update decreased L(D) and leave out those
whose update increased it (`analysis.exclude_loss_increase`, on by default: the paper applied it). "Filter out" is
read as "select"; read either way, the sentence and its motivation agree on what is excluded: the steps where L
rose. Comparing logged training losses 1000 steps apart cannot tell what one update did; this callback measures
it. At every saved step N but the last, it evaluates the run's loss on the `analysis.n_pairs` pairs
of the G sample at θ_N, lets the optimizer take step N+1, evaluates again at θ_{N+1}, and writes
`checkpoints/step-N/loss_check.json` = {"before", "after", "measured_on", ...}.

L is the algorithm's own loss (DPO's Eq. 4, cDPO's Eq. 32 with its λ at step N, the λ of update N+1), the same at
both ends, in eval mode (no dropout), under the training's autocast. Ablations (w/o NEG, w/o POS) descend a masked
surrogate that has no loss value of its own: their check measures the algorithm's loss all the same.

The reference log-probs of the sample are TRL's, computed when the trainer is built (the sample is its
`eval_dataset`): the model is the start model θ_0 then, also in a resumed run (the checkpoint is loaded later).
Multi-process: each rank evaluates its share (ranks r, r+W, ...; padded so every rank runs the same number of
forwards, as ZeRO-3 needs) and the sums are all-reduced. A run resumed from step-N whose file is missing measures
"before" at the start, so the file is written all the same.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import distributed
from ..atomic import write_json

log = logging.getLogger(__name__)
LOSS_CHECK = "loss_check.json"


def read_loss_check(folder: Path) -> dict | None:
    path = Path(folder) / LOSS_CHECK
    return json.loads(path.read_text()) if path.exists() else None


def rank_share(n: int, rank: int, world: int) -> list[int | None]:
    """This rank's rows of a sample of n: r, r + W, ..., padded with None to ceil(n / W) (equal forward counts)."""
    rows: list[int | None] = list(range(rank, n, world))
    return rows + [None] * (-(-n // world) - len(rows))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class LossCheck(TrainerCallback):
    """Writes `loss_check.json` into each checkpoint but the final one (see the module's doc). `bind(trainer)`
    after building the trainer: it needs the trainer's model, collator and the sample (its `eval_dataset`)."""

    def __init__(self, checkpoint_root: Path, batch_size: int, measured_on: str):
        self.root = Path(checkpoint_root)
        self.batch_size = batch_size
        self.measured_on = measured_on
        self.trainer = None
        self.pending: tuple[int, float] | None = None  # (checkpoint step N, L at θ_N)
        self.seconds = 0.0  # time spent measuring (reported by the overhead benchmark)

    def bind(self, trainer) -> "LossCheck":
        if trainer.eval_dataset is None:
            raise ValueError("LossCheck needs the G sample as the trainer's eval_dataset")
        self.trainer = trainer
        return self

    @torch.no_grad()
    def sample_loss(self, step: int) -> float:
        """Mean over the sample of the algorithm's per-pair loss at the current weights, its schedule at `step`."""
        import time

        started = time.perf_counter()
        t = self.trainer
        data = t.eval_dataset
        share = rank_share(len(data), distributed.rank(), distributed.world())
        model = t.model_wrapped
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=t.accelerator.device)
        for start in range(0, len(share), self.batch_size):
            rows = share[start:start + self.batch_size]
            weight = torch.tensor([r is not None for r in rows], dtype=torch.float64, device=total.device)
            batch = t._prepare_inputs(t.data_collator([data[r if r is not None else 0] for r in rows]))
            with t.compute_loss_context_manager():
                losses = t.pair_losses(model, batch, step)
            total += torch.stack([(losses.double() * weight).sum(), weight.sum()])
        model.train(was_training)
        total = _all_reduce(total)
        self.seconds += time.perf_counter() - started
        return (total[0] / total[1]).item()

    def _write(self, step: int, before: float, after: float) -> None:
        folder = self.root / f"step-{step}"
        if not distributed.is_main():
            return
        if not folder.is_dir():
            log.warning("loss check of step %d: no checkpoint folder %s", step, folder)
            return
        record = {"before": before, "after": after, "measured_on": self.measured_on, "step": step,
                  "objective_step": step, "increased": after > before}
        write_json(folder / LOSS_CHECK, record, indent=2)
        log.info("loss check, update %d -> %d: L %.6g -> %.6g%s", step, step + 1, before, after,
                 " (increased)" if after > before else "")

    def on_train_begin(self, args, state, control, **kwargs):
        """A run resumed from step-N whose update N+1 was not measured yet: measure L at θ_N now."""
        step = state.global_step
        if step == 0 or step >= state.max_steps:
            return
        folder = self.root / f"step-{step}"
        missing = distributed.broadcast(distributed.is_main() and folder.is_dir()
                                        and not (folder / LOSS_CHECK).exists())
        if missing:
            self.pending = (step, self.sample_loss(step))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.pending is not None and step == self.pending[0] + 1:
            saved, before = self.pending
            self._write(saved, before, self.sample_loss(saved))
            self.pending = None
        # the Trainer saves a checkpoint after this step (DefaultFlowCallback ran first); the last has no next update
        if control.should_save and step < state.max_steps:
            self.pending = (step, self.sample_loss(step))
