"""Batch inference over a LLaVA-Med style question file, writing LLaVA-Med answers.

    python -m medv_jax.infer --checkpoint DIR --tokenizer DIR \\
        --question_file questions.jsonl --image_folder IMAGES --answers_file answers.jsonl \\
        [--batch_size 8 --gen_length 128 --block_length 128 --steps 128 ...]

    (or --tfds vqa_rad:test [--tfds_data_dir DIR] instead of --question_file/--image_folder:
    the questions of a built TFDS split, see medv_jax.data.tfds_vqa)

Question rows: ``{"question_id": ..., "image": "relative/path.png", "text": "..."}`` (any
``<image>`` in the text is removed and the image placed first, as LLaVA-Med's model_vqa does).
Answer rows: ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`` with
``prompt`` the question text and ``text`` the decoded answer; ``metadata`` holds ``num_tokens``,
``token_ids`` (generated ids up to the stop), ``steps`` (denoising steps the row ran), ``seconds``
(an equal share of its batch's sampler wall time), ``batch_seconds``, ``batch_size`` and
``includes_compile`` (the first batch of a prompt width also compiles its program).

* Fixed-shape batches: every batch has ``--batch_size`` rows (the last one is filled with inert
  rows), prompts are left padded to ``--prompt_length`` (0: the batch's longest rounded up to a
  multiple of 64), so only a few programs are ever compiled.
* Resume: rerunning with the same ``--answers_file`` skips the question ids already answered and
  appends (a partly written last line from an interrupted run is dropped first).
* Checked before the weights load, each a one-line error with exit status 2 that leaves the
  answers file as it was: the question file exists, every question_id appears once, no question
  is empty, the checkpoint is a converted one and the tokenizer is its own.
* A bad row (missing or unreadable image, malformed JSON, prompt too long) is reported on stderr
  with its id and skipped; the run goes on.
* Several processes (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or
  a SLURM / TPU launch; docs/multihost.md): process p of N answers the rows r with r % N == p
  into ``ANSWERS.process-P`` beside the answers file; once all are done, process 0 appends them to
  the answers file in question order (each question once) and removes them
  (``medv_jax.sampling.shares``). A rerun on any N after a process died counts the answers of
  those files as done.
* ``--limit N``: the first N questions of the file, however many processes share them (each
  answers its rows among those N); questions answered by an earlier run count among them.
* Row r of the question file draws its random numbers from ``fold_in(key(seed), r)``, so its
  answer does not depend on the batch it lands in, nor on resuming.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from medv_jax.sampling import cli, shares
from medv_jax.sampling.answers import checked_questions
from medv_jax.user_errors import CommandParser, UserError, command_name, existing_path, run_command

COMMAND = "medv_jax.infer"
PROMPT_BUCKET = 64  # the Python API's default (api.PROMPT_BUCKET)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog=command_name(COMMAND), description=__doc__.split("\n\n")[0])
    cli.add_model_args(parser)
    cli.add_image_args(parser)
    g = parser.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--question_file", "--question-file", help="questions .jsonl")
    src.add_argument("--tfds", metavar="NAME:SPLIT", help="questions of a built TFDS set instead, e.g. vqa_rad:test")
    g.add_argument("--tfds_data_dir", default=None, help="TFDS data folder of --tfds (default ~/tensorflow_datasets)")
    g.add_argument("--image_folder", "--image-folder", default="", help="folder image paths are relative to")
    g.add_argument("--answers_file", "--answers-file", required=True, help="answers .jsonl (appended)")
    g.add_argument("--model_id", default=None, help="model_id written in answers (default: checkpoint folder name)")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--prompt_length", type=int, default=0, help="fixed prompt width; 0 = per batch, bucketed")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N questions of the file (a total over all processes, split "
                   "among them like the whole file; already answered ones count)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    cli.add_sampler_args(parser)
    return parser


def read_questions(path: str) -> Iterator[tuple[int, Any, str]]:
    """(line index, parsed row or None, error message) for every non-empty line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
                    raise ValueError("needs question_id and text")
                yield i, row, ""
            except ValueError as e:
                yield i, None, f"line {i + 1}: bad question row ({e})"


