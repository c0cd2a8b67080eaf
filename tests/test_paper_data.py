"""The paper's data loaders (po_experiments.data.{sources,validation,paper}), all offline.

Real samples come from `<repo>/../shared/data` and are skipped where absent; everything else is written here
into tmp_path in the exact hub schemas (DESIGN 2).
"""
from __future__ import annotations

import gzip
import json
import logging
import time
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omegaconf import OmegaConf

from po_experiments.config import OnInvalid, PaperDataConfig, SourceConfig
from po_experiments.data.paper import (hh_question, hh_question_text, load_instructions, load_preferences,
                                       load_questions, load_sft)
from po_experiments.data.sources import load_source
from po_experiments.data.validation import N_EXAMPLES, validate_rows
from po_experiments.errors import DataError
from po_experiments.hub import hub_reachable

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
ALPACA_SAMPLE = SHARED_DATA / "alpaca_eval_805_instructions.json"
HH_BAD_ROWS = [1254, 1688, 1952, 2036]  # questions that end with an Assistant turn (an inline "Human:")


def _hh_raw() -> list[dict]:
    with gzip.open(_need(HH_SAMPLE), "rt") as f:
        return [json.loads(line) for line in f]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data sample {path} not present (no ../shared checkout)")
    return path


@pytest.fixture(autouse=True)
def _own_datasets_cache(tmp_path, monkeypatch):
    """Each test gets its own datasets cache: nothing leaks between tests or into ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# --------------------------------------------------------------------------------------------- fixtures


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def ultrachat_row(i):
    return {"prompt": f"question {i}", "prompt_id": f"id{i}",
            "messages": [user(f"question {i}"), bot(f"answer {i}")]}


def ultrafeedback_row(i):
    q = f"question {i}"
    return {"prompt": q, "prompt_id": f"id{i}", "chosen": [user(q), bot(f"good {i}")],
            "rejected": [user(q), bot(f"bad {i}")], "messages": [user(q), bot(f"good {i}")],
            "score_chosen": 8.0, "score_rejected": 5.0}


def hh_row(i):
    return {"chosen": f"\n\nHuman: question {i}\n\nAssistant: good {i}",
            "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad {i}"}


def alpaca_row(i):
    return {"instruction": f"instruction {i}", "dataset": "helpful_base"}


def write(path: Path, rows: list[dict]) -> Path:
    """Rows in the file kind the suffix names: JSON lines (maybe gzip), a top-level JSON list, or parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif path.name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path


def config(on_invalid="skip", max_length=1024, **paths) -> PaperDataConfig:
    return PaperDataConfig(on_invalid=OnInvalid(on_invalid), max_length=max_length,
                           **{what: SourceConfig(path=str(p)) for what, p in paths.items()})


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built offline: one token per whitespace word, `<role> text <eos>` per message."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "<eos>", "<user>", "<assistant>", "<system>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def words(n: int) -> str:
    return " ".join(f"w{k}" for k in range(n))


# --------------------------------------------------------------------------------------------- the config


