"""The project's configuration: typed sections, loaded from TOML with dotted overrides (see config_base)."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from megatron_hope.config_base import ConfigError, load_config, require_at_least

Readout = Literal["after_write", "before_write", "chunk_start"]


@dataclass
class MemoryConfig:
    """The self-modifying Titans memories (hope_spec.md 1.2-1.3, 2.1-2.4)."""

    kind: Literal["mlp", "linear"] = "mlp"  # residual 2-layer MLP z + A s(B z), or a matrix memory
    hidden_mult: int = 2  # MLP memory hidden width m = hidden_mult * head_dim
    chunk_size: int = 64  # tokens whose inner gradients share one chunk-start state
    momentum: bool = True  # S_t = beta_t S_{t-1} + g_t (spec project decisions)
    momentum_form: Literal["hope", "titans"] = "hope"  # titans: S_t = beta S - eta g, M_t = alpha M + S
    readout: Readout = "after_write"  # spec 1.3 reading B (dual form); chunk_start = reading A
    dgd: Literal["first", "each"] = "first"  # MLP memory: DGD factor on B only (i) or on each layer (ii)
    adaptive_q: bool = False  # q from a memory M_q instead of a static projection
    differentiable_writes: bool = True  # outer gradient flows through the inner updates (spec 2.4)
    eta_max: float = 0.5  # eta_t = eta_max * sigmoid(.)
    grad_clip: float = 1.0  # inner-update clipping: per-token gradient of each memory matrix to norm <= this (0 = off)
    alpha_bias_init: float = 5.0  # alpha_t = sigmoid(. + bias): starts near 1 (little forgetting)
    activation: Literal["silu", "gelu"] = "silu"
    # how the inner loop runs, not what it computes: left out of comparisons, so a checkpoint resumes either way
    # auto: the fastest for the device; sequential: the oracle; chunked: the earlier name of torch (saved configs);
    # triton: the fused kernels of ops/triton/ (CUDA)
    impl: Literal["auto", "torch", "sequential", "chunked", "triton"] = field(default="auto", compare=False)
    # > 0: keep the state every this many chunks for backward, which recomputes them (less activation memory)
    recompute_chunks: int = field(default=0, compare=False)
    # the chunk writes' backward: hand-written (ops/dual_form_grad.py) or autograd through the same math (reference)
    write_backward: Literal["manual", "autograd"] = field(default="manual", compare=False)

    def validate(self, path: str = "model.memory") -> None:
        require_at_least(self, path, 1, ("chunk_size", "hidden_mult"))
        if self.recompute_chunks < 0:
            raise ConfigError(f"{path}.recompute_chunks = {self.recompute_chunks} must be >= 0 (0 keeps every "
                              "activation; n > 0 recomputes n chunks at a time in backward)")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip = {self.grad_clip} must be >= 0 (0 turns inner-update clipping off)")
        if not 0.0 < self.eta_max <= 1.0:
            raise ConfigError(f"{path}.eta_max = {self.eta_max} must be in (0, 1] so that the DGD factor "
                              "alpha I - eta k k^T stays a contraction for unit keys")


@dataclass
class CMSLevel:
    """One Continuum Memory System level: an MLP with its own width and update periods (spec 1.4)."""

    hidden: int = 512
    period: int = 1  # outer period K_l in optimizer steps (schedule-aware accumulation)
    inner_chunk: int = 0  # in-sequence fast-weight update every inner_chunk tokens (0 = static level)


@dataclass
class CMSConfig:
    levels: list[CMSLevel] = field(default_factory=lambda: [CMSLevel(512, 1), CMSLevel(512, 4), CMSLevel(512, 16)])
    inner_updates: bool = False  # in-sequence first-order fast-weight updates (spec 1.4 proposal); off in pretraining
    inner_lr: float = 1e-2

    def validate(self, path: str = "model.cms") -> None:
        if not self.levels:
            raise ConfigError(f"{path}.levels is empty; give at least one [[{path}.levels]] table")
        for i, lvl in enumerate(self.levels):
            require_at_least(lvl, f"{path}.levels[{i}]", 1, ("hidden",))
            if lvl.period < 1:
                raise ConfigError(f"{path}.levels[{i}].period = {lvl.period} must be >= 1 optimizer steps")
            if lvl.inner_chunk < 0:
                raise ConfigError(f"{path}.levels[{i}].inner_chunk = {lvl.inner_chunk} must be >= 0")
        if self.inner_lr < 0:
            raise ConfigError(f"{path}.inner_lr = {self.inner_lr} must be >= 0")
        if self.inner_updates and not any(lvl.inner_chunk > 0 for lvl in self.levels):
            raise ConfigError(f"{path}.inner_updates = true but every level has inner_chunk = 0; "
                              "set inner_chunk > 0 on the levels that should adapt in-sequence")
        # the sequence is processed in chunks of the smallest inner_chunk; a level can only step at chunk ends
        step = self.inner_chunk
        for i, lvl in enumerate(self.levels):
            if lvl.inner_chunk and lvl.inner_chunk % step:
                raise ConfigError(f"{path}.levels[{i}].inner_chunk = {lvl.inner_chunk} is not a multiple of the "
                                  f"smallest inner_chunk {step}; levels step at ends of {step}-token chunks")

    @property
    def inner_chunk(self) -> int:
        """Chunk length of the in-sequence update loop: the smallest non-zero inner_chunk (0 if none)."""
        return min((lvl.inner_chunk for lvl in self.levels if lvl.inner_chunk > 0), default=0)


@dataclass
class ModelConfig:
    arch: Literal["hope", "titans", "transformerpp"] = "hope"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    max_seq_len: int = 2048
    ffn_hidden: int = 1408  # SwiGLU hidden width of the Transformer++ and Titans baselines
    conv_width: int = 4  # short causal depthwise conv on q/k/v (spec 1.1)
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)
    # torch.compile each block (parallel/compile.py). How the model runs, not what it is: left out of comparisons,
    # so a checkpoint resumes with it switched either way
    compile: bool = field(default=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, path: str = "model") -> None:
        require_at_least(self, path, 1, ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"{path}.n_heads = {self.n_heads} does not divide {path}.d_model = {self.d_model}; "
                              f"pick n_heads among the divisors of d_model")
        if self.arch == "transformerpp" and self.head_dim % 2:
            raise ConfigError(f"{path}: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.conv_width < 1:
            raise ConfigError(f"{path}.conv_width = {self.conv_width} must be >= 1 (1 = no mixing)")
        for name in ("init_std", "norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name} = {getattr(self, name)} must be > 0")
        self.memory.validate(f"{path}.memory")
        if self.memory.impl == "triton":
            self._validate_kernels(path)
        self.cms.validate(f"{path}.cms")
        if self.cms.inner_updates and self.arch != "hope":
            raise ConfigError(f"{path}.cms.inner_updates = true needs {path}.arch = 'hope' "
                              f"(arch {self.arch!r} has no CMS); set it to false")
        # the blocks run once per CMS chunk and the mixer's memory carries its state from chunk end to chunk
        # start, so a CMS chunk must start on the memory's chunk grid
        for i, lvl in enumerate(self.cms.levels if self.cms.inner_updates else []):
            if lvl.inner_chunk % self.memory.chunk_size:
                raise ConfigError(f"{path}.cms.levels[{i}].inner_chunk = {lvl.inner_chunk} is not a multiple of "
                                  f"{path}.memory.chunk_size = {self.memory.chunk_size}; with {path}.cms.inner_updates "
                                  f"= true set it to a multiple of the memory chunk (or lower the memory chunk)")

    def _validate_kernels(self, path: str) -> None:
        """model.memory.impl = "triton" asks for kernels that cover this model and installation (ops/triton/:
        the memories' writes and reads, with differentiable writes)."""
        fix = f"set {path}.memory.impl = 'auto' (the kernels where they apply, else the PyTorch form)"
        lacking = []
        if not self.memory.differentiable_writes:
            lacking.append(f"{path}.memory.differentiable_writes = false")
        if find_spec("triton") is None:
            lacking.append("triton, which is not installed (pip install triton)")
        if lacking:
            raise ConfigError(f"{path}.memory.impl = 'triton' cannot run with {'; '.join(lacking)}: {fix}")


@dataclass
class TrainConfig:
    """Batch sizes follow Megatron: a step consumes global_batch_size sequences, in micro-batches of
    micro_batch_size per data-parallel rank, accumulated over global / (micro * dp) micro-batches."""

    micro_batch_size: int = 8  # sequences per rank per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks and micro-batches
    seq_len: int = 64  # tokens per sequence; at most model.max_seq_len
    train_steps: int = 100  # optimizer steps
    eval_interval: int = 0  # evaluate every N steps (0: only at the end)
    eval_batches: int = 4  # validation batches of global_batch_size sequences per evaluation (0: no evaluation)
    log_interval: int = 10  # steps between metric lines
    log_comm_bytes: bool = False  # count the bytes of every collective per step (per mesh dim, and FSDP2 gradient
    # reductions per parameter group) into metrics "comm"
    seed: int = 0  # model initialisation (identical on every rank)
    max_nan_steps: int = 3  # stop after this many consecutive steps with a NaN/Inf loss or gradient norm
    dist_timeout_s: int = 600  # a collective that waits longer than this fails the run instead of hanging
    stop_at_step: int = 0  # save a checkpoint and stop after this step, keeping the schedule of train_steps (0: off)
    run_name: str = ""  # "" = <config file stem>-<date>-<time>
    runs_dir: str = "runs"
    peak_flops: float = 0.0  # per device, for MFU; 0 = from the CUDA device name, or a nominal CPU figure
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per process when CUDA is available, else CPU

    def validate(self, path: str = "train") -> None:
        require_at_least(self, path, 1, ("micro_batch_size", "global_batch_size", "seq_len", "train_steps",
                                         "log_interval", "max_nan_steps", "dist_timeout_s"))
        require_at_least(self, path, 0, ("eval_interval", "eval_batches", "stop_at_step"), " (0 switches it off)")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"{path}.global_batch_size = {self.global_batch_size} is not a multiple of "
                              f"{path}.micro_batch_size = {self.micro_batch_size}")
        if self.stop_at_step > self.train_steps:
            raise ConfigError(f"{path}.stop_at_step = {self.stop_at_step} is beyond {path}.train_steps = "
                              f"{self.train_steps}, so it would never stop the run; lower it or set 0 (off)")
        if self.peak_flops < 0:
            raise ConfigError(f"{path}.peak_flops = {self.peak_flops} must be >= 0 (0 = look it up)")
        if self.run_name:
            check_run_name(self.run_name, f"{path}.run_name")
        if not self.runs_dir:
            raise ConfigError(f"{path}.runs_dir is empty; give the directory that holds run directories")