def tfds_questions(spec: str, data_dir: str | None) -> Iterator[tuple[int, Any, str]]:
    """read_questions' rows from a TFDS split: question_id = the record id, text = the first
    human turn without <image>, image = the cached image file (an absolute path)."""
    from medv_jax.data.tfds_vqa import read_split

    for i, rec in enumerate(read_split(spec, data_dir)):
        text = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
        row = {"question_id": rec["id"], "text": text.replace("<image>", "").strip()}
        if rec.get("image"):
            row["image"] = rec["image"]
        yield i, row, ""


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda a: run(build_parser().parse_args(a)), argv, COMMAND)


def run(args: argparse.Namespace) -> int:
    """Answer the questions ``args`` (build_parser's flags) name; raises UserError for a mistake
    in them, before anything is loaded or written."""
    sampler_config = cli.sampler_config_from(args, build_parser())
    if args.batch_size <= 0:
        raise UserError(f"--batch_size={args.batch_size} must be positive")
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit={args.limit} must be >= 0")
    if args.prompt_length < 0:
        raise UserError(f"--prompt_length={args.prompt_length} must be >= 0")
    if os.path.isdir(os.path.expanduser(args.answers_file)):
        raise UserError(f"--answers_file {args.answers_file!r} is a folder: give a .jsonl file")
    if args.image_folder:
        existing_path("--image_folder", args.image_folder, "folder")
    image_options = cli.image_options(args)
    from medv_jax.models.medv import MedVConfig

    if args.question_file:
        where = f"--question_file {args.question_file}"
        try:
            rows = checked_questions(read_questions(existing_path("--question_file", args.question_file)), where)
        except UnicodeDecodeError as e:
            raise UserError(f"{where} is not UTF-8 text ({e}): give a .jsonl question file") from None
    else:
        try:
            rows = checked_questions(tfds_questions(args.tfds, args.tfds_data_dir), f"--tfds {args.tfds}")
        except UserError:
            raise
        except (ValueError, OSError) as e:
            raise UserError(f"--tfds {args.tfds}: {e}") from None
    process, processes = shares.start_processes()
    opened = cli.open_model(args)
    if not isinstance(opened[0], MedVConfig):
        raise UserError(f"--checkpoint {args.checkpoint!r} is a text-only LLaDA model: infer needs a MedV checkpoint")

    bad = [error for _, row, error in rows if row is None]
    for error in bad:
        print(f"skipping {error}", file=sys.stderr)
    questions = [(index, row) for index, row, _ in rows if row is not None]
    share = shares.process_share(questions, args.answers_file, process, processes, limit=args.limit)
    print(f"{share.summary()}, {len(bad)} unreadable rows", file=sys.stderr)
    if share.todo and (code := _answer(args, sampler_config, opened, image_options, share.todo, share.own_file, bad)):
        return code
    merged = shares.merge_shares(share, args.answers_file)
    if processes > 1 and process == 0:
        print(f"merged {merged} answers of {processes} processes into {args.answers_file}", file=sys.stderr)
    return 0


def _answer(args, sampler_config, opened, image_options: dict, todo, answers_file: str, bad: list) -> int:
    """Answer ``todo`` ((row index, row) pairs) into ``answers_file`` (appended) with the model
    ``opened`` (cli.open_model) loaded through the Python API; exit status."""
    from medv_jax.sampling import answers, api

    model = api.load(args.checkpoint, args.tokenizer, opened=opened, prompt_bucket=PROMPT_BUCKET,
                     **cli.load_options(args))
    done = answers.answer_questions(
        model, todo, answers_file, sampler_config,
        seed=args.seed, batch_size=args.batch_size, prompt_length=args.prompt_length,
        image_folder=args.image_folder, image_options=image_options,
        model_id=args.model_id or os.path.basename(os.path.normpath(args.checkpoint)),
        progress=not args.no_progress,
    )
    print(
        f"wrote {done.written} answers to {answers_file} in {done.seconds:.1f}s; "
        f"skipped {len(done.skipped)} questions and {len(bad)} unreadable rows"
        + (f"; {np.mean(done.steps_used):.1f} denoising steps per answer" if done.steps_used else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
