"""A results page comparing run folders side by side with the paper's numbers.

    python -m medv_jax.evaluate report RUN_DIR [RUN_DIR ...] --out report.md [--html]

Each RUN_DIR holds the ``metrics.json`` of ``run-vqa``, ``run-conversation`` or ``judge``. The
page has up to three tables, each with the paper's rows as reference (values from the paper's
tables as summarised in ``docs/algorithm.md`` §7 and the paper text):

* Table 1 layout: open conversation, mean(s2/s1)*100 per type, per domain and overall.
* Table 2 layout: VQA open recall and closed accuracy for VQA-RAD, SLAKE and PathVQA; a run fills
  the columns of its dataset (``dataset`` in metrics.json: vqa_rad, slake, pathvqa, or a name
  containing one of them); runs on other datasets get their own table.
* Table 3 layout: seconds per question, words per question, seconds per word, sampling steps and
  the conversation score.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
from typing import Any, Mapping, Sequence

from medv_jax.evaluate.conversation import GROUPS

__all__ = ["PAPER_VQA", "PAPER_CONVERSATION", "PAPER_LENGTHS", "load_run", "vqa_dataset",
           "build_report", "markdown_to_html", "add_arguments", "run"]

#: The paper's Table 2 (LLaDA-MedV, fine-tuned per dataset, L = B = N = 128): (open recall, closed acc).
PAPER_VQA: dict[str, tuple[float, float]] = {
    "vqa_rad": (45.60, 84.93),
    "slake": (68.85, 92.31),
    "pathvqa": (31.96, 95.15),
}
VQA_LABELS = {"vqa_rad": "VQA-RAD", "slake": "SLAKE", "pathvqa": "PathVQA"}
#: The paper's Table 1 rows (GPT-4.1 mini judge): columns as conversation.GROUPS.
PAPER_CONVERSATION: dict[str, tuple[float, ...]] = {
    "LLaDA-MedV (paper, L=256 B=64 N=256)":
        (54.141, 48.214, 64.352, 47.348, 51.073, 50.432, 50.268, 52.605),
    "LLaVA-Med (paper)": (51.750, 24.730, 40.819, 39.928, 51.452, 48.880, 42.083, 44.750),
}
#: The paper's Table 3 rows: (s/question, words/question, s/word, steps N, overall score).
PAPER_LENGTHS: dict[str, tuple[Any, ...]] = {
    "LLaDA-MedV256 (paper, A100)": (38.382, 166.585, 0.230, 256, 52.605),
    "LLaDA-MedV128 (paper)": (30.874, 170.399, 0.181, 128, 44.276),
    "LLaDA-MedV64 (paper)": (21.234, 172.839, 0.123, 64, 28.523),
    "LLaVA-Med (paper)": (1.317, 36.332, 0.036, None, 44.750),
}


def load_run(run_dir: str) -> dict[str, Any]:
    """A run's metrics.json, with its name defaulting to the folder name."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{run_dir}: no metrics.json (not a run-vqa / run-conversation folder?)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(metrics, dict) or metrics.get("kind") not in ("vqa", "conversation"):
        raise ValueError(f"{path}: 'kind' must be 'vqa' or 'conversation'")
    metrics.setdefault("name", os.path.basename(os.path.normpath(run_dir)))
    metrics["run_dir"] = run_dir
    return metrics


def vqa_dataset(name: str | None) -> str | None:
    """The paper dataset a run's dataset name refers to (vqa_rad, slake, pathvqa), if any."""
    key = re.sub(r"[^a-z]", "", (name or "").lower())
    for dataset, pattern in (("vqa_rad", "vqarad"), ("slake", "slake"), ("pathvqa", "pathvqa")):
        if pattern in key:
            return dataset
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return lines


def _sampler_text(run: Mapping[str, Any]) -> str:
    s = run.get("sampler") or {}
    if not s:
        return "-"
    return f"L={s.get('gen_length')} B={s.get('block_length')} N={s.get('steps')}"