def check_run_name(name: str, what: str) -> None:
    """A run name is one directory name under train.runs_dir: no path separator, no control character, no
    surrounding spaces, not "." or "..", at most 200 bytes (a file system allows 255 per name)."""
    problem = ("holds a '/'" if "/" in name else
               "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
               "starts or ends with a space" if name != name.strip() else
               "is empty" if not name else
               "is '.' or '..'" if name in (".", "..") else
               "is longer than 200 bytes" if len(name.encode()) > 200 else None)
    if problem:
        raise ConfigError(f"{what} = {name!r} {problem}; a run name must be a plain directory name, e.g. "
                          "hope-125m (letters, digits, '-', '_', '.')")


@dataclass
class OptimConfig:
    """AdamW with a warmup + decay learning-rate schedule (training/schedule.py)."""

    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5  # learning rate at the end of the decay
    weight_decay: float = 0.1  # on matrices only; see training/optimizer.py for the no-decay rule
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient L2 norm (0: no clipping)
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of train_steps decays linearly to min_lr
    cms_lr_period_exponent: float = 0.0  # CMS level l's lr = lr x period_l ** this (0: same lr for every level)

    def validate(self, train_steps: int, path: str = "optim") -> None:
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr = {self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{path}.min_lr = {self.min_lr} must be in [0, {path}.lr = {self.lr}]")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay = {self.weight_decay} must be >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"{path}.betas = {list(self.betas)} must hold two numbers, e.g. [0.9, 0.95]")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"{path}.betas[{i}] = {beta} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"{path}.eps = {self.eps} must be > 0")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip = {self.grad_clip} must be >= 0 (0 switches clipping off)")
        if not 0 <= self.warmup_steps <= train_steps:
            raise ConfigError(f"{path}.warmup_steps = {self.warmup_steps} must be in [0, train.train_steps = "
                              f"{train_steps}]; lower it or train longer")
        if self.schedule == "wsd":
            if not 0 < self.decay_fraction <= 1:
                raise ConfigError(f"{path}.decay_fraction = {self.decay_fraction} must be in (0, 1]")
            if self.warmup_steps + self.decay_steps(train_steps) > train_steps:
                raise ConfigError(f"{path}.warmup_steps + decay_fraction * train.train_steps = {self.warmup_steps}"
                                  f" + {self.decay_steps(train_steps)} exceeds train.train_steps = {train_steps}; "
                                  f"lower {path}.decay_fraction or {path}.warmup_steps")

    def decay_steps(self, train_steps: int) -> int:
        """Length of the WSD decay phase in steps."""
        return round(self.decay_fraction * train_steps)


