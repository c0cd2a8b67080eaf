"""Time the gradient-alignment analysis of one checkpoint three ways, side by side in one process.

The same model (eval mode, eager attention, as the analysis stage loads it), the same D (DPO: `--pairs` pairs in
mini-batches of 4; PPO: a `--rollout`-sequence rollout in mini-batches of 6) and the same D' (`--dprime`
sequences in mini-batches of `--dprime-batch`, by default D's mini-batch size, as the stage batches it). Every
method starts from the parameters and ends with G over D, and every method includes the D' gradient pass
(`dprime_gradient`, the same call in all three):

  tot_only       the floor: one plain backward per D mini-batch of the TOT surrogate loss (DPO: coefficients from
                 `dpo_coefficients` on the mini-batch's own log-probs, which TOT needs nothing else for; PPO: from
                 `ppo_token_coefficients`), its gradient norm (what the IQR filter needs) and its dot with g'
                 (layer group `all` only); then `summarise` (IQR filter);
  full           what the analysis stage runs: DPO `dpo_alignment` with `--method` (auto: vmap up to
                 `--vmap-max-params` parameters, else ghost; vmap'd per-sequence gradients, or one backward with
                 hooks: 6 components x 4 layer groups and every component's norm); PPO `ppo_alignment` (one jvp per
                 layer group + one ghost pass per mini-batch, `--ppo-all-norms` one per component); then `summarise`;
  per_component  the naive way: one forward and one plain backward per component (6, skipping a component whose
                 coefficients are all zero in that mini-batch) per mini-batch, each gradient dotted with the 4
                 group-restricted g' columns; then `summarise`.

`--targets T` (2..5): the full method measures G against T targets in its one pass (analysis.targets: D', then
chosen / rejected = y+ / y- of the first `--n-target` pairs, sft = other answers to `--n-target` D' questions,
unrelated = those answers rotated by one; PPO and the pythia presets: random rows of the same shapes), its g' passes
included, while tot_only stays D' alone: the ratios full/tot_only (t_T / t_1) and per target t_T / (T t_1).

Repeats run interleaved (A B C A B C ...), after `--warmup` untimed rounds; `--methods` picks a subset (tot_only
and full are always run). Each method's peak resident memory above the process's before it (sampled every 5 ms)
is reported. `--compare-vmap` also runs the vmap path once (untimed) and reports the full method's largest
difference from it over every component x group G and every norm. All methods must agree on G(TOT, all):
the per-mini-batch values, the IQR outliers and the filtered / unfiltered means, measured relative to the scale
of the components (TOT is a small difference of the large POS and NEG terms, DESIGN 2c).

    python scripts/bench_alignment.py --family dpo --model tiny --pairs 500 --dprime 500 --threads 1
    python scripts/bench_alignment.py --family ppo --model tiny --rollout 64 --dprime 500 --threads 1
    python scripts/bench_alignment.py --family dpo --model pythia-160m --seq-len 256 --device cuda
    python scripts/bench_alignment.py --model tiny --pairs 64 --dprime 64 --method ghost --compare-vmap --threads 1
    python scripts/bench_alignment.py --model tiny --pairs 64 --dprime 64 --targets 5 --n-target 64 --threads 1
    python scripts/bench_alignment.py --model pythia-160m --pairs 4 --dprime 4 --seq-len 640 --dprime-len 512 \
        --methods tot_only full --repeats 1 --warmup 0 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere
from po_experiments.bench import cli, quartiles, write_results  # noqa: E402
from po_experiments.analysis.gradients import (  # noqa: E402
    DPO_COMPONENTS, MinibatchAlignment, _response_logps, choose_method, dpo_alignment, dpo_coefficients,
    dprime_gradient, encode, encode_pairs, layer_groups, ppo_alignment, ppo_token_coefficients, sequence_logps,
    summarise, target_gradients,
)
from po_experiments.data.synthetic import DictionaryTask  # noqa: E402
from po_experiments.models import DTYPES, build_tiny_model, build_word_tokenizer, set_threads  # noqa: E402
from po_experiments.trainers.ppo import Rollout  # noqa: E402
from po_experiments.objectives.policy_gradient import WEIGHTINGS  # noqa: E402

TARGET = 1.5  # full / tot_only (issue 12: the full analysis at <= 1.5x TOT-only G)
METHODS = ("tot_only", "full", "per_component")
EXCL_DPRIME = "full/tot_only excluding D'"
BATCH = {"dpo": 4, "ppo": 6}  # the analysis stage's mini-batch sizes (AnalysisConfig dpo/ppo_batch_size)
PYTHIA = {  # randomly initialised GPTNeoX of Pythia sizes: timing needs the shapes, not the weights
    "pythia-160m": (768, 12, 12, 3072), "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1b": (2048, 16, 8, 8192), "pythia-2.8b": (2560, 32, 32, 10240),
}
PYTHIA_VOCAB = 50304
PAD_ID, EOS_ID = 0, 1  # pythia presets: token ids are drawn directly, no tokenizer
DPO_ALGO = OmegaConf.create({"name": "dpo", "beta": 0.1})
PPO_ALGO = OmegaConf.create({"name": "ppo", "family": "ppo", "weighting": "ppo", "components": ["TOT"],
                             "lam": None, "t3": None, "tau": None})
STEP = 0  # the checkpoint's optimizer step (only schedules such as cDPO's lambda read it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="dpo", choices=["dpo", "ppo"])
    p.add_argument("--model", default="tiny", choices=["tiny", *PYTHIA])
    p.add_argument("--pairs", type=int, default=500, help="DPO: pairs in D (the paper: 500)")
    p.add_argument("--rollout", type=int, default=64, help="PPO: sequences in the rollout (tiny.yaml's PPO batch)")
    p.add_argument("--dprime", type=int, default=500, help="D' sequences (the paper: 500)")
    p.add_argument("--dprime-batch", type=int, default=0, help="D' mini-batch (0: D's, 4 DPO / 6 PPO, as the stage)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row for the pythia presets (tiny: task)")
    p.add_argument("--dprime-len", type=int, default=0, help="tokens per D' row for the pythia presets (0: --seq-len)")
    p.add_argument("--method", default="auto", choices=["auto", "vmap", "ghost", "jvp"],
                   help="DPO full method (analysis.method); auto picks by --vmap-max-params")
    p.add_argument("--vmap-max-params", type=float, default=2.0e7, help="auto: vmap up to this many parameters")
    p.add_argument("--ppo-all-norms", action="store_true", help="PPO full method: every component's norm")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="which methods to time (tot_only and full always run)")
    p.add_argument("--compare-vmap", action="store_true",
                   help="DPO: also run the vmap path once (untimed) and report the full method's difference")
    p.add_argument("--chunk", type=int, default=32,
                   help="sequences per vmap'd backward (DPO full method; whole mini-batches, as analysis.chunk)")
    p.add_argument("--targets", type=int, default=1, choices=range(1, 6),
                   help="targets of the full method (1: D' alone; 5: analysis.targets' default)")
    p.add_argument("--n-target", type=int, default=64, help="sequences per target other than D' (analysis.n_target)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of all three methods first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (no autocast)")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="attention for every method (vmap needs eager; ghost runs on sdpa in the stage)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = free cores")
    p.add_argument("--out", default=None, help="results file: .json or .csv")
    args = p.parse_args(argv)
    args.batch = BATCH[args.family]
    args.dprime_batch = args.dprime_batch or args.batch
    args.dprime_len = args.dprime_len or args.seq_len
    args.methods = [m for m in METHODS if m in {"tot_only", "full", *args.methods}]
    for key in ("pairs", "rollout", "dprime", "dprime_batch", "chunk", "repeats", "seq_len", "n_target"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ------------------------------------------------------------------------------------------ model and data
def build_model(name: str, seq_len: int):
    """(model, tokenizer or None, task or None): tiny = conf/model/tiny.yaml on the embedded task."""
    if name == "tiny":
        task = DictionaryTask.from_config()
        tok = build_word_tokenizer(task.words)
        model_cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml").model
        return build_tiny_model(model_cfg.arch, tok, seed=0), tok, task, model_cfg
    hidden, layers, heads, inter = PYTHIA[name]
    config = GPTNeoXConfig(vocab_size=PYTHIA_VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=inter, rotary_pct=0.25,
                           max_position_embeddings=max(2048, seq_len + 8), tie_word_embeddings=False,
                           bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config), None, None, OmegaConf.load(REPO / "conf" / "model" / "pythia.yaml").model


def random_rows(n: int, seq_len: int, rng) -> tuple[torch.Tensor, ...]:
    """Pythia presets: ids / mask / completion mask of rows of exactly seq_len tokens (second half + EOS)."""
    ids = torch.from_numpy(rng.integers(5, PYTHIA_VOCAB, size=(n, seq_len)))
    ids[:, -1] = EOS_ID
    comp = torch.zeros_like(ids)
    comp[:, seq_len // 2:] = 1
    return ids, torch.ones_like(ids), comp


def dpo_pairs(args, tok, task) -> dict[str, torch.Tensor]:
    """D: chosen_* / rejected_* tensors (tiny: two demonstrations per prompt, ordered by gold reward)."""
    if task is None:
        rng = np.random.default_rng(0)
        chosen, rejected = random_rows(args.pairs, args.seq_len, rng), random_rows(args.pairs, args.seq_len, rng)
        rejected[0][:, :args.seq_len // 2] = chosen[0][:, :args.seq_len // 2]  # one prompt per pair
        return {f"{side}_{k}": t for side, rows in (("chosen", chosen), ("rejected", rejected))
                for k, t in zip(("ids", "mask", "comp"), rows)}
    return encode_pairs(tok, task.ranked_demonstration_pairs(args.pairs, seed=0))


def dprime_set(args, tok, task) -> list[tuple[torch.Tensor, ...]]:
    """D' in mini-batches (tiny: held-out prompts with their right answers, encoded as the stage encodes them)."""
    n, b = args.dprime, args.dprime_batch
    if task is None:
        ids, mask, comp = random_rows(n, args.dprime_len, np.random.default_rng(1))
        return [(ids[i:i + b], mask[i:i + b], comp[i:i + b]) for i in range(0, n, b)]
    prompts = task.heldout_prompts(n)
    answers = [task.completion_text(task.parse_prompt(p)) for p in prompts]
    return [encode(tok, prompts[i:i + b], answers[i:i + b]) for i in range(0, n, b)]


