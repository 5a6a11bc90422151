"""How well the tiny from-scratch model reads the lesions off a scan: a model trained from random
weights on the synthetic set's lesion questions alone ("How many lesions are there?", "On which
side is the lesion?"), then scored on held-out questions per family and per true lesion count.

The findings reports of the miniature recipe (docs/mini_recipe.md) need the lesion count of each
side; this isolates that reading from the report's language, so a change to the tower, the image
or the training budget can be judged in a few minutes.

    python benchmarks/lesion_perception.py --workdir runs/perception/base
    python benchmarks/lesion_perception.py --workdir runs/perception/patch8 \\
        --set model.vision_overrides.patch_size=8 --set data.max_length=96 --set data.prompt_length=96

A workdir that already holds a trained model is scored, not retrained (delete it to train again).
Prints a Markdown table row per family and true count and writes ``<workdir>/perception.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_cpu  # noqa: E402
from medv_jax import checkpoint  # noqa: E402
from medv_jax.sampling.multimodal import with_tokenizer_ids  # noqa: E402
from medv_jax.train import chain, trainer  # noqa: E402

# The demo's model and optimizer (configs/demo.py) on the lesion questions only: open questions of
# the two families whose answers need the lesions counted and placed.
LESION_QUESTIONS = [
    "tokenizer=demo",
    "data.closed_fraction=0.0",
    "data.open_families=('count','side')",
    "train.global_batch=32",
    "train.eval_every=0",
    "eval.num_examples=400",
]


def perception_config(steps: int, seed: int, overrides: list[str]):
    config = chain.load_config_file(ROOT / "configs" / "demo.py")
    for assignment in [*LESION_QUESTIONS, f"train.num_steps={steps}", f"train.checkpoint_every={steps}",
                       f"seed={seed}", *overrides]:
        chain.apply_override(config, assignment)
    return config


def answer_within(answer: str, tokenizer, gen_length: int) -> str:
    """The reference as a canvas of `gen_length` tokens holds it: the demo's L = 4 cuts the longest
    finding, "one small and one large lesion" (6 tokens), to "one small and one". The demo model is
    trained with EOS padding, which the sampler bans, so a longer canvas would be filled with more
    words instead (docs/algorithm.md §4); scoring the cut form keeps the demo's setting."""
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:gen_length]
    return tokenizer.decode(ids).strip().lower()


def score(config, workdir: Path) -> dict:
    """Exact-match accuracy of the generated answers per family, and per family and true count."""
    tokenizer = trainer.load_tokenizer(config, workdir)
    model_cfg, params = checkpoint.load_pretrained(workdir / "model")
    model_cfg = with_tokenizer_ids(model_cfg, tokenizer)
    _, test = trainer.data_sources(config)
    bcfg = trainer.batch_config(config, model_cfg, config.eval.batch_size)
    right = collections.Counter()
    asked = collections.Counter()
    for qid, _, answer, _, text, _ in trainer.generated_answers(config, model_cfg, params, tokenizer, test, bcfg):
        record = test.describe(int(qid.rsplit("-", 1)[1]))
        family, count = record["question_type"], record["scene"].count
        for key in (family, f"{family}, {count} lesion{'s' if count != 1 else ''}"):
            asked[key] += 1
            right[key] += text.strip().lower() == answer_within(answer, tokenizer, config.eval.gen_length)
    return {key: {"accuracy": round(100.0 * right[key] / asked[key], 1), "questions": asked[key]}
            for key in sorted(asked)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config field, e.g. model.vision_overrides.patch_size=8 (repeatable)")
    args = p.parse_args()
    workdir = Path(args.workdir)
    config = perception_config(args.steps, args.seed, args.overrides)
    train_seconds = None
    if not (workdir / "model").exists():
        t0 = time.time()
        trainer.train(config, workdir)
        train_seconds = round(time.time() - t0, 1)
    rows = score(config, workdir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"steps": args.steps, "seed": args.seed, "overrides": args.overrides, "rows": rows,
              "train_seconds": train_seconds, "commit": commit, "machine": describe_cpu(),
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    (workdir / "perception.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.steps} steps, seed {args.seed}, {' '.join(args.overrides) or 'no overrides'}\n")
    print("| questions | accuracy | n |\n|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['accuracy']:.1f} % | {r['questions']} |")


if __name__ == "__main__":
    main()