def test_paper_yaml_composes_against_the_schema(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    (tmp_path / "primary.yaml").write_text(
        f"defaults:\n  - data: paper\n  - _self_\nhydra:\n  searchpath:\n    - file://{REPO / 'conf'}\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose("primary", overrides=["data.preferences.path=/x/prefs.jsonl"])
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, PaperDataConfig)
    assert (data.sft.hub_id, data.sft.split) == ("HuggingFaceH4/ultrachat_200k", "train_sft")
    assert (data.preferences.hub_id, data.preferences.split) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert data.preferences.path == "/x/prefs.jsonl"
    assert (data.questions.hub_id, data.questions.data_dir, data.questions.split) == (
        "Anthropic/hh-rlhf", "helpful-base", "test")
    assert (data.instructions.hub_id, data.instructions.split) == ("tatsu-lab/alpaca_eval", "eval")
    assert (data.on_invalid, data.max_length, data.max_new_tokens) == (OnInvalid.skip, 1024, 512)


# --------------------------------------------------------------------------------------------- real samples


def test_real_hh_questions_parse_and_skip_the_malformed_rows(caplog):
    raw = _hh_raw()
    assert len(raw) == 2312
    with caplog.at_level(logging.WARNING, logger="po_experiments.data"):
        q = load_questions(config(questions=HH_SAMPLE))
    assert len(q) == 2312 - len(HH_BAD_ROWS)
    assert "4 row(s): chosen: question ends with an assistant turn" in caplog.text
    kept = [r for i, r in enumerate(raw) if i not in HH_BAD_ROWS]
    assert q["text"] == [hh_question_text(r["chosen"]) for r in kept]  # the right rows, in order
    for row in q:
        roles = [m["role"] for m in row["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]  # alternating, ends with the user
        assert not row["text"].rstrip().endswith("Assistant:")
    assert q[0]["prompt"][0] == user("what are some pranks with a pen i can do?")
    assert q[0]["prompt"][1:3] == [bot("Are you looking for practical joke ideas?"), user("yep")]
    assert q[0]["prompt"][-1] == user("okay some of these do not have anything to do with pens")
    assert len(q[0]["prompt"]) == 5
    assert q[0]["text"].endswith("\n\nHuman: okay some of these do not have anything to do with pens")


def test_real_hh_questions_fail_names_every_bad_row():
    with pytest.raises(DataError) as err:
        load_questions(config("fail", questions=_need(HH_SAMPLE)))
    msg = str(err.value)
    assert "4 of 2312 rows are invalid" in msg
    for i in HH_BAD_ROWS:
        assert f"row {i}, field 'chosen': question ends with an assistant turn" in msg


def test_real_hh_doubled_assistant_turns_are_joined():
    raw = _hh_raw()
    text = raw[763]["chosen"]  # "...\n\nAssistant: ...\n\nAssistant: ..." in the middle of the dialogue
    prompt = hh_question(text)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[1]["content"].count("\n\n") >= 1 and "Assistant:" not in prompt[1]["content"]


def test_real_alpaca_eval_instructions():
    ds = load_instructions(config(instructions=_need(ALPACA_SAMPLE)))  # a top-level JSON list
    assert len(ds) == 805 and ds.column_names == ["instruction", "dataset"]
    assert Counter(ds["dataset"]) == {"selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129,
                                      "vicuna": 80}
    assert ds[0] == {"instruction": "What are the names of some famous actors that started their careers on "
                                    "Broadway?", "dataset": "helpful_base"}
    first = load_source(SourceConfig(path=str(ALPACA_SAMPLE), max_rows=10), "instructions")
    assert first["instruction"] == ds["instruction"][:10]


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["sft.jsonl", "sft.jsonl.gz", "sft.json", "sft.parquet"])
def test_sft_loads_from_every_file_kind(tmp_path, name):
    ds = load_sft(config(sft=write(tmp_path / name, [ultrachat_row(i) for i in range(3)])))
    assert ds.column_names == ["messages"]
    assert ds["messages"] == [[user(f"question {i}"), bot(f"answer {i}")] for i in range(3)]


def test_a_folder_of_files_is_one_source(tmp_path):
    write(tmp_path / "d" / "part-0.jsonl", [ultrachat_row(0), ultrachat_row(1)])
    write(tmp_path / "d" / "sub" / "part-1.jsonl", [ultrachat_row(2)])
    write(tmp_path / "d" / ".hidden" / "junk.jsonl", [{"other": 1}])  # ignored: hidden
    ds = load_sft(config(sft=tmp_path / "d"))
    assert [m[0]["content"] for m in ds["messages"]] == ["question 0", "question 1", "question 2"]


def test_preferences_in_trl_conversational_format(tmp_path):
    multi = ultrafeedback_row(1)
    history = [{"role": "system", "content": "be kind"}, user("hi"), bot("hello"), user("question 1")]
    multi["chosen"], multi["rejected"] = history + [bot("good 1")], history + [bot("bad 1")]
    ds = load_preferences(config(preferences=write(tmp_path / "p.parquet", [ultrafeedback_row(0), multi])))
    assert ds.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    assert ds[0] == {"prompt": [user("question 0")], "chosen": [bot("good 0")], "rejected": [bot("bad 0")],
                     "score_chosen": 8.0, "score_rejected": 5.0}
    assert ds[1]["prompt"] == history and ds[1]["chosen"] == [bot("good 1")]


def test_preferences_without_score_columns(tmp_path):
    rows = [{k: v for k, v in ultrafeedback_row(i).items() if not k.startswith("score")} for i in range(2)]
    ds = load_preferences(config(preferences=write(tmp_path / "p.json", rows)))
    assert ds.column_names == ["prompt", "chosen", "rejected"]


def test_hh_questions_from_a_fixture(tmp_path):
    row = {"chosen": "\n\nHuman: Hi there\n\nAssistant:  Hello!\n\nHuman: How are you?\n\nAssistant: Fine.",
           "rejected": "\n\nHuman: Hi there\n\nAssistant:  Hello!\n\nHuman: How are you?\n\nAssistant: Bad."}
    ds = load_questions(config(questions=write(tmp_path / "hh.jsonl", [row, hh_row(1)])))
    assert ds.column_names == ["prompt", "text"]
    assert ds[0]["prompt"] == [user("Hi there"), bot("Hello!"), user("How are you?")]
    assert ds[0]["text"] == "\n\nHuman: Hi there\n\nAssistant:  Hello!\n\nHuman: How are you?"
    assert ds[1]["prompt"] == [user("question 1")]


@pytest.mark.parametrize("text, problem", [
    ("\n\nHuman: hi there", "no '\\n\\nAssistant:' marker"),
    ("\n\nAssistant: hi there", "no '\\n\\nHuman:' turn"),
    ("Human: hi\n\nAssistant: yo", "no '\\n\\nHuman:' turn"),  # the marker lacks its blank line
    ("preamble\n\nHuman: hi\n\nAssistant: yo", "text before the first"),
    ("\n\nHuman: a\n\nAssistant: b  Human: c\n\nAssistant: d", "question ends with an assistant turn"),
    ("\n\nHuman:  \n\nAssistant: yo", "empty turn"),
    ("\n\nAssistant: a\n\nHuman: b\n\nAssistant: c", "starts with an assistant turn"),
    (None, "not a string"),
])
def test_hh_question_rejects_malformed_dialogues(text, problem):
    with pytest.raises(ValueError, match=problem.replace("\\", "\\\\")):
        hh_question(text)


# --------------------------------------------------------------------------------------------- malformed rows


def _bad_sft(**messages):
    return {"prompt": "x", "prompt_id": "x", **messages}


MALFORMED = {  # case: (source, good-row factory, bad row, field, problem kind)
    "sft missing field": ("sft", ultrachat_row, _bad_sft(), "messages", "missing"),
    "sft empty content": ("sft", ultrachat_row, _bad_sft(messages=[user("q"), bot("  ")]), "messages",
                          "empty content"),
    "sft non-string content": ("sft", ultrachat_row, _bad_sft(messages=[user("q"), bot(42)]), "messages",
                               "non-string content"),
    "sft last turn not assistant": ("sft", ultrachat_row, _bad_sft(messages=[user("q"), bot("a"), user("q2")]),
                                    "messages", "last message not from the assistant"),
    "sft unknown role": ("sft", ultrachat_row, _bad_sft(messages=[{"role": "bot", "content": "q"}, bot("a")]),
                         "messages", "unknown role"),
    "sft not a message list": ("sft", ultrachat_row, _bad_sft(messages="just text"), "messages",
                               "not a list of {role, content} messages"),
    "prefs identical": ("preferences", ultrafeedback_row,
                        {**ultrafeedback_row(9), "rejected": ultrafeedback_row(9)["chosen"]}, "chosen",
                        "identical to 'rejected'"),
    "prefs different prompts": ("preferences", ultrafeedback_row,
                                {**ultrafeedback_row(9), "rejected": [user("other"), bot("bad")]}, "rejected",
                                "different prompt from 'chosen'"),
    "prefs prompt mismatch": ("preferences", ultrafeedback_row, {**ultrafeedback_row(9), "prompt": "other"},
                              "prompt", "does not match the last user turn of 'chosen'"),
    "prefs empty prompt": ("preferences", ultrafeedback_row, {**ultrafeedback_row(9), "prompt": ""}, "prompt",
                           "empty"),
    "prefs rejected not ending with assistant": ("preferences", ultrafeedback_row,
                                                 {**ultrafeedback_row(9), "rejected": [user("question 9")]},
                                                 "rejected", "last message not from the assistant"),
    "prefs scores swapped": ("preferences", ultrafeedback_row, {**ultrafeedback_row(9), "score_chosen": 1.0},
                             "score_chosen", "lower than score_rejected"),
    "hh no assistant marker": ("questions", hh_row, {"chosen": "\n\nHuman: hi", "rejected": "x"}, "chosen",
                               "no '\\n\\nAssistant:' marker"),
    "hh no human turn": ("questions", hh_row, {"chosen": "\n\nAssistant: hi", "rejected": "x"}, "chosen",
                         "no '\\n\\nHuman:' turn"),
    "hh empty": ("questions", hh_row, {"chosen": "", "rejected": "x"}, "chosen", "empty"),
    "alpaca empty instruction": ("instructions", alpaca_row, {"instruction": " ", "dataset": "koala"},
                                 "instruction", "empty"),
    "alpaca non-string instruction": ("instructions", alpaca_row, {"instruction": 7, "dataset": "koala"},
                                      "instruction", "not a string"),
}
LOADERS = {"sft": load_sft, "preferences": load_preferences, "questions": load_questions,
           "instructions": load_instructions}
IDENTITY = {"sft": lambda r: r["messages"][0]["content"], "preferences": lambda r: r["prompt"][-1]["content"],
            "questions": lambda r: r["prompt"][-1]["content"], "instructions": lambda r: r["instruction"]}
BAD_AT = 2  # the malformed row's index among 4 rows


def _malformed_file(tmp_path, case):
    what, good, bad, field, problem = MALFORMED[case]
    rows = [good(0), good(1), bad, good(3)]
    return what, write(tmp_path / f"{what}.jsonl", rows), field, problem


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_row_fails_naming_row_and_field(tmp_path, case):
    what, path, field, problem = _malformed_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        LOADERS[what](config("fail", **{what: path}))
    msg = str(err.value)
    assert f"{what} ({path})" in msg and "1 of 4 rows are invalid" in msg
    assert f"row {BAD_AT}, field '{field}': {problem}" in msg
    assert "data.on_invalid=skip" in msg


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_row_is_skipped_and_counted(tmp_path, case, caplog):
    what, path, field, problem = _malformed_file(tmp_path, case)
    with caplog.at_level(logging.WARNING, logger="po_experiments.data"):
        ds = LOADERS[what](config("skip", **{what: path}))
    assert [IDENTITY[what](row) for row in ds] == [f"{'instruction' if what == 'instructions' else 'question'} {i}"
                                                   for i in (0, 1, 3)]  # the good rows, in order
    assert "dropped 1 of 4 rows" in caplog.text
    assert f"1 row(s): {field}: {problem}" in caplog.text


def test_mixed_problems_are_counted_per_kind(tmp_path, caplog):
    def same(i):
        return {**ultrafeedback_row(i), "rejected": ultrafeedback_row(i)["chosen"]}

    rows = [ultrafeedback_row(0), same(1), {**ultrafeedback_row(2), "prompt": ""}, same(3), ultrafeedback_row(4)]
    with caplog.at_level(logging.WARNING, logger="po_experiments.data"):
        ds = load_preferences(config(preferences=write(tmp_path / "p.jsonl", rows)))
    assert [p[0]["content"] for p in ds["prompt"]] == ["question 0", "question 4"]
    assert "2 row(s): chosen: identical to 'rejected'" in caplog.text
    assert "1 row(s): prompt: empty" in caplog.text
    assert "dropped 3 of 5 rows" in caplog.text


def test_validate_rows_report_and_example_limit(caplog):
    ds = datasets.Dataset.from_list([{"x": i} for i in range(20)])

    def odd(row):  # odd rows: three problems of two kinds (a kind counts once per row)
        return [("x", f"odd ({row['x']})"), ("x", "big"), ("x", "big (again)")] if row["x"] % 2 else []

    with caplog.at_level(logging.WARNING, logger="po_experiments.data"):
        kept, report = validate_rows(ds, odd, source="demo", on_invalid="skip")
    assert kept["x"] == list(range(0, 20, 2))
    assert (report.total, report.kept, report.dropped) == (20, 10, 10)
    assert report.bad_rows == list(range(1, 20, 2))
    assert report.counts == {"x: odd": 10, "x: big": 10}
    assert [p.index for p in report.examples] == [i for i in range(1, 2 * N_EXAMPLES, 2) for _ in range(3)]
    assert str(report.examples[0]) == "row 1, field 'x': odd (1)"
    assert any(r.name == "po_experiments.data" for r in caplog.records)

    with pytest.raises(DataError) as err:
        validate_rows(ds, odd, source="demo", on_invalid=OnInvalid.fail)
    msg = str(err.value)
    assert "demo: 10 of 20 rows are invalid" in msg and "demo row 1, field 'x': odd (1)" in msg
    assert f"row {2 * N_EXAMPLES - 1}," in msg and f"row {2 * N_EXAMPLES + 1}," not in msg  # only the first few


def test_skip_with_no_valid_row_left_fails(tmp_path):
    with pytest.raises(DataError, match="no valid rows left"):
        load_instructions(config(instructions=write(tmp_path / "a.jsonl", [{"instruction": "", "dataset": "x"}])))


# --------------------------------------------------------------------------------------------- lengths


def test_a_long_sft_row_is_kept_for_truncation_and_the_share_logged(tmp_path, tokenizer, caplog):
    # <user> 3 words <eos> <assistant> 3 words <eos> = 10 tokens; one more answer word makes 11
    rows = [{"messages": [user(words(3)), bot(words(3))]}, {"messages": [user(words(3)), bot(words(4))]}]
    path = write(tmp_path / "sft.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="po_experiments.data"):
        ds = load_sft(config("fail", max_length=10, sft=path), tokenizer)  # not invalid: fail does not stop
    assert ds["messages"] == [r["messages"] for r in rows]  # kept whole: SFTTrainer truncates it
    assert "1 of 2 rows (50.0 %) are longer than max_length and will be truncated" in caplog.text
    assert "messages: 1" in caplog.text and "truncated (11 tokens > max_length 10)" in caplog.text
    assert "dropped" not in caplog.text


def test_sft_trainer_truncates_the_long_row_to_max_length(tmp_path, tokenizer):
    """What the kept row becomes in training: TRL's SFTTrainer cuts it to max_length (keep_start)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": [user(words(3)), bot(words(3))]}, {"messages": [user(words(3)), bot(words(9))]}]
    ds = load_sft(config(max_length=10, sft=write(tmp_path / "sft.jsonl", rows)), tokenizer)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=16))
    args = SFTConfig(output_dir=str(tmp_path / "t"), max_length=10, report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    ids = trainer.train_dataset["input_ids"]
    assert [len(i) for i in ids] == [10, 10]
    assert ids[1] == tokenizer.apply_chat_template(rows[1]["messages"], return_dict=False)[:10]


def test_long_preference_responses_are_kept_for_truncation(tmp_path, tokenizer, caplog):
    row = ultrafeedback_row(0)  # prompt "question 0" = 4 tokens + <assistant>; answers "good 0" = 4 tokens
    row["rejected"] = [user("question 0"), bot(words(5))]  # 4 + 7 = 11 tokens
    path = write(tmp_path / "p.jsonl", [ultrafeedback_row(1), row])
    with caplog.at_level(logging.INFO, logger="po_experiments.data"):
        ds = load_preferences(config("fail", max_length=10, preferences=path), tokenizer)
    assert ds["rejected"] == [[bot("bad 1")], [bot(words(5))]]
    assert "1 of 2 rows (50.0 %) are longer than max_length" in caplog.text and "rejected: 1" in caplog.text


def test_a_pair_whose_prompt_fills_max_length_is_dropped_as_trl_drops_it(tmp_path, tokenizer, caplog):
    # the prompt with its generation prompt: <user> 8 words <eos> <assistant> = 11 tokens >= 10
    long_q = words(8)
    row = {**ultrafeedback_row(0), "prompt": long_q, "chosen": [user(long_q), bot("a")],
           "rejected": [user(long_q), bot("b")]}
    path = write(tmp_path / "p.jsonl", [ultrafeedback_row(1), row, ultrafeedback_row(2)])
    with caplog.at_level(logging.WARNING, logger="po_experiments.data"):
        ds = load_preferences(config("fail", max_length=10, preferences=path), tokenizer)  # dropped even so
    assert [p[0]["content"] for p in ds["prompt"]] == ["question 1", "question 2"]
    assert "dropped 1 of 3 rows" in caplog.text and "prompt alone fills max_length" in caplog.text
    assert "1 row(s): prompt: prompt fills max_length" in caplog.text


def test_validation_report_counts_truncated_rows():
    ds = datasets.Dataset.from_list([{"n": n} for n in (3, 12, 15, 4)])

    def check(row):
        return [("text", f"truncated ({row['n']} tokens > max_length 10)")] if row["n"] > 10 else []

    kept, report = validate_rows(ds, check, source="demo", on_invalid="fail")
    assert kept["n"] == [3, 12, 15, 4] and not report.bad_rows
    assert (report.truncated, report.truncated_share, report.truncated_counts) == (2, 0.5, {"text": 2})
    assert (report.kept, report.dropped, report.discarded) == (4, 0, 0)


@pytest.mark.parametrize("what", ["questions", "instructions"])
def test_prompt_length_includes_the_generation_prompt(tmp_path, tokenizer, what):
    # <user> n words <eos> <assistant> = n + 3 tokens: 7 words fit in 10, 8 words do not
    if what == "questions":
        rows = [{"chosen": f"\n\nHuman: {words(n)}\n\nAssistant: ok", "rejected": "x"} for n in (7, 8)]
    else:
        rows = [{"instruction": words(n), "dataset": "koala"} for n in (7, 8)]
    path = write(tmp_path / f"{what}.jsonl", rows)
    field = "chosen" if what == "questions" else "instruction"
    with pytest.raises(DataError, match=rf"row 1, field '{field}': too long \(11 tokens > max_length 10\)") as err:
        LOADERS[what](config("fail", max_length=10, **{what: path}), tokenizer)
    assert "row 0" not in str(err.value)


def test_tokenizer_without_chat_template_is_refused(tmp_path, tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataError, match="chat_template"):
        load_sft(config(sft=write(tmp_path / "s.jsonl", [ultrachat_row(0)])), bare)


# --------------------------------------------------------------------------------------------- sources


def test_missing_path_names_the_source_and_the_key(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_preferences(config(preferences=missing))
    assert "preferences" in str(err.value) and str(missing) in str(err.value)
    assert "data.preferences.path" in str(err.value)


def _csv(d):
    return write(d / "x.csv", [])


def _empty_folder(d):
    (d / "empty").mkdir()
    return d / "empty"


def _broken_json(d):
    (d / "broken.jsonl").write_text('{"messages": [\n')
    return d / "broken.jsonl"


def _mixed_folder(d):
    write(d / "m" / "a.jsonl", [ultrachat_row(0)])
    write(d / "m" / "b.parquet", [ultrachat_row(1)])
    return d / "m"


@pytest.mark.parametrize("setup, match", [(_csv, "unknown extension"), (_empty_folder, "holds no data files"),
                                          (_broken_json, "could not read"), (_mixed_folder, "mixes JSON and parquet")])
def test_bad_local_sources(tmp_path, setup, match):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        load_source(SourceConfig(path=str(path)), "sft")
    assert str(path) in str(err.value) and "sft data" in str(err.value)


def jsonl_with_a_bad_line(path: Path, where: str) -> tuple[Path, int]:
    """Five UltraChat rows as JSON lines (gzip for .gz), one of them broken: the last one cut short (a truncated
    download) or a middle one that is not JSON. Returns the file and the broken line's number (1-based)."""
    lines = [json.dumps(ultrachat_row(i)) + "\n" for i in range(5)]
    bad = 5 if where == "last" else 3
    lines[bad - 1] = lines[bad - 1][:25] if where == "last" else "{'messages': not json}\n"
    text = "".join(lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path, bad


@pytest.mark.parametrize("name", ["sft.jsonl", "sft.jsonl.gz"])
@pytest.mark.parametrize("where", ["last", "middle"])
def test_a_line_that_is_not_json_is_named_or_skipped(tmp_path, caplog, monkeypatch, name, where):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path, bad = jsonl_with_a_bad_line(tmp_path / name, where)
    with pytest.raises(DataError) as err:  # fail (the default): the file and the line, and the way out
        load_source(SourceConfig(path=str(path)), "sft", OnInvalid.fail)
    assert f"could not read {path}: 1 line(s) not JSON (line {bad}:" in str(err.value)
    assert "data.on_invalid=skip" in str(err.value)
    assert ("cut short" in str(err.value)) == (where == "last")
    with caplog.at_level(logging.WARNING, logger="po_experiments.data.sources"):
        rows = load_source(SourceConfig(path=str(path)), "sft", OnInvalid.skip)
    kept = [f"question {i}" for i in range(5) if i != bad - 1]
    assert rows["prompt"] == kept  # every other row, in order
    assert f"skipped lines that are not JSON in {path}: 1 line(s) not JSON (line {bad}:" in caplog.text
    sft = load_sft(config("skip", sft=path))  # the loaders pass data.on_invalid down
    assert len(sft) == 4
    with pytest.raises(DataError, match=f"line {bad}:"):
        load_sft(config("fail", sft=path))


def test_preflight_peeks_past_a_bad_first_line_only_when_skipping(tmp_path):
    from po_experiments.data.sources import peek_source

    path = tmp_path / "s.jsonl"
    path.write_text("{broken\n" + json.dumps(ultrachat_row(0)) + "\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        peek_source(SourceConfig(path=str(path)), "sft", "fail")
    peek_source(SourceConfig(path=str(path)), "sft", "skip")


def test_wrong_schema_names_the_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"no column\(s\) chosen, rejected"):
        load_preferences(config(preferences=write(tmp_path / "p.jsonl", [ultrachat_row(0)])))


def test_max_rows_takes_the_first_rows(tmp_path):
    path = write(tmp_path / "s.jsonl", [ultrachat_row(i) for i in range(5)])
    assert load_source(SourceConfig(path=str(path), max_rows=2), "sft")["prompt"] == ["question 0", "question 1"]
    assert len(load_source(SourceConfig(path=str(path), max_rows=50), "sft")) == 5
    with pytest.raises(DataError, match="data.sft.max_rows"):
        load_source(SourceConfig(path=str(path), max_rows=0), "sft")


def test_no_path_and_no_hub_id():
    with pytest.raises(DataError, match="data.questions.path"):
        load_source(SourceConfig(), "questions")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()  # later tests must not inherit "unreachable"


@pytest.mark.parametrize("what", ["sft", "preferences", "questions"])  # instructions: the script-dataset test
def test_unreachable_hub_fails_fast_and_says_what_to_set(offline, what):
    hub_cfg = PaperDataConfig(
        sft=SourceConfig(hub_id="HuggingFaceH4/ultrachat_200k", split="train_sft"),
        preferences=SourceConfig(hub_id="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs"),
        questions=SourceConfig(hub_id="Anthropic/hh-rlhf", data_dir="helpful-base", split="test"),
        instructions=SourceConfig(hub_id="tatsu-lab/alpaca_eval", split="eval"))
    flags = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        LOADERS[what](hub_cfg)
    assert time.monotonic() - start < 10
    assert getattr(hub_cfg, what).hub_id in str(err.value)
    assert f"data.{what}.path=" in str(err.value) and "cannot be reached" in str(err.value)
    assert datasets.config.HF_HUB_OFFLINE == flags  # the temporary offline switch is undone



def test_alpaca_eval_hub_id_names_the_json_file_to_use():
    hub = PaperDataConfig(instructions=SourceConfig(hub_id="tatsu-lab/alpaca_eval", split="eval"))
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_instructions(hub)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "script dataset" in msg and "alpaca_eval.json" in msg
    assert "data.instructions.path=/path/to/alpaca_eval.json" in msg


# --------------------------------------------------------------------------------------------- validation at scale


def _spy_map(monkeypatch) -> list:
    """Record the num_proc of every datasets.map call (the parallel path of the validation)."""
    calls, real = [], datasets.Dataset.map

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("num_proc"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    return calls


@pytest.mark.slow  # a few seconds: the fast tier keeps under 3 minutes
def test_parallel_validation_finds_what_the_loop_finds(tmp_path, tokenizer, monkeypatch):
    """num_proc=2 over the real HH sample: the same rows kept, the same report as one process."""
    from po_experiments.data import validation
    from po_experiments.data.paper import _check_question

    ds = load_source(SourceConfig(path=str(_need(HH_SAMPLE))), "questions")
    check = lambda row: _check_question(row, tokenizer, 40)  # noqa: E731 - some rows too long, four malformed
    loop = {i: p for i, p in enumerate(check(r) for r in ds) if p}
    calls = _spy_map(monkeypatch)
    kept_1, one = validate_rows(ds, check, source="hh", on_invalid="skip", num_proc=1)
    kept_2, two = validate_rows(ds, check, source="hh", on_invalid="skip", num_proc=2)
    assert calls == [2]  # one process first (no map), then two processes
    assert one == two and one.bad_rows == sorted(loop) and len(loop) > 100
    assert set(HH_BAD_ROWS) <= set(one.bad_rows)
    assert kept_1["chosen"] == kept_2["chosen"]
    assert validation.row_findings(ds, check, num_proc=2) == loop


def test_parallel_validation_fail_names_every_bad_row(tmp_path, monkeypatch):
    from po_experiments.data import validation

    monkeypatch.setattr(validation, "ROWS_PER_PROCESS", 8)  # 40 rows: 2 processes
    bad_at = [3, 17, 38]
    rows = [ultrachat_row(i) if i not in bad_at else _bad_sft(messages=[user("q"), bot(" ")]) for i in range(40)]
    calls = _spy_map(monkeypatch)
    cfg = PaperDataConfig(on_invalid=OnInvalid.fail, num_proc=2, sft=SourceConfig(path=str(write(tmp_path / "s.jsonl",
                                                                                                  rows))))
    with pytest.raises(DataError) as err:
        load_sft(cfg)
    assert calls[0] == 2
    assert "3 of 40 rows are invalid" in str(err.value)
    for i in bad_at:
        assert f"row {i}, field 'messages': empty content (message 1)" in str(err.value)


def test_validation_runs_once_per_process_and_data_set(tmp_path, tokenizer, monkeypatch):
    from po_experiments.data import validation

    runs = []
    real = validation._check_all
    monkeypatch.setattr(validation, "_check_all", lambda *a: runs.append(1) or real(*a))
    cfg = config(preferences=write(tmp_path / "p.jsonl", [ultrafeedback_row(i) for i in range(3)]))
    first = load_preferences(cfg, tokenizer)
    again = load_preferences(cfg, tokenizer)  # e.g. the G analysis after DPO: the findings are reused
    assert len(runs) == 1 and first["prompt"] == again["prompt"]
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "policy")  # the same tokenizer saved in another folder (the policy's)
    load_preferences(cfg, AutoTokenizer.from_pretrained(tmp_path / "policy"))
    assert len(runs) == 1
    load_preferences(config(max_length=7, preferences=cfg.preferences.path), tokenizer)  # another limit: checked
    assert len(runs) == 2


def test_only_the_main_process_checks_rows(tmp_path, monkeypatch):
    """Other ranks take rank 0's findings (`distributed.main_first`) instead of checking themselves."""
    from po_experiments import distributed
    from po_experiments.data import validation

    validation._MEMO.clear()
    shared = {1: [("messages", "empty content (message 1)")]}  # what rank 0 found
    monkeypatch.setattr(distributed, "main_first", lambda work: shared)
    monkeypatch.setattr(validation, "_check_all", lambda *a: pytest.fail("a non-main rank checked rows"))
    ds = load_sft(config(sft=write(tmp_path / "s.jsonl", [ultrachat_row(i) for i in range(3)])))
    assert [m[0]["content"] for m in ds["messages"]] == ["question 0", "question 2"]


# --------------------------------------------------------------------------------------------- preflight


def _paper_cfg(tmp_path, **paths):
    from omegaconf import OmegaConf

    files = {"sft": write(tmp_path / "sft.jsonl.gz", [ultrachat_row(i) for i in range(3)]),
             "preferences": write(tmp_path / "p.parquet", [ultrafeedback_row(i) for i in range(3)]),
             "questions": write(tmp_path / "hh.jsonl", [hh_row(i) for i in range(3)]),
             "instructions": write(tmp_path / "alpaca.json", [alpaca_row(i) for i in range(3)])}
    files.update(paths)
    data = OmegaConf.structured(PaperDataConfig(**{w: SourceConfig(path=str(p)) for w, p in files.items()}))
    return OmegaConf.create({"data": data, "analysis": {"enabled": True, "dprime": "heldout"}})


def test_win_rate_on_the_hh_helpful_questions(tokenizer, tmp_path):
    """eval.prompts=hh_helpful: data.questions in file order (the first are D', fed the same way), AlpacaEval's
    record format; the default stays AlpacaEval's instructions."""
    from po_experiments.analysis.stage import dprime_prompts
    from po_experiments.evaluation.stage import eval_prompts, outputs_dir, write_outputs

    data = OmegaConf.structured(PaperDataConfig(
        on_invalid=OnInvalid.fail, num_proc=1, questions=SourceConfig(path=str(_need(HH_SAMPLE)), max_rows=200),
        instructions=SourceConfig(path=str(_need(ALPACA_SAMPLE)), max_rows=200)))
    cfg = OmegaConf.create({"data": data, "eval": {"n_prompts": 40, "max_new_tokens": None, "prompts": "hh_helpful"},
                            "analysis": {"n_dprime": 10, "dprime": "heldout"}})
    prompts = eval_prompts(cfg, tokenizer)
    questions = load_questions(data, tokenizer)
    assert len(prompts.instructions) == 40 and prompts.index == list(range(40))
    assert prompts.model_inputs[:10] == dprime_prompts(cfg, tokenizer)  # D' is the first 10 of them
    assert prompts.max_new_tokens == data.max_new_tokens and set(prompts.dataset) == {"hh_rlhf_helpful"}
    for k in range(40):
        turns = questions[k]["prompt"]
        assert prompts.model_inputs[k] == tokenizer.apply_chat_template(turns, tokenize=False,
                                                                         add_generation_prompt=True)
        expected = turns[0]["content"] if len(turns) == 1 else questions[k]["text"].strip()
        assert prompts.instructions[k] == expected
    assert any(len(questions[k]["prompt"]) > 1 for k in range(40))  # multi-turn questions are read as dialogues
    single = next(k for k in range(40) if len(questions[k]["prompt"]) == 1)
    assert prompts.instructions[single] == turns_of(HH_SAMPLE, single)  # the question as the file writes it
    write_outputs(outputs_dir(cfg, tmp_path) / "step-1.json", prompts, ["an answer"] * 40, "dpo")
    records = json.loads((tmp_path / "eval" / "outputs@hh_helpful" / "step-1.json").read_text())
    assert set(records[0]) == {"instruction", "output", "generator", "dataset", "index"}  # AlpacaEval's records
    cfg.eval.prompts = "alpaca_eval"
    default = eval_prompts(cfg, tokenizer)
    assert len(default.instructions) == 40 and default.instructions[0] == json.loads(ALPACA_SAMPLE.read_text())[0][
        "instruction"] and outputs_dir(cfg, tmp_path) == tmp_path / "eval" / "outputs"


def turns_of(path, row):
    """The first user turn of an HH-RLHF file's row, read here without the loaders."""
    with gzip.open(path, "rt") as f:
        for _ in range(row):
            f.readline()
        chosen = json.loads(f.readline())["chosen"]
    return chosen.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()


def test_preflight_opens_every_source(tmp_path):
    from po_experiments.data.sources import preflight_sources, sources_in_use

    cfg = _paper_cfg(tmp_path)
    start = time.monotonic()
    preflight_sources(cfg)
    assert time.monotonic() - start < 2
    assert sources_in_use(cfg) == ["sft", "preferences", "questions", "instructions"]
    cfg.analysis.dprime = "train"  # D' from the training prompts: HH-RLHF is not read
    assert sources_in_use(cfg) == ["sft", "preferences", "instructions"]
    cfg.eval = {"prompts": "hh_helpful"}  # ... unless the win rate asks its questions, and then not AlpacaEval
    assert sources_in_use(cfg) == ["sft", "preferences", "questions"]


def _truncated_gz(d):
    (d / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"messages": []}\n')[:12])
    return d / "cut.jsonl.gz"


@pytest.mark.parametrize("what, setup, match", [
    ("sft", lambda d: d / "missing.jsonl", "does not exist"),
    ("sft", _broken_json, "could not read"),
    ("sft", _truncated_gz, "could not read"),
    ("preferences", lambda d: write(d / "p.jsonl", [ultrachat_row(0)]), r"no column\(s\) chosen, rejected"),
    ("instructions", lambda d: write(d / "a.parquet", [{"instruction": "x"}]), r"no column\(s\) dataset"),
    ("questions", lambda d: write(d / "hh.json", []), "empty JSON list"),
])
def test_preflight_fails_in_seconds_naming_key_and_file(tmp_path, what, setup, match):
    from po_experiments.data.sources import preflight_sources

    path = setup(tmp_path)
    cfg = _paper_cfg(tmp_path, **{what: path})
    start = time.monotonic()
    with pytest.raises(DataError, match=match) as err:
        preflight_sources(cfg)
    assert time.monotonic() - start < 2
    assert str(path) in str(err.value) and f"{what} data" in str(err.value)


def test_preflight_on_the_alpaca_eval_hub_id(tmp_path):
    from po_experiments.data.sources import preflight_sources

    cfg = _paper_cfg(tmp_path)
    cfg.data.instructions = SourceConfig(hub_id="tatsu-lab/alpaca_eval", split="eval")
    with pytest.raises(DataError, match=r"alpaca_eval\.json .*data\.instructions\.path=/path/to/alpaca_eval\.json"):
        preflight_sources(cfg)


def test_preflight_on_an_unreachable_hub_source(tmp_path, offline):
    from po_experiments.data.sources import preflight_sources

    cfg = _paper_cfg(tmp_path)
    cfg.data.questions = SourceConfig(hub_id="Anthropic/hh-rlhf", data_dir="helpful-base", split="test")
    start = time.monotonic()
    with pytest.raises(DataError, match="questions data: Anthropic/hh-rlhf .*data.questions.path="):
        preflight_sources(cfg)
    assert time.monotonic() - start < 10


def test_preflight_reads_the_real_samples():
    from omegaconf import OmegaConf

    from po_experiments.data.sources import peek_source

    peek_source(OmegaConf.structured(SourceConfig(path=str(_need(ALPACA_SAMPLE)))), "instructions")
    peek_source(OmegaConf.structured(SourceConfig(path=str(_need(HH_SAMPLE)))), "questions")


def test_a_copy_whose_size_differs_from_the_planned_rows_is_reported(caplog):
    n = len(load_source(SourceConfig(path=str(ALPACA_SAMPLE)), "instructions"))
    with caplog.at_level("WARNING", logger="po_experiments.data.sources"):
        load_source(SourceConfig(path=str(ALPACA_SAMPLE), rows=n), "instructions")
    assert "data.instructions" not in caplog.text
    with caplog.at_level("WARNING", logger="po_experiments.data.sources"):
        load_source(SourceConfig(path=str(ALPACA_SAMPLE), rows=n + 7), "instructions")
    assert f"has {n} rows, data.instructions.rows says {n + 7}" in caplog.text
