"""Weight-only quantized sampling: every sampling command and the Python API take the flag and
sample with integer kernels; on a trained demo model (trained here with
python -m medv_jax.train --config=configs/demo.py, or MEDV_DEMO_MODEL: such a run's workdir/model)
int8 answers agree with the float ones on >= 95 % of the 400 test questions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medv_jax.sampling import generate
import medv_jax
from tests.sampling.test_commands import SAMPLER_FLAGS, files, model_flags  # noqa: F401 (fixture)


def test_generate_takes_the_quantization_flag(files, capsys):  # noqa: F811
    flags = ["--image", str(files["images"] / "a.png"), "--question", "What organ is shown?", "--json"]
    assert generate.main(model_flags(files) + flags + SAMPLER_FLAGS + ["--weight_quant", "int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["answer_length"] <= 8
    with pytest.raises(SystemExit) as exit_:  # a user mistake: one line, status 2
        generate.main(model_flags(files) + flags + ["--weight_quant", "int3"])
    assert exit_.value.code == 2 and "int3" in capsys.readouterr().err


def test_python_api_loads_integer_kernels(files):  # noqa: F811
    model = medv_jax.load(files["checkpoint"], files["tokenizer"], weight_quant="int4")
    assert model.config.lm.weight_quant == "int4"
    q_proj = model.params["lm"]["layers"]["attn"]["q_proj"]
    assert q_proj["kernel"].dtype == np.dtype("int4") and "kernel_scale" in q_proj


DEMO = os.environ.get("MEDV_DEMO_MODEL", "")


def demo_agreement(model_dir: str, quant: str) -> tuple[float, int]:
    """(share of the demo's test questions whose ``quant`` answer equals the float one, count)."""
    from medv_jax import checkpoint
    from medv_jax.train import trainer
    from medv_jax.train.chain import load_config_file

    root = Path(__file__).resolve().parents[2]
    config = load_config_file(root / "configs" / "demo.py")
    workdir = Path(model_dir).parent
    tokenizer = trainer.load_tokenizer(config, workdir)
    _, test_source = trainer.data_sources(config)
    answers = {}
    for q in ("none", quant):
        model_cfg, params = checkpoint.load_pretrained(model_dir, weight_quant=q)
        model_cfg = trainer.model_config(config.copy_and_resolve_references(), tokenizer).replace(
            lm=model_cfg.lm, vision=model_cfg.vision)
        bcfg = trainer.batch_config(config, model_cfg, config.eval.batch_size)
        answers[q] = {qid: text for qid, _, _, _, text, _ in
                      trainer.generated_answers(config, model_cfg, params, tokenizer, test_source, bcfg)}
    same = [answers["none"][k] == answers[quant][k] for k in answers["none"]]
    return float(np.mean(same)), len(same)


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory) -> str:
    """MEDV_DEMO_MODEL, or the demo trained here as a user trains it (its command, its config)."""
    if DEMO:
        return DEMO
    import subprocess
    import sys

    workdir = tmp_path_factory.mktemp("demo")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "medv_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
                    "--config.train.eval_every=0", "--config.eval.num_examples=0"],
                   cwd=root, check=True, capture_output=True, timeout=3000)
    return str(workdir / "model")


def test_int8_answers_agree_with_float_on_the_trained_demo(trained_demo):
    agreement, n = demo_agreement(trained_demo, "int8")
    assert n == 400 and agreement >= 0.95, agreement


if __name__ == "__main__":  # python -m tests.sampling.test_quantized MODEL_DIR: int8 and int4 agreement
    import sys

    for quant in ("int8", "int4"):
        print(quant, "agreement %.4f over %d questions" % demo_agreement(sys.argv[1], quant), flush=True)
