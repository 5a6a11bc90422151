"""Sampling sweep: the task score, answer length, speed and repetition over a grid of
(gen_length, block_length, steps), as the paper's Tables 3 and 5 and Section 6.4.

    python -m medv_jax.evaluate sweep --checkpoint DIR --tokenizer DIR \\
        --task vqa --questions test.jsonl --image_folder IMAGES --out SWEEP_DIR \\
        --gen_lengths 64 128 --block_lengths 64 128 --step_counts 32 64 128
    # or explicit settings L:B:N, e.g. the paper's Table 5 (B):
        --settings 256:256:32 256:256:64 256:256:128 256:256:256

Every valid combination (gen_length divisible by block_length, steps divisible by the number of
blocks; others are listed and skipped) is one run folder ``SWEEP_DIR/L{L}_B{B}_N{N}`` made by
``run-vqa`` or ``run-conversation`` (so each setting resumes on its own), then summarised in
``sweep.csv``, ``sweep.md``, ``sweep.json`` and ``sweep.png`` (score and repetition against steps,
one line per gen_length, or per gen_length and block_length when several block lengths are swept).

``--task conversation`` scores with the judge (its flags as in run-conversation); with
``--no_judge`` only lengths, speed and repetition are reported. ``--task report`` answers the
synthetic set's findings-report requests and scores field accuracy
(``python -m medv_jax.evaluate synthetic-questions`` writes that question file).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from medv_jax.evaluate import conversation, generation, run_vqa, synthetic_reports
from medv_jax.data.records import write_json
from medv_jax.evaluate.repetition import repetition_stats
from medv_jax.evaluate.tables import format_table

__all__ = ["grid", "parse_setting", "setting_dir", "summarise_run", "write_table", "plot_sweep",
           "add_arguments", "run", "COLUMNS"]

Setting = tuple[int, int, int]  # (gen_length, block_length, steps)
_SCHEDULE = ("gen_length", "block_length", "steps")

#: (key, header, digits) of the summary table, score columns first (filled per task).
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("gen_length", "L", 0),
    ("block_length", "B", 0),
    ("steps", "N", 0),
    ("closed_accuracy", "closed acc (%)", 2),
    ("open_recall", "open recall (%)", 2),
    ("conversation_score", "conv. score", 3),
    ("field_accuracy", "field acc (%)", 2),
    ("tokens_per_answer", "tokens/answer", 1),
    ("words_per_answer", "words/answer", 1),
    ("seconds_per_question", "s/question", 3),
    ("seconds_per_word", "s/word", 4),
    ("repeated_ngram_share", "repeated n-grams (%)", 2),
    ("longest_token_run", "longest token run", 2),
    ("max_longest_token_run", "max token run", 0),
)


def parse_setting(text: str) -> Setting:
    parts = text.replace("/", ":").split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"--settings {text!r}: expected gen_length:block_length:steps, e.g. 256:64:256")
    return values  # type: ignore[return-value]


def grid(
    gen_lengths: Sequence[int],
    block_lengths: Sequence[int] | None,
    step_counts: Sequence[int],
    settings: Sequence[Setting] = (),
) -> tuple[list[Setting], list[str]]:
    """(valid settings in order, messages for the skipped ones). Without block lengths a setting
    is one block (block_length = gen_length)."""
    from medv_jax.sampling.diffusion import SamplerConfig

    combos: list[Setting] = list(settings)
    for length, steps in itertools.product(gen_lengths, step_counts):
        for block in (block_lengths or [length]):
            combos.append((length, block, steps))
    valid, skipped = [], []
    for combo in dict.fromkeys(combos):  # ordered, without duplicates
        try:
            SamplerConfig(gen_length=combo[0], block_length=combo[1], steps=combo[2])
        except ValueError as err:
            skipped.append(f"L={combo[0]} B={combo[1]} N={combo[2]}: {err}")
            continue
        valid.append(combo)
    return valid, skipped


def setting_dir(out: str, setting: Setting) -> str:
    return os.path.join(out, "L{}_B{}_N{}".format(*setting))


def summarise_run(run_dir: str, setting: Setting, tokenizer: Any, ngram: int) -> dict[str, Any]:
    """One table row from a finished run folder."""
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    answers = generation.timed_answers(run_dir, tokenizer)
    texts = [str(a.get("text", "")) for a in answers]
    # The generated ids where the answer row carries them, else the text re-encoded (see
    # generation's note on token counts).
    ids = [
        list((a.get("metadata") or {}).get("token_ids") or [])
        or (tokenizer.encode(t, add_special_tokens=False) if t else [])
        for a, t in zip(answers, texts)
    ]
    rep = repetition_stats(texts, ids, n=ngram)
    lengths = metrics.get("response_length") or {}
    return {
        "gen_length": setting[0],
        "block_length": setting[1],
        "steps": setting[2],
        "closed_accuracy": metrics.get("closed_accuracy"),
        "open_recall": metrics.get("open_recall"),
        "conversation_score": metrics.get("overall"),
        "field_accuracy": metrics.get("field_accuracy"),
        "tokens_per_answer": lengths.get("tokens_per_question"),
        "words_per_answer": lengths.get("words_per_question"),
        "seconds_per_question": lengths.get("seconds_per_question"),
        "seconds_per_word": lengths.get("seconds_per_word"),
        "repeated_ngram_share": None if rep.repeated_ngram_share is None
        else 100.0 * rep.repeated_ngram_share,
        "longest_token_run": rep.longest_token_run,
        "max_longest_token_run": rep.max_longest_token_run,
        "n_answers": rep.n_answers,
        "run_dir": run_dir,
    }


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int]]:
    """The table's columns: those with a value in some row (a VQA sweep has no judge score)."""
    return [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def _cell(value: Any, digits: int) -> Any:
    return f"{value:.{digits}f}" if isinstance(value, float) else value


def write_table(rows: Sequence[Mapping[str, Any]], out: str, ngram: int) -> str:
    """Write sweep.csv, sweep.md and sweep.json; return the plain-text table."""
    columns = _columns(rows)
    with open(os.path.join(out, "sweep.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _, _ in columns])
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row[k] for k, _, _ in columns])
    headers = [h.replace("n-grams", f"{ngram}-grams") for _, h, _ in columns]
    cells = [[_cell(row.get(k), d) if row.get(k) is not None else "-" for k, _, d in columns]
             for row in rows]
    markdown = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    markdown += ["| " + " | ".join(str(c) for c in line) + " |" for line in cells]
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write("# Sampling sweep\n\n" + "\n".join(markdown) + "\n\n"
                     f"Repeated {ngram}-grams: mean over answers of 1 - distinct/total word "
                     f"{ngram}-grams. Token runs: longest stretch of one token id in an answer.\n")
    write_json(os.path.join(out, "sweep.json"), {"ngram": ngram, "settings": list(rows)})
    return format_table(headers, cells)


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str, ngram: int) -> None:
    """Score(s) and repetition against steps, one line per gen_length (and block length)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    scores = [(k, h) for k, h, _ in COLUMNS[3:7] if any(r.get(k) is not None for r in rows)]
    panels = scores + [("words_per_answer", "words per answer"), ("seconds_per_word", "seconds per word"),
                       ("repeated_ngram_share", f"repeated {ngram}-grams (%)"),
                       ("longest_token_run", "longest run of one token (mean)")]
    several_blocks = len({r["block_length"] for r in rows}) > 1 and not all(
        r["block_length"] == r["gen_length"] for r in rows)
    lines: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["gen_length"], row["block_length"]) if several_blocks else (row["gen_length"],)
        lines.setdefault(key, []).append(row)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for line_key, members in sorted(lines.items()):
            members = sorted((m for m in members if m.get(key) is not None), key=lambda m: m["steps"])
            if not members:
                continue
            name = f"L={line_key[0]}" + (f", B={line_key[1]}" if len(line_key) > 1 else "")
            ax.plot([m["steps"] for m in members], [m[key] for m in members], marker="o", label=name)
        ax.set_xlabel("steps N")
        ax.set_title(label, fontsize=10)
        ax.set_xscale("log", base=2)
        steps = sorted({r["steps"] for r in rows})
        ax.set_xticks(steps, [str(n) for n in steps])  # the swept values, not powers of two
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser, generation_flags: Callable[..., None]) -> None:
    """The sweep flags; ``generation_flags`` as in ``run_vqa.add_arguments``."""
    parser.add_argument("--task", choices=["vqa", "conversation", "report"], default="vqa",
                        help="vqa: score with closed accuracy / open recall; conversation: the judge; "
                        "report: field accuracy of synthetic findings reports")
    parser.add_argument("--questions", required=True, help="question set (as run-vqa / run-conversation)")
    parser.add_argument("--out", required=True, help="sweep folder (one run folder per setting)")
    parser.add_argument("--gen_lengths", type=int, nargs="*", default=[], help="gen_length values")
    parser.add_argument("--block_lengths", type=int, nargs="*", default=None,
                        help="block_length values (default: one block, block_length = gen_length)")
    parser.add_argument("--step_counts", type=int, nargs="*", default=[], help="steps values")
    parser.add_argument("--settings", nargs="*", default=[], help="explicit L:B:N settings")
    parser.add_argument("--ngram", type=int, default=3, help="n of the repeated n-gram share")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--no_judge", action="store_true", help="conversation task: skip the judge")
    generation_flags(parser, gen_length=128, block_length=128, steps=128)
    # The single-setting schedule flags of the shared sampler group are set per grid point.
    for action in parser._actions:
        if action.dest in _SCHEDULE:
            action.help, action.default = argparse.SUPPRESS, None
    conversation.add_judge_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medv_jax.data import tokenizer as tok_lib

    given = [f"--{name}" for name in _SCHEDULE if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"sweep takes the grid flags (--gen_lengths, --block_lengths, --step_counts "
                         f"or --settings L:B:N), not {', '.join(given)}")
    settings, skipped = grid(args.gen_lengths, args.block_lengths, args.step_counts,
                             [parse_setting(s) for s in args.settings])
    for message in skipped:
        print(f"skipping {message}", file=sys.stderr)
    if not settings:
        raise ValueError("no valid setting: give --gen_lengths and --step_counts, or --settings L:B:N")
    if args.ngram < 1:
        raise ValueError(f"--ngram={args.ngram} must be >= 1")
    tokenizer = tok_lib.load_tokenizer(os.path.expanduser(args.tokenizer))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for index, setting in enumerate(settings, start=1):
        print(f"[{index}/{len(settings)}] gen_length={setting[0]} block_length={setting[1]} "
              f"steps={setting[2]}", file=sys.stderr)
        run_dir = setting_dir(args.out, setting)
        overrides = {"gen_length": setting[0], "block_length": setting[1], "steps": setting[2],
                     "out": run_dir, "name": os.path.basename(run_dir)}
        setting_args = argparse.Namespace(**{**vars(args), **overrides})
        if args.task == "vqa":
            setting_args.tfds, setting_args.tfds_data_dir, setting_args.dataset = None, None, None
            run_vqa.run(setting_args, overrides, quiet=True)
        elif args.task == "report":
            synthetic_reports.run_reports(setting_args, overrides, quiet=True)
        else:
            conversation.run_conversation(setting_args, overrides, quiet=True)
        rows.append(summarise_run(run_dir, setting, tokenizer, args.ngram))
    print(write_table(rows, args.out, args.ngram))
    plot_sweep(rows, os.path.join(args.out, "sweep.png"), args.ngram)
    print(f"\nwrote sweep.csv, sweep.md, sweep.json and sweep.png in {args.out}", file=sys.stderr)
    return 0
