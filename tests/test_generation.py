"""Generation of win-rate outputs and D' answers: the planner's batch, the HF path on a saved folder, and the vLLM
worker's subprocess protocol (run here against a stand-in `vllm` package the test puts on PYTHONPATH; a real-vLLM
comparison runs where vLLM and a GPU are available)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

import po_experiments.config  # noqa: F401  (registers schemas)
from po_experiments import plan
from po_experiments.config import validate
from po_experiments.errors import ConfigError
from po_experiments.evaluation.stage import EvalPrompts, greedy_outputs
from po_experiments.generation import backend, vllm_worker
from po_experiments.stages.common import generate

from conftest import REPO


def make(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/x", "paths.cache_dir=/tmp/y", *overrides])
    validate(cfg)
    return cfg


# A stand-in for vllm: LLM / SamplingParams with vLLM's signatures, outputs that spell out what the worker passed
# (sampling settings, the prompt's token ids) around whitespace the worker must strip, and a log of the engine's
# arguments and of the rendezvous variables the worker saw.
FAKE_VLLM = '''
import json, os

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class _Tokenizer:
    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [len(w) for w in text.split()]

class _Completion:
    def __init__(self, text):
        self.text = text

class _Result:
    def __init__(self, text):
        self.outputs = [_Completion(text)]

class LLM:
    def __init__(self, **kw):
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise RuntimeError("CUDA out of memory (fake)")
        self.kw = kw
        with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
            json.dump({"engine": kw, "RANK": os.environ.get("RANK"), "MASTER_PORT": os.environ.get("MASTER_PORT")}, f)

    def get_tokenizer(self):
        return _Tokenizer()

    def generate(self, prompts, params, use_tqdm=True):
        p = params.kw
        return [_Result(f"  t={p['temperature']} n={p['max_tokens']} min={p['min_tokens']} seed={p['seed']} "
                        f"ids={x['prompt_token_ids']}\\n") for x in prompts]
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    root = tmp_path / "fake_site"
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    log = tmp_path / "engine.json"
    monkeypatch.setenv("PYTHONPATH", f"{root}:{REPO}")
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return log


def vllm_cfg(*overrides):
    return make("generation.backend=vllm", "model.dtype=bfloat16", "generation.vllm_gpu_memory_utilization=0.5",
                *overrides)


# ------------------------------------------------------------------------------------------ the planner's batch


def test_generation_batch_is_the_plans_unless_set():
    cfg = make()
    assert cfg.eval.batch_size is None  # the default: the plan's batch
    planned = plan.make_plan(plan.for_this_job(cfg))["stages"]["win_rate"]["per_device_batch"]
    assert plan.generation_batch(cfg) == planned == 256  # the tiny model on CPU: the largest candidate
    assert plan.generation_batch(make("eval.batch_size=7")) == 7  # an explicit value wins
    big = plan.generation_batch(make("model=pythia", "plan.gpus=1", "plan.gpu_memory_gb=80"))
    small = plan.generation_batch(make("model=pythia", "plan.gpus=1", "plan.gpu_memory_gb=16"))
    assert 1 <= small < big  # the KV cache of 512 new tokens per prompt: less memory, fewer prompts per call
    # the batch it picks fits, one step larger does not (unless it is the largest candidate)
    planner = plan.Planner(make("model=pythia", "plan.gpus=1", "plan.gpu_memory_gb=16"))
    _, prompt_len, new = plan.win_rate_generation(planner.cfg)
    assert plan.generation_bytes(planner.shape, planner.P, 2, small, prompt_len, new) <= planner.budget
    assert plan.generation_bytes(planner.shape, planner.P, 2, 2 * small, prompt_len, new) > planner.budget


def test_hf_backend_generates_from_the_saved_folder_in_order(tmp_path, tiny_model, tokenizer, task):
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prompts = task.heldout_prompts(40)
    expected = generate(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=1)  # one by one: no padding
    got = backend.generate_texts(make("eval.batch_size=16"), tmp_path / "m", prompts, max_new_tokens=6)
    assert got == expected


# ------------------------------------------------------------------------------------------ the vLLM worker


def test_vllm_worker_passes_settings_and_keeps_prompt_order(tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setenv("RANK", "3")  # a torchrun rank's variables must not reach the engine
    monkeypatch.setenv("MASTER_PORT", "29500")
    prompts = [" ".join("w" * (k % 7 + 1) for _ in range(k % 3 + 1)) for k in range(50)]
    out = backend.generate_texts(vllm_cfg("generation.vllm_tensor_parallel_size=2"), tmp_path / "ckpt", prompts,
                                 max_new_tokens=9, temperature=0.7, seed=5, min_new_tokens=2)
    assert out == [f"t=0.7 n=9 min=2 seed=5 ids={[len(w) for w in p.split()]}" for p in prompts]  # stripped, in order
    seen = json.loads(fake_vllm.read_text())
    assert seen["engine"] == {"model": str(tmp_path / "ckpt"), "dtype": "bfloat16", "seed": 5,
                              "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2}
    assert seen["RANK"] is None and seen["MASTER_PORT"] is None


def test_vllm_worker_greedy_for_evaluation_outputs(tmp_path, fake_vllm):
    prompts = EvalPrompts(["a bb", "ccc"], ["a bb", "ccc"], ["x", "x"], [0, 1], max_new_tokens=4)
    outputs = greedy_outputs(tmp_path / "out.json", tmp_path / "ckpt", prompts, vllm_cfg(), "policy")
    assert outputs == ["t=0.0 n=4 min=0 seed=0 ids=[1, 2]", "t=0.0 n=4 min=0 seed=0 ids=[3]"]
    records = json.loads((tmp_path / "out.json").read_text())
    assert [(r["instruction"], r["output"], r["index"]) for r in records] == [("a bb", outputs[0], 0),
                                                                              ("ccc", outputs[1], 1)]


def test_vllm_worker_failure_names_the_backend_and_shows_its_error(tmp_path, fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "1")
    with pytest.raises(RuntimeError, match=r"generation.backend=vllm(.|\n)*CUDA out of memory \(fake\)"):
        backend.generate_texts(vllm_cfg(), tmp_path / "ckpt", ["a"], max_new_tokens=2)


def test_vllm_worker_rejects_an_incomplete_request(tmp_path):
    (tmp_path / "req.json").write_text(json.dumps({"model": "m", "prompts": []}))
    with pytest.raises(ValueError, match="max_new_tokens"):
        vllm_worker.read_request(str(tmp_path / "req.json"))
    proc = subprocess.run([sys.executable, str(backend.WORKER)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Request:" in proc.stderr  # usage


# ------------------------------------------------------------------------------------------ preflight


def test_preflight_fails_when_the_interpreter_cannot_import_vllm(tmp_path, monkeypatch):
    broken = tmp_path / "site" / "vllm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('vllm built for another torch (fake)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    with pytest.raises(ConfigError, match=r"generation.backend=vllm(.|\n)*another torch(.|\n)*vllm_python"):
        backend.preflight(vllm_cfg())
    with pytest.raises(ConfigError, match="generation.vllm_python=/no/such/python"):
        backend.preflight(vllm_cfg("generation.vllm_python=/no/such/python"))
    backend.preflight(make())  # hf: nothing to check


def test_preflight_passes_when_vllm_imports(fake_vllm):
    backend.preflight(vllm_cfg())


# ------------------------------------------------------------------------------------------ real vLLM


def vllm_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM (and a GPU) not available to this interpreter")
def test_real_vllm_greedy_agrees_with_hf(tmp_path, tiny_model, tokenizer, task):
    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prompts = task.heldout_prompts(64)
    cfg = make("generation.backend=vllm", "model.dtype=float32")
    hf = backend.generate_texts(make("model.dtype=float32"), tmp_path / "m", prompts, max_new_tokens=8)
    ours = backend.generate_texts(cfg, tmp_path / "m", prompts, max_new_tokens=8)
    assert sum(a == b for a, b in zip(hf, ours)) >= 0.9 * len(prompts)  # greedy; kernels may break near-ties


# ------------------------------------------------------------------------------------------ every rank's share


def test_rank_slices_cover_the_prompts_once_in_order():
    for n, world in ((23, 2), (5, 8), (0, 3), (16, 4)):
        parts = [list(range(n))[backend.rank_slice(n, r, world)] for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


TWO_RANKS = '''
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from hydra import compose, initialize_config_dir
import po_experiments.config
from po_experiments.evaluation.stage import share_outputs
from po_experiments.analysis.stage import answer_dprime
from transformers import AutoTokenizer
torch.set_num_threads(1)
import po_experiments.generation.backend as backend
dist.init_process_group("gloo")
root = Path(sys.argv[1])
unshared = backend.generate_texts


def spy(cfg, model_dir, prompts, **kwargs):  # what this rank generates itself
    with open(root / f"rank{dist.get_rank()}.log", "a") as f:
        f.write(f"{len(prompts)}\\n")
    return unshared(cfg, model_dir, prompts, **kwargs)


backend.generate_texts = spy
with initialize_config_dir(version_base="1.3", config_dir=sys.argv[2]):
    cfg = compose("config", overrides=["eval.checkpoints=final", "eval.n_prompts=23", "eval.batch_size=4",
                                       "analysis.n_dprime=11", f"paths.output_dir={root / 'run'}",
                                       f"paths.cache_dir={root / 'cache'}"])
share_outputs(cfg, root / "run", root / "sft", final_step=5)
answer_dprime(cfg, root / "run", AutoTokenizer.from_pretrained(root / "sft"))
dist.destroy_process_group()
'''


@pytest.mark.slow  # a subprocess or a training run: the fast tier stays under 3 minutes
def test_two_ranks_share_the_outputs_and_dprime_like_one_process(tmp_path, tiny_model, tokenizer):
    for folder in (tmp_path / "sft", tmp_path / "run" / "model"):
        tiny_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29731", str(script), str(tmp_path), str(REPO / "conf")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = [(tmp_path / f"rank{r}.log").read_text().split() for r in range(2)]
    assert shares == [["12", "12", "6"], ["11", "11", "5"]]  # reference, final model, D': each rank its share
    cfg = make("eval.checkpoints=final", "eval.n_prompts=23", "analysis.n_dprime=11")
    from po_experiments.analysis.stage import dprime_prompts
    from po_experiments.evaluation.stage import eval_prompts

    prompts = eval_prompts(cfg, tokenizer)
    alone = generate(tiny_model, tokenizer, prompts.model_inputs, max_new_tokens=prompts.max_new_tokens, batch_size=1)
    for stem in ("reference", "step-5"):
        records = json.loads((tmp_path / "run" / "eval" / "outputs" / f"{stem}.json").read_text())
        assert [r["output"] for r in records] == alone and [r["index"] for r in records] == list(range(23))
    shared = list((tmp_path / "cache" / "reference_outputs").glob("*.json"))  # the SFT model's, for every run
    assert len(shared) == 1 and [r["output"] for r in json.loads(shared[0].read_text())] == alone
    dprime = json.loads(next((tmp_path / "run" / "analysis").glob("dprime_heldout_*.json")).read_text())
    questions = dprime_prompts(cfg, tokenizer)
    answers = generate(tiny_model, tokenizer, questions, max_new_tokens=cfg.data.max_new_tokens, batch_size=1)
    assert dprime == [{"prompt": q, "response": " " + a} for q, a in zip(questions, answers)]
