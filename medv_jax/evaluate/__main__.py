"""Command line for evaluation: ``python -m medv_jax.evaluate SUBCOMMAND ...``.

Subcommands:
  vqa               score a VQA answer file against references (closed accuracy, open recall, extras)
  lengths           response-length statistics of one or more answer files (paper Table 3)
  run-vqa           answer a VQA test split with the sampler and score it (paper Table 2)
  run-conversation  answer the open conversation benchmark and judge it (paper Table 1)
  judge             judge an existing conversation answer file (any model's)
  sweep             score, length, speed and repetition over a (gen_length, block_length, steps) grid
  report            one Markdown/HTML page comparing run folders with the paper's numbers
  synthetic-questions  the built-in synthetic set's findings-report requests as a question file

To add a subcommand, write its ``add_arguments(parser)`` and ``run(args) -> exit code`` functions
(in any module) and append a :class:`Subcommand` to :data:`SUBCOMMANDS`. ``run`` may raise
UserError, ValueError or OSError for bad input; :func:`main` prints those as one ``error:`` line,
exit code 2 (``--debug``: with the traceback).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from medv_jax.evaluate import conversation, report, run_vqa, sweep, synthetic_reports, word_probe
from medv_jax.data.records import load_records, write_json
from medv_jax.evaluate.response_length import format_length_table, length_stats
from medv_jax.evaluate.vqa_scoring import (
    format_vqa_table,
    load_references,
    predictions_from_records,
    score_vqa,
)
from medv_jax.user_errors import CommandParser, UserError, command_name, run_command

COMMAND = "medv_jax.evaluate"

__all__ = ["Subcommand", "SUBCOMMANDS", "build_parser", "main", "write_json"]


@dataclass(frozen=True)
class Subcommand:
    """One ``python -m medv_jax.evaluate NAME`` command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- vqa ---------------------------------------------------------------------------------------


def _add_vqa_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions", required=True,
        help="answer file (JSONL or JSON list): question_id and text (or answer / prediction)",
    )
    refs = parser.add_mutually_exclusive_group(required=True)
    refs.add_argument(
        "--references",
        help="test questions (JSONL or JSON list): question_id or id, answer_type CLOSED/OPEN, "
        "ground truth in answer (gt_answer, gpt_answer, ground_truth) or the gpt turn of "
        "conversations",
    )
    refs.add_argument("--tfds", metavar="NAME:SPLIT",
                      help="references from a built TFDS split instead (e.g. vqa_rad:test)")
    parser.add_argument("--tfds_data_dir", default=None, help="TFDS data folder of --tfds")
    parser.add_argument("--output", help="write the metrics (and per-question scores) as JSON here")
    parser.add_argument(
        "--allow_missing", action="store_true",
        help="score references without a prediction as empty answers instead of failing",
    )


def _run_vqa(args: argparse.Namespace) -> int:
    if args.tfds:
        from medv_jax.data.tfds_vqa import read_split
        from medv_jax.evaluate.vqa_scoring import references_from_records

        args.references = f"tfds {args.tfds}"
        references = references_from_records(read_split(args.tfds, args.tfds_data_dir), where=args.references)
    else:
        references = load_references(args.references)
    if not references:
        raise UserError(f"--references {args.references}: no questions in it; give the test questions file")
    prediction_records = load_records(args.predictions)
    if not prediction_records:
        raise UserError(f"--predictions {args.predictions}: no answers in it; give the answers file infer wrote")
    predictions = predictions_from_records(prediction_records, where=args.predictions)
    scores = score_vqa(references, predictions, allow_missing=args.allow_missing)
    print(format_vqa_table(scores))
    payload = {"predictions": args.predictions, "references": args.references, **scores.to_dict()}
    # Answer files written by our sampler carry num_tokens / seconds: report lengths alongside.
    if any("num_tokens" in r or "seconds" in r for r in prediction_records):
        lengths = length_stats(prediction_records)
        print()
        print(format_length_table({os.path.basename(args.predictions): lengths}))
        payload["response_length"] = lengths.to_dict()
    if scores.missing_ids:
        print(
            f"\nwarning: {len(scores.missing_ids)} reference question(s) had no prediction and "
            "were scored as empty answers",
            file=sys.stderr,
        )
    if args.output:
        write_json(args.output, payload)
    return 0