TARGET_NAMES = ("dprime", "chosen", "rejected", "sft", "unrelated")


def target_sets(args, tok, task, dprime) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """The full method's targets: D' and the first `--targets` - 1 others (see the module doc), in D' mini-batches."""
    n, b = args.n_target, args.dprime_batch
    out = {"dprime": dprime}
    if task is None:
        rng = np.random.default_rng(2)
        for name in TARGET_NAMES[1:args.targets]:
            ids, mask, comp = random_rows(n, args.dprime_len, rng)
            out[name] = [(ids[i:i + b], mask[i:i + b], comp[i:i + b]) for i in range(0, n, b)]
        return out
    pairs = task.ranked_demonstration_pairs(n, seed=1)
    prompts = task.heldout_prompts(n)
    other = [task.completion_text(task.parse_prompt(p)[::-1]) for p in prompts]
    rows = {"chosen": (list(pairs["prompt"]), list(pairs["chosen"])),
            "rejected": (list(pairs["prompt"]), list(pairs["rejected"])),
            "sft": (prompts, other), "unrelated": (prompts, other[1:] + other[:1])}
    for name in TARGET_NAMES[1:args.targets]:
        p, a = rows[name]
        out[name] = [encode(tok, p[i:i + b], a[i:i + b]) for i in range(0, len(p), b)]
    return out


