"""Per-device memory of a real training config without the hardware: the train step is AOT
compiled for a mesh of fake CPU devices from abstract shapes only (nothing is allocated), and XLA's
memory analysis is printed.

    python -m medv_jax.train.memory --config=configs/stage2.py --mesh=1,8,1 --seq_len=8192
    python -m medv_jax.train.memory --config=configs/stage3_lora.py:slake --mesh=1,1,1 --seq_len=2048 --global_batch=1
    python -m medv_jax.train.memory --config=configs/stage3.py:slake --sampler --weight_quant=int8

``--sampler`` compiles the sampling program instead (one device; ``--prompt_len`` prompt tokens with
one image crop, ``--gen_length`` answer tokens), with the LM's kernels as ``--weight_quant`` says.

CPU and GPU/TPU compilers schedule and fuse differently, so the figure is an estimate of the
accelerator's: parameters, gradients and optimizer state are exact; activations and temporaries
depend on the backend (remat keeps them to roughly one layer's worth per step).

The attention kernel is compiled as ``--attention`` says. The model's default on CPU is the per-head
form, which no accelerator runs and whose temporaries differ from the fused kernels', so the tool
defaults to "xla" (``jax.nn.dot_product_attention``'s portable form, the closest CPU stand-in for
the GPU/TPU kernels); the choice is printed with the figure.

XLA:CPU has no bfloat16 matmul: it converts bfloat16 weights to float32 for every dot, and its
while-loop invariant code motion then hoists those converts out of the layer loop, materialising a
float32 copy of every layer's weights at once (twice the bfloat16 weights; measured on a 16-layer
scan: 352 MiB of temporaries against 56 MiB without the pass). GPUs and TPUs multiply bfloat16
natively and make no such copy, so the tool disables that pass unless ``--cpu_loop_hoisting`` is
given; the setting is printed with the figure.
"""
from __future__ import annotations

import argparse
import os
import sys

# The attention kernels a command line names (medv_jax.models.layers.ATTENTION_CHOICES), written out
# here because jax must not be imported before the fake devices are requested.
ATTENTION_CHOICES = ("xla", "cudnn", "per_head")


def _parse_mesh(text: str) -> tuple[int, int, int]:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected three positive ints data,fsdp,tensor")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medv_jax.train.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="a training config file, with its argument if it takes one (configs/stage3.py:slake)")
    parser.add_argument("--mesh", type=_parse_mesh, default=(1, 8, 1), help="data,fsdp,tensor (default 1,8,1)")
    parser.add_argument("--seq_len", type=int, default=None, help="sequence length (default: config.data.max_length)")
    parser.add_argument("--crops", type=int, default=1, help="image crops per sequence (1 = square; 37 = anyres max)")
    parser.add_argument("--global_batch", type=int, default=None, help="default: config.train.global_batch")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="xla",
                        help="attention kernel to compile (default xla: the CPU stand-in for the GPU/TPU "
                             "path; per_head is the CPU default of training runs)")
    parser.add_argument("--base_quant", choices=("none", "int8", "int4"), default=None,
                        help="train step: the LM's frozen kernels stored quantized (QLoRA; default: the config's)")
    parser.add_argument("--sampler", action="store_true", help="compile the sampler, not the train step")
    parser.add_argument("--weight_quant", choices=("none", "int8", "int4"), default="none",
                        help="--sampler: weight-only quantization of the LM's kernels")
    parser.add_argument("--param_dtype", default="bfloat16", help="--sampler: the weights' dtype")
    parser.add_argument("--prompt_len", type=int, default=1024, help="--sampler: prompt tokens (image included)")
    parser.add_argument("--gen_length", type=int, default=256, help="--sampler: answer canvas")
    parser.add_argument("--cpu_loop_hoisting", action="store_true",
                        help="keep XLA:CPU's while-loop invariant code motion (hoists float32 copies of bfloat16 "
                             "weights out of the layer loop, which GPU/TPU do not make)")
    args = parser.parse_args(argv)
    if args.sampler:
        args.mesh = (1, 1, 1)

    n = args.mesh[0] * args.mesh[1] * args.mesh[2]
    # Fake devices must be requested before jax is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    if not args.cpu_loop_hoisting:
        os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from medv_jax import sharding as shd
    from medv_jax.models import llada, medv, siglip
    from medv_jax.train import optimizer as opt_lib
    from medv_jax.train import step as step_lib
    from medv_jax.train.chain import load_config_file
    from medv_jax.train.trainer import _numerics, lm_adapter_options

    path, _, config_arg = args.config.partition(":")
    config = load_config_file(path, config_arg or None)
    m = config.model
    if args.base_quant is not None:
        m.base_quant = args.base_quant
    numerics = {**_numerics(m), "attention_impl": args.attention}
    model_cfg = medv.MedVConfig(
        lm=llada.LLADA_PRESETS[m.lm_preset].replace(**dict(m.lm_overrides), **numerics, **lm_adapter_options(m)),
        vision=siglip.SIGLIP_PRESETS[m.vision_preset].replace(**dict(m.vision_overrides), **numerics),
        image_aspect_ratio=m.image_aspect_ratio,
        mm_patch_merge_type=m.mm_patch_merge_type,
        projector_param_dtype=m.get("projector_param_dtype") or None,
    )
    if args.sampler:
        return _sampler_memory(args, model_cfg)
    seq = args.seq_len or config.data.max_length
    batch = args.global_batch or config.train.global_batch
    mesh = shd.make_mesh(args.mesh, jax.devices()[:n])
    groups = opt_lib.resolve_group_rates([tuple(g) for g in config.optim.param_groups], config.optim.lr)
    boxed = medv.abstract_params(model_cfg)
    trainable, _ = opt_lib.split_frozen(nn.unbox(boxed), groups)
    tx = opt_lib.make_optimizer(trainable, groups, config.optim.lr, 1000)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract_state = jax.eval_shape(lambda r: step_lib.create_state(boxed, tx, groups, r), rng)
    shardings = step_lib.state_shardings(abstract_state, mesh)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   nn.unbox(abstract_state), shardings)
    s = model_cfg.vision.image_size
    shapes = {
        "tokens": ((batch, seq), jnp.int32),
        "labels": ((batch, seq), jnp.int32),
        "key_mask": ((batch, seq), jnp.bool_),
        "pixels": ((batch, args.crops, s, s, 3), jnp.float32),
        "image_index": ((batch, seq, 4), jnp.int32),
        "image_weight": ((batch, seq, 4), jnp.float32),
        "image_newline_mask": ((batch, seq), jnp.bool_),
    }
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
                      for k, (shape, dtype) in shapes.items()}
    step = step_lib.jit_train_step(
        step_lib.make_train_step(medv.MedV(model_cfg), tx, step_lib.StepConfig(config.train.micro_batches,
                                                                                 config.train.ce_chunk)),
        shardings, mesh, abstract_batch)
    print(f"compiling the train step: {args.config}, mesh {args.mesh}, batch {batch} x {seq} tokens, "
          f"{args.crops} crop(s), {model_cfg.lm.dtype} compute / {model_cfg.lm.param_dtype} params, "
          f"remat {model_cfg.lm.remat_policy}, attention {args.attention} ...", flush=True)
    compiled = step.lower(state, abstract_batch).compile()
    stats = compiled.memory_analysis()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(boxed)))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"params {n_params / 1e9:.3f} B ({n_trainable / 1e9:.3f} B trainable)")
    lm = model_cfg.lm
    if lm.lora_rank or lm.weight_quant != "none":
        print(f"LoRA rank {lm.lora_rank} (alpha {lm.lora_alpha}), base {lm.param_dtype}, LM kernels {lm.weight_quant}")
    _report(stats, "arguments (state + batch)", args.attention)
    return 0


