"""One question file answered by several processes (docs/multihost.md): what
``python -m medv_jax.infer`` and ``python -m medv_jax.evaluate run-vqa`` run.

Process p of N answers the question rows r with r % N == p into ``ANSWERS.process-P`` beside
the answers file; once every process is done (a barrier over all processes), process 0 appends
them to the answers file in question order and removes them, and every process waits for that.
On one process the answers go straight to the answers file.

Resume: the answers of the answers file and of every part file (of any earlier process count)
count as done, so after a process died the same command, on any N, answers only what is
missing, each question once. Row r draws its random numbers from the seed and r
(``api.row_key``), so the answers do not depend on N.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping, Sequence

from medv_jax.sampling.answers import _key, answered_ids
from medv_jax.user_errors import UserError


def start_processes() -> tuple[int, int]:
    """Join the other processes the environment names (nothing to do for one process) and return
    (this process's index, the process count). A run that cannot start is a UserError.

    Call it before anything uses JAX's devices: the distributed runtime starts only before them."""
    import jax

    from medv_jax.sharding import DistributedSetupError, maybe_initialize_distributed

    try:
        maybe_initialize_distributed()
    except DistributedSetupError as e:
        raise UserError(str(e)) from None
    return jax.process_index(), jax.process_count()


def part_file(answers_file: str, process_index: int) -> str:
    """Where process ``process_index`` of a multi-process run writes its answers."""
    return f"{answers_file}.process-{process_index}"


def part_files(answers_file: str) -> list[str]:
    """Part files beside ``answers_file`` (of any earlier process count too)."""
    return sorted(glob.glob(glob.escape(answers_file) + ".process-*"))


def merge_parts(answers_file: str, order: Mapping[str, int]) -> int:
    """Append the part files' answers that ``answers_file`` lacks, in question order (``order``:
    key -> row index), then remove the parts; returns how many were appended. Safe to repeat
    after an interruption: what is already merged is not appended again."""
    done = answered_ids(answers_file)
    new: dict[str, tuple[int, str]] = {}
    for part in part_files(answers_file):
        with open(part, "rb") as f:
            data = f.read()
        # A killed process may have left half a line: only whole lines are answers.
        for line in data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines():
            try:
                key = _key(json.loads(line)["question_id"])
            except (ValueError, KeyError, TypeError):
                continue
            if key not in done and key not in new:
                new[key] = (order.get(key, len(order)), line)
    with open(answers_file, "a", encoding="utf-8") as out:
        for _, line in sorted(new.values(), key=lambda x: x[0]):
            out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())
    for part in part_files(answers_file):
        os.remove(part)
    return len(new)


@dataclasses.dataclass
class Share:
    """This process's part of a question file: ``todo`` ((row index, row) pairs it answers, into
    ``own_file``), ``done`` (keys of the questions answered by any process, any earlier run) and
    ``order`` (key -> row index, the merged file's order)."""

    process: int
    processes: int
    todo: list[tuple[int, Any]]
    done: set[str]
    order: dict[str, int]
    own_file: str

    def summary(self) -> str:
        where = f" (process {self.process} of {self.processes})" if self.processes > 1 else ""
        return f"{len(self.done)} already answered, {len(self.todo)} to answer{where}"


def process_share(
    questions: Sequence[tuple[int, Mapping[str, Any]]],
    answers_file: str,
    process: int,
    processes: int,
    limit: int | None = None,
) -> Share:
    """The share of process ``process`` of ``processes`` in ``questions`` ((row index, row) pairs
    in file order): the rows r with r % processes == process not answered yet, among the first
    ``limit`` questions when given (a count over all processes, so the same questions whatever N)."""
    questions = list(questions)[:limit] if limit is not None else list(questions)
    own_file = part_file(answers_file, process) if processes > 1 else answers_file
    # Only the process that may write a file cuts off its half-written last line; the others
    # read it as it is (process 0 alone appends to the answers file, at the merge).
    done = answered_ids(answers_file, repair=process == 0)
    for part in part_files(answers_file):
        done |= answered_ids(part, repair=part == own_file or processes == 1)
    order: dict[str, int] = {}
    todo = []
    for index, row in questions:
        key = _key(row["question_id"])
        order.setdefault(key, index)
        if key not in done and index % processes == process:
            todo.append((index, row))
    return Share(process, processes, todo, done, order, own_file)


def merge_shares(share: Share, answers_file: str) -> int:
    """Once every process has written its share, process 0 merges the part files into
    ``answers_file``; every process returns when the merged file is complete. Returns how many
    answers were merged (0 on the other processes)."""
    if share.processes > 1:
        from jax.experimental import multihost_utils

        # sync_global_devices: a barrier over all processes that works on CPU (gloo) too.
        multihost_utils.sync_global_devices("answers written")
    merged = merge_parts(answers_file, share.order) if share.process == 0 and part_files(answers_file) else 0
    if share.processes > 1:
        multihost_utils.sync_global_devices("answers merged")
    return merged
