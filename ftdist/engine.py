"""From the validated config to a DeepSpeed engine.

``deepspeed_config`` is a pure function (unit-tested without starting anything). Choices that
matter for speed, from measurements (bench/RESULTS.md):

- mixed precision through ``torch.autocast`` with fp32 master weights (``mixed_precision:
  torch_autocast``) rather than DeepSpeed's bf16 optimizer wrapper, which lost up to 2.9x to a
  plain loop on one GPU; fp16 there gets its dynamic loss scale from DeepSpeed's ``torch_autocast``
  mode (ZeRO-0 only: ``resolve_precision`` refuses fp16 with ZeRO under torch_autocast);
- ftdist's own AdamW (fused, on CPU as on CUDA) with weight decay off for biases and norms, and its own
  warmup+decay schedule, unless optimizer offload needs DeepSpeed's CPU Adam;
- no DeepSpeed progress printing or wall-clock breakdown in the hot path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ftdist.config import RunConfig
from ftdist.errors import UserError


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None


def resolve_precision(cfg: RunConfig, device_type: str) -> Precision:
    """The precision this run trains in; refuses fp16 where it would train without loss scaling.

    fp16 gradients below ~6e-8 flush to zero, so fp16 needs a dynamic loss scale. Under
    ``torch_autocast`` ftdist gets one from DeepSpeed's ``torch_autocast`` mode, which scales
    correctly only without ZeRO: with DeepSpeed 0.19's ZeRO optimizers every fp16 step was
    skipped as an overflow and the scale never lowered (nothing trained), so that is refused.
    """
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    stage = cfg.deepspeed.zero_stage
    if p == "fp16" and cfg.deepspeed.mixed_precision == "torch_autocast" and stage >= 1:
        raise UserError(f"train.precision fp16 under deepspeed.mixed_precision torch_autocast has loss scaling "
                        f"only without ZeRO, and this run asks for deepspeed.zero_stage {stage}; set "
                        f"deepspeed.mixed_precision: deepspeed (DeepSpeed's fp16 engine, dynamic loss scale), "
                        f"or train.precision: bf16, or deepspeed.zero_stage: 0")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    return Precision(p, dtype)


def engine_autocasts(cfg: RunConfig, precision: Precision) -> bool:
    """True when DeepSpeed itself runs the forward under autocast: fp16 with ``torch_autocast``,
    so that its ``torch_autocast`` mode also owns the matching dynamic loss scale (a GradScaler:
    scale the loss, unscale before clipping, skip steps with inf/NaN gradients, adapt the scale).
    bf16 has fp32's exponent range and needs no scaling: ftdist's own ``torch.autocast`` runs it."""
    return precision.name == "fp16" and cfg.deepspeed.mixed_precision == "torch_autocast"


def deepspeed_config(cfg: RunConfig, precision: Precision, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (``deepspeed.config`` keys are merged last).

    ``hidden_size`` (the model's, when known): ZeRO-3's gathering sizes, and its gradient bucket
    unless ``deepspeed.reduce_bucket_size`` is set, are derived from it (``zero3_sizes``; transformers'
    "auto" takes h² for the bucket too) instead of DeepSpeed's fixed defaults."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": ds.overlap_comm, "reduce_bucket_size": ds.reduce_bucket_size or 50_000_000,
                     "allgather_bucket_size": ds.allgather_bucket_size, "contiguous_gradients": True,
                     "reduce_scatter": True})
    if ds.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, **zero3_sizes(hidden_size)})
        if ds.reduce_bucket_size is None and hidden_size:  # a 5e7-element bucket is 200 MB of fp32 per rank
            zero["reduce_bucket_size"] = hidden_size * hidden_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.train.max_grad_norm:
        out["gradient_clipping"] = cfg.train.max_grad_norm
    if precision.autocast_dtype is not None and ds.mixed_precision == "deepspeed":
        out["bf16" if precision.name == "bf16" else "fp16"] = {"enabled": True}
    if engine_autocasts(cfg, precision):
        out["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    if ds.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's CPU Adam; the schedule stays ftdist's (passed as a callable).
        out["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.train.learning_rate, "betas": list(cfg.train.adam_betas), "eps": cfg.train.adam_eps,
            "weight_decay": cfg.train.weight_decay}}
    return _merge(out, ds.config)


def zero3_sizes(hidden_size: int | None) -> dict[str, int]:
    """ZeRO-3's gathering limits from the model's hidden size ``h`` (a transformer layer holds ~12 h²
    parameters); none without it (DeepSpeed's defaults).

    Why: DeepSpeed keeps a gathered parameter whenever it is used again within
    ``stage3_max_reuse_distance`` parameters (default 1e9) and keeps up to
    ``stage3_max_live_parameters`` (1e9) gathered: for a model under ~500M parameters nothing bounds
    what stays gathered. Two layers' worth keeps the prefetch pipeline fed while the rest stays
    partitioned. Measured on a 335M model, 2 CPU workers (bench/RESULTS.md): 7% lower ZeRO-3 peak,
    no slower; the peak is still ZeRO-0's, for another reason. The prefetch
    bucket and the persistence threshold follow transformers' "auto" rules (0.9 h², 10 h).
    ``deepspeed.config`` overrides any of them."""
    if not hidden_size:
        return {}
    h = int(hidden_size)
    return {"stage3_max_live_parameters": 24 * h * h, "stage3_max_reuse_distance": 24 * h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
            "sub_group_size": 24 * h * h}


def model_hidden_size(model: torch.nn.Module) -> int | None:
    """The hidden size from a (possibly peft-wrapped) HF model's config, if it has one."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    return size if isinstance(size, int) else None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (the standard AdamW recipe)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, remap: list[float] | None = None) -> Any:
    """Linear warmup to the peak, then linear/cosine decay to zero (or constant).

    ``remap`` (a run resumed on another number of workers, see ``rescheduled``): optimizer steps
    are mapped onto the schedule planned for ``total_steps`` before it is evaluated."""
    def f(step: int) -> float:
        v = schedule_position(remap, total_steps, step)
        if warmup_steps and v < warmup_steps:
            return (v + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (v - warmup_steps) / max(1, total_steps - warmup_steps))
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def schedule_position(remap: list[float] | None, total_steps: int, step: int) -> float:
    """Where optimizer step ``step`` is on the schedule planned for ``total_steps`` steps."""
    if not remap:
        return step
    at, position, end = remap
    return position + (step - at) * (total_steps - position) / max(1.0, end - at)


def rescheduled(remap: list[float] | None, total_steps: int, done: int, remaining: int) -> list[float]:
    """The schedule of a run resumed on another number of workers after ``done`` optimizer steps,
    with ``remaining`` steps left under the new plan (the data-parallel size changes the steps per
    epoch): the LR continues from where it was at ``done`` (no jump) and the rest of the schedule
    (warmup left, decay) is stretched or squeezed to end exactly at the new last step.
    Returns ``[done, position on the schedule at done, step at which it ends]``."""
    return [float(done), schedule_position(remap, total_steps, done), float(done + max(1, remaining))]


def follow_schedule(engine: Any, total_steps: int, cfg: RunConfig, remap: list[float] | None) -> None:
    """Make the engine's LR schedule ``lr_lambda(total_steps, ..., remap)`` (a resumed run's plan,
    which the checkpoint records); ``reapply_hyperparameters`` then sets the current LR from it."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    fn = lr_lambda(total_steps, int(cfg.train.warmup_ratio * total_steps), cfg.train.lr_schedule, remap)
    scheduler.lr_lambdas = [fn] * len(scheduler.lr_lambdas)


def build_engine(cfg: RunConfig, model: torch.nn.Module, total_optimizer_steps: int, precision: Precision) -> Any:
    """``deepspeed.initialize`` with ftdist's optimizer and schedule; expects torch.distributed ready."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    ds_cfg = deepspeed_config(cfg, precision, model_hidden_size(model))
    warmup = int(cfg.train.warmup_ratio * total_optimizer_steps)
    sched_fn = lr_lambda(total_optimizer_steps, warmup, cfg.train.lr_schedule)
    groups = param_groups(model, cfg.train.weight_decay)
    if "optimizer" in ds_cfg:
        optimizer = None
    else:
        # Fused on CPU too (torch >= 2.4): with the default per-tensor AdamW a small BERT's CPU step took
        # 1.6x as long (bench/RESULTS.md).
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=cfg.train.adam_betas,
                                      eps=cfg.train.adam_eps, fused=True)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: LambdaLR(opt, sched_fn), config=ds_cfg, dist_init_required=False)
    if "torch_autocast" in ds_cfg:
        _forget_autocast_globals()
    if ds_cfg["zero_optimization"]["stage"] == 0 and _world_size() == 1:
        # One rank without ZeRO: DeepSpeed would still flatten every gradient, all-reduce it with
        # itself and copy it back, each step (+7% step time on CPU, bench/RESULTS.md).
        engine.enable_backward_allreduce = False
    share_master_partitions(engine)
    return engine, scheduler


