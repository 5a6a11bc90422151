"""The training loop: model and data from a config, sharded state, resumable orbax checkpoints,
logging, held-out loss, and a final VQA evaluation through the sampler.

A run never loses finished work: checkpoints (params, optimizer state, step, RNG and the position in
the batch plan) are written every ``checkpoint_every`` steps, at the end, and on SIGTERM; a
restart in the same workdir resumes from the latest one. A non-finite loss stops the run with the
step and the batch's example ids, leaving the last good checkpoint in place.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from medv_jax import checkpoint
from medv_jax import sharding as shd
from medv_jax.data import pipeline
from medv_jax.data import synthetic
from medv_jax.data.records import load_records
from medv_jax.data.tfds_vqa import read_split
from medv_jax.evaluate.vqa_scoring import VQAReference, format_vqa_table, score_vqa
from medv_jax.data import tokenizer as tok_lib
from medv_jax.models import adapters, llada, medv, siglip
from medv_jax.sampling.diffusion import SamplerConfig
from medv_jax.sampling.multimodal import (PromptBatch, image_config_for, sample_medv, system_prompt_for,
                                          with_tokenizer_ids)
from medv_jax.train import loss as loss_lib
from medv_jax.train import optimizer as opt_lib
from medv_jax.train import step as step_lib
from medv_jax.user_errors import UserError, closest, existing_path


class NonFiniteLossError(RuntimeError):
    pass


# ----- building blocks from the config -------------------------------------------------------


def load_tokenizer(config: ml_collections.ConfigDict, workdir: Path):
    """``tokenizer: "demo"`` builds the compact synthetic-set tokenizer inside the workdir,
    ``"demo_reports"`` the same with the findings reports' words."""
    if config.tokenizer in ("demo", "demo_reports"):
        folder, reports = str(workdir / "tokenizer"), config.tokenizer == "demo_reports"
        if jax.process_count() == 1:
            return synthetic.load_demo_tokenizer(folder, reports=reports)
        # One writer: the other processes read the files once process 0 has written them.
        if jax.process_index() == 0:
            synthetic.load_demo_tokenizer(folder, reports=reports)
        multihost_utils.sync_global_devices("demo tokenizer written")
        return tok_lib.load_tokenizer(folder)
    if not config.tokenizer:
        raise ValueError("config.tokenizer: give the tokenizer folder (e.g. the LLaDA-MedV HF folder)")
    return tok_lib.load_tokenizer(config.tokenizer)


def check_config(config: ml_collections.ConfigDict) -> None:
    """User mistakes in a training config (required fields unset, files that do not exist, names
    that are not presets), found before a workdir or any weights exist; each a UserError naming
    the field and what to give."""
    try:
        opt_lib.resolve_group_rates([tuple(g) for g in config.optim.param_groups], config.optim.lr)
    except ValueError as e:
        raise UserError(str(e)) from None
    d = config.data
    if d.source == "json":
        if not d.train_path:
            raise UserError("config.data.train_path is not set: give the training records, "
                            "--config.data.train_path=FILE.json")
        existing_path("config.data.train_path", d.train_path)
        if d.test_path:
            existing_path("config.data.test_path", d.test_path)
        if d.get("image_root"):
            existing_path("config.data.image_root", d.image_root, "folder")
    elif d.source == "tfds":
        if not d.get("tfds"):
            raise UserError('config.data.tfds is not set: config.data.source="tfds" needs "NAME:SPLIT", e.g. vqa_rad:train')
    elif d.source != "synthetic":
        raise UserError(f"config.data.source={d.source!r}: expected 'synthetic', 'json' or 'tfds'")
    elif d.get("layout", "free") not in synthetic.LAYOUTS:
        raise UserError(f"config.data.layout={d.layout!r}: expected one of {', '.join(synthetic.LAYOUTS)}")
    elif d.get("report_wording", "varied") not in synthetic.REPORT_WORDINGS:
        raise UserError(f"config.data.report_wording={d.report_wording!r}: expected one of "
                        f"{', '.join(synthetic.REPORT_WORDINGS)}")
    elif not 0.0 <= d.get("report_alone", 0.0) <= 1.0:
        raise UserError(f"config.data.report_alone={d.report_alone}: expected a share in [0, 1]")
    if not config.tokenizer:
        raise UserError("config.tokenizer is not set: give the tokenizer folder (e.g. the LLaDA-MedV download), "
                        "--config.tokenizer=DIR")
    if config.tokenizer not in ("demo", "demo_reports"):
        existing_path("config.tokenizer", config.tokenizer, "folder")
    lora = config.model.get("lora")
    if lora is not None and lora.get("rank", 0) and not config.get("init_from"):
        raise UserError("config.model.lora.rank > 0 trains adapters on a base model: set config.init_from "
                        "to a converted MedV checkpoint")
    for field in ("init_from", "init_lm_from", "init_vision_from"):
        if config.get(field):
            checkpoint.check_converted(config.get(field), f"config.{field}")
    floor = config.train.get("mask_time_floor", 0.0)
    if not 0.0 <= floor < 1.0:
        raise UserError(f"config.train.mask_time_floor={floor}: must be in [0, 1) (0 = the reference's "
                        "masking times)")
    span = config.train.get("mask_span_fraction", 0.0)
    if not 0.0 <= span <= 1.0:
        raise UserError(f"config.train.mask_span_fraction={span}: must be in [0, 1] (the share of rows given a "
                        "span mask; 0 = the reference's masks)")
    if config.train.get("log_every", 1) < 1:
        raise UserError(f"config.train.log_every={config.train.log_every}: must be >= 1 (steps between log lines)")
    for field in ("checkpoint_every", "eval_every"):
        if config.train.get(field, 0) < 0:
            raise UserError(f"config.train.{field}={config.train.get(field)}: must be >= 0 (0 = only at the end"
                            + (")" if field == "checkpoint_every" else ": never)"))
    for field, presets in (("lm_preset", llada.LLADA_PRESETS), ("vision_preset", siglip.SIGLIP_PRESETS)):
        name = config.model.get(field)
        if name not in presets:
            raise UserError(f"config.model.{field}={name!r} is not a preset; closest: "
                            f"{', '.join(closest(str(name), presets)) or ', '.join(presets)}")