def random_rollout(args, tok, task, model_cfg) -> Rollout:
    """A rollout with left-padded prompts, random responses (a random number of valid tokens, the last one EOS when
    shorter than the response length, pad after it) and whitened random advantages on the valid tokens."""
    gen = torch.Generator().manual_seed(3)
    n = args.rollout
    if task is None:
        ctx, length = args.seq_len // 2, args.seq_len - args.seq_len // 2
        queries = torch.randint(5, PYTHIA_VOCAB, (n, ctx), generator=gen)
        query_mask, pad, eos, low, high = torch.ones_like(queries), PAD_ID, EOS_ID, 5, PYTHIA_VOCAB
    else:
        length = int(model_cfg.ppo.max_new_tokens)
        enc = tok(task.preference_prompts(n, 0), add_special_tokens=False, padding=True, return_tensors="pt")
        queries, query_mask = enc["input_ids"], enc["attention_mask"]  # the tokenizer pads on the left
        pad, eos, low, high = tok.pad_token_id, tok.eos_token_id, len(tok) - len(task.words), len(tok)
    responses = torch.randint(low, high, (n, length), generator=gen)
    n_valid = torch.randint(1, length + 1, (n,), generator=gen)
    pos = torch.arange(length)[None]
    valid = pos < n_valid[:, None]
    responses = torch.where(pos == (n_valid[:, None] - 1), torch.tensor(eos), responses)
    responses[n_valid == length, -1] = int(torch.randint(low, high, (1,), generator=gen))  # hit the length limit
    responses = responses.masked_fill(~valid, pad)
    raw = torch.randn(n, length, generator=gen, dtype=torch.float32)
    mean, std = raw[valid].mean(), raw[valid].std()
    adv = ((raw - mean) / std).masked_fill(~valid, 0.0)
    zeros = torch.zeros(n, length)
    return Rollout(query_responses=torch.cat([queries, responses], 1),
                   attention_mask=torch.cat([query_mask, valid.long()], 1), context_length=queries.shape[1],
                   logprobs=zeros, ref_logprobs=zeros, values=zeros, valid=valid, scores=torch.zeros(n),
                   rewards=zeros, raw_advantages=raw.masked_fill(~valid, 0.0), advantages=adv, returns=zeros)


