"""``train.l2sp``: L2-SP (Li et al., 2018), the trained non-head weights pulled toward the run's starting
weights ``w0``, in decoupled form: before each optimizer step, ``w ← w − lr·λ·(w − w0)``.

Why decoupled (as AdamW decouples weight decay) rather than λ/2·||w − w0||² added to the loss: through
Adam, the penalty's gradient is divided by its own running magnitude, so a weight the task never
touches (most rows of a word-embedding matrix) but that weight decay moved by a hair got full-size
steps back and forth: on the tests' tiny BERT (6 steps, λ = 50) the loss form ended *farther* from
``w0`` than no penalty at all (squared distance 30.0 vs 25.1); the decoupled form at λ = 10 over an
epoch ended 4.5x nearer than no penalty (7.9 vs 35.3), the same at ZeRO 0, 2 and 3. Decoupled, the pull is ``lr·λ`` of the
distance per step, whatever Adam does; with SGD the two forms are the same. ``lr·λ`` must stay below 1
(the config refuses more: the pull would overshoot ``w0``).

``w0`` is taken when the engine is built, before any checkpoint is restored: the weights of
``model.path`` (in a sequence of stages, the previous stage's export), so a resumed run still pulls
toward the stage's start. The task head is left out (new, or this stage's own). The pull acts where
each ZeRO stage keeps the fp32 weights the optimizer updates, so each rank keeps ``w0`` only for
what it updates:

- ZeRO-0: the parameters themselves (one fp32 copy of the penalised weights);
- ZeRO-1/2 (and DeepSpeed's own bf16 optimizer at ZeRO-0): this rank's fragment of the fp32 master
  partition (``param._hp_mapping``, DeepSpeed's link between a model parameter and its optimizer partition);
- ZeRO-3: this rank's fp32 partition, through DeepSpeed's documented local API
  (``safe_get_local_fp32_param``/``safe_set_local_fp32_param``).

The optimizer step then updates those weights and DeepSpeed hands them to the model as for any step.
"""

from __future__ import annotations

from typing import Any

import torch

from ftdist.modeling import TASK_HEADS


def anchored_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trained parameters outside the task head (a tied output layer counts once, as its embedding)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in TASK_HEADS]


def _master(p: torch.nn.Parameter, zero_stage: int) -> torch.Tensor | None:
    """The fp32 weights of ``p`` this rank's optimizer updates (None: another rank holds them all)."""
    if zero_stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, and DeepSpeed's bf16 optimizer at ZeRO-0: an fp32 master fragment
        return p._hp_mapping.get_hp_fragment() if p._hp_mapping is not None else None
    return p.data  # ZeRO-0 (fp32 weights, autocast): the optimizer updates the parameters themselves


class L2SP:
    """The pull of one run; build it right after the engine, before a checkpoint is restored."""

    def __init__(self, engine: Any, strength: float, zero_stage: int) -> None:
        self.engine, self.strength, self.stage = engine, strength, zero_stage
        self.params: list[torch.nn.Parameter] = []
        self.anchor: list[torch.Tensor] = []
        for _, p in anchored_parameters(engine.module):
            w = _master(p, zero_stage)
            if w is not None and w.numel():
                self.params.append(p)
                self.anchor.append(w.detach().float().clone())

    @torch.no_grad()
    def pull(self) -> None:
        """``w ← w − lr·λ·(w − w0)`` at the current learning rate; call once per optimizer step, just
        before it (the step that closes a gradient-accumulation window)."""
        rate = self.engine.get_lr()[0] * self.strength
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param

            for p, a in zip(self.params, self.anchor):
                w = _master(p, 3)
                assert w is not None
                safe_set_local_fp32_param(p, w.lerp(a, rate))  # set: with offload, the partition lives elsewhere
            return
        weights = [_master(p, self.stage) for p in self.params]
        torch._foreach_lerp_(weights, self.anchor, rate)  # type: ignore[arg-type]