def _numerics(m: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
                attention_impl=m.attention_impl or None, unroll_layers=bool(m.get("unroll_layers", False)))


def lm_adapter_options(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """The LM's LoRA and base-quantization fields from ``config.model``."""
    lora = m.get("lora") or ml_collections.ConfigDict()
    options = dict(lora_rank=int(lora.get("rank", 0)), weight_quant=m.get("base_quant", "none") or "none")
    if options["lora_rank"]:
        options.update(lora_alpha=float(lora.get("alpha", 16.0)), lora_dropout=float(lora.get("dropout", 0.0)),
                       lora_targets=lora.get("targets", llada.DEFAULT_LORA_TARGETS))
    return options


def adapted(model_cfg: medv.MedVConfig) -> bool:
    """Whether the LM carries adapters or quantized kernels (trees a plain checkpoint lacks)."""
    return bool(model_cfg.lm.lora_rank) or model_cfg.lm.weight_quant != "none"


def model_config(config: ml_collections.ConfigDict, tokenizer) -> medv.MedVConfig:
    """The MedV config: from ``init_from`` (a converted MedV checkpoint), or from presets with
    ``init_lm_from`` / ``init_vision_from`` (converted LLaDA / SigLIP checkpoints) replacing the LM
    and tower shapes; special ids always come from the tokenizer."""

    m = config.model
    numerics = _numerics(m)
    if config.get("init_from"):
        cfg = checkpoint.load_config(config.init_from)
        if not isinstance(cfg, medv.MedVConfig):
            raise ValueError(f"init_from={config.init_from} holds a {type(cfg).__name__}, not a MedV model")
        cfg = cfg.replace(lm=cfg.lm.replace(**numerics, **lm_adapter_options(m)), vision=cfg.vision.replace(**numerics),
                          projector_param_dtype=m.get("projector_param_dtype") or None)
    else:
        lm = llada.LLADA_PRESETS[m.lm_preset].replace(**dict(m.lm_overrides))
        vision = siglip.SIGLIP_PRESETS[m.vision_preset].replace(**dict(m.vision_overrides))
        if config.get("init_lm_from"):
            lm = checkpoint.load_config(config.init_lm_from)
        if config.get("init_vision_from"):
            vision = checkpoint.load_config(config.init_vision_from)
        cfg = medv.MedVConfig(lm=lm.replace(**numerics, **lm_adapter_options(m)), vision=vision.replace(**numerics),
                              image_aspect_ratio=m.image_aspect_ratio,
                              mm_patch_merge_type=m.mm_patch_merge_type,
                              projector_param_dtype=m.get("projector_param_dtype") or None)
    return with_tokenizer_ids(cfg, tokenizer)


def sharding_rules(config: ml_collections.ConfigDict):
    """The logical-axis rules of ``config.sharding_rules`` (the default table where unset)."""
    rules = config.get("sharding_rules")
    return shd.rules_from_config(rules) if rules else shd.LOGICAL_AXIS_RULES


def initial_params(config: ml_collections.ConfigDict, model_cfg: medv.MedVConfig, mesh, seed: int):
    """Params to start from, restored straight into their shards; None for a random start.

    With ``init_lm_from`` / ``init_vision_from`` the projector (and image_newline) start random.
    An adapted model (LoRA, quantized base) starts from the plain tree: its kernels are quantized
    in place and its adapters start fresh (B = 0: the model computes what its base does)."""
    rules = sharding_rules(config)
    if adapted(model_cfg):
        base_cfg = model_cfg.replace(lm=model_cfg.lm.replace(lora_rank=0, weight_quant="none"))
        plain = initial_params(config, base_cfg, mesh, seed)
        if plain is None:
            plain = jax.jit(lambda r: nn.unbox(medv.init_params(base_cfg, r, boxed=True)),
                            out_shardings=shd.logical_shardings(medv.abstract_params(base_cfg), mesh, rules))(
                jax.random.PRNGKey(seed))
        boxed = medv.abstract_params(model_cfg)
        # One jitted program straight into the shards (on every process alike).
        conform = lambda p, r: adapters.conform_params(p, nn.unbox(boxed), r)
        return jax.jit(conform, out_shardings=shd.logical_shardings(boxed, mesh, rules))(
            plain, jax.random.PRNGKey(seed + 1))
    shardings = shd.logical_shardings(medv.abstract_params(model_cfg), mesh, rules)
    dtype = model_cfg.lm.param_dtype
    if config.get("init_from"):
        return checkpoint.load_pretrained(config.init_from, shardings, dtype)[1]
    if not (config.get("init_lm_from") or config.get("init_vision_from")):
        return None
    rng = jax.random.PRNGKey(seed)
    # Random for every part, then the loaded parts replace theirs (each loaded into its shards).
    params = dict(jax.jit(lambda r: nn.unbox(medv.init_params(model_cfg, r, boxed=True)),
                          out_shardings=shardings)(rng))
    for key, path in (("lm", config.get("init_lm_from")), ("vision", config.get("init_vision_from"))):
        if path:
            params[key] = checkpoint.load_pretrained(path, shardings[key], dtype)[1]
    return params


def data_sources(config: ml_collections.ConfigDict):
    d = config.data
    if d.source == "synthetic":
        # Extra dialogue turns are a training device: the test split keeps one question per image,
        # as in the VQA benchmarks.
        kw = dict(task=d.task, closed_fraction=d.get("closed_fraction", 0.5), layout=d.get("layout", "free"),
                  report_wording=d.get("report_wording", "varied"), report_alone=d.get("report_alone", 0.0))
        for name in ("closed_families", "open_families"):  # () = all families
            if d.get(name):
                kw[name] = tuple(d.get(name))
        return (synthetic.SyntheticMedVQA("train", d.train_size, seed=d.seed, turns=d.get("turns", 1), **kw),
                synthetic.SyntheticMedVQA("test", d.test_size, seed=d.seed, **kw))
    if d.source == "json":
        return _load_json_records(d.train_path), (_load_json_records(d.test_path) if d.test_path else None)
    if d.source == "tfds":  # data.tfds = "NAME:SPLIT" (e.g. "vqa_rad:train"), data.tfds_test optional
        if not d.get("tfds"):
            raise ValueError('config.data.source="tfds" needs config.data.tfds = "NAME:SPLIT", e.g. "vqa_rad:train"')
        test = d.get("tfds_test")
        return _load_tfds_records(d.tfds, d.get("tfds_data_dir")), (
            _load_tfds_records(test, d.get("tfds_data_dir")) if test else None)
    raise ValueError(f"config.data.source={d.source!r}: expected 'synthetic', 'json' or 'tfds'")


def _load_tfds_records(spec: str, data_dir: str | None):
    return pipeline.RecordList(read_split(spec, data_dir or None), name=spec)


def _load_json_records(path: str):
    return pipeline.RecordList(load_records(path))


def check_rows_hold_records(train_source: Any, test_source: Any, tokenizer: Any, bcfg: pipeline.BatchConfig) -> None:
    """A UserError, before any weights exist, when data.max_length cannot hold the longest record
    a synthetic source can draw and too_long = "raise" would stop the run at that record, however
    many steps in. Sources that bound their records (``longest_record``) are checked; others are
    checked as they are read (or up front with data.length_buckets)."""
    if bcfg.too_long != "raise":
        return
    length = lambda record: pipeline.record_length(record, tokenizer, bcfg)
    for split, source in (("train", train_source), ("test", test_source)):
        if not hasattr(source, "longest_record"):
            continue
        need = length(source.longest_record(length))
        if need > bcfg.max_length:
            raise UserError(f"config.data.max_length={bcfg.max_length} is too short for the synthetic {split} "
                            f"set, whose longest record is {need} tokens: set config.data.max_length >= {need} "
                            '(or config.data.too_long="skip")')


def batch_config(config: ml_collections.ConfigDict, model_cfg: medv.MedVConfig, batch_size: int):
    d = config.data
    return pipeline.BatchConfig(
        batch_size=batch_size,
        max_length=d.max_length,
        prompt_length=d.prompt_length,
        max_crops=d.max_crops,
        image=image_config_for(model_cfg),
        text_format=d.text_format,
        system_prompt=system_prompt_for(d.system_prompt),
        too_long=d.too_long,
        image_root=d.get("image_root") or None,
        length_buckets=tuple(d.get("length_buckets") or ()),  # e.g. (256, 512, 1024): pad per batch
        answer_padding=d.get("answer_padding", "eos"),
    )


# ----- checkpoints -----------------------------------------------------------------------------


def checkpoint_manager(workdir: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options,
                                 item_names=("state", "data"))


def save_checkpoint(manager, step: int, state, next_batch: int, base: str | None = None) -> None:
    """The train state and the data position: the next global batch of the plan, the same on
    every process and for any process count (a grain iterator state names one process's shard).
    ``base``: the checkpoint the state's (omitted) frozen params come from, recorded beside it."""
    import orbax.checkpoint as ocp

    data = {"next_batch": int(next_batch)}
    if base is not None:
        data["base"] = str(Path(base).expanduser().absolute())
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
    ))


