"""Building blocks of the shipped training configs (configs/*.py, configs/mini/*.py): the fields every
config shares (``base_config``), the paper's fine-tuning stages, the tiny from-scratch model, and the
miniature recipe's stage settings. Configs import them from here, so they load from any folder."""
import ml_collections

from medv_jax.sharding import LOGICAL_AXIS_RULES

# The attention and MLP projections (medv_jax.models.llada.DEFAULT_LORA_TARGETS, written out so that
# loading a config imports no model code).
LORA_TARGETS = r"/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "workdir/run"
    c.tokenizer = ""  # a local tokenizer folder (e.g. the LLaDA-MedV HF folder); "demo": built-in
    # Where weights start: a converted MedV checkpoint, or converted LM + vision checkpoints
    # (python -m tools.convert_weights); all empty = random init.
    c.init_from = ""
    c.init_lm_from = ""
    c.init_vision_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.lm_preset = "llada_8b"
    c.model.lm_overrides = ml_collections.ConfigDict()
    c.model.vision_preset = "siglip2_so400m_patch14_384"
    c.model.vision_overrides = ml_collections.ConfigDict()
    c.model.image_aspect_ratio = "anyres_max_4"
    c.model.mm_patch_merge_type = "spatial_unpad"
    c.model.dtype = "bfloat16"  # compute
    c.model.param_dtype = "float32"
    c.model.remat_policy = "full"
    # The layers as straight-line code instead of a loop over stacked weights (same parameters):
    # faster for a few small layers on CPU (the miniature recipe), slower to compile for deep ones.
    c.model.unroll_layers = False
    c.model.attention_impl = ""  # "" (per_head on CPU, JAX's choice elsewhere) | "xla" | "cudnn" | "per_head"
    # LoRA adapters on the LM kernels whose path ("lm/layers/attn/q_proj/kernel") matches
    # lora.targets (rank 0 = none; see lora_finetune_config); base_quant "int8" / "int4" stores
    # the LM's dense kernels quantized (QLoRA: they must be frozen); projector_param_dtype ("" =
    # param_dtype) keeps a fully trained projector in float32 beside a bfloat16 base.
    c.model.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=LORA_TARGETS))
    c.model.base_quant = "none"
    c.model.projector_param_dtype = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "json"  # "json" (LLaVA records) | "tfds" | "synthetic"
    c.data.train_path = ""
    c.data.test_path = ""
    c.data.tfds = ""  # source "tfds": "NAME:SPLIT", e.g. "vqa_rad:train" (python -m medv_jax.data.tfds build)
    c.data.tfds_test = ""  # e.g. "vqa_rad:test"
    c.data.tfds_data_dir = ""  # "" = TFDS's default data dir
    c.data.image_root = ""
    c.data.task = "vqa"  # synthetic only: "vqa" | "caption" | "report" (findings reports, tokenizer "demo_reports")
    c.data.train_size = 20000  # synthetic only
    c.data.test_size = 500
    c.data.closed_fraction = 0.5  # synthetic only: share of yes/no questions
    c.data.turns = 1  # synthetic only: question-answer turns per training dialogue (test: 1)
    c.data.closed_families = ()  # synthetic only: subsets of synthetic.CLOSED_FAMILIES (() = all)
    c.data.open_families = ()  # ... and of synthetic.OPEN_FAMILIES
    c.data.layout = "free"  # synthetic only: where lesions lie ("free" | "slots"; synthetic.LAYOUTS)
    c.data.report_wording = "varied"  # synthetic reports: "varied" | "house" | "templated" (synthetic.REPORT_WORDINGS)
    c.data.report_alone = 0.0  # synthetic reports with turns > 1: share asked alone, in one turn
    c.data.seed = 0
    c.data.text_format = "conversation"  # | "caption" (stage 1)
    c.data.system_prompt = "medical"  # | "general" | "none" | any text
    c.data.max_length = 8192
    c.data.prompt_length = 8192
    c.data.max_crops = 37  # anyres_max_4: base view + up to 6x6 grid
    c.data.too_long = "truncate"
    # Per-batch padded lengths (each batch padded to the smallest bucket holding its longest
    # record, max_length last); () = every batch padded to max_length. Each bucket compiles once.
    c.data.length_buckets = ()
    # The labelled token after each row's last turn: "eos" (<|endoftext|>, the reference) or "eot"
    # (<|eot_id|>, the sampler's stop token; pipeline.BatchConfig.answer_padding).
    c.data.answer_padding = "eos"
    c.data.worker_count = 0

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 8
    c.train.micro_batches = 1
    c.train.num_epochs = 1
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.ce_chunk = 1024
    # How each row's masking time t is drawn: "uniform" (independent, as the reference) or
    # "stratified" (evenly spread over the batch, same expectation, lower variance; loss.draw_times).
    c.train.mask_times = "uniform"
    # > 0: each row's t drawn from [floor, 1), every answer masked at least that much (0: the
    # reference's U(0, 1); loss.draw_masks).
    c.train.mask_time_floor = 0.0
    # > 0: that share of the rows gets one contiguous run of its answer masked instead of i.i.d.
    # masks, the states the sampler reaches near an answer's end (0: the reference; loss.draw_span_masks).
    c.train.mask_span_fraction = 0.0
    c.train.log_every = 1
    c.train.eval_every = 500
    c.train.checkpoint_every = 500  # 0: only at the end (and on SIGTERM)
    c.train.keep_checkpoints = 2

    # The paper's table of training settings leaves the learning rates blank: these follow the
    # public LLaDA-V recipe (1e-3 projector-only, 1e-5 full fine-tuning, weight decay 0).
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_ratio = 0.03
    c.optim.final_lr_ratio = 0.0  # the cosine decays to final_lr_ratio * lr
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    # (regex over "part/.../name" parameter paths, lr or None = frozen); first match wins.
    c.optim.param_groups = [("^vision/", None)]

    c.mesh = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
    # Logical axis name -> mesh axis (or axes, or None = whole) for parameters, their gradients and
    # optimizer state, and the activations inside the train step (docs/architecture.md, Sharding).
    c.sharding_rules = [list(rule) for rule in LOGICAL_AXIS_RULES]

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 0  # VQA questions answered with the sampler at the end (0 = none)
    c.eval.batch_size = 8
    c.eval.gen_length = 128  # the paper's VQA setting: L = B = N = 128
    c.eval.block_length = 128
    c.eval.steps = 128
    c.eval.show_examples = 5
    return c


