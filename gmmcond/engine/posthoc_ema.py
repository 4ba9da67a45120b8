"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Sec. 3): the averaging length chosen after training instead of before.

During training a few power-function EMA tracks are kept (``train.posthoc_ema``: their relative standard deviations
``sigma_rel``) and each is saved every ``train.posthoc_every`` steps (``RUN/posthoc_ema/STEP.safetensors``). A power-
function EMA at step t with exponent gamma averages the trained weights theta(tau) with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its update is theta_hat <- beta theta_hat + (1 - beta) theta
with beta = (1 - 1/t)^(gamma + 1). Any other profile of the same family (another ``sigma_rel``, at any saved step) is
approximated by the combination of saved snapshots whose profiles come closest to it in L2 over tau: a linear
least-squares problem in the snapshots' profile inner products (:func:`profile_dot`, closed form), solved in float64.
Reconstructing a profile that one snapshot has returns that snapshot (tested), so the tracks themselves are exact.

Nothing here changes training: the tracks draw no random numbers and feed nothing back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import read_safetensors, write_safetensors

FORMAT = "gmmcond-posthoc-ema-1"
FOLDER = "posthoc_ema"


def sigma_rel_of_gamma(gamma: float | np.ndarray) -> float | np.ndarray:
    """The standard deviation of a power-function EMA profile of exponent ``gamma`` relative to its length t (EDM2,
    Eq. 3; the profile is t times a Beta(gamma + 1, 1) density)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt(gamma + 1) / ((gamma + 2) * np.sqrt(gamma + 3))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative standard deviation ``sigma_rel``: the largest real root of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, a cubic (``sigma_rel`` in (0, sigma_rel_of_gamma(0)))."""
    top = float(sigma_rel_of_gamma(0.0))
    if not 0 < sigma_rel < top:
        raise ConfigError(f"a post-hoc EMA sigma_rel must lie in (0, {top:.4f}) (the widest power-function profile, "
                          f"gamma 0, a plain average), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """The L2 inner product over tau of the power-function profiles (t_a, gamma_a) and (t_b, gamma_b):
    (ga + 1)(gb + 1) min(ta, tb)^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)), written so that large t and
    gamma do not overflow. Broadcasts over numpy arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    exponent = np.where(t_a < t_b, gamma_b, gamma_a)  # the longer profile's exponent, on the shorter's interval
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def profile_fit(snapshots: list[tuple[float, float]], t: float, gamma: float) -> tuple[np.ndarray, float]:
    """The weights x of the snapshots (each (step, gamma)) whose combined profile sum_i x_i p_i is closest in L2 to
    the profile (t, gamma), from the normal equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p>; and how far the
    combined profile stays from the target: ||sum_i x_i p_i - p|| relative to ||p|| (0 where a snapshot holds the
    target; with EDM2's two tracks saved every twelfth of the run, about 0.01 between sigma_rel 0.05 and 0.15, more
    outside them)."""
    ts = np.array([s[0] for s in snapshots], dtype=np.float64)
    gs = np.array([s[1] for s in snapshots], dtype=np.float64)
    a = profile_dot(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    b = profile_dot(ts, gs, t, gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    norm = profile_dot(t, gamma, t, gamma)
    return x, float(np.sqrt(max(x @ a @ x - 2 * x @ b + norm, 0.0) / norm))


def ema_warmup_profile(power: float, max_value: float, steps: int) -> np.ndarray:
    """The weight k-diffusion's ``EMAWarmup`` (inv_gamma 1, min 0, as the trainer builds it) gives the trained
    weights after each of ``steps`` optimiser steps: update s (0-based) lerps by 1 - d_s, d_s = min(max_value,
    1 - (1 + s)^-power), so its weight is (1 - d_s) times the product of the later decays."""
    s = np.arange(steps, dtype=np.float64)
    decay = np.minimum(max_value, 1 - (1 + s) ** -power)
    later = np.concatenate([np.cumprod(decay[::-1])[::-1][1:], [1.0]])  # prod_{r > s} d_r
    return (1 - decay) * later


def ema_warmup_sigma_rel(power: float, max_value: float, steps: int) -> float:
    """The relative standard deviation (std over the length, as :func:`sigma_rel_of_gamma`) of the training EMA's
    averaging profile: where the run's own EMA sits among the post-hoc lengths."""
    w = ema_warmup_profile(power, max_value, steps)
    t = np.arange(1, steps + 1, dtype=np.float64)
    mean = (w * t).sum()
    return float(np.sqrt((w * t * t).sum() - mean ** 2) / steps)


class PowerEMA:
    """Power-function EMA tracks of a model's parameters, one per ``sigma_rel``, updated after each optimiser step
    (buffers are copied from the model when a snapshot is taken)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        self.model, self.sigma_rels = model, [float(s) for s in sigma_rels]
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.names = [k for k, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.tracks = [[p.detach().clone() for p in self.params] for _ in self.sigma_rels]
        self.count = 0  # optimiser steps averaged so far

    @torch.no_grad()
    def update(self) -> None:
        """Average in the model's current parameters (call once per optimiser step)."""
        self.count += 1
        for gamma, track in zip(self.gammas, self.tracks):
            beta = (1 - 1 / self.count) ** (gamma + 1)
            torch._foreach_lerp_(track, self.params, 1 - beta)

    def state_dict(self) -> dict:
        return {"count": self.count, "sigma_rels": self.sigma_rels,
                "tracks": [{k: v.clone() for k, v in zip(self.names, track)} for track in self.tracks]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ConfigError(f"train.posthoc_ema cannot change on resume: the checkpoint's tracks are "
                              f"{state['sigma_rels']}, the config asks for {self.sigma_rels}")
        self.count = int(state["count"])
        for track, saved in zip(self.tracks, state["tracks"]):
            for tensor, name in zip(track, self.names):
                tensor.copy_(saved[name])

    def snapshot(self, run_dir: str | Path, step: int) -> Path:
        """Write every track at ``step`` to ``RUN/posthoc_ema/STEP.safetensors`` (atomically)."""
        buffers = {k: b.detach().cpu() for k, b in self.model.named_buffers()}
        tensors = {f"{i}/{k}": v.detach().cpu() for i, track in enumerate(self.tracks) for k, v in zip(self.names, track)}
        tensors.update({f"buffer/{k}": v for k, v in buffers.items()})
        path = Path(run_dir) / FOLDER / f"{step:07d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, tensors, {"format": FORMAT, "step": str(step),
                                          "sigma_rels": ",".join(repr(s) for s in self.sigma_rels)})
        return path


def snapshot_files(run_dir: str | Path, up_to: int | None = None) -> list[tuple[Path, int, list[float]]]:
    """A run's snapshot files at or before step ``up_to`` with their step and tracks (metadata only, no tensors)."""
    from safetensors import safe_open

    folder = Path(run_dir) / FOLDER
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"{folder} holds no post-hoc EMA snapshots: train with train.posthoc_ema=[0.05,0.1] "
                              "(EDM2's two tracks) to choose the EMA length after training")
    out = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a post-hoc EMA snapshot (format {meta.get('format')!r})")
        if up_to is None or int(meta["step"]) <= up_to:
            out.append((path, int(meta["step"]), [float(s) for s in meta["sigma_rels"].split(",")]))
    if not out:
        raise CheckpointError(f"{folder} holds no post-hoc EMA snapshot at or before step {up_to}")
    return out