def check_trainable(trainable_shape: Any) -> None:
    """Quantized kernels cannot train: a UserError when optim.param_groups leaves one trainable."""
    from flax.traverse_util import flatten_dict

    for path, leaf in flatten_dict(trainable_shape).items():
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.integer):
            raise UserError(f"{'/'.join(path)} is quantized (config.model.base_quant) and cannot train: freeze "
                            "it in config.optim.param_groups, e.g. ('^lm/', None) after the adapters' group")


def restore_checkpoint(manager, step: int, abstract_state, expect_base: str | None = None):
    """(state, data position): the next global batch (int), or the grain iterator state (bytes)
    of a checkpoint written before positions were saved. ``expect_base``: the base checkpoint the
    caller loaded the frozen params from, which must be the one the checkpoint was trained on."""
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    data = restored["data"]
    if expect_base is not None and data.get("base") != str(Path(expect_base).expanduser().absolute()):
        raise UserError(f"the checkpoint at step {step} was trained on the base {data.get('base')!r}, "
                        f"not config.init_from={expect_base!r}")
    position = int(data["next_batch"]) if "next_batch" in data else data["iterator"].encode("latin-1")
    return restored["state"], position


def host_params(state) -> Any:
    """The full (trainable + frozen) params as numpy arrays on every process (on several
    processes each holds only its shards, so they are gathered)."""
    params = opt_lib.merge_params(state.params, state.frozen)
    if jax.process_count() == 1:
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)


