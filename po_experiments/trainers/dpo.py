"""`ComponentDPOTrainer`: TRL's DPOTrainer with the paper's decomposition as the training objective.

TRL keeps data preparation, the reference model (or precomputed reference log-probs), the Trainer loop,
checkpointing and DeepSpeed; we replace only the loss: per-pair sequence log-probs go through a registered
pairwise objective (dpo, cdpo, ipo, simpo, ...) and are masked by the active components (POS/NEG/TOP/MID/BOT and
the objective's own terms, minus what the ablation drops at this step). With a controller (controller=g_balance)
the objective's lambda is the controller's, set before the update from G measured on the same mini-batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOTrainer
from trl.trainer.utils import selective_log_softmax

from .ablations import ABLATIONS
from ..objectives import objective_of
from ..objectives.pairwise import PairTerms, build_pair_terms, coverage, objective, thirds_of
from ..objectives.pairwise_losses import decompose
from .resume import ExactResumeMixin


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence (token t is predicted by position t-1)."""
    token_logps = selective_log_softmax(logits[:, :-1], input_ids[:, 1:])
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


class ComponentDPOTrainer(ExactResumeMixin, DPOTrainer):
    def __init__(self, *args, algo, ablation, controller=None, **kwargs):
        self.spec = objective_of(algo)
        self.controller = controller  # None: the objective's own schedule (controllers/)
        if self.spec.family != "dpo":
            raise ValueError(f"objective {algo.name!r} is not pairwise (family {self.spec.family!r})")
        self.algo, self.ablation = algo, ablation
        self.drop_components = ABLATIONS[ablation.name]
        super().__init__(*args, **kwargs)
        if self.use_liger_kernel:
            raise ValueError("use_liger_kernel fuses TRL's own loss; the component objective needs the log-probs")

    # ----------------------------------------------------------------------------------------- loss
    def pair_terms(self, model, inputs) -> PairTerms:
        """Policy and reference sequence log-probs for a collated batch ([chosen; rejected] along the batch)."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logps = sequence_logps(outputs.logits, inputs["input_ids"], inputs["completion_mask"])
        chosen, rejected = logps.chunk(2, dim=0)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        completion = inputs["completion_mask"][:, 1:]  # the tokens sequence_logps sums
        chosen_completion, rejected_completion = completion.chunk(2, dim=0)
        return build_pair_terms(chosen, rejected, ref_chosen, ref_rejected, step=self.state.global_step,
                                chosen_ids=inputs["input_ids"][:, 1:].chunk(2, dim=0)[0],
                                chosen_completion=chosen_completion, rejected_completion=rejected_completion)

    def pair_losses(self, model, inputs, step: int) -> torch.Tensor:
        """Per-pair value of the objective's own loss with its schedule at optimizer step `step` (cDPO's λ): the L
        of App. A's loss check (`loss_check.LossCheck`)."""
        terms = self.pair_terms(model, inputs)
        terms.step = step
        if self.controller is not None:
            terms.lam = self.controller.lam  # the lambda of the next update
        return decompose(terms, self.algo).loss

    def _compute_loss(self, model, inputs, return_outputs):
        terms = self.pair_terms(model, inputs)
        if self.controller is not None:
            self._control(model, terms)
        decomposition = decompose(terms, self.algo)
        dropped = self.drop_components(terms.step, self.ablation)
        covered = coverage(self.algo.components, dropped, thirds_of(decomposition), decomposition.extras)
        loss = objective(decomposition, terms, covered)
        self._record_metrics(terms, decomposition, covered)
        return (loss, None) if return_outputs else loss

    def _control(self, model, terms: PairTerms) -> None:
        """The controller's lambda on this batch; at its due steps (first micro-batch of the update, training mode)
        it first measures G on the batch's own graph and moves lambda."""
        if model.training:
            row = self.controller.before_update(self.accelerator.unwrap_model(model), terms, self.algo,
                                                self.state.max_steps)
            if row is not None:
                m = self._metrics["train"]
                for key in (k for k in row if k.startswith("G_") or k in ("lambda_target", "seconds")):
                    m[f"controller/{key}"].append(row[key])
            self._metrics["train"]["controller/lambda"].append(self.controller.lam)
        terms.lam = self.controller.lam

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.controller is not None and self.is_world_process_zero():  # before StepCheckpoints renames it
            self.controller.save(Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}")

    # ----------------------------------------------------------------------------------------- logging
    @torch.no_grad()
    def _record_metrics(self, t: PairTerms, d, covered) -> None:
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        chosen_r = gather(self.algo.beta * (t.chosen - t.ref_chosen).detach())
        rejected_r = gather(self.algo.beta * (t.rejected - t.ref_rejected).detach())
        omega = gather(d.rank_by.detach()).float()
        q = torch.quantile(omega, torch.tensor([1 / 3, 2 / 3], device=omega.device))
        m = self._metrics[mode]
        m["rewards/chosen"].append(chosen_r.mean().item())
        m["rewards/rejected"].append(rejected_r.mean().item())
        m["rewards/margins"].append((chosen_r - rejected_r).mean().item())
        m["rewards/accuracies"].append((chosen_r > rejected_r).float().mean().item())
        m["logps/chosen"].append(gather(t.chosen.detach()).mean().item())
        m["logps/rejected"].append(gather(t.rejected.detach()).mean().item())
        m["omega/mean"].append(omega.mean().item())
        m["omega/q33"].append(q[0].item())
        m["omega/q67"].append(q[1].item())
        m["components/pos_share"].append(covered.pos.mean().item())
        m["components/neg_share"].append(covered.neg.mean().item())
        m["weights/pos_mean"].append(gather(d.w_pos.detach()).mean().item())
        m["weights/neg_mean"].append(gather(d.w_neg.detach()).mean().item())
        for key, value in d.scalars.items():
            m[key].append(value)