def build_report(runs: Sequence[Mapping[str, Any]], title: str = "LLaDA-MedV evaluation") -> str:
    """The Markdown page for ``runs`` (loaded metrics)."""
    lines = [f"# {title}", ""]
    conv = [r for r in runs if r["kind"] == "conversation"]
    vqa = [r for r in runs if r["kind"] == "vqa"]

    if conv:
        lines += ["## Open-ended biomedical conversation (paper Table 1)", "",
                  "Score: mean over questions of s2/s1 x 100 (s1: the reference GPT-4 answer, "
                  "s2: the candidate, both rated 1-10 by the judge).", ""]
        rows = []
        for r in conv:
            scores = r.get("scores") or {}
            rows.append([f"{r['name']} ({_sampler_text(r)})",
                         *((scores.get(g) or {}).get("relative_score") for g in GROUPS),
                         (scores.get("Overall") or {}).get("count")])
        rows += [[name, *values, 193] for name, values in PAPER_CONVERSATION.items()]
        lines += _table(["run", *GROUPS, "judged"], rows, digits=3)
        notes = [f"- {r['name']}: judge {r['judge']['model']}, {r.get('n_judge_failures', 0)} "
                 f"judge failure(s), {r.get('n_missing_answers', 0)} missing answer(s)"
                 for r in conv if r.get("judge")]
        lines += ["", *notes, "- Paper judge: GPT-4.1 mini.", ""]

    if vqa:
        known = [r for r in vqa if vqa_dataset(r.get("dataset"))]
        other = [r for r in vqa if not vqa_dataset(r.get("dataset"))]
        if known:
            lines += ["## Medical VQA (paper Table 2)", "",
                      "Open: recall of ground-truth words (%); closed: yes/no accuracy (%).", ""]
            headers = ["run"] + [f"{VQA_LABELS[d]} {kind}" for d in PAPER_VQA for kind in ("open", "closed")]
            rows = []
            for r in known:
                row: list[Any] = [f"{r['name']} ({_sampler_text(r)})"]
                for d in PAPER_VQA:
                    mine = vqa_dataset(r.get("dataset")) == d
                    row += [r.get("open_recall") if mine else None, r.get("closed_accuracy") if mine else None]
                rows.append(row)
            rows.append(["LLaDA-MedV (paper, L=B=N=128)",
                         *(v for d in PAPER_VQA for v in PAPER_VQA[d])])
            lines += _table(headers, rows) + [""]
        if other:
            lines += ["## VQA on other question sets", ""]
            rows = [[r["name"], r.get("dataset"), _sampler_text(r), r.get("n_closed"),
                     r.get("closed_accuracy"), r.get("n_open"), r.get("open_recall")] for r in other]
            lines += _table(["run", "dataset", "sampler", "closed", "closed acc (%)", "open",
                             "open recall (%)"], rows) + [""]

    lines += ["## Response length and speed (paper Table 3)", "",
              "T/Q: seconds per question, W/Q: words per answer, T/W: seconds per word. Our "
              "seconds include model loading and compilation spread over the run's answers.", ""]
    rows = []
    for r in runs:
        lengths = r.get("response_length") or {}
        score = r.get("overall") if r["kind"] == "conversation" else r.get("closed_accuracy")
        rows.append([r["name"], r["kind"], lengths.get("seconds_per_question"),
                     lengths.get("words_per_question"), lengths.get("seconds_per_word"),
                     lengths.get("tokens_per_second"), (r.get("sampler") or {}).get("steps"), score])
    rows += [[name, "conversation", t, w, tw, None, n, s] for name, (t, w, tw, n, s) in PAPER_LENGTHS.items()]
    lines += _table(["run", "task", "T/Q (s)", "W/Q", "T/W (s)", "tokens/s", "N",
                     "score (conv. overall / closed acc)"], rows, digits=3)
    lines += ["", "Runs: " + ", ".join(f"`{r['run_dir']}`" for r in runs), ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def markdown_to_html(markdown: str, title: str = "LLaDA-MedV evaluation") -> str:
    """HTML for the subset of Markdown :func:`build_report` writes: headings, pipe tables,
    bullet lists and paragraphs."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, rows = table[0], table[2:]
            body.append("<table>")
            body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            for row in rows:
                opening = '<tr class="paper">' if "paper" in row[0] else "<tr>"
                body.append(opening
                            + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>")
            body.append("</table>")
            continue
        elif line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}tr.paper{background:#eee}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders with metrics.json")
    parser.add_argument("--out", required=True, help="Markdown report path")
    parser.add_argument("--html", action="store_true", help="also write the page as HTML (.html beside --out)")
    parser.add_argument("--title", default="LLaDA-MedV evaluation")


def run(args: argparse.Namespace) -> int:
    runs = [load_run(d) for d in args.run_dirs]
    markdown = build_report(runs, args.title)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(markdown)
    print(markdown)
    if args.html:
        path = os.path.splitext(args.out)[0] + ".html"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(markdown_to_html(markdown, args.title))
        print(f"wrote {args.out} and {path}")
    return 0
