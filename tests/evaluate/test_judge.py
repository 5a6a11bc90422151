"""The judge client and the conversation benchmark against a fake OpenAI-compatible server on
127.0.0.1 (http.server in a thread) whose replies are scripted per candidate answer.

Scoring, worked by hand (see test_score_judgements_hand_worked):
  q1 Conversation CXR        s1 8,  s2 6  -> 0.75
  q2 Conversation MRI        s1 10, s2 5  -> 0.50
  q3 Description  CXR        s1 5,  s2 4  -> 0.80
  q4 Description  CT         s1 8,  s2 2  -> 0.25
  q5 Conversation Histology  judge failed -> left out everywhere
  Conversation (0.75 + 0.50) / 2 = 62.5; Description (0.80 + 0.25) / 2 = 52.5; CXR 77.5; MRI 50;
  CT 25; Histology and Gross: no question; Overall 2.30 / 4 = 57.5 (not the ratio of the mean
  scores, 4.25 / 7.75 = 54.84).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medv_jax.evaluate import conversation, judge
from medv_jax.evaluate.__main__ import main

GOOD = "8 6\nAssistant 1 is more detailed."


class FakeJudge:
    """Scripted replies keyed by the candidate answer: a list of (status, body or reply text,
    delay seconds); the last entry repeats. Records every request."""

    def __init__(self, scripts: dict[str, list[tuple[int, str, float]]]):
        self.scripts = scripts
        self.requests: list[dict] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][1]["content"]
                candidate = user.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]")[0]
                with fake.lock:
                    fake.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                    n = fake.counts.get(candidate, 0)
                    fake.counts[candidate] = n + 1
                script = fake.scripts.get(candidate, [(200, GOOD, 0.0)])
                status, text, delay = script[min(n, len(script) - 1)]
                if delay:
                    time.sleep(delay)
                if status == 200:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                else:
                    payload = json.dumps({"error": {"message": text}})
                data = payload.encode()
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _messages(candidate: str, reference: str = "The reference answer.") -> list[dict]:
    return judge.judge_messages(judge.judge_user_prompt("What is shown?\n<image>", reference, candidate,
                                                        "A chest X-ray.", "Figure 1", []))


def _config(server: FakeJudge, tmp_path: Path, **kw) -> judge.JudgeConfig:
    base = dict(base_url=server.base_url, model="fake-judge", api_key="sk-test", timeout=5.0,
                max_retries=3, parse_retries=2, backoff=0.5, concurrency=3,
                cache_dir=str(tmp_path / "cache"))
    return judge.JudgeConfig(**{**base, **kw})


def test_prompt_is_llava_med_text():
    prompt = judge.judge_user_prompt(
        "What is the organ?\n<image>", "REF", "CAND", "Cystic wall.", "Fig. 3",
        [{"tokens": "Cells were not found ( Fig. 3 ) .", "entities": []}])
    assert prompt.startswith("[Context]\nFigure Caption:\nFig. 3: Cystic wall.\n\nFigure Context:\n\t- [{'tokens'")
    assert "[Question]\nWhat is the organ?\n<image>\n\n[Assistant 1]\nREF\n\n[End of Assistant 1]\n\n" in prompt
    assert "[Assistant 2]\nCAND\n\n[End of Assistant 2]\n\n[System]\nWe would like" in prompt
    assert "helpfulness, relevance, accuracy, level of details" in prompt
    assert "a single line containing only two values" in prompt and prompt.endswith("judgment.\n\n")
    clean = judge.judge_user_prompt(
        "What is the organ?\n<image>", "REF", "CAND", "Cystic wall.", "Fig. 3",
        [{"tokens": "One."}, {"tokens": "Two."}], style="clean")
    assert "Figure Context:\n\t- One.\n\t- Two.\n\n[Question]\nWhat is the organ?\n\n" in clean


@pytest.mark.parametrize("reply, scores", [
    ("8 6\nexplanation", (8, 6)), ("**7 9**", (7, 9)), ("\n  8, 5\n", (8, 5)), ("10/4", (10, 4)),
    ("Assistant 1: 9 Assistant 2: 7", (9, 7)), ("Answer 10 9", (10, 9)), ("7.5 6.5", (7.5, 6.5)),
])
def test_parse_scores_accepts(reply, scores):
    assert judge.parse_scores(reply) == scores


@pytest.mark.parametrize("reply", ["", "Assistant 1 is better.", "8", "8 7 6", "0 5", "11 3", "8 seven"])
def test_parse_scores_rejects(reply):
    with pytest.raises(judge.JudgeParseError):
        judge.parse_scores(reply)


def test_scripted_failures_retries_and_cache(tmp_path):
    scripts = {
        "good": [(200, "9 7\nfine", 0.0)],
        "malformed-then-good": [(200, "Assistant 2 is weaker.\n8 4", 0.0), (200, "8 4\nok", 0.0)],
        "always-malformed": [(200, "I cannot rate this.", 0.0)],
        "slow-then-good": [(200, "9 9", 1.5), (200, "6 3\nok", 0.0)],
        "500-twice": [(500, "overloaded", 0.0), (500, "overloaded", 0.0), (200, "10 5", 0.0)],
        "429": [(429, "rate limited", 0.0), (200, "5 5", 0.0)],
        "401": [(401, "bad key", 0.0)],
    }
    waits: list[float] = []
    with FakeJudge(scripts) as server:
        config = _config(server, tmp_path, timeout=0.5)
        names = list(scripts)
        results = judge.judge_all(config, [_messages(n) for n in names], progress=False,
                                  sleep=waits.append)
        by_name = dict(zip(names, results))
        assert (by_name["good"].reference_score, by_name["good"].candidate_score) == (9, 7)
        assert by_name["good"].requests == 1 and not by_name["good"].cached
        assert by_name["malformed-then-good"].candidate_score == 4
        assert by_name["malformed-then-good"].requests == 2
        bad = by_name["always-malformed"]
        assert not bad.ok and bad.requests == 3 and "malformed reply after 3 ask(s)" in bad.error
        assert bad.reply == "I cannot rate this."
        assert (by_name["slow-then-good"].candidate_score, by_name["slow-then-good"].requests) == (3, 2)
        assert (by_name["500-twice"].reference_score, by_name["500-twice"].requests) == (10, 3)
        assert by_name["429"].requests == 2 and by_name["429"].ok
        unauthorized = by_name["401"]
        assert not unauthorized.ok and unauthorized.requests == 1 and "HTTP 401" in unauthorized.error
        # Backoff: 0.5 s then 1.0 s for the two 500s, 0.5 s for the timeout and for the 429.
        assert sorted(waits) == [0.5, 0.5, 0.5, 1.0]
        first = server.requests[0]
        assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
        assert first["body"]["temperature"] == 0 and first["body"]["model"] == "fake-judge"
        assert first["body"]["messages"][0]["content"] == judge.SYSTEM_PROMPT
        sent = len(server.requests)

        # Second run: every good judgement comes from the cache; only the failures are asked again.
        again = judge.judge_all(config, [_messages(n) for n in names], progress=False, sleep=waits.append)
        resent = [n for n, r in zip(names, again) if r.requests]
        assert sorted(resent) == ["401", "always-malformed"]
        assert all(r.cached for n, r in zip(names, again) if n not in resent)
        assert [(r.reference_score, r.candidate_score) for r in again] == \
            [(r.reference_score, r.candidate_score) for r in results]
        assert len(server.requests) == sent + 1 + 3
        # A different request (another judge model) is a different cache entry.
        other = judge.judge_all(_config(server, tmp_path, model="other"), [_messages("good")],
                                progress=False)
        assert other[0].requests == 1


def test_gives_up_after_max_retries(tmp_path):
    with FakeJudge({"down": [(503, "down", 0.0)]}) as server:
        waits: list[float] = []
        result = judge.judge_request(_config(server, tmp_path, max_retries=2, backoff=1.0, max_backoff=1.5),
                                     _messages("down"), sleep=waits.append)
        assert not result.ok and result.requests == 3 and "HTTP 503" in result.error
        assert waits == [1.0, 1.5]  # 1, 2 capped at max_backoff
        assert len(server.requests) == 3


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="base URL"):
        judge.JudgeConfig(base_url="", model="m")
    with pytest.raises(ValueError, match="concurrency"):
        judge.JudgeConfig(base_url="http://x", model="m", concurrency=0)


def test_score_judgements_hand_worked():
    rows = [
        {"type": "Conversation", "domain": "CXR", "reference_score": 8, "candidate_score": 6},
        {"type": "Conversation", "domain": "MRI", "reference_score": 10, "candidate_score": 5},
        {"type": "Description", "domain": "CXR", "reference_score": 5, "candidate_score": 4},
        {"type": "Description", "domain": "CT", "reference_score": 8, "candidate_score": 2},
        {"type": "Conversation", "domain": "Histology", "reference_score": None, "candidate_score": None},
    ]
    scores = conversation.score_judgements(rows)
    expected = {"Conversation": 62.5, "Description": 52.5, "CXR": 77.5, "MRI": 50.0, "CT": 25.0,
                "Histology": None, "Gross": None, "Overall": 57.5}
    for group, value in expected.items():
        got = scores[group].relative_score
        assert got == pytest.approx(value) if value is not None else got is None, group
    assert scores["Overall"].count == 4 and scores["Histology"].count == 0
    assert scores["Overall"].reference_score == pytest.approx(7.75)
    assert scores["Overall"].candidate_score == pytest.approx(4.25)


def _qa50(qid, kind, domain_flags, answer="Reference."):
    flags = {"chest_xray": False, "mri": False, "ct_scan": False, "histology": False, "gross": False}
    flags.update(domain_flags)
    return {"question_id": qid, "image": f"{qid}.jpg", "pair_id": f"p{qid}", "text": f"Question {qid}?\n<image>",
            "gpt4_answer": answer, "fig_caption": f"Caption {qid}.", "fig_label": "Figure 1",
            "in_text_mention": [{"tokens": f"Mention {qid} .", "entities": []}], "domain": flags,
            "type": kind}


def test_domain_priority_and_bad_records():
    records = [_qa50(0, "conversation", {"histology": True, "gross": True}),
               _qa50(1, "detailed_description", {"ct_scan": True})]
    questions = conversation.parse_questions(records, "qa.jsonl")
    assert [(q.type, q.domain) for q in questions] == [("Conversation", "Histology"), ("Description", "CT")]
    with pytest.raises(ValueError, match=r"qa.jsonl: question 5 has no domain flag set"):
        conversation.parse_questions([_qa50(5, "conversation", {})], "qa.jsonl")
    with pytest.raises(ValueError, match=r"question 6 has type 'chat'"):
        conversation.parse_questions([_qa50(6, "chat", {"mri": True})], "qa.jsonl")


def test_judge_command_end_to_end(tmp_path, monkeypatch, capsys):
    """``python -m medv_jax.evaluate judge`` on a qa50-format file: the hand-worked scores above
    (q5's judge keeps answering without scores), then a rerun that sends nothing."""
    records = [
        _qa50(1, "conversation", {"chest_xray": True}),
        _qa50(2, "conversation", {"mri": True}),
        _qa50(3, "detailed_description", {"chest_xray": True, "ct_scan": True}),
        _qa50(4, "detailed_description", {"ct_scan": True}),
        _qa50(5, "conversation", {"histology": True}),
    ]
    questions = tmp_path / "qa50.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": f"cand{i}"}) + "\n" for i in range(1, 6)))
    scripts = {"cand1": [(200, "8 6\n.", 0.0)], "cand2": [(500, "x", 0.0), (200, "10 5", 0.0)],
               "cand3": [(200, "5 4", 0.0)], "cand4": [(200, "Assistant 1: 8\nAssistant 2: 2", 0.0),
                                                      (200, "8 2", 0.0)],
               "cand5": [(200, "no scores here", 0.0)]}
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-env")
    with FakeJudge(scripts) as server:
        argv = ["judge", "--questions", str(questions), "--answers", str(answers), "--out",
                str(tmp_path / "run"), "--judge_base_url", server.base_url, "--judge_model", "fake",
                "--judge_api_key_env", "FAKE_JUDGE_KEY", "--judge_backoff", "0", "--no_progress"]
        assert main(argv) == 0
        out = capsys.readouterr()
        assert "question 5" in out.err and "malformed" in out.err
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["kind"] == "conversation" and metrics["n_judged"] == 4
        assert metrics["overall"] == pytest.approx(57.5)
        assert metrics["scores"]["Conversation"]["relative_score"] == pytest.approx(62.5)
        assert metrics["scores"]["Description"]["relative_score"] == pytest.approx(52.5)
        assert metrics["scores"]["CXR"]["relative_score"] == pytest.approx(77.5)
        assert metrics["judge_failures"][0]["question_id"] == 5
        assert all(r["auth"] == "Bearer sk-env" for r in server.requests)
        user = server.requests[0]["body"]["messages"][1]["content"]
        assert "Figure 1: Caption" in user and "Mention" in user and "[Assistant 1]\nReference." in user
        rows = [json.loads(line) for line in (tmp_path / "run" / "judgements.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5]
        sent = len(server.requests)
        assert main(argv) == 0  # rerun: all good judgements cached; only q5 is asked again
        assert len(server.requests) == sent + 3
        again = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert again["judge_cached"] == 4 and again["overall"] == pytest.approx(57.5)