# Stage 3: the paper's epochs per VQA training set.
STAGE3_EPOCHS = {"vqa_rad": 2, "slake": 10, "pathvqa": 7}


def stage3_epochs(config_file: str, dataset: str) -> int:
    """The paper's stage-3 epochs for ``dataset``; a ValueError naming the config forms otherwise."""
    if dataset not in STAGE3_EPOCHS:
        raise ValueError(f"{config_file}:{dataset}: unknown dataset; use one of "
                         f"{', '.join(f'{config_file}:{d}' for d in STAGE3_EPOCHS)}")
    return STAGE3_EPOCHS[dataset]


def finetune_config(name: str, init_from: str, epochs: int) -> ml_collections.ConfigDict:
    """Stages 2 and 3: LLM + projector (vision frozen), global batch 8, lr 1e-5 (LLaDA-V recipe)."""
    c = base_config()
    c.workdir = f"workdir/{name}"
    c.init_from = init_from
    c.train.global_batch = 8
    c.train.num_epochs = epochs
    c.optim.lr = 1e-5
    c.optim.param_groups = [("^vision/", None)]
    return c


def lora_finetune_config(name: str, init_from: str, epochs: int, rank: int = 64,
                         lora_lr: float = 2e-4, projector_lr: float = 2e-5) -> ml_collections.ConfigDict:
    """Stage 3 with LoRA: adapters (rank 64, alpha 16, dropout 0.05) on the LM's attention and MLP
    projections and the projector trained fully (lr 2e-4 and 2e-5, LLaVA's LoRA recipe); the LM's
    base weights frozen in bfloat16, the vision tower frozen. Set model.base_quant to "int8" or
    "int4" for QLoRA."""
    c = finetune_config(name, init_from, epochs)
    c.model.lora.rank = rank
    c.model.lora.alpha = 16.0
    c.model.lora.dropout = 0.05
    c.model.param_dtype = "bfloat16"  # the frozen base
    c.model.projector_param_dtype = "float32"
    c.optim.lr = projector_lr  # the default group: projector and image_newline
    c.optim.param_groups = lora_groups(lora_lr)
    return c


def lora_groups(lora_lr: float) -> list:
    """Adapters train at ``lora_lr``; the LM's base weights and the vision tower are frozen; the rest
    (projector, image_newline) trains at ``optim.lr``."""
    return [("^vision/", None), ("/lora_[ab]$", lora_lr), ("^lm/", None)]