def share_master_partitions(engine: Any) -> int:
    """Under ZeRO-3 with fp32 parameters, make the optimizer's fp32 partitions the parameters' own
    partitions instead of copies; the bytes freed on this rank.

    Why: ftdist keeps parameters in fp32 (mixed precision runs under ``torch.autocast``), so the
    "master" copy DeepSpeed makes of each rank's partition duplicates it, 4 bytes per parameter per
    worker. DeepSpeed 0.19 means to share them in that case, but its check compares ``tensor.device``
    with a device *name* string, which never holds, so it copies (on CPU and CUDA alike). The values
    are the same at every step either way: the optimizer updates the shared tensor, and DeepSpeed's
    copy back into the parameters becomes a copy onto itself. Offloaded partitions (another device)
    and 16-bit parameters keep their copies."""
    opt = getattr(engine, "optimizer", None)
    low = getattr(opt, "fp16_partitioned_groups_flat", None)
    master = getattr(opt, "fp32_partitioned_groups_flat", None)
    inner = base_optimizer(engine)
    if not low or not master or len(low) != len(master) or inner is None:
        return 0
    if any(inner.state.get(m) for m in master):  # moments exist: leave it as built
        return 0
    freed = 0
    for lp, hp in zip(low, master):
        if (lp.dtype == hp.dtype and lp.device == hp.device and lp.shape == hp.shape
                and lp.untyped_storage().data_ptr() != hp.untyped_storage().data_ptr()):
            freed += hp.numel() * hp.element_size()
            hp.data = lp.data
    return freed