def snapshot_profiles(run_dir: str | Path, up_to: int | None = None) -> list[tuple[int, float]]:
    """(step, gamma) of every saved track at or before ``up_to``, in :func:`read_snapshots`' order."""
    return [(step, gamma_of_sigma_rel(s)) for _, step, sigma_rels in snapshot_files(run_dir, up_to) for s in sigma_rels]


def read_snapshots(run_dir: str | Path, up_to: int | None = None) -> list[tuple[int, float, dict, dict]]:
    """Every saved track of a run at or before step ``up_to``: (step, gamma, parameters, buffers)."""
    out = []
    for path, step, sigma_rels in snapshot_files(run_dir, up_to):
        tensors = read_safetensors(path, CheckpointError)[0]
        buffers = {k[len("buffer/"):]: v for k, v in tensors.items() if k.startswith("buffer/")}
        for i, sigma_rel in enumerate(sigma_rels):
            params = {k[len(f"{i}/"):]: v for k, v in tensors.items() if k.startswith(f"{i}/")}
            out.append((step, gamma_of_sigma_rel(sigma_rel), params, buffers))
    return out


def posthoc_fit(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> dict:
    """How a post-hoc EMA of ``sigma_rel`` at ``step`` (default: the last snapshot's) is made from the run's
    snapshots, without loading them: step, coefficients and the profile's relative residual (:func:`profile_fit`)."""
    return _fit_facts(snapshot_profiles(run_dir, step), sigma_rel, step)


def _fit_facts(pairs: list[tuple[int, float]], sigma_rel: float, step: int | None) -> dict:
    step = step if step is not None else max(t for t, _ in pairs)
    x, residual = profile_fit(pairs, step, gamma_of_sigma_rel(sigma_rel))
    return {"step": step, "sigma_rel": sigma_rel, "coefficients": x.tolist(),
            "snapshots": [[int(t), float(g)] for t, g in pairs], "profile_residual": residual}


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> tuple[dict, dict]:
    """The inner model's weights under a power-function EMA of ``sigma_rel`` at ``step`` (default: the last
    snapshot's), from the run's snapshots; returns (state dict, :func:`posthoc_fit`'s facts)."""
    snaps = read_snapshots(run_dir, step)
    facts = _fit_facts([(s[0], s[1]) for s in snaps], sigma_rel, step)
    x = facts["coefficients"]
    state = {key: sum(float(c) * s[2][key].double() for c, s in zip(x, snaps)).to(value.dtype)
             for key, value in snaps[0][2].items()}
    state.update(max(snaps, key=lambda s: s[0])[3])  # buffers are not averaged: the latest snapshot's
    return state, facts