# ---- lengths -----------------------------------------------------------------------------------


def _add_lengths_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--answers", required=True, nargs="+",
        help="answer file(s) whose records carry text, num_tokens and seconds; one column each",
    )
    parser.add_argument("--output", help="write the statistics as JSON here")


def _run_names(paths: Sequence[str]) -> list[str]:
    """Column names: file names when they are distinct, else the paths as given."""
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _run_lengths(args: argparse.Namespace) -> int:
    runs = {}
    for name, path in zip(_run_names(args.answers), args.answers):
        records = load_records(path)
        if not records:
            raise UserError(f"--answers {path}: no answers in it")
        runs[name] = length_stats(records)
    print(format_length_table(runs))
    if args.output:
        write_json(
            args.output,
            {"runs": [{"answers": path, **runs[name].to_dict()}
                      for name, path in zip(runs, args.answers)]},
        )
    return 0


def model_flags(parser: argparse.ArgumentParser) -> None:
    """The shared model flags of ``medv_jax.sampling.cli`` (checkpoint, tokenizer, dtypes, prompt)."""
    from medv_jax.sampling import cli

    cli.add_model_args(parser)


def generation_flags(parser: argparse.ArgumentParser, gen_length: int, block_length: int, steps: int) -> None:
    """Model and sampler flags (the shared ones of ``medv_jax.sampling.cli``) plus infer's
    batching flags, with the benchmark's paper defaults for the schedule."""
    from medv_jax.sampling import cli
    from medv_jax.sampling.diffusion import SamplerConfig

    cli.add_model_args(parser)
    cli.add_image_args(parser)
    cli.add_sampler_args(parser, SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps))
    g = parser.add_argument_group("inference")
    g.add_argument("--image_folder", default="", help="folder the questions' image paths are relative to")
    g.add_argument("--batch_size", type=int, default=8, help="questions per jitted batch")
    g.add_argument("--prompt_length", type=int, default=0, help="fixed prompt width; 0 = per batch, bucketed")
    g.add_argument("--model_id", default=None, help="model_id written in answers")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("vqa", "score VQA answers (closed accuracy, open recall, F1, BLEU)",
               _add_vqa_arguments, _run_vqa),
    Subcommand("lengths", "response-length statistics (tokens, words, seconds per question)",
               _add_lengths_arguments, _run_lengths),
    Subcommand("run-vqa", "answer a VQA test split with the jitted sampler and score it (resumable)",
               functools.partial(run_vqa.add_arguments, generation_flags=generation_flags), run_vqa.run),
    Subcommand("run-conversation",
               "answer the open conversation benchmark (L=256 B=64 N=256) and judge it (resumable)",
               functools.partial(conversation.add_run_arguments, generation_flags=generation_flags),
               conversation.run_conversation),
    Subcommand("judge", "judge a conversation answer file with an OpenAI-compatible endpoint",
               conversation.add_judge_command_arguments, conversation.run_judge),
    Subcommand("sweep", "task score, length, speed and repetition over a sampler grid, with plots",
               functools.partial(sweep.add_arguments, generation_flags=generation_flags), sweep.run),
    Subcommand("report", "compare run folders side by side with the paper's numbers",
               report.add_arguments, report.run),
    Subcommand("probe-words", "teacher-forced accuracy of chosen words of the reference answers (what the model reads)",
               functools.partial(word_probe.add_arguments, model_flags=model_flags), word_probe.run),
    Subcommand("synthetic-questions", "write synthetic findings-report requests with images and scan attributes",
               synthetic_reports.add_arguments, synthetic_reports.run),
]


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = CommandParser(prog=command_name(COMMAND), description="LLaDA-MedV evaluation.")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for command in subcommands:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""

    def run(argv: list[str]) -> int:
        args = build_parser().parse_args(argv)
        return args.run(args)

    return run_command(run, argv, COMMAND, user_errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