def _report(stats, arguments: str, attention: str) -> None:
    hoisting = "on" if "while-loop-invariant-code-motion" not in os.environ.get("XLA_FLAGS", "") else "off"
    gib = 1024**3
    rows = [(arguments, stats.argument_size_in_bytes),
            ("outputs", stats.output_size_in_bytes),
            ("aliased (donated)", stats.alias_size_in_bytes),
            ("temporaries", stats.temp_size_in_bytes)]
    for name, value in rows:
        print(f"  {name:28s} {value / gib:8.2f} GiB per device")
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    print(f"  {'peak estimate':28s} {peak / gib:8.2f} GiB per device (attention {attention}, "
          f"CPU loop hoisting {hoisting})")


def _sampler_memory(args, model_cfg) -> int:
    """AOT-compile the multimodal sampler (prompt with one image crop, batch 1) on one device."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from medv_jax.models import medv
    from medv_jax.sampling import diffusion, multimodal

    lm = model_cfg.lm.replace(param_dtype=args.param_dtype, dtype=args.param_dtype, weight_quant=args.weight_quant,
                              lora_rank=0, remat_policy="none")
    vision = model_cfg.vision.replace(param_dtype=args.param_dtype, dtype=args.param_dtype, remat_policy="none")
    cfg = model_cfg.replace(lm=lm, vision=vision, projector_param_dtype=None)
    params = nn.unbox(medv.abstract_params(cfg))
    s, p = cfg.vision.image_size, args.prompt_len
    abstract = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((1, p), jnp.int32), ((1, p), jnp.bool_), ((1, 1, s, s, 3), jnp.float32), ((1, p, 4), jnp.int32),
        ((1, p, 4), jnp.float32), ((1, p), jnp.bool_))]
    sampler = diffusion.SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length)
    keys = diffusion.row_keys_for(jax.random.PRNGKey(0), 1)
    print(f"compiling the sampler: prompt {p} tokens (1 crop), answer {args.gen_length}, batch 1, "
          f"{args.param_dtype} weights, LM kernels {args.weight_quant}, attention {args.attention} ...", flush=True)
    compiled = multimodal._medv_program.lower(
        params, *abstract, keys, sampler._knobs(), config=cfg, plan=sampler._plan(), logits_processor=None).compile()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    print(f"params {n_params / 1e9:.3f} B scalars, {n_bytes / 1024**3:.2f} GiB stored "
          "(int4 counted as one byte each here; XLA's figure below is what it allocates)")
    _report(compiled.memory_analysis(), "arguments (weights + prompt)", args.attention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