def build(args, device: str) -> dict:
    """One 'checkpoint' (the initial model moved a little, eval mode, eager attention) and its D and D'."""
    model, tok, task, model_cfg = build_model(args.model, args.seq_len)
    model = model.to(DTYPES[args.dtype])
    model.config._attn_implementation = args.attn  # eager: vmap (DPO) needs it, as the stage loads it
    ref = copy.deepcopy(model).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.01 * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model = model.to(device).eval()
    data = {"model": model, "dprime": [tuple(t.to(device) for t in b) for b in dprime_set(args, tok, task)],
            "n_params": sum(p.numel() for p in model.parameters())}
    data["targets"] = {k: [tuple(t.to(device) for t in b) for b in v]
                       for k, v in target_sets(args, tok, task, data["dprime"]).items()}
    if args.family == "dpo":
        pairs = {k: v.to(device) for k, v in dpo_pairs(args, tok, task).items()}
        with torch.no_grad():  # reference log-probs: precomputed once per run by the stage, so not timed here
            data["ref_logps"] = tuple(torch.cat([sequence_logps(ref, *(pairs[f"{s}_{k}"][i:i + 64]
                                                                     for k in ("ids", "mask", "comp")))
                                                 for i in range(0, args.pairs, 64)]) for s in ("chosen", "rejected"))
        data["pairs"], data["width"] = pairs, pairs["chosen_ids"].shape[1]
    else:
        data["rollout"] = random_rollout(args, tok, task, model_cfg).to(device)
        data["temperature"] = float(model_cfg.ppo.temperature)
        data["width"] = data["rollout"].query_responses.shape[1]
    del ref
    return data


# ------------------------------------------------------------------------------------------ the three methods
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # CUDA is asynchronous: the clock must wait for the kernels


