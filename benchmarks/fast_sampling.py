"""Fast sampling modes against the exact sampler: speedup and answer agreement on the synthetic
test split with a model trained on it: the demo (``python -m medv_jax.train --config=configs/demo.py``,
short VQA answers) or the miniature recipe's report model (``python -m medv_jax.train.chain
configs/mini/``, findings reports of 26-35 tokens, scored by field accuracy).

    python benchmarks/fast_sampling.py --checkpoint workdir/demo/model --out fast_sampling.json
    python benchmarks/fast_sampling.py --checkpoint workdir/mini/stage2_instruct/model \
        --config configs/mini/stage2_instruct.py --gen_length 96 --block_length 48 --steps 96 \
        --num_examples 200 --out fast_sampling_reports.json

For every mode (exact, prefix cache, dual cache, threshold, adaptive stop and combinations):

* agreement: the whole test split (``--num_examples``, batches of ``--batch_size``) answered by
  the mode, compared with the exact sampler's answers (exact-match rate of the decoded text) and
  scored against the ground truth with LLaVA-Med's VQA metrics (closed accuracy, open recall), or
  for reports by field accuracy (``synthetic.field_accuracy``);
* speed: ``--timing_examples`` questions answered one at a time (batch 1), ``--repeats`` timed
  runs after a warm-up; modes are interleaved within each repeat so that load from other
  processes falls on all of them alike. Reported: median seconds per question, steps used, and
  the speedup over the exact sampler's median.

Results are written to ``--out`` as JSON after every mode (a rerun skips the modes already there).

``--wide`` instead times the cache modes on the random-weight CPU-sized wide LM of
``benchmarks/sampler.py`` (text-only, ``--prompt_len`` tokens of prompt): the long-answer regime
(random weights never emit end-of-turn, so every step runs) where the per-step saving of a cache
shows; no agreement there (random weights).

    python benchmarks/fast_sampling.py --wide --prompt_len 200 --steps 32 --block_length 128
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.machine import describe_cpu  # noqa: E402
from medv_jax import checkpoint  # noqa: E402
from medv_jax.data import pipeline, synthetic  # noqa: E402
from medv_jax.evaluate.vqa_scoring import VQAReference, score_vqa  # noqa: E402
from medv_jax.sampling.diffusion import AdaptiveStop, CachePolicy, SamplerConfig, ThresholdSelection  # noqa: E402
from medv_jax.sampling.multimodal import PromptBatch, compile_medv, with_tokenizer_ids  # noqa: E402
from medv_jax.train import trainer  # noqa: E402

PROMPT_FIELDS = ("tokens", "key_mask", "pixels", "image_index", "image_weight", "image_newline_mask", "valid")


def modes(refresh: int, threshold: float, patience: int, entropy: float) -> dict[str, dict]:
    prefix, dual = CachePolicy("prefix", refresh), CachePolicy("dual", refresh)
    sel, stop = ThresholdSelection(threshold), AdaptiveStop(patience, entropy)
    return {
        "exact": {},
        "prefix": dict(cache=prefix),
        "dual": dict(cache=dual),
        "threshold": dict(selection=sel),
        "adaptive": dict(adaptive_stop=stop),
        "prefix+threshold": dict(cache=prefix, selection=sel),
        "dual+threshold": dict(cache=dual, selection=sel),
        "prefix+threshold+adaptive": dict(cache=prefix, selection=sel, adaptive_stop=stop),
    }


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent))
    spec.loader.exec_module(module)
    return module.get_config()


def batches_of(test, tokenizer, bcfg, batch_size: int, limit: int) -> list[dict]:
    return list(pipeline.make_prompt_batches(test, tokenizer, bcfg, batch_size=batch_size, limit=limit))


def prompt_batch(b: dict) -> PromptBatch:
    return PromptBatch(**{k: b[k] for k in PROMPT_FIELDS})


def answer_all(model_cfg, params, tokenizer, batches, sampler, name) -> tuple[dict, list[int]]:
    """question id -> answer text over all batches, and the steps each row used."""
    run = compile_medv(model_cfg, params, prompt_batch(batches[0]), jax.random.key(0), sampler)
    answers, steps = {}, []
    for i, b in enumerate(tqdm(batches, desc=f"agreement: {name}", unit="batch")):
        out = jax.device_get(run(prompt_batch(b), jax.random.key(i)))
        for r in range(len(b["valid"])):
            if b["valid"][r]:
                n = int(out.answer_length[r])
                ids = [int(x) for x in out.tokens[r, :n]]
                answers[str(b["example_id"][r])] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                steps.append(int(out.steps_run[r]))
    return answers, steps


def report_field_accuracy(test, answers: dict[str, str]) -> float:
    """Mean field accuracy (%) of generated reports against their scans."""
    scores = [synthetic.field_accuracy(text, test.describe(int(qid.rsplit("-", 1)[1]))["scene"])
              for qid, text in answers.items()]
    return 100.0 * float(np.mean(scores))


def wide(args) -> None:
    """Cache modes vs exact on the random wide LM: median seconds per generation, speedup."""
    from medv_jax.models import llada
    from medv_jax.sampling.diffusion import compile_generate_text

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampler import PRESETS  # the shapes of the sampler benchmark

    cfg = llada.LLADA_PRESETS["llada_8b"].replace(
        **PRESETS["cpu_wide"], max_position_embeddings=args.prompt_len + args.gen_length
    )
    params = jax.jit(lambda r: llada.init_params(cfg, r))(jax.random.key(0))
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(0, cfg.tokenizer_vocab_size - 10, size=args.prompt_len))]
    base = SamplerConfig(args.gen_length, args.block_length, args.steps)
    configs = {
        "exact": base,
        "prefix": base.replace(cache=CachePolicy("prefix", args.refresh)),
        "dual": base.replace(cache=CachePolicy("dual", args.refresh)),
    }
    runs, compile_s = {}, {}
    for name, sc in configs.items():
        t0 = time.perf_counter()
        runs[name] = compile_generate_text(cfg, params, prompts, jax.random.key(0), sc)
        compile_s[name] = time.perf_counter() - t0
    times = {n: [] for n in configs}
    steps = {}
    for rep in tqdm(range(args.repeats + 1), desc="timing (first run = warm-up)"):
        for name in configs:
            t0 = time.perf_counter()
            out = jax.block_until_ready(runs[name](prompts, jax.random.key(rep)))
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
            steps[name] = int(out.steps_run[0])  # all of them unless the row stopped
    exact = statistics.median(times["exact"])
    print(f"wide LM (hidden 768, 8 layers, vocab 32k, fp32), prompt {args.prompt_len}, "
          f"L={args.gen_length} block={args.block_length} steps={args.steps} refresh={args.refresh}, "
          f"batch 1, median of {args.repeats}; {os.cpu_count()} CPUs")
    print("| mode | compile (s) | median run (s) | ms / step | speedup |")
    print("|---|---|---|---|---|")
    for name in configs:
        m = statistics.median(times[name])
        print(f"| {name} | {compile_s[name]:.1f} | {m:.2f} | {1000 * m / steps[name]:.0f} | {exact / m:.2f}x |")
    print(json.dumps({n: [round(t, 3) for t in v] for n, v in times.items()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="workdir/demo/model", help="trained demo model folder")
    p.add_argument("--config", default="configs/demo.py", help="the config the model was trained with")
    p.add_argument("--gen_length", type=int, default=128)
    p.add_argument("--block_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--refresh", type=int, default=8, help="cache refresh interval K")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--entropy", type=float, default=0.1)
    p.add_argument("--num_examples", type=int, default=400, help="test questions for agreement")
    p.add_argument("--batch_size", type=int, default=50, help="batch size of the agreement runs")
    p.add_argument("--timing_examples", type=int, default=16, help="questions timed one at a time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    p.add_argument("--out", default="fast_sampling.json")
    p.add_argument("--wide", action="store_true", help="time the cache modes on the random wide LM instead")
    p.add_argument("--prompt_len", type=int, default=200, help="--wide: prompt tokens")
    args = p.parse_args()
    if args.wide:
        return wide(args)

    all_modes = modes(args.refresh, args.threshold, args.patience, args.entropy)
    names = [m for m in args.modes.split(",") if m] or list(all_modes)
    unknown = sorted(set(names) - set(all_modes))
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {list(all_modes)}")
    if "exact" not in names:
        names.insert(0, "exact")
    if not os.path.isdir(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such folder (train the demo first)")

    config = load_config(args.config)
    tokenizer = trainer.load_tokenizer(config, Path(tempfile.mkdtemp(prefix="demo_tok_")))
    reports = config.data.task == "report"
    model_cfg, params = checkpoint.load_pretrained(args.checkpoint)
    model_cfg = with_tokenizer_ids(model_cfg, tokenizer)
    _, test = trainer.data_sources(config)
    bcfg = trainer.batch_config(config, model_cfg, args.batch_size)
    batches = batches_of(test, tokenizer, bcfg, args.batch_size, args.num_examples)
    singles = batches_of(test, tokenizer, bcfg, 1, args.timing_examples)
    references = [
        VQAReference(str(b["example_id"][r]), str(b["answer"][r]), str(b["answer_type"][r]))
        for b in batches for r in range(len(b["valid"])) if b["valid"][r]
    ]
    base = SamplerConfig(args.gen_length, args.block_length, args.steps)
    configs = {m: base.replace(**all_modes[m]) for m in names}

    results = json.loads(Path(args.out).read_text()) if os.path.exists(args.out) else {}
    machine = f"{describe_cpu()}, {jax.devices()[0].platform}"
    results.setdefault("meta", {}).update(
        machine=machine, jax=jax.__version__, checkpoint=args.checkpoint,
        sampler=f"L={args.gen_length} block={args.block_length} steps={args.steps}",
        refresh=args.refresh, threshold=args.threshold, patience=args.patience, entropy=args.entropy,
        num_examples=len(references), timing_examples=args.timing_examples, repeats=args.repeats,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    modes_out = results.setdefault("modes", {})

    def save():
        Path(args.out).write_text(json.dumps(results, indent=1))

    # 1. Agreement over the test split (resumable per mode).
    exact_answers = None
    for name in names:
        if name in modes_out and "answers" in modes_out[name]:
            if name == "exact":
                exact_answers = modes_out[name]["answers"]
            continue
        t0 = time.perf_counter()
        answers, steps = answer_all(model_cfg, params, tokenizer, batches, configs[name], name)
        entry = modes_out.setdefault(name, {})
        if reports:
            entry["field_accuracy"] = report_field_accuracy(test, answers)
            quality = f"field accuracy {entry['field_accuracy']:.1f}%"
        else:
            scores = score_vqa(references, answers)
            entry.update(closed_accuracy=scores.closed_accuracy, open_recall=scores.open_recall)
            quality = f"closed {scores.closed_accuracy:.1f}% open recall {scores.open_recall:.1f}%"
        entry.update(
            answers=answers,
            mean_steps=float(np.mean(steps)),
            agreement_seconds=round(time.perf_counter() - t0, 1),
        )
        if name == "exact":
            exact_answers = answers
        save()
        print(f"{name}: {quality}, mean steps {np.mean(steps):.1f}", file=sys.stderr)
    for name in names:
        ans = modes_out[name]["answers"]
        modes_out[name]["agreement"] = 100.0 * float(np.mean([ans[k] == exact_answers[k] for k in exact_answers]))
        if reports:
            # Reports can differ in wording alone (each sentence has two or three forms): the
            # share stating the same findings as the exact sampler's report, read by parse_report.
            modes_out[name]["findings_agreement"] = 100.0 * float(np.mean(
                [synthetic.parse_report(ans[k]) == synthetic.parse_report(exact_answers[k]) for k in exact_answers]))
    save()

    # 2. Speed at batch 1, modes interleaved within each repeat.
    # The exact sampler is timed again with any mode still to time (same load conditions).
    pending = [n for n in names if "median_s_per_question" not in modes_out[n]]
    if pending:
        pending = ["exact"] + [n for n in pending if n != "exact"]
        runs = {}
        for name in pending:
            t0 = time.perf_counter()
            runs[name] = compile_medv(model_cfg, params, prompt_batch(singles[0]), jax.random.key(0), configs[name])
            modes_out[name]["compile_s"] = round(time.perf_counter() - t0, 2)
        times = {n: [] for n in pending}
        steps = {n: [] for n in pending}
        for rep in tqdm(range(args.repeats + 1), desc="timing (first run = warm-up)"):
            for name in pending:
                t0 = time.perf_counter()
                used = []
                for i, b in enumerate(singles):
                    out = jax.block_until_ready(runs[name](prompt_batch(b), jax.random.key(i)))
                    used.append(int(out.steps_run[0]))
                if rep > 0:
                    times[name].append((time.perf_counter() - t0) / len(singles))
                    steps[name] = used
        for name in pending:
            modes_out[name].update(
                median_s_per_question=statistics.median(times[name]),
                runs_s_per_question=times[name],
                timing_mean_steps=float(np.mean(steps[name])),
            )
        save()
    exact_s = modes_out["exact"]["median_s_per_question"]
    print(f"\nmachine: {machine}; {results['meta']['sampler']}; {len(references)} test questions; "
          f"timing: {args.timing_examples} questions at batch 1, median of {args.repeats}")
    quality = "field acc." if reports else "closed acc. | open recall"
    same = " same findings as exact |" if reports else ""
    print(f"| mode | s / question (median) | speedup | steps (timed) | exact-match vs exact |{same} {quality} |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        m = modes_out[name]
        scores = (f"{m['findings_agreement']:.1f}% | {m['field_accuracy']:.1f}%" if reports
                  else f"{m['closed_accuracy']:.1f}% | {m['open_recall']:.1f}%")
        print(f"| {name} | {m['median_s_per_question']:.4f} | {exact_s / m['median_s_per_question']:.2f}x | "
              f"{m['timing_mean_steps']:.1f} | {m['agreement']:.1f}% | {scores} |")


if __name__ == "__main__":
    main()