def base_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside DeepSpeed's ZeRO wrappers."""
    opt = getattr(engine, "optimizer", None)
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of optimizer state (Adam's moments) this rank holds; under ZeRO >= 1 only its partition."""
    opt = base_optimizer(engine)
    if opt is None:
        return 0
    return sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def release_optimizer_state(engine: Any) -> None:
    """Drop the optimizer's moments once training is over (the last checkpoint keeps them).

    Why: exporting under ZeRO-3 gathers the whole model on rank 0 while every rank still holds its
    partition of Adam's two moments, 8 bytes per parameter divided by the workers; freed first, the
    export's peak is no higher than training's (tests/test_memory_budget.py)."""
    import gc

    opt = base_optimizer(engine)
    if opt is not None:
        opt.state.clear()
        gc.collect()


def memory_levers(engine: Any) -> dict[str, Any]:
    """What the engine actually runs with (read from DeepSpeed and the model, not from the config), for
    the summary: the optimizer class, offloads, activation checkpointing, compilation."""
    module: Any = getattr(engine, "module", None)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    opt = base_optimizer(engine)
    return {"optimizer": type(opt).__name__ if opt is not None else None,
            "offload_optimizer": bool(engine.zero_use_cpu_optimizer()),
            "offload_params": _offloaded(engine.zero_offload_param()),
            "gradient_checkpointing": bool(getattr(base, "is_activation_checkpointing", False)),
            "compiled": bool(getattr(engine, "is_compiled", False))}


def _offloaded(offload: Any) -> bool:
    return offload is not None and getattr(offload.device, "value", offload.device) != "none"


def _forget_autocast_globals() -> None:
    """Undo the process-wide flag DeepSpeed's ``torch_autocast`` mode leaves behind.

    DeepSpeed records "autocast in fp16" in module globals that only ZeRO optimizers read, when
    they are built. This engine (ZeRO-0) has read what it needs; left set, the flag would hand a
    later ZeRO engine in the same process (tests, the benchmark harness) a grad scaler it never
    asked for, and that engine would skip every step.
    """
    from deepspeed.runtime import torch_autocast

    torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
    torch_autocast.TORCH_AUTOCAST_DTYPE = None


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def init_distributed(device_type: str) -> None:
    """DeepSpeed on top of the process group Ray Train (or the bench harness) created."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device_type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op (40-75 s on 2 cores, once per machine)
        # that only its *inference* all-reduce uses; training all-reduces go through gloo. Skip it.
        import importlib

        ds_torch_comm: Any = importlib.import_module("deepspeed.comm.torch")  # `import a.b.torch as x` finds torch
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None

    deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl", auto_mpi_discovery=False)


def reapply_hyperparameters(engine: Any, cfg: RunConfig) -> None:
    """Make the restored optimizer and schedule follow ``cfg``, not the checkpoint.

    Restoring a checkpoint loads the optimizer's param groups (lr, weight decay, betas, eps) and
    the scheduler's ``base_lrs`` from it. For a resumed run they equal the config anyway; a PBT
    trial continuing another trial's checkpoint with a perturbed learning rate or weight decay
    must train with its own values. The schedule's step count stays the checkpoint's, so warmup
    and decay continue where they were, scaled to the new peak learning rate.
    """
    scheduler = getattr(engine, "lr_scheduler", None)
    optimizer = scheduler.optimizer if scheduler is not None else getattr(engine, "optimizer", None)
    if optimizer is None:
        return
    t = cfg.train
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = t.learning_rate
        if i == 0:  # param_groups(): decayed weights first, biases and norms (no decay) second
            group["weight_decay"] = t.weight_decay
        if "betas" in group:
            group["betas"] = tuple(t.adam_betas)
        if "eps" in group:
            group["eps"] = t.adam_eps
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = t.learning_rate
        return
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() (and so engine.get_lr()) reports