def trainable(model) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def grad_stats(loss, names, params, g, groups=None, retain: bool = False):
    """One plain backward: (its dot with g' per layer group [all, bottom, middle, top] or [all] without `groups`,
    its norm). Parameter by parameter in float64: nothing P-sized is concatenated."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    dots = torch.zeros(4 if groups else 1, dtype=torch.float64, device=params[0].device)
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for n, gr in zip(names, grads):
        d = torch.dot(gr.flatten().double(), g[n].flatten().double())
        dots[0] += d
        if groups:
            dots[1 + groups[n]] += d
        sq += gr.double().pow(2).sum()
    return dots, sq.sqrt()


def dpo_minibatch(pairs, idx):
    """ids, mask, completion mask of a mini-batch: its chosen rows, then its rejected rows (as dpo_alignment)."""
    return tuple(torch.cat([pairs[f"chosen_{k}"][idx], pairs[f"rejected_{k}"][idx]]) for k in ("ids", "mask", "comp"))


def dpo_all_coefficients(model, pairs, ref_logps):
    """Per component, the coefficients over the whole sample (the thirds rank over D): one no-grad forward."""
    with torch.no_grad():
        chosen = sequence_logps(model, pairs["chosen_ids"], pairs["chosen_mask"], pairs["chosen_comp"])
        rejected = sequence_logps(model, pairs["rejected_ids"], pairs["rejected_mask"], pairs["rejected_comp"])
    return dpo_coefficients(chosen, rejected, *ref_logps, DPO_ALGO, STEP)


def dpo_tot_only(data, args, clock):
    model, pairs, (ref_c, ref_r) = data["model"], data["pairs"], data["ref_logps"]
    g = clock("dprime", lambda: dprime_gradient(model, data["dprime"]))
    names, params = trainable(model)
    n, G, norms = args.pairs, [], []
    for s in range(0, n, args.batch):
        idx = torch.arange(s, min(s + args.batch, n), device=params[0].device)
        b = len(idx)
        lp = sequence_logps(model, *dpo_minibatch(pairs, idx))  # 2b, with grad
        # TOT's weights depend on each pair alone: the mini-batch's own (detached) log-probs give them
        coef = dpo_coefficients(lp[:b].detach(), lp[b:].detach(), ref_c[idx], ref_r[idx], DPO_ALGO, STEP)["TOT"]
        dot, norm = grad_stats((coef.to(lp.dtype) * lp).sum() / b, names, params, g)
        G.append(dot[0])
        norms.append(norm)
    return MinibatchAlignment(("TOT",), torch.stack(G)[:, None, None], torch.stack(norms)[:, None])


def full_gradients(data, args, clock):
    """g' of D' alone, or of every target (one pass each) when `--targets` > 1: the full method's g' passes."""
    model = data["model"]
    if args.targets == 1:
        return clock("dprime", lambda: dprime_gradient(model, data["dprime"]))
    return clock("dprime", lambda: target_gradients(model, data["targets"]))


def dpo_full(data, args, clock):
    model = data["model"]
    g = full_gradients(data, args, clock)
    return dpo_alignment(model, data["pairs"], data["ref_logps"], g, DPO_ALGO, STEP, batch_size=args.batch,
                         chunk=args.chunk, method=full_method(args, data))


def full_method(args, data) -> str:
    return choose_method(args.method, data["n_params"], args.vmap_max_params)


def dpo_per_component(data, args, clock):
    model, pairs = data["model"], data["pairs"]
    g = clock("dprime", lambda: dprime_gradient(model, data["dprime"]))
    coef = dpo_all_coefficients(model, pairs, data["ref_logps"])
    n, G, norms = args.pairs, [], []
    for s in range(0, n, args.batch):
        idx = torch.arange(s, min(s + args.batch, n), device=pairs["chosen_ids"].device)
        lp = sequence_logps(model, *dpo_minibatch(pairs, idx))  # one forward, then one backward per component
        C = torch.stack([torch.cat([coef[c][idx], coef[c][n + idx]]) for c in DPO_COMPONENTS]).to(lp.dtype) / len(idx)
        G_b, norms_b = per_component_backwards(C, lp, model, g)
        G.append(G_b)
        norms.append(norms_b)
    return MinibatchAlignment(DPO_COMPONENTS, torch.stack(G), torch.stack(norms))


def per_component_backwards(C, lp, model, g):
    """Rows of C: each component's coefficients on lp; one backward each (all-zero rows skipped: G = 0, norm 0)."""
    names, params = trainable(model)
    groups = layer_groups(model)
    live = [k for k in range(len(C)) if bool(C[k].any())]
    G = torch.zeros(len(C), 4, dtype=torch.float64, device=lp.device)
    norms = torch.zeros(len(C), dtype=torch.float64, device=lp.device)
    for j, k in enumerate(live):
        G[k], norms[k] = grad_stats((C[k] * lp).sum(), names, params, g, groups, retain=j < len(live) - 1)
    return G, norms


def ppo_coefficients(data):
    return ppo_token_coefficients(data["rollout"], PPO_ALGO, STEP, WEIGHTINGS[PPO_ALGO.weighting])


def ppo_minibatch_logps(model, data, idx):
    """Masked response-token log-probs (with grad) of rows idx, and the mini-batch's number of valid tokens."""
    r = data["rollout"]
    live = dict(model.named_parameters())
    lp = _response_logps(model, live, r, idx, data["temperature"]).masked_fill(~r.valid[idx], 0.0)
    return lp, r.valid[idx].sum().clamp(min=1)


def ppo_tot_only(data, args, clock):
    model = data["model"]
    g = clock("dprime", lambda: dprime_gradient(model, data["dprime"]))
    coef = ppo_coefficients(data)["TOT"]
    names, params = trainable(model)
    n, G, norms = args.rollout, [], []
    for s in range(0, n, args.batch):
        idx = torch.arange(s, min(s + args.batch, n), device=params[0].device)
        lp, scale = ppo_minibatch_logps(model, data, idx)
        dot, norm = grad_stats((coef[idx].to(lp.dtype) * lp).sum() / scale, names, params, g)
        G.append(dot[0])
        norms.append(norm)
    return MinibatchAlignment(("TOT",), torch.stack(G)[:, None, None], torch.stack(norms)[:, None])


def ppo_full(data, args, clock):
    model = data["model"]
    g = full_gradients(data, args, clock)
    return ppo_alignment(model, data["rollout"], g, ppo_coefficients(data), temperature=data["temperature"],
                         batch_size=args.batch, all_norms=args.ppo_all_norms)


def ppo_per_component(data, args, clock):
    model = data["model"]
    g = clock("dprime", lambda: dprime_gradient(model, data["dprime"]))
    coef = ppo_coefficients(data)
    n, G, norms = args.rollout, [], []
    for s in range(0, n, args.batch):
        idx = torch.arange(s, min(s + args.batch, n), device=data["rollout"].valid.device)
        lp, scale = ppo_minibatch_logps(model, data, idx)
        C = torch.stack([coef[c][idx] for c in DPO_COMPONENTS]).to(lp.dtype) / scale  # comps x b x L
        G_b, norms_b = per_component_backwards(C, lp, model, g)
        G.append(G_b)
        norms.append(norms_b)
    return MinibatchAlignment(DPO_COMPONENTS, torch.stack(G), torch.stack(norms))