def tiny_from_scratch(c: ml_collections.ConfigDict, vocab_size: int) -> ml_collections.ConfigDict:
    """The tiny MedV the CPU recipes train from random weights on the synthetic set (configs/demo.py,
    configs/mini/): LM d128 x 4 layers, a 2-layer tower on 64 px scans in 16 px patches (16 image
    tokens), fp32, and the from-scratch optimizer settings measured on the demo."""
    c.model.lm_preset = "llada_tiny"
    c.model.lm_overrides.vocab_size = vocab_size
    c.model.lm_overrides.hidden_size = 128
    c.model.lm_overrides.num_layers = 4
    c.model.lm_overrides.num_heads = 4
    c.model.lm_overrides.num_kv_heads = 4
    c.model.lm_overrides.head_dim = 32
    c.model.lm_overrides.mlp_hidden_size = 384
    c.model.lm_overrides.max_position_embeddings = 256
    # LLaDA-8B uses theta 500000 for long contexts; this tiny from-scratch model reads 40-128
    # tokens and learned positional attention far faster with the common 10000 (on the demo).
    c.model.lm_overrides.rope_theta = 10000.0
    c.model.vision_preset = "siglip_tiny"
    c.model.vision_overrides.image_size = 64
    c.model.vision_overrides.patch_size = 16  # 4 x 4 = 16 image tokens
    c.model.vision_overrides.hidden_size = 64
    c.model.vision_overrides.num_layers = 2
    c.model.vision_overrides.num_heads = 4
    c.model.vision_overrides.mlp_hidden_size = 128
    c.model.image_aspect_ratio = "square"
    c.model.mm_patch_merge_type = "flat"
    # Weights drawn with std 0.15 (about 2 / sqrt(width)) instead of the released models' 0.02: at
    # width 64-128 the small init leaves attention near uniform and the image barely read for
    # hundreds of steps, and when the yes/no questions were learned became a matter of seed and
    # rounding (at 0.02, seeds 1 and 2 ended at 78 % and 75 % closed; at 0.1 a seed could stall
    # on one yes/no question). With 0.15 every seed and both attention kernels learn both
    # families (benchmarks/RESULTS.md, "Training demo").
    c.model.lm_overrides.init_std = 0.15
    c.model.vision_overrides.init_std = 0.15
    c.model.dtype = "float32"
    c.model.remat_policy = "none"

    c.data.source = "synthetic"
    c.data.train_size = 1_000_000  # drawn on the fly: no record repeats within the run
    c.data.system_prompt = "none"
    c.data.max_crops = 1
    c.data.too_long = "raise"
    c.train.num_epochs = 0

    c.optim.lr = 2e-3
    # The diffusion loss weights each masked token by 1/p, so rare sequences with tiny p give large
    # gradients; with b2 = 0.999 they hold Adam's second moment up for ~1000 steps and slow learning
    # (measured: open recall 0.0 vs 0.44 after 800 steps with b2 = 0.95).
    c.optim.b2 = 0.95
    # Decoupled weight decay (AdamW) speeds up the demo's yes/no comparison a lot (closed after 1000
    # steps of batch 32: 54.5 % without, 66 % with 0.1; batch 64: 74 % -> 92 %). The LLaDA-V recipe
    # uses 0 for fine-tuning (base_config); this model learns from scratch.
    c.optim.weight_decay = 0.1
    c.optim.warmup_ratio = 0.03
    c.optim.param_groups = []  # everything trains from scratch
    c.mesh = (1, -1, 1)
    return c


# ------------------------------------------------------------------------------------------------
# The miniature recipe (configs/mini/)

MINI_ROOT = "workdir/mini"


def mini_config(stage: str):
    """The demo's from-scratch model and optimizer (tiny_from_scratch) with the findings reports'
    tokenizer, scans with the lesions in slots and a tower with 32 px patches (docs/mini_recipe.md);
    `stage` names the workdir (workdir/mini/<stage>)."""
    c = tiny_from_scratch(base_config(), vocab_size=768)
    c.workdir = f"{MINI_ROOT}/{stage}"
    c.tokenizer = "demo_reports"  # the demo's words plus the reports' (684 ids)
    # 4 + 2 small layers: unrolled, a train step takes a sixth to a fifth less time on the 2-core
    # CPU than with the layer loop (benchmarks/RESULTS.md, "Training step").
    c.model.unroll_layers = True
    c.data.layout = "slots"  # each lesion in one quadrant of its side (synthetic.SyntheticConfig.layout)
    # 32 px patches: 4 image tokens, one per quadrant, so each lesion is one token's finding; with
    # 16 px patches the tiny model confused the sides (docs/mini_recipe.md, "Lesion reading").
    c.model.vision_overrides.patch_size = 32
    # Reports whose length is fixed by the exam type (synthetic.REPORT_WORDINGS, docs/mini_recipe.md).
    c.data.report_wording = "templated"
    c.data.test_size = 200
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.ce_chunk = 128
    return c


# Parameter groups (regex over "part/.../name" paths; None = frozen). Frozen parts get no
# optimizer state and, unlike parts that merely receive no gradient, no weight decay either.
LM_ONLY = [("^vision/", None), ("^projector/", None), ("^image_newline", None)]
LM_AND_PROJECTOR = [("^vision/", None)]
