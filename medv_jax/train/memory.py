"""Per-device memory of a real training config without the hardware: the train step is AOT
compiled for a mesh of fake CPU devices from abstract shapes only (nothing is allocated), and XLA's
memory analysis is printed.

    python -m medv_jax.train.memory --config=configs/stage2.py --mesh=1,8,1 --seq_len=8192

CPU and GPU/TPU compilers schedule and fuse differently, so the figure is an estimate of the
accelerator's: parameters, gradients and optimizer state are exact; activations and temporaries
depend on the backend (remat keeps them to roughly one layer's worth per step).

The attention kernel is compiled as ``--attention`` says. The model's default on CPU is the per-head
form, which no accelerator runs and whose temporaries differ from the fused kernels', so the tool
defaults to "xla" (``jax.nn.dot_product_attention``'s portable form, the closest CPU stand-in for
the GPU/TPU kernels); the choice is printed with the figure.
"""
from __future__ import annotations

import argparse
import os
import runpy
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
    parser.add_argument("--config", required=True, help="a training config file (e.g. configs/stage2.py)")
    parser.add_argument("--mesh", type=_parse_mesh, default=(1, 8, 1), help="data,fsdp,tensor (default 1,8,1)")
    parser.add_argument("--seq_len", type=int, default=None, help="sequence length (default: config.data.max_length)")
    parser.add_argument("--crops", type=int, default=1, help="image crops per sequence (1 = square; 37 = anyres max)")
    parser.add_argument("--global_batch", type=int, default=None, help="default: config.train.global_batch")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="xla",
                        help="attention kernel to compile (default xla: the CPU stand-in for the GPU/TPU "
                             "path; per_head is the CPU default of training runs)")
    args = parser.parse_args(argv)

    n = args.mesh[0] * args.mesh[1] * args.mesh[2]
    # Fake devices must be requested before jax is imported.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from medv_jax import sharding as shd
    from medv_jax.models import llada, medv, siglip
    from medv_jax.train import optimizer as opt_lib
    from medv_jax.train import step as step_lib
    from medv_jax.train.trainer import _numerics

    config = runpy.run_path(args.config)["get_config"]()
    m = config.model
    numerics = {**_numerics(m), "attention_impl": args.attention}
    model_cfg = medv.MedVConfig(
        lm=llada.LLADA_PRESETS[m.lm_preset].replace(**dict(m.lm_overrides), **numerics),
        vision=siglip.SIGLIP_PRESETS[m.vision_preset].replace(**dict(m.vision_overrides), **numerics),
        image_aspect_ratio=m.image_aspect_ratio,
        mm_patch_merge_type=m.mm_patch_merge_type,
    )
    seq = args.seq_len or config.data.max_length
    batch = args.global_batch or config.train.global_batch
    mesh = shd.make_mesh(args.mesh, jax.devices()[:n])
    groups = [tuple(g) for g in config.optim.param_groups]
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
    gib = 1024**3
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(boxed)))
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"params {n_params / 1e9:.3f} B ({n_trainable / 1e9:.3f} B trainable)")
    rows = [("arguments (state + batch)", stats.argument_size_in_bytes),
            ("outputs", stats.output_size_in_bytes),
            ("aliased (donated)", stats.alias_size_in_bytes),
            ("temporaries", stats.temp_size_in_bytes)]
    for name, value in rows:
        print(f"  {name:28s} {value / gib:8.2f} GiB per device")
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    print(f"  {'peak estimate':28s} {peak / gib:8.2f} GiB per device (attention {args.attention})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