RUNNERS = {"dpo": {"tot_only": dpo_tot_only, "full": dpo_full, "per_component": dpo_per_component},
           "ppo": {"tot_only": ppo_tot_only, "full": ppo_full, "per_component": ppo_per_component}}


# ------------------------------------------------------------------------------------------ timing
class PeakMemory:
    """Peak memory of one method above the level before it: CUDA's allocator peak, or on CPU this process's resident
    set sampled every 5 ms by a thread (torch's kernels release the GIL, so the sampler runs during them)."""

    def __init__(self, device: str):
        self.device, self.peak_gb = device, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        proc = psutil.Process()
        self.base = self.peak = proc.memory_info().rss
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_gb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 30
        else:
            self.stop.set()
            self.thread.join()
            self.peak_gb = (self.peak - self.base) / 2 ** 30


def timed_checkpoint(fn, data, args, device: str):
    """One method on one checkpoint, `summarise` included: (seconds, seconds in the D' pass, summary, mini-batches,
    peak memory above the start in GiB, CPU seconds of this process: steadier than wall time on a shared machine)."""
    phases = {}

    def clock(name, thunk):
        sync(device)
        start = time.perf_counter()
        out = thunk()
        sync(device)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
        return out

    with PeakMemory(device) as mem:
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        mb = fn(data, args, clock)
        summary = summarise(mb)
        sync(device)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    return total, phases.get("dprime", 0.0), summary, mb, mem.peak_gb, cpu


def bench(data, args, device: str):
    runners = RUNNERS[args.family]
    times = {m: [] for m in args.methods}
    dprime_times = {m: [] for m in args.methods}
    peaks = {m: [] for m in args.methods}
    cpu_times = {m: [] for m in args.methods}
    results = {}
    for r in range(args.warmup + args.repeats):
        for m in args.methods:  # interleaved A B C A B C ...
            total, dp, summary, mb, peak, cpu = timed_checkpoint(runners[m], data, args, device)
            if r >= args.warmup:
                cpu_times[m].append(cpu)
                times[m].append(total)
                dprime_times[m].append(dp)
                peaks[m].append(peak)
            results[m] = (summary, mb)
            print(f"  round {r + 1}/{args.warmup + args.repeats}{' (warm-up)' if r < args.warmup else ''} "
                  f"{m:<14} {total:8.3f} s  (D' pass {dp:.3f} s, CPU {cpu:.3f} s)  peak +{peak:.2f} GiB", flush=True)
    return times, dprime_times, peaks, cpu_times, results


def vmap_reference(data, args):
    """The vmap path once, untimed: what every other method must reproduce."""
    model = data["model"]
    g = dprime_gradient(model, data["dprime"])
    mb = dpo_alignment(model, data["pairs"], data["ref_logps"], g, DPO_ALGO, STEP, batch_size=args.batch,
                       chunk=args.chunk, method="vmap")
    return summarise(mb), mb


# ------------------------------------------------------------------------------------------ agreement
def all_components_rel(mb, ref) -> dict:
    """Every component x group G (relative to the largest |G|) and every component's norm (relative, per entry)."""
    return {"all_components_G_rel": ((mb.G - ref.G).abs().max() / ref.G.abs().max()).item(),
            "all_components_norm_rel": ((mb.norms - ref.norms).abs() / ref.norms.clamp(min=1e-30)).max().item()}


