"""From a validated sweep spec to Ray Tune objects: search space, PBT mutations, searcher, scheduler.

Pure functions (they build Tune objects but start nothing), so what a spec turns into is
unit-tested without a cluster. Trials receive a flat dict keyed by dotted config path
(``{"train.learning_rate": 3e-5, ...}``): the same keys the user wrote and ``--set`` takes.
"""

from __future__ import annotations

import math
from typing import Any

from ftdist.errors import UserError
from ftdist.sweep.spec import (
    AshaSpec,
    Dimension,
    HyperbandSpec,
    MedianSpec,
    PbtSpec,
    ResolvedSweep,
    SweepSpec,
)

#: the time axis every scheduler uses: ftdist reports once per epoch with ``epoch`` = epochs done
TIME_ATTR = "epoch"


def tune_domain(dim: Dimension, search_type: str) -> Any:
    """The Tune sampler for one dimension (``randint`` bounds are inclusive, unlike Tune's)."""
    from ray import tune

    if dim.kind == "loguniform":
        assert dim.low is not None and dim.high is not None  # a range: the spec checked both bounds
        return tune.loguniform(dim.low, dim.high)
    if dim.kind == "uniform":
        assert dim.low is not None and dim.high is not None
        return tune.uniform(dim.low, dim.high)
    if dim.kind == "randint":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # type: ignore[arg-type]
    if dim.kind == "grid" or (dim.kind == "choice" and search_type == "grid"):
        return tune.grid_search(list(dim.values))
    return tune.choice(list(dim.values))


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {key: tune_domain(dim, spec.search.type) for key, dim in spec.space.items()}


def grid_points(spec: SweepSpec) -> int:
    """Configurations per sample: the product of the grid sizes (1 without grid dimensions)."""
    n = 1
    for dim in spec.space.values():
        if dim.kind == "grid" or (dim.kind == "choice" and spec.search.type == "grid"):
            n *= len(dim.values)
    return n


def total_trials(spec: SweepSpec) -> int:
    return spec.num_samples * grid_points(spec)


def pbt_mutations(spec: SweepSpec) -> dict[str, Any]:
    """PBT resamples/perturbs within the same space the population was drawn from."""
    return {key: (list(dim.values) if not dim.is_range else tune_domain(dim, "random"))
            for key, dim in spec.space.items()}


def clamp_to_space(config: dict[str, Any], space: dict[str, Dimension]) -> dict[str, Any]:
    """PBT multiplies values by its perturbation factors (1.2, 0.8), which can leave the space
    (a warmup_ratio of 0.95 * 1.2 is not a valid config): clamp them back to the bounds."""
    out = dict(config)
    for key, dim in space.items():
        if dim.is_range and isinstance(out.get(key), (int, float)) and not isinstance(out.get(key), bool):
            v = min(max(out[key], dim.low), dim.high)
            out[key] = int(round(v)) if dim.kind == "randint" else float(v)
    return out


class ClampToSpace:
    """``custom_explore_fn`` for PBT (a class, not a closure, so Tune can pickle it into its state)."""

    def __init__(self, space: dict[str, Dimension]) -> None:
        self.space = space

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        return clamp_to_space(config, self.space)


def build_scheduler(rs: ResolvedSweep) -> Any:
    """The Tune scheduler; ``max_t`` defaults to the most epochs a trial runs."""
    from ray.tune.schedulers import (
        FIFOScheduler,
        HyperBandScheduler,
        MedianStoppingRule,
        PopulationBasedTraining,
    )

    s = rs.spec.scheduler
    if isinstance(s, AshaSpec):
        from ftdist.uri import join_uri
        from ftdist.sweep.asha import RUNGS_FILE, PersistentASHA

        return PersistentASHA(join_uri(rs.sweep_uri, RUNGS_FILE), rs.base_config.storage,
                              time_attr=TIME_ATTR, max_t=s.max_t or rs.max_epochs, grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor, brackets=s.brackets)
    if isinstance(s, HyperbandSpec):
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=s.max_t or rs.max_epochs,
                                  reduction_factor=s.reduction_factor)
    if isinstance(s, PbtSpec):
        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=s.perturbation_interval, burn_in_period=s.burn_in_period,
            hyperparam_mutations=pbt_mutations(rs.spec), quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability, perturbation_factors=(s.perturbation_factors[0], s.perturbation_factors[1]),
            custom_explore_fn=ClampToSpace(rs.spec.space), synch=s.synch)
    if isinstance(s, MedianSpec):
        return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=s.grace_period,
                                  min_samples_required=s.min_samples_required, hard_stop=s.hard_stop)
    return FIFOScheduler()


def build_searcher(rs: ResolvedSweep, max_concurrent: int) -> Any:
    """Random and grid: Tune's variant generator, seeded. TPE: Optuna, if installed."""
    spec = rs.spec
    if spec.search.type == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("sweep spec: search 'optuna' needs the optuna package; pip install optuna "
                            "(or pip install 'ftdist[optuna]'), or use search 'random'") from None
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(seed=spec.search.seed), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=max_concurrent)


# ---------------------------------------------------------------------------------------------
# Resources: how many trials fit at once


def trial_resources(rs: ResolvedSweep, gpu: bool) -> dict[str, float]:
    """What one trial's Train workers ask for in total (the trial's driver takes no CPU)."""
    from ftdist.ray_cluster import worker_resources

    cfg = rs.base_config
    per_worker = worker_resources(cfg, gpu)
    n = cfg.scaling.num_workers
    return {k: v * n for k, v in per_worker.items() if not k.startswith("accelerator_type")}


def concurrency(need: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster can run side by side without oversubscribing any resource."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(fits) if fits else 1 << 30


def describe(res: dict[str, float]) -> str:
    def fmt(k: str, v: float) -> str:
        return f"{k}={v / 1024**3:.1f}GiB" if k == "memory" else f"{k}={v:g}"

    return ", ".join(fmt(k, v) for k, v in sorted(res.items()))