@dataclass
class DataConfig:
    """Prepared data (python -m data_pipeline.prepare): manifests of token shards and the tokenizer."""

    train_manifest: str = ""  # manifest.json (or its directory) whose "train" split is trained on
    val_manifest: str = ""  # manifest.json (or its directory) whose "val" split is evaluated
    tokenizer_dir: str = ""  # the tokenizer the shards were made with (checked against the manifests)
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 1024  # documents
    seed: int = 0  # shard order and document shuffle

    def validate(self, path: str = "data") -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers = {self.num_workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"{path}.shuffle_buffer = {self.shuffle_buffer} must be >= 1 (1 = no shuffling)")


@dataclass
class CheckpointConfig:
    """Sharded checkpoints in runs_dir/run_name/checkpoints/step_NNNNNNNN/ (checkpoints/ package)."""

    save_interval: int = 0  # save every N steps (0: only at the end and on a stop signal)
    save_final: bool = True  # save after the last step
    keep_last: int = 3  # keep the newest K checkpoints (0: keep all)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of N (0: none)
    async_save: bool = True  # training continues while the shards are written (DCP async_save)
    verify_on_load: bool = True  # check every file's sha256 before loading (sizes and metadata are always checked)
    resume: str = ""  # "": a fresh run (a new run directory); "auto": this run's newest valid checkpoint, if any;
    # "none": start this run again at step 0 on purpose (its checkpoints are kept, renamed); or a checkpoint dir

    def validate(self, path: str = "checkpoint") -> None:
        require_at_least(self, path, 0, ("save_interval", "keep_last", "keep_every"), " (0 switches it off)")
        if self.resume not in ("", "auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError(f"{path}.resume = {self.resume!r} is neither \"auto\", \"none\" nor a checkpoint "
                              "directory; give runs/NAME/checkpoints/step_NNNNNNNN, \"auto\", \"none\" (this run again from step 0) "
                              "or \"\" for a fresh run")