def agreement(results) -> dict:
    """Each method's G(TOT, all) against the full method's: per mini-batch, filtered and unfiltered means, the
    TOT gradient norms and the outlier set. `*_rel` divide by the components' scale (max |G| over TOT, POS and NEG of
    the full method, per mini-batch or for the means); `*_rel_to_tot` by |G(TOT)| itself."""
    s_full, mb_full = results["full"]
    comps = list(mb_full.components)
    cols = [comps.index(c) for c in ("TOT", "POS", "NEG")]
    batch_scale = mb_full.G[:, cols, 0].abs().max().item()
    out = {}
    others = [m for m in ("tot_only", "per_component", "vmap") if m in results]
    for m in others:
        s, mb = results[m]
        entry = {"per_batch_G_rel": (mb.G[:, 0, 0] - mb_full.G[:, 0, 0]).abs().max().item() / batch_scale,
                 "norm_rel": ((mb.norms[:, 0] - mb_full.norms[:, 0]).abs() / mb_full.norms[:, 0]).max().item(),
                 "same_outliers": bool(torch.equal(s["outliers"], s_full["outliers"]))}
        for key in ("G_filtered", "G_unfiltered"):
            ref = s_full[key][:, 0]
            diff = abs(s[key][0, 0].item() - ref[0].item())
            entry[f"{key}_rel"] = diff / ref[cols].abs().max().item()
            entry[f"{key}_rel_to_tot"] = diff / abs(ref[0].item())
        out[m] = entry
    out["max_rel"] = max(max(out[m]["per_batch_G_rel"], out[m]["G_filtered_rel"], out[m]["G_unfiltered_rel"],
                             out[m]["norm_rel"]) for m in others)
    out["full_G_tot_all"] = {"filtered": s_full["G_filtered"][0, 0].item(),
                             "unfiltered": s_full["G_unfiltered"][0, 0].item(),
                             "n_batches": s_full["n_batches"], "n_outliers": s_full["n_outliers"]}
    out["full_norms_present"] = [c for c, ok in zip(comps, torch.isfinite(mb_full.norms).all(0).tolist()) if ok]
    if mb_full.norms.shape[1] == len(comps) and torch.isfinite(mb_full.norms).all():  # every component's norm
        for m in ("per_component", "vmap"):
            if m in results:
                out[m].update(all_components_rel(mb_full, results[m][1]))
    return out


