"""`controller=g_balance`: an objective's lambda set in closed loop from G measured during training.

The paper (App. E) found cDPO best when positive learning comes first and negative learning is brought in later,
but not so far that it dominates: its t1/t2 were tuned per model. Here the move is decided by measurement.
What lambda weighs (`controllers.measured`): cDPO and the controlled schedule on any pairwise objective: NEG
(Eq. 32: (1 - lambda) on y+, lambda on y-), compared with POS; hPPO: the A < 0 tokens (Eq. 35's lambda, here in
[0, 1] instead of the sine's [1 - tau, 1]), compared with POS; cPPO-top / -mid: the top / middle third (Eq. 33,
34's lambda), compared with the other tokens (REST). Below, "NEG" and "POS" stand for that pair.

Proxy target. The CURRENT model's greedy answers y' to `n_questions` held-out questions x' (the embedded task:
held-out prompts after the first `data.n_heldout`, so disjoint from the win-rate prompts by position; the paper's
data: the last rows of `data.questions`, disjoint from D' and from HH win-rate prompts while n_prompts +
n_questions <= rows), regenerated every `refresh` estimates: g' = E[-grad log pi(y'|x')].

Measurement. Every `every` optimizer steps (first at step 0), on the training mini-batch of that step (the pairs
the update is about to use: no extra forward, the loss's own graph; policy gradient: the first micro-batch of the
update's rollout at the rollout's policy, ratio 1), G_c = g' . grad L_c for c = POS and NEG with the UNSCHEDULED
weights (omega on both sides; the objective's own weights for the controlled schedule; weight 1 on every token for
the policy-gradient family), so G_NEG is measurable while lambda is 0. Both by torch.autograd.grad on the trainable parameters: the trainer's .grad is never
touched. To first order an update along -grad L_c changes log pi(y') by lr * G_c: G_NEG >= 0 means negative
learning does not lower the likelihood of what the model now answers.

Law (no per-run tuning; every constant is a fraction of the run):
    P_k, N_k = EMAs over estimates of G_POS and G_NEG  (weight `smoothing` on the newest; P_1 = G_POS_1, ...)
    lambda*_k = the most negative learning whose scheduled update does not lower the proxy to first order:
                the largest lambda in [0, lambda_max] with (1 - lambda) P_k + lambda N_k >= 0, i.e.
                lambda_max           where N_k >= 0          (negative learning does not hurt the proxy),
                P_k / (P_k - N_k)    where N_k < 0 < P_k     (the balance: the two effects cancel),
                0                    where both are <= 0     (nothing to balance: supervised learning only)
    step  = every / (ramp * total_steps)                (lambda can cross [0, 1] in `ramp` of the run, no faster)
    lambda_k = lambda_{k-1} + clip(lambda*_k - lambda_{k-1}, -step, step)
lambda starts at `lambda_init` (0: supervised learning first) and follows the balance point at a bounded pace, so
negative learning is brought in as far as it stops hurting the current answers, and taken back when it does.
DPO's own balance is lambda = 1/2 (w+ = w- = omega): where DPO's net G on the proxy is positive the balance point
lies beyond it (more negative learning than DPO), where it is negative, short of it. The lambda set at an estimate
is used from that step's update until the next estimate.

Outputs: `controller.csv` in the run dir (step, lambda, G_POS, G_NEG, lambda_target, seconds, refreshed), written
atomically after each estimate; `controller/*` in the trainer's logs (W&B); `figures/controller.png`;
`controller.json` (seconds spent, training seconds, overhead = their ratio), read into summary.json. The state
(lambda, EMA, last estimated step, the rows, the proxy answers) is saved in each checkpoint folder
(`controller_state.json`) and restored on resume, so a resumed run continues the same law.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..atomic import write_csv, write_json
from ..objectives import objective_of
from ..objectives.pairwise import Decomposition, PairTerms, coefficients, coverage, thirds_of
from . import measured, register_controller

log = logging.getLogger(__name__)
STATE_FILE = "controller_state.json"
CSV = "controller.csv"
SUMMARY = "controller.json"


# ------------------------------------------------------------------------------------------------ the law


@dataclass(frozen=True)
class Law:
    every: int
    ramp: float
    smoothing: float
    lambda_max: float

    @classmethod
    def of(cls, c) -> Law:
        return cls(c.every, c.ramp, c.smoothing, c.lambda_max)

    def step_bound(self, total_steps: int) -> float:
        """The largest move of lambda per estimate: `ramp` of the run's steps cross [0, 1]."""
        return min(1.0, self.every / max(self.ramp * max(total_steps, 1), 1e-12))


