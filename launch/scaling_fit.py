"""Scaling-law fits over a sweep: L(x) = E + A * x^(-alpha), x a run's size (parameters) or compute (FLOPs).

    python -m launch.report SWEEP_DIR --fit=params          # x = non-embedding parameters
    python -m launch.report SWEEP_DIR --fit=flops --fit_metric=eval/loss

The fit is nonlinear least squares on the final metric of every finished run. For a fixed alpha the law is
linear in (E, A), so each alpha has a closed-form best (E, A) ("variable projection"); the sum of squared
residuals of that best is minimised over alpha on a log-spaced grid, then refined by golden-section search
between the grid neighbours of the best point. x is divided by its geometric mean while fitting, so the linear
solves stay well conditioned whatever the scale of x (1e4 parameters or 1e15 FLOPs); A is reported for the
unscaled x.

Uncertainties are the usual asymptotic ones: the covariance s^2 (J^T J)^-1 of the three parameters, J the
Jacobian of the model at the optimum and s^2 = SSE / (n - 3), mapped back to the unscaled A by the delta
method. With few runs (4 gives one degree of freedom) they are rough: read them as the scale of the
uncertainty, not as a confidence interval.

The x axes are a registry (FIT_AXES), each reading a run's work directory:
  * params: the non-embedding parameter count, the weight matrices of the Transformer blocks (attention's q, k,
    v and output projections and the MLP, per layer), from the model config saved in the run's config.json.
    Token and position embeddings (and a tied output head) are left out, as in Kaplan et al. 2020, who found
    the power law much cleaner without them: at small widths the embedding dominates the count without adding
    much capacity. Norm scales and biases, O(d_model) per layer, are left out too (N ~ 12 L d^2).
  * flops: training FLOPs, llm_jax.training.flops' train FLOPs per token (6 x forward multiply-accumulates,
    the vocabulary head counted at every position) times the tokens trained (train.steps x train.batch_size x
    data.seq_len of the config in force).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from llm_jax.errors import UserError
from llm_jax.registry import Registry
from llm_jax.training import flops, run_record

MIN_RUNS = 4  # three parameters and at least one degree of freedom for their uncertainties
ALPHA_RANGE = (1e-3, 5.0)
_GRID_POINTS = 400
_GOLDEN_STEPS = 80


class FitError(UserError, ValueError):
    """A fit that cannot be made; the message says what the runs lack."""


@dataclasses.dataclass(frozen=True)
class FitAxis:
    """An x axis of the fit: its name in the plot and how to read a run's x from its work directory."""

    label: str
    read: Callable[[str], float]


def _run_configs(workdir: str) -> tuple[Any, Any]:
    """(config in force, model config) of the run in `workdir`, as a FitError when config.json is unreadable."""
    try:
        return run_record.read_run_config(workdir)
    except (FileNotFoundError, UserError, ValueError, KeyError) as error:
        raise FitError(f"cannot read the run's config in {workdir}: {error}") from None


def non_embedding_params(model_config: Any) -> int:
    """Weights of the blocks' matrices: per layer, attention's projections and the MLP (see the module doc)."""
    return model_config.num_layers * (flops.projection_macs(model_config) + flops.mlp_macs(model_config))


def training_flops(config: Any, model_config: Any) -> float:
    """Train FLOPs per token x tokens trained (train.steps x train.batch_size x data.seq_len)."""
    tokens = int(config.train.steps) * int(config.train.batch_size) * int(config.data.seq_len)
    return flops.train_flops_per_token(model_config, int(config.data.seq_len)) * tokens


def _run_params(workdir: str) -> float:
    return float(non_embedding_params(_run_configs(workdir)[1]))


def _run_flops(workdir: str) -> float:
    return training_flops(*_run_configs(workdir))