# ----- the loop ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Preemption:
    requested: bool = False

    def install(self):
        def handler(signum, frame):
            self.requested = True

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass
        return self


class MetricsLog:
    """JSONL (always) and TensorBoard (when tensorboardX is installed) in the workdir."""

    def __init__(self, workdir: Path):
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard")) if jax.process_index() == 0 else None
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if jax.process_index() != 0:
            return
        self.file.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def make_eval_loss(model, mesh, shardings, batch_example, rules=shd.LOGICAL_AXIS_RULES):
    """Held-out loss with fixed mask draws (a deterministic number to watch)."""

    def fn(state, batch, rng):
        params = opt_lib.merge_params(state.params, state.frozen)
        masked, p = loss_lib.draw_masks(rng, batch["labels"] != loss_lib.IGNORE_INDEX)
        return loss_lib.diffusion_loss(model, params, batch, masked, p)[0]

    batch_sh = {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in batch_example.items()}
    return jax.jit(functools.partial(step_lib.traced_with_layout, fn, mesh, rules),
                   in_shardings=(shardings, batch_sh, shd.replicated(mesh)))


def _device_batch(batch: dict[str, np.ndarray], mesh) -> tuple[dict[str, jax.Array], np.ndarray]:
    ids = batch.pop("example_id")
    return shd.global_batch(batch, mesh), ids


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) training; returns the final summary (also written to summary.json)."""
    check_config(config)
    shd.maybe_initialize_distributed()
    workdir = Path(workdir)
    new_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:  # a run that fails before its first step leaves no half-made workdir behind
        tokenizer = load_tokenizer(config, workdir)
        model_cfg = model_config(config, tokenizer)
        if jax.process_index() == 0:
            (workdir / "model_config.json").write_text(json.dumps(checkpoint.config_to_dict(model_cfg), indent=2))
        model = medv.MedV(model_cfg)
        mesh = shd.make_mesh(tuple(config.mesh))
        rules = sharding_rules(config)
        train_source, test_source = data_sources(config)

        t = config.train
        n_proc = jax.process_count()
        if t.global_batch % (n_proc * t.micro_batches):
            raise ValueError(f"train.global_batch={t.global_batch} must divide by processes x micro_batches")
        steps_per_epoch = len(train_source) // t.global_batch
        total_steps = t.num_steps or t.num_epochs * steps_per_epoch
        if total_steps <= 0:
            raise ValueError("train.num_steps / num_epochs give no steps")
        local_batch = t.global_batch // n_proc
        bcfg = batch_config(config, model_cfg, local_batch)  # checks the data fields before any weights exist
        check_rows_hold_records(train_source, test_source, tokenizer, bcfg)
        groups = opt_lib.resolve_group_rates([tuple(g) for g in config.optim.param_groups], config.optim.lr)
        abstract_boxed = medv.abstract_params(model_cfg)
        trainable_shape, _ = opt_lib.split_frozen(nn.unbox(abstract_boxed), groups)
        check_trainable(trainable_shape)
        slim = bool(model_cfg.lm.lora_rank)  # adapter runs checkpoint only what trains
        o = config.optim
        tx = opt_lib.make_optimizer(trainable_shape, groups, o.lr, total_steps, o.warmup_ratio,
                                    o.weight_decay, o.max_grad_norm, o.b1, o.b2, o.eps, o.final_lr_ratio)

        params = initial_params(config, model_cfg, mesh, config.seed)
        if params is None:
            init_fn = lambda rng: medv.init_params(model_cfg, rng, boxed=True)
            state, shardings = step_lib.init_sharded_state(init_fn, tx, groups, mesh, config.seed, rules)
        else:
            state, shardings = step_lib.state_from_params(params, abstract_boxed, tx, groups, mesh, config.seed,
                                                              rules)
            del params
        manager = checkpoint_manager(workdir, t.keep_checkpoints)
        start_step, position = 0, 0
        if manager.latest_step() is not None:
            start_step = manager.latest_step()
            abstract_state = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            if slim:  # the frozen base is the one loaded above from config.init_from
                restored, position = restore_checkpoint(manager, start_step, abstract_state.replace(frozen={}),
                                                        expect_base=config.init_from)
                state = restored.replace(frozen=state.frozen)
            else:
                state, position = restore_checkpoint(manager, start_step, abstract_state)
            print(f"resumed from {workdir / 'checkpoints'} at step {start_step}")
        loader = pipeline.make_loader(train_source, tokenizer, bcfg, seed=config.seed,
                                      worker_count=config.data.worker_count,
                                      start_batch=position if isinstance(position, int) else 0)
        it = iter(loader)
        if isinstance(position, bytes):
            it.set_state(position)
        next_batch = position if isinstance(position, int) else start_step
        first = next(it)
        example = {k: v for k, v in first.items() if k != "example_id"}
        train_step = step_lib.jit_train_step(step_lib.make_train_step(
            model, tx, step_lib.StepConfig(t.micro_batches, t.ce_chunk, t.get("mask_times", "uniform"),
                                             t.get("mask_time_floor", 0.0), t.get("mask_span_fraction", 0.0))),
            shardings, mesh, example, rules)
        eval_loss = make_eval_loss(model, mesh, shardings, example, rules)
        eval_batches = _held_out_batches(config, test_source, tokenizer, bcfg) if test_source is not None else []
    except BaseException:
        if new_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    log = MetricsLog(workdir)
    preempt = _Preemption().install()
    batch = first
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    step = start_step
    last_loss = float("nan")
    pad_fill = pipeline.answer_padding_id(bcfg, tokenizer)
    # padding fraction of the batches (padding and filler rows): since the last log, and in all
    pad_window, pad_sum, pad_steps, n_tokens = [], 0.0, 0, 0
    t_loop = time.time()
    try:
        while step < total_steps:
            next_batch += 1  # the position *after* this batch: resume continues from here
            pad_window.append(pipeline.padding_fraction(batch, pad_fill))
            n_tokens += batch["tokens"].size * n_proc  # positions computed (per-batch lengths vary)
            device_batch, ids = _device_batch(batch, mesh)
            state, metrics = train_step(state, device_batch)
            step += 1
            if step % t.log_every == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss {metrics['loss']} at step {step}; batch example ids: "
                        f"{[str(i) for i in ids]}; the last good checkpoint is kept")
                last_loss = metrics["loss"]
                elapsed = time.time() - t_loop
                metrics["tokens_per_s"] = n_tokens / max(elapsed, 1e-9)
                metrics["padding_fraction"] = float(np.mean(pad_window))
                pad_sum, pad_steps = pad_sum + sum(pad_window), pad_steps + len(pad_window)
                pad_window = []
                log.write(step, metrics)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if eval_batches and t.eval_every and step % t.eval_every == 0:
                log.write(step, {"loss": _held_out_loss(eval_loss, state, eval_batches, mesh)}, "eval")
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == total_steps or preempt.requested:
                save_checkpoint(manager, step, state.replace(frozen={}) if slim else state, next_batch,
                                base=config.init_from if slim else None)
            if preempt.requested:
                manager.wait_until_finished()
                print(f"SIGTERM: saved a checkpoint at step {step}; exiting")
                return {"preempted_at": step}
            if step < total_steps:
                batch = next(it)
    finally:
        bar.close()
        manager.wait_until_finished()
        log.close()
    train_seconds = time.time() - t_start
    summary: dict[str, Any] = {"steps": step, "final_loss": last_loss, "train_seconds": round(train_seconds, 1)}
    if pad_steps:  # over this run's logged steps: how much of the batches was padding (data.length_buckets)
        summary["padding_fraction"] = round(pad_sum / pad_steps, 4)
    if eval_batches:
        summary["held_out_loss"] = _held_out_loss(eval_loss, state, eval_batches, mesh)
    params = host_params(state)  # every process takes part in gathering them
    if config.eval.num_examples and test_source is not None:
        if config.data.source == "synthetic" and config.data.task == "report":
            summary["reports"] = evaluate_reports(config, model_cfg, params, tokenizer, test_source, bcfg)
        else:
            summary["vqa"] = evaluate_vqa(config, model_cfg, params, tokenizer, test_source, bcfg)
    # The trained tensors only (adapter runs), gathered by every process.
    trained = None if not slim else jax.device_get(state.params) if n_proc == 1 else \
        multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        if slim:  # with the base they apply to
            export = workdir / "adapters"
            checkpoint.save_adapters(export, model_cfg, trained, config.init_from, overwrite=True)
            summary["adapters"] = str(export)
        else:
            export = workdir / "model"
            checkpoint.save_pretrained(export, model_cfg, params, overwrite=True)
            summary["model"] = str(export)
        summary["total_seconds"] = round(time.time() - t_start, 1)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _held_out_batches(config, test_source, tokenizer, bcfg, limit_batches: int = 4):
    loader = pipeline.make_loader(test_source, tokenizer, bcfg, seed=0, shuffle=False, num_epochs=1,
                                  worker_count=0)
    out = []
    for b in loader:
        b = dict(b)
        b.pop("example_id")
        out.append(b)
        if len(out) >= limit_batches:
            break
    return out


def _held_out_loss(eval_loss, state, batches, mesh) -> float:
    rng = jax.random.PRNGKey(1234)
    values = [float(eval_loss(state, shd.global_batch(b, mesh), rng)) for b in batches]
    return float(np.mean(values))


def generated_answers(config, model_cfg, params, tokenizer, test_source, bcfg):
    """Yields (example id, question, reference answer, answer type, generated text, answer tokens)
    for the first ``eval.num_examples`` test records, answered by the jitted sampler."""
    e = config.eval
    sampler = SamplerConfig(gen_length=e.gen_length, block_length=e.block_length, steps=e.steps)
    batches = pipeline.make_prompt_batches(test_source, tokenizer, bcfg, batch_size=e.batch_size,
                                           limit=e.num_examples)
    for i, b in enumerate(tqdm(batches, desc="eval", unit="batch", disable=jax.process_index() != 0)):
        pb = PromptBatch(**{k: b[k] for k in ("tokens", "key_mask", "pixels", "image_index", "image_weight",
                                              "image_newline_mask", "valid")})
        out = jax.device_get(sample_medv(model_cfg, params, pb, jax.random.PRNGKey(i), sampler))
        for r in range(len(b["valid"])):
            if not b["valid"][r]:
                continue
            n = int(out.answer_length[r])
            text = tokenizer.decode([int(x) for x in out.tokens[r, :n]], skip_special_tokens=True).strip()
            yield (str(b["example_id"][r]), str(b["question"][r]), str(b["answer"][r]), str(b["answer_type"][r]),
                   text, n)


def evaluate_reports(config, model_cfg, params, tokenizer, test_source, bcfg) -> dict[str, Any]:
    """Findings reports of the synthetic set (``data.task = "report"``): each generated report is
    parsed back into attributes and scored against its scan (``synthetic.field_accuracy``)."""
    t0, scores, n_tokens, examples = time.time(), [], 0, []
    per_field = {f: [] for f in synthetic.REPORT_FIELDS}
    for qid, question, answer, _, text, n in generated_answers(config, model_cfg, params, tokenizer,
                                                                test_source, bcfg):
        scene = test_source.describe(int(qid.rsplit("-", 1)[1]))["scene"]
        correct = synthetic.fields_correct(text, scene)
        scores.append(sum(correct.values()) / len(correct))
        for f, ok in correct.items():
            per_field[f].append(ok)
        n_tokens += n
        if len(examples) < config.eval.show_examples:
            examples.append({"question": question, "answer": answer, "prediction": text})
    seconds = time.time() - t0
    accuracy = 100.0 * float(np.mean(scores)) if scores else float("nan")
    if jax.process_index() == 0:
        fields = ", ".join(f"{f} {100.0 * np.mean(v):.1f}" for f, v in per_field.items() if v)
        print(f"report field accuracy (%)  {accuracy:.2f}  ({len(scores)} reports; {fields})")
    return {"field_accuracy": accuracy, "n_reports": len(scores),
            "per_field": {f: 100.0 * float(np.mean(v)) if v else float("nan") for f, v in per_field.items()},
            "seconds_per_question": seconds / max(len(scores), 1),
            "tokens_per_s": n_tokens / max(seconds, 1e-9), "examples": examples}


def evaluate_vqa(config, model_cfg, params, tokenizer, test_source, bcfg) -> dict[str, Any]:
    """Answer test questions with the jitted sampler and score them as LLaVA-Med does."""
    refs, preds, examples = [], {}, []
    t0 = time.time()
    n_tokens = 0
    for qid, question, answer, answer_type, text, n in generated_answers(config, model_cfg, params, tokenizer,
                                                                          test_source, bcfg):
        n_tokens += n
        preds[qid] = text
        refs.append(VQAReference(qid, answer, answer_type))
        if len(examples) < config.eval.show_examples:
            examples.append({"question": question, "answer": answer, "prediction": text})
    seconds = time.time() - t0
    scores = score_vqa([r for r in refs if r.answer_type in ("closed", "open")], preds)
    if jax.process_index() == 0:
        print(format_vqa_table(scores))
        for ex in examples:
            print(f"  Q: {ex['question']!r}  reference: {ex['answer']!r}  model: {ex['prediction']!r}")
    return {
        "closed_accuracy": scores.closed_accuracy,
        "open_recall": scores.open_recall,
        "n_closed": scores.n_closed,
        "n_open": scores.n_open,
        "seconds_per_question": seconds / max(len(preds), 1),
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
        "examples": examples,
    }