def balance_point(g_pos: float, g_neg: float, lambda_max: float) -> float:
    """The largest lambda in [0, lambda_max] with (1 - lambda) G_POS + lambda G_NEG >= 0 (0 where no lambda has it)."""
    if g_neg >= 0:
        return lambda_max
    if g_pos <= 0:
        return 0.0
    return min(g_pos / (g_pos - g_neg), lambda_max)


def next_lambda(lam: float, ema: list | None, g_pos: float, g_neg: float, law: Law,
                total_steps: int) -> tuple[float, list, float]:
    """(lambda, [EMA of G_POS, EMA of G_NEG], the balance point lambda*) after one estimate (the module
    docstring's law)."""
    a = law.smoothing
    ema = [g_pos, g_neg] if ema is None else [(1 - a) * ema[0] + a * g_pos, (1 - a) * ema[1] + a * g_neg]
    target = balance_point(ema[0], ema[1], law.lambda_max)
    bound = law.step_bound(total_steps)
    return lam + min(max(target - lam, -bound), bound), ema, target


# ------------------------------------------------------------------------------------------------ measurement


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def proxy_gradient(model, batches) -> list[torch.Tensor]:
    """g' = E[-grad log pi(y'|x')] over the proxy sequences, per trainable parameter, by torch.autograd.grad (the
    parameters' .grad untouched)."""
    from ..analysis.gradients import sequence_logps

    params = [p for _, p in trainable(model)]
    device = params[0].device
    total, count = [torch.zeros_like(p) for p in params], 0
    for ids, mask, comp in batches:
        nll = -sequence_logps(model, ids.to(device), mask.to(device), comp.to(device)).sum()
        for acc, g in zip(total, torch.autograd.grad(nll, params, allow_unused=True)):
            if g is not None:
                acc.add_(g)
        count += len(ids)
    return [t.div_(max(count, 1)) for t in total]


def unscheduled(t: PairTerms, algo) -> Decomposition:
    """The objective's weights without the balance: the controlled schedule only scales the sides, so the
    objective's own function is unscheduled; cDPO's weights are omega (1 - lambda) and omega lambda and it ranks
    omega on both sides (Eq. 32's gradient), so omega is its unscheduled weight on either side."""
    spec = objective_of(algo)
    d = spec.fn(t, algo)
    if not spec.schedules_itself:
        return d
    return Decomposition(d.loss, d.rank_pos, d.rank_neg, d.rank_pos, d.rank_neg, d.extras, d.scalars)


def component_losses(t: PairTerms, algo, components=("POS", "NEG")) -> dict[str, torch.Tensor]:
    """Per component, a scalar whose gradient is that component's (unscheduled) loss gradient on this batch: the
    trainer's surrogate mean(c+ log pi(y+) + c- log pi(y-)) restricted to the component."""
    d = unscheduled(t, algo)
    th = thirds_of(d)
    out = {}
    for c in components:
        c_pos, c_neg = coefficients(d, coverage([c], [], th, d.extras))
        out[c] = (c_pos * t.chosen + c_neg * t.rejected).mean()
    return out


def alignment(model, losses: dict[str, torch.Tensor], g: list[torch.Tensor]) -> dict[str, float]:
    """G_c = g' . grad L_c (float64 sums), each gradient by torch.autograd.grad, the graph kept for the update."""
    params = [p for _, p in trainable(model)]
    out = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[name] = float(sum((gp.double() * gr.double()).sum() for gp, gr in zip(g, grads) if gr is not None))
    return out


