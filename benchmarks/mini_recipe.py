"""The miniature recipe (configs/mini/) over several seeds: each seed's whole chain run as a user runs
it (one command, one process, nothing else running), its wall time and what its models reach.

    python benchmarks/mini_recipe.py --seeds 0 1 2 --root runs/mini --out mini_recipe.json

Per seed: ``python -m medv_jax.train.chain configs/mini/ --workdir ROOT/seedS --seed S``. A seed
whose chain finished before is read back, not rerun (delete its folder to measure it again). Prints
a Markdown table (wall time from command to exit; report field accuracy of the stage-2 model on the
200 held-out scans, overall and per field; VQA of the stage-3 model) and the worst seed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe_cpu  # noqa: E402


def run_seed(seed: int, root: Path, folder: str, extra: list[str]) -> dict:
    workdir = root / f"seed{seed}"
    summary = workdir / "chain_summary.json"
    timing = workdir / "wall_seconds.json"
    if not (summary.exists() and timing.exists()):
        cmd = [sys.executable, "-m", "medv_jax.train.chain", folder, f"--workdir={workdir}", f"--seed={seed}", *extra]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        timing.write_text(json.dumps({"wall_seconds": round(time.time() - t0, 1),
                                      "start_utc": time.strftime("%H:%M", time.gmtime(t0))}))
    out = json.loads(summary.read_text())
    out.update(json.loads(timing.read_text()))
    return out


def row(seed: int, result: dict) -> dict:
    stages = result["stages"]
    reports = next(s["reports"] for s in stages.values() if "reports" in s)
    vqa = next((s["vqa"] for s in stages.values() if "vqa" in s), None)
    return {"seed": seed, "start_utc": result["start_utc"], "wall_seconds": result["wall_seconds"],
            "field_accuracy": reports["field_accuracy"], "per_field": reports["per_field"],
            "closed_accuracy": vqa and vqa["closed_accuracy"], "open_recall": vqa and vqa["open_recall"],
            "stage_seconds": {k: s.get("total_seconds") for k, s in stages.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default="runs/mini", help="one chain folder per seed under here")
    p.add_argument("--folder", default="configs/mini/", help="the chain's stage configs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="passed to every stage (e.g. train.num_steps=5 for a smoke run)")
    p.add_argument("--out", default="mini_recipe.json")
    args = p.parse_args()
    root = Path(args.root).absolute()
    extra = [f"--set={o}" for o in args.overrides]
    rows = [row(s, run_seed(s, root, args.folder, extra)) for s in args.seeds]
    meta = {"machine": describe_cpu(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "overrides": args.overrides}
    Path(args.out).write_text(json.dumps({"meta": meta, "seeds": rows}, indent=1))
    fields = list(rows[0]["per_field"])
    print(f"\n{meta['machine']}, {meta['date']}")
    print("| seed | start (UTC) | wall time | report field acc. | " + " | ".join(fields) + " | VQA closed / open |")
    print("|---|---|---|---|" + "---|" * len(fields) + "---|")
    for r in rows:
        m, s = divmod(int(round(r["wall_seconds"])), 60)
        vqa = "-" if r["closed_accuracy"] is None else f"{r['closed_accuracy']:.1f} % / {r['open_recall']:.1f} %"
        print(f"| {r['seed']} | {r['start_utc']} | {m} min {s:02d} s | {r['field_accuracy']:.1f} % | "
              + " | ".join(f"{r['per_field'][f]:.1f} %" for f in fields) + f" | {vqa} |")
    worst = min(rows, key=lambda r: r["field_accuracy"])
    slowest = max(rows, key=lambda r: r["wall_seconds"])
    print(f"\nworst field accuracy {worst['field_accuracy']:.1f} % (seed {worst['seed']}); "
          f"longest chain {slowest['wall_seconds'] / 60:.1f} min (seed {slowest['seed']})")


if __name__ == "__main__":
    main()