@dataclass
class ParallelConfig:
    """Megatron's names for the parallel sizes; the data-parallel size is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1  # > 1: interleaved 1F1B with this many chunks per stage
    sequence_parallel: bool = False  # norms and residuals on sequence shards between TP regions
    data_parallel_size: int = 0  # 0: derived, world size / (tensor x pipeline); any other value must equal that
    dp_engine: Literal["fsdp2", "deepspeed"] = "fsdp2"
    zero_stage: int = 1  # DeepSpeed engine: ZeRO stage 1 or 2
    reshard_after_forward: bool = True  # FSDP2: free gathered block weights after forward (ZeRO-3)
    recompute_granularity: Literal["none", "selective", "full"] = "none"  # selective: the mixers' inner loop

    def validate(self, path: str = "parallel") -> None:
        require_at_least(self, path, 1, ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                         "virtual_pipeline_model_parallel_size"))
        if self.data_parallel_size < 0:
            raise ConfigError(f"{path}.data_parallel_size = {self.data_parallel_size} must be >= 0 "
                              "(0 = derived from the number of processes)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(f"{path}.sequence_parallel = true needs {path}.tensor_model_parallel_size > 1 "
                              "(it shards the sequence between tensor-parallel regions)")
        if self.virtual_pipeline_model_parallel_size > 1 and self.pipeline_model_parallel_size == 1:
            raise ConfigError(f"{path}.virtual_pipeline_model_parallel_size > 1 needs "
                              f"{path}.pipeline_model_parallel_size > 1")
        if self.dp_engine == "deepspeed":
            if self.zero_stage not in (1, 2):
                raise ConfigError(f"{path}.zero_stage = {self.zero_stage}: the DeepSpeed engine runs ZeRO stage 1 "
                                  "or 2; for fully sharded parameters use dp_engine = \"fsdp2\"")
            if self.tensor_model_parallel_size > 1 or self.pipeline_model_parallel_size > 1:
                raise ConfigError(f"{path}.dp_engine = \"deepspeed\" supports data parallelism only; set "
                                  f"{path}.tensor_model_parallel_size = {path}.pipeline_model_parallel_size = 1 or "
                                  "use dp_engine = \"fsdp2\"")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass
class Config:
    """Top-level run configuration; each section is one [table] of the TOML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        """Checks that hold for any use of the config (presets without data included)."""
        self.model.validate()
        self.train.validate()
        self.optim.validate(self.train.train_steps)
        self.data.validate()
        self.parallel.validate()
        self.checkpoint.validate()

    def grad_accum_steps(self, dp_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * dp_size)

    def _validate_pipeline(self, micro_batches: int) -> None:
        """The pipeline schedules' limits on the micro-batches per step (torch.distributed.pipelining)."""
        pp = self.parallel.pipeline_model_parallel_size
        counted = (f"train.global_batch_size / (train.micro_batch_size x data_parallel_size) = {micro_batches} "
                   "micro-batches per step")
        if micro_batches < pp:
            raise ConfigError(f"parallel.pipeline_model_parallel_size = {pp} needs at least {pp} micro-batches per "
                              f"step, but {counted}; raise train.global_batch_size or lower train.micro_batch_size")
        rounds = micro_batches // pp  # interleaved 1F1B runs the micro-batches in this many equal rounds
        if self.parallel.virtual_pipeline_model_parallel_size > 1 and micro_batches % rounds:
            raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size > 1 (interleaved 1F1B) runs the "
                              f"micro-batches in {micro_batches} // parallel.pipeline_model_parallel_size = {rounds} "
                              f"equal rounds, but {counted}; make it a multiple of {pp} with "
                              "train.global_batch_size")

    def validate_run(self, world_size: int) -> None:
        """Checks for a training run on `world_size` processes; fills in parallel.data_parallel_size.
        Run before any process group starts, so that every rank fails alike with the same message."""
        t, p = self.train, self.parallel
        mp = p.model_parallel_size
        if world_size % mp:
            raise ConfigError(f"{world_size} process(es) are not a multiple of parallel.tensor_model_parallel_size x "
                              f"parallel.pipeline_model_parallel_size = {mp}; launch a multiple of {mp} processes")
        dp = world_size // mp
        if p.data_parallel_size not in (0, dp):
            raise ConfigError(f"parallel.data_parallel_size = {p.data_parallel_size} but {world_size} process(es) "
                              f"with model-parallel size {mp} give {dp}; set it to 0 (derive it) or launch "
                              f"{p.data_parallel_size * mp} processes")
        p.data_parallel_size = dp
        m, tp = self.model, p.tensor_model_parallel_size
        if m.n_heads % tp:
            raise ConfigError(f"parallel.tensor_model_parallel_size = {tp} does not divide model.n_heads = "
                              f"{m.n_heads}; memory and attention heads are split whole across TP ranks")
        if m.vocab_size % tp:
            raise ConfigError(f"parallel.tensor_model_parallel_size = {tp} does not divide model.vocab_size = "
                              f"{m.vocab_size}; the embedding and LM head are vocab-parallel (pad the vocabulary)")
        if p.sequence_parallel and t.seq_len % tp:
            raise ConfigError(f"train.seq_len = {t.seq_len} is not a multiple of parallel.tensor_model_parallel_size"
                              f" = {tp}, which sequence parallelism needs")
        stages = p.pipeline_model_parallel_size * p.virtual_pipeline_model_parallel_size
        if stages > m.n_layers:
            raise ConfigError(f"pipeline stages x virtual chunks = {stages} exceed model.n_layers = {m.n_layers}; "
                              "every pipeline chunk needs at least one block")
        per_pass = t.micro_batch_size * dp
        if t.global_batch_size % per_pass:
            raise ConfigError(f"train.global_batch_size = {t.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size x data_parallel_size = {t.micro_batch_size} x {dp}"
                              f" = {per_pass}; make it a multiple so that every rank accumulates whole "
                              "micro-batches")
        if p.pipeline_model_parallel_size > 1:
            self._validate_pipeline(self.grad_accum_steps(dp))
        periods = [lvl.period for lvl in self.model.cms.levels]
        if self.model.arch == "hope" and any(k > 1 for k in periods):
            unsupported = ("parallel.dp_engine = \"deepspeed\"" if p.dp_engine == "deepspeed" else
                           "parallel.pipeline_model_parallel_size > 1" if p.pipeline_model_parallel_size > 1 else
                           "parallel.tensor_model_parallel_size > 1" if tp > 1 else None)
            if unsupported:
                raise ConfigError(f"model.cms.levels periods {periods}: schedule-aware accumulation (periods > 1) "
                                  f"runs with the FSDP2 engine without model parallelism only, not with "
                                  f"{unsupported}; set every model.cms.levels[].period = 1 or drop {unsupported}")
        if t.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len = {t.seq_len} exceeds model.max_seq_len = {self.model.max_seq_len};"
                              " lower train.seq_len or raise model.max_seq_len")
        if self.model.cms.inner_updates:
            raise ConfigError("model.cms.inner_updates = true is not wired into the trainer yet (HopeLM."
                              "forward_inner_updates runs and is tested without data or model parallelism); set it "
                              "to false")
        for name in ("train_manifest", "tokenizer_dir") + (("val_manifest",) if t.eval_batches else ()):
            value = getattr(self.data, name)
            if not value:
                raise ConfigError(f"data.{name} is empty; point it at the output of python -m data_pipeline."
                                  f"{'tokenizer train' if name == 'tokenizer_dir' else 'prepare'}")
            if not Path(value).exists():
                raise ConfigError(f"data.{name} = {value!r} does not exist; check the path or build it with "
                                  "launch/quickstart.sh / the data_pipeline commands")


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    return load_config(Config, path, overrides)