def mean_over_ranks(G: dict[str, float]) -> dict[str, float]:
    """A multi-process job: each rank measured its own micro-batch against the same proxy (the same weights and
    greedy answers), so the mean over ranks is the global batch's G and every rank sets the same lambda."""
    from .. import distributed

    if distributed.world() == 1 or not torch.distributed.is_initialized():
        return G
    values = torch.tensor([G[k] for k in G], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(values)
    return {k: float(v) / distributed.world() for k, v in zip(G, values)}


def proxy_prompts(cfg, tokenizer, n: int) -> list[str]:
    """`n` held-out questions the win rate is not judged on (see the module docstring)."""
    from ..models import chat_template_text
    from ..tasks import task_of

    if task_of(cfg).embedded:
        from ..data.synthetic import DictionaryTask

        skip = cfg.data.n_heldout  # the win-rate prompts are the first n_heldout (eval.n_prompts of them)
        return DictionaryTask.from_config(cfg.data).heldout_prompts(skip + n)[skip:]
    from ..data.paper import load_questions

    rows = load_questions(cfg.data, tokenizer)
    turns = rows.select(range(max(len(rows) - n, 0), len(rows)))["prompt"]
    return [chat_template_text(tokenizer, t, add_generation_prompt=True) for t in turns]


# ------------------------------------------------------------------------------------------------ the controller


@dataclass
class ControllerState:
    lam: float
    ema: list | None = None  # [EMA of G_POS, EMA of G_NEG]
    last_step: int | None = None  # the optimizer step of the last estimate
    estimates: int = 0
    seconds: float = 0.0  # spent estimating (and answering the proxy questions)
    train_seconds: float = 0.0  # training wall time before this process (a resumed run's earlier part)
    rows: list = field(default_factory=list)
    answers: list | None = None  # the proxy answers in use


@register_controller("g_balance")
class GBalance:
    """The g_balance loop (module docstring). The pairwise trainer calls `before_update(model, terms, algo,
    total_steps)` on each training mini-batch, the policy-gradient one `measure(policy, losses, step, total)` before
    each update, and both use `lam`; `save(folder)` / `restore(folder)` carry its state over
    checkpoints; `finish()` writes controller.csv, the figure and controller.json."""

    def __init__(self, cfg, tokenizer, run_dir):
        c = cfg.controller
        self.cfg, self.tokenizer, self.run_dir = cfg, tokenizer, Path(run_dir)
        self.law = Law.of(c)
        self.controlled, self.reference = measured(cfg.algo)  # lambda weighs the first; G of both is measured
        self.n_questions, self.refresh = c.n_questions, c.refresh
        self.max_new_tokens = min(int(cfg.data.max_new_tokens), int(c.max_new_tokens))
        self.state = ControllerState(lam=float(c.lambda_init))
        self.prompts: list[str] | None = None
        self.started = time.monotonic()
        log.info("controller g_balance: lambda from G_POS / G_NEG every %d steps (lambda_init %.2f); it replaces "
                 "algo.t1/t2%s", c.every, c.lambda_init,
                 f" ({cfg.algo.get('t1')}, {cfg.algo.get('t2')})" if cfg.algo.get("t1") is not None else "")

    @property
    def lam(self) -> float:
        return self.state.lam

    def due(self, step: int) -> bool:
        return step % self.law.every == 0 and step != self.state.last_step

    # -------------------------------------------------------------------------------------------- proxy
    def proxy_batches(self, model, batch_size: int = 16):
        from ..analysis.gradients import encode
        from ..generation.local import generate
        from ..tasks import task_of

        refreshed = self.state.answers is None or self.state.estimates % self.refresh == 0
        if self.prompts is None:
            self.prompts = proxy_prompts(self.cfg, self.tokenizer, self.n_questions)
        if refreshed:
            was_training, side = model.training, self.tokenizer.padding_side
            try:
                answers = generate(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                   batch_size=batch_size, desc="controller proxy answers")
            finally:
                model.train(was_training)
                self.tokenizer.padding_side = side
            self.state.answers = [task_of(self.cfg).dprime_response(a) for a in answers]
        answers = self.state.answers
        return refreshed, [encode(self.tokenizer, self.prompts[i:i + batch_size], answers[i:i + batch_size])
                           for i in range(0, len(answers), batch_size)]

    # -------------------------------------------------------------------------------------------- the loop
    def before_update(self, model, terms: PairTerms, algo, total_steps: int) -> dict | None:
        """Pairwise family, at a due step: G of POS and NEG on this mini-batch (unscheduled weights, at the lambda
        in use: cDPO's omega depends on it), then lambda moves; returns the row (else None)."""
        def losses():
            terms.lam = self.state.lam
            return component_losses(terms, algo, (self.reference, self.controlled))
        return self.measure(model, losses, int(terms.step), total_steps)

    def measure(self, model, losses, step: int, total_steps: int) -> dict | None:
        """At a due step: g' on the proxy, G = g' . grad L_c for the two components of `losses()` ({name: scalar
        whose gradient is the component's, unscheduled}), the law; returns the row (else None)."""
        if not self.due(step):
            return None
        started = time.perf_counter()
        refreshed, batches = self.proxy_batches(model)
        g = proxy_gradient(model, batches)
        G = mean_over_ranks(alignment(model, losses(), g))  # every rank: one lambda
        ref, ctl = G[self.reference], G[self.controlled]
        lam, ema, target = next_lambda(self.state.lam, self.state.ema, ref, ctl, self.law, total_steps)
        seconds = time.perf_counter() - started
        row = {"step": step, "lambda_before": self.state.lam, "lambda": lam, f"G_{self.reference}": ref,
               f"G_{self.controlled}": ctl, "lambda_target": target, "refreshed": refreshed,
               "seconds": round(seconds, 4)}
        self.state = ControllerState(lam, ema, step, self.state.estimates + 1, self.state.seconds + seconds,
                                     self.state.train_seconds, [*self.state.rows, row], self.state.answers)
        write_csv(self.run_dir / CSV, pd.DataFrame(self.state.rows))
        return row

    # -------------------------------------------------------------------------------------------- state
    def save(self, folder: Path) -> None:
        state = asdict(self.state)
        state["train_seconds"] = self.state.train_seconds + (time.monotonic() - self.started)
        write_json(Path(folder) / STATE_FILE, state)

    def restore(self, folder: Path) -> bool:
        path = Path(folder) / STATE_FILE
        if not path.exists():
            log.warning("no %s in %s: the controller starts again from lambda_init", STATE_FILE, folder)
            return False
        self.state = ControllerState(**json.loads(path.read_text()))
        self.started = time.monotonic()
        log.info("controller state restored from %s: lambda %.3f (last estimate at step %s)", folder,
                 self.state.lam, self.state.last_step)
        return True

    def start(self) -> None:
        """The training loop starts now (the stage calls it right before trainer.train): the overhead's denominator."""
        self.started = time.monotonic()

    def finish(self) -> dict:
        """controller.csv, figures/controller.png and controller.json (overhead: seconds / training seconds, the
        training measured from `start()` (trainer.train, estimates included), plus the time before a resume)."""
        total = self.state.train_seconds + (time.monotonic() - self.started)
        info = {"controller": "g_balance", "estimates": self.state.estimates, "final_lambda": self.state.lam,
                "seconds": round(self.state.seconds, 2), "train_seconds": round(total, 2),
                "overhead": round(self.state.seconds / total, 4) if total > 0 else None}
        frame = pd.DataFrame(self.state.rows)
        write_csv(self.run_dir / CSV, frame)
        if not frame.empty:
            from ..reporting.controller import run_figure

            figure = self.run_dir / "figures" / "controller.png"
            figure.parent.mkdir(parents=True, exist_ok=True)
            run_figure(frame, f"g_balance: lambda and G (overhead {info['overhead']:.1%})").savefig(
                figure, dpi=110, bbox_inches="tight")
        write_json(self.run_dir / SUMMARY, info)
        log.info("controller: %d estimates, %.1f s of %.1f s training (overhead %.1f%%), final lambda %.3f",
                 info["estimates"], info["seconds"], total, 100 * (info["overhead"] or 0), self.state.lam)
        return info


def lambda_in_force(run_dir: Path, step: int, lambda_init: float) -> float:
    """The lambda the update after optimizer step `step` used: the one set by the last estimate at a step <= `step`
    (an estimate at step s comes before update s + 1), or `lambda_init` before the first (controller.csv)."""
    path = Path(run_dir) / CSV
    if not path.exists():
        raise FileNotFoundError(f"{path}: a controller run's G needs the lambda it trained with (controller.csv)")
    rows = pd.read_csv(path)
    rows = rows[rows["step"] <= step]
    return float(rows["lambda"].iloc[-1]) if len(rows) else float(lambda_init)


def controller_summary(run_dir: Path) -> dict:
    """summary.json's controller entries: `controller_overhead` (and the rest of controller.json), or {}."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return {}
    info = json.loads(path.read_text())
    return {"controller": info.get("controller"), "controller_overhead": info.get("overhead"),
            "controller_seconds": info.get("seconds"), "controller_final_lambda": info.get("final_lambda")}