FIT_AXES: Registry[FitAxis] = Registry("fit axis")  # --fit=NAME: the x of each run
FIT_AXES.add("params", FitAxis("non-embedding parameters", _run_params))
FIT_AXES.add("flops", FitAxis("training FLOPs", _run_flops))


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A * x^(-alpha) fitted to points (x, y), with standard errors and residuals (y - fit)."""

    E: float
    A: float
    alpha: float
    E_err: float
    A_err: float
    alpha_err: float
    x: tuple[float, ...]
    y: tuple[float, ...]
    residuals: tuple[float, ...]
    note: str = ""  # a warning when the optimum sits at the edge of the searched alpha range

    def predict(self, x: Any) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    @property
    def rms_residual(self) -> float:
        return float(np.sqrt(np.mean(np.square(self.residuals))))


def _linear_solve(u: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(E, A, SSE) of the best linear fit y ~ E + A u^-alpha for this alpha."""
    design = np.stack([np.ones_like(u), u ** (-alpha)], axis=1)
    (E, A), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(E), float(A), float(np.sum(np.square(y - design @ np.array([E, A]))))


def _best_alpha(u: np.ndarray, y: np.ndarray) -> float:
    """The alpha minimising the profile SSE: a log-spaced grid, then golden-section search around its best."""
    grid = np.geomspace(*ALPHA_RANGE, _GRID_POINTS)
    sse = [_linear_solve(u, y, alpha)[2] for alpha in grid]
    best = int(np.argmin(sse))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_STEPS):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if _linear_solve(u, y, a)[2] < _linear_solve(u, y, b)[2]:
            high = b
        else:
            low = a
    return (low + high) / 2


def _covariance(u: np.ndarray, y: np.ndarray, E: float, A: float, alpha: float) -> np.ndarray:
    """s^2 (J^T J)^-1 of (E, A, alpha) for the scaled x `u` (pseudo-inverse if J is rank deficient)."""
    power = u ** (-alpha)
    jacobian = np.stack([np.ones_like(u), power, -A * power * np.log(u)], axis=1)
    dof = len(y) - 3
    s2 = float(np.sum(np.square(y - (E + A * power)))) / dof
    return s2 * np.linalg.pinv(jacobian.T @ jacobian)


def _check_points(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) < MIN_RUNS:
        raise FitError(f"a scaling fit needs at least {MIN_RUNS} runs with a final value (3 parameters and one "
                       f"degree of freedom for their uncertainties); got {len(x)}: add sizes to the sweep or let "
                       "its runs finish")
    if not (np.all(np.isfinite(x)) and np.all(x > 0) and np.all(np.isfinite(y))):
        raise FitError(f"a scaling fit needs positive finite x and finite y; got x={x.tolist()}, y={y.tolist()}")
    if len(np.unique(x)) < 3:
        raise FitError(f"a scaling fit needs at least 3 distinct x values; got {sorted(set(x.tolist()))}: the runs "
                       "differ in something other than the fitted axis")


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of y = E + A * x^(-alpha) (see the module doc); FitError on too few or bad points."""
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _check_points(x_arr, y_arr)
    scale = float(np.exp(np.mean(np.log(x_arr))))
    u = x_arr / scale
    alpha = _best_alpha(u, y_arr)
    E, A_scaled, _ = _linear_solve(u, y_arr, alpha)
    cov = _covariance(u, y_arr, E, A_scaled, alpha)
    # A = A_scaled * scale^alpha: the delta method maps (E, A_scaled, alpha) to (E, A, alpha)
    A = A_scaled * scale ** alpha
    transform = np.array([[1, 0, 0], [0, scale ** alpha, A * math.log(scale)], [0, 0, 1]])
    errors = np.sqrt(np.clip(np.diag(transform @ cov @ transform.T), 0, None))
    edge = min(abs(math.log(alpha / bound)) for bound in ALPHA_RANGE) < 0.05
    note = (f"alpha is at the edge of the searched range {ALPHA_RANGE}: the points do not follow a power law "
            "there, so do not trust this fit") if edge else ""
    residuals = y_arr - (E + A * x_arr ** (-alpha))
    return PowerLawFit(float(E), float(A), float(alpha), *map(float, errors), tuple(x_arr.tolist()),
                       tuple(y_arr.tolist()), tuple(residuals.tolist()), note)


def fit_sweep_runs(sweep_dir: str, names: Sequence[str], axis: str, ys: Sequence[float | None]
                   ) -> tuple[PowerLawFit, list[str]]:
    """The fit over the runs `names` of `sweep_dir` whose `ys` are known; also returns the names used."""
    reader = FIT_AXES.get(axis).read
    used = [(name, reader(os.path.join(sweep_dir, name)), y) for name, y in zip(names, ys) if y is not None]
    fit = fit_power_law([x for _, x, _ in used], [y for _, _, y in used])
    return fit, [name for name, _, _ in used]


def format_value_with_error(value: float, error: float) -> str:
    """'0.342 ± 0.021': the value to the error's second significant digit (4 significant digits if no error)."""
    if not math.isfinite(error) or error <= 0:
        return f"{value:.4g}"
    digits = max(0, 1 - int(math.floor(math.log10(error))))
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-4):
        return f"{value:.3e} ± {error:.2e}"
    return f"{value:.{digits}f} ± {error:.{digits}f}"