def run(args) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    data = build(args, device)
    n_d = args.pairs if args.family == "dpo" else args.rollout
    print(f"{args.family}: {data['n_params'] / 1e6:.2f} M parameters, D = {n_d} "
          f"{'pairs' if args.family == 'dpo' else 'sequences'} in {-(-n_d // args.batch)} mini-batches of "
          f"{args.batch}, D' = {args.dprime} sequences in {len(data['dprime'])} mini-batches, rows of "
          f"{data['width']} tokens", flush=True)
    times, dprime_times, peaks, cpu_times, results = bench(data, args, device)
    if args.compare_vmap and args.family == "dpo":
        results["vmap"] = vmap_reference(data, args)
    stats = {}
    for m in args.methods:
        q1, med, q3 = quartiles(times[m])
        stats[m] = {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "n": len(times[m]),
                    "dprime_median_s": float(np.median(dprime_times[m])), "times_s": times[m],
                    "dprime_times_s": dprime_times[m], "peak_gb": max(peaks[m]),
                    "cpu_median_s": float(np.median(cpu_times[m])), "cpu_times_s": cpu_times[m]}
    med = {m: stats[m]["median_s"] for m in args.methods}
    dp = float(np.median([t for m in args.methods for t in dprime_times[m]]))  # the same work in all
    ratio = med["full"] / med["tot_only"]
    ratios = {"full/tot_only": ratio, EXCL_DPRIME: (med["full"] - stats["full"]["dprime_median_s"])
              / (med["tot_only"] - stats["tot_only"]["dprime_median_s"]),  # each without its own g' passes
              "full/tot_only CPU time": stats["full"]["cpu_median_s"] / stats["tot_only"]["cpu_median_s"]}
    if args.targets > 1:  # the cost goal: <= 1.5x per target
        ratios["full_targets/tot_only_1"] = ratio
        ratios["per_target"] = ratio / args.targets
    if "per_component" in med:
        ratios["full/per_component"] = med["full"] / med["per_component"]
        ratios["per_component/tot_only"] = med["per_component"] / med["tot_only"]
    per_repeat = [f / t for f, t in zip(times["full"], times["tot_only"])]
    config = {**vars(args), "device": device, "threads": threads, "n_params": data["n_params"],
              "row_width": data["width"], "n_minibatches": -(-n_d // args.batch),
              "dprime_minibatches": len(data["dprime"]),
              "full_method": full_method(args, data) if args.family == "dpo" else "jvp + ghost norms",
              "order": f"interleaved {', '.join(args.methods)} per round"}
    res = {"config": config, "methods": stats, "ratio": ratio, "ratios": ratios, "per_repeat_ratio": per_repeat,
           "target": TARGET, "verdict": "PASS" if ratio / args.targets <= TARGET else "ABOVE TARGET",  # per target
           "dprime_median_s": dp, "agreement": agreement(results)}
    return res


def print_table(res: dict) -> None:
    c = res["config"]
    d_size = f"{c['pairs']} pairs" if c["family"] == "dpo" else f"{c['rollout']}-sequence rollout"
    print(f"\nfamily={c['family']} model={c['model']} ({c['n_params'] / 1e6:.2f} M params) device={c['device']} "
          f"dtype={c['dtype']} threads={c['threads']} D={d_size} ({c['n_minibatches']} mini-batches of {c['batch']}), "
          f"D'={c['dprime']} ({c['dprime_minibatches']} mini-batches of {c['dprime_batch']}), rows {c['row_width']} "
          f"tokens, full method {c['full_method']}, chunk={c['chunk']}, {c['repeats']} repeats "
          f"(+{c['warmup']} warm-up), interleaved")
    print(f"{'method':<15} {'median s':>9} {'q1 s':>8} {'q3 s':>8} {'IQR s':>7} {'n':>3} {'D pass s':>9} {'x TOT':>6} "
          f"{'peak GiB':>9}")
    base = res["methods"]["tot_only"]["median_s"]
    for m, s in res["methods"].items():
        print(f"{m:<15} {s['median_s']:>9.3f} {s['q1_s']:>8.3f} {s['q3_s']:>8.3f} {s['iqr_s']:>7.3f} {s['n']:>3} "
              f"{s['dprime_median_s']:>9.3f} {s['median_s'] / base:>6.2f} {s['peak_gb']:>9.2f}")
    r = res["ratios"]
    print("per-repeat ratio (full/tot_only): " + " ".join(f"{x:.3f}" for x in res["per_repeat_ratio"]))
    if "full/per_component" in r:
        print(f"full/per_component: {r['full/per_component']:.3f}   per_component/tot_only: "
              f"{r['per_component/tot_only']:.3f}")
    print(f"full/tot_only without the shared D' pass ({res['dprime_median_s']:.3f} s): {r[EXCL_DPRIME]:.3f}   "
          f"in CPU time (steadier on a shared machine): {r['full/tot_only CPU time']:.3f}")
    per = "" if c["targets"] == 1 else f" = {res['ratio'] / c['targets']:.3f} per target ({c['targets']} targets)"
    print(f"ratio of medians (full/tot_only): {res['ratio']:.3f}{per}  target <= {res['target']}"
          f"{' per target' if per else ''}  {res['verdict']}")
    if c["targets"] > 1:
        print(f"full with {c['targets']} targets ({c['n_target']} sequences each beside D') vs TOT-only with D' alone: "
              f"t{c['targets']}/t1 = {r['full_targets/tot_only_1']:.3f}, per target t{c['targets']}/({c['targets']} "
              f"t1) = {r['per_target']:.3f} (goal <= 1.5)")
    a = res["agreement"]
    f = a["full_G_tot_all"]
    print(f"G(TOT, all) by the full method: filtered {f['filtered']:.6g}, unfiltered {f['unfiltered']:.6g} "
          f"({f['n_outliers']} of {f['n_batches']} mini-batches filtered out); norms present for "
          f"{', '.join(a['full_norms_present']) or 'no component'}")
    for m in ("tot_only", "per_component", "vmap"):
        if m not in a:
            continue
        e = a[m]
        extra = (f", all 6 x 4 G {e['all_components_G_rel']:.1e}, all norms {e['all_components_norm_rel']:.1e}"
                 if "all_components_G_rel" in e else "")
        print(f"  {m} vs full: per-batch G {e['per_batch_G_rel']:.1e}, filtered {e['G_filtered_rel']:.1e} "
              f"({e['G_filtered_rel_to_tot']:.1e} of |G_TOT|), unfiltered {e['G_unfiltered_rel']:.1e}, "
              f"TOT norms {e['norm_rel']:.1e}, same outliers {e['same_outliers']}{extra}")
    print("  (rel. differences: per the components' scale, max |G| of TOT/POS/NEG, unless said otherwise)")


def write_out(res: dict, path: str) -> None:
    rows = [[res["config"]["family"], res["config"]["model"], m, s["median_s"], s["q1_s"], s["q3_s"], s["iqr_s"],
             s["n"], s["dprime_median_s"], s["peak_gb"], res["ratio"], res["ratios"].get("full/per_component"),
             res["verdict"], res["agreement"]["max_rel"]] for m, s in res["methods"].items()]  # one row per method
    write_results(res, path, ["family", "model", "method", "median_s", "q1_s", "q3_s", "iqr_s", "n",
                              "dprime_median_s", "peak_gb", "ratio_full_tot_only", "ratio_full_per_component",
                              "verdict", "agreement_max_rel"], rows)


def main(argv=None) -> int:
    return cli(run, parse_args, print_table, write_out, argv)


if __name__ == "__main__":
    sys.exit(main())