def fit_markdown(fit: PowerLawFit, names: Sequence[str], axis: str, metric: str) -> str:
    """The fit as Markdown: the law with E, A, alpha ± standard errors, then each run's x, y, fit and residual."""
    label = FIT_AXES.get(axis).label
    lines = [f"## Scaling fit: {metric} = E + A * N^(-alpha), N = {label}", "",
             f"- E = {format_value_with_error(fit.E, fit.E_err)}",
             f"- A = {format_value_with_error(fit.A, fit.A_err)}",
             f"- alpha = {format_value_with_error(fit.alpha, fit.alpha_err)}",
             f"- {len(fit.x)} runs; RMS residual {fit.rms_residual:.4g}; ± are standard errors from the "
             "Jacobian's covariance s²(JᵀJ)⁻¹", ""]
    if fit.note:
        lines += [f"**warning:** {fit.note}", ""]
    lines += [f"| name | N ({label}) | {metric} | fit | residual |", "|---|---|---|---|---|"]
    for name, x, y, residual in zip(names, fit.x, fit.y, fit.residuals):
        lines.append(f"| {name} | {x:.4g} | {y:.4f} | {y - residual:.4f} | {residual:+.4f} |")
    return "\n".join(lines) + "\n"


def plot_fit(fit: PowerLawFit, axis: str, metric: str, path: str, title: str = "") -> str:
    """A PNG of the runs' points and the fitted curve on a log-x axis, the parameters in the legend; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(fit.x)
    curve_x = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
    law = (f"fit: {fit.E:.3f} + {fit.A:.3g}·N^(-{fit.alpha:.3f}), RMS residual {fit.rms_residual:.2g}\n"
           + "\n".join(f"{name} = {format_value_with_error(value, error)}" for name, value, error in
                       (("E", fit.E, fit.E_err), ("A", fit.A, fit.A_err), ("alpha", fit.alpha, fit.alpha_err))))
    figure, plot = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    plot.plot(curve_x, fit.predict(curve_x), color="tab:blue", label=law)
    plot.plot(x, fit.y, "o", color="black", markersize=7, label=f"runs ({len(x)})")
    plot.axhline(fit.E, color="tab:gray", linestyle=":", label=f"E = {fit.E:.3f} (irreducible)")
    plot.set(xscale="log", xlabel=f"N ({FIT_AXES.get(axis).label})", ylabel=metric,
             title=title or f"scaling fit of {metric}")
    plot.grid(alpha=0.3, which="both")
    plot.legend(frameon=False)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
