"""Calibration statistics of one linear layer, as the profiler accumulates them.

Only the *input* moments are accumulated: for ``y = W x + b`` the output moments follow
exactly, ``E[y] = W E[x] + b`` and ``Cov[y] = W Cov[x] Wᵀ``, so nothing about the output
needs a pass over data. Linears that read the same input (q/k/v, gate/up) share one
``InputStats`` object.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InputStats:
    """Running sums over tokens of one linear input ``x`` (width n), float64."""

    n_tokens: int
    x_sum: Tensor  # (n,)   sum_t x_t
    xxt: Tensor  # (n, n) sum_t x_t x_tᵀ

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> InputStats:
        return cls(0, torch.zeros(n, dtype=torch.float64, device=device),
                   torch.zeros(n, n, dtype=torch.float64, device=device))

    def update(self, x: Tensor) -> None:
        """Add a batch of inputs ``x`` (..., n): the batch is centred on its own mean ``m``
        before the fp32 matmul, and ``Σ x xᵀ = Σ c cᵀ + m (Σ c)ᵀ + (Σ c) mᵀ + T m mᵀ`` (``c = x - m``)
        is added up in fp64. Without the centring, inputs with large means (a channel at 300,
        as attention sinks make) lost their covariance to cancellation in the fp32 product."""
        x2 = x.reshape(-1, x.shape[-1])  # (T, n)
        xf = x2 if x2.dtype == torch.float64 else x2.float()
        s = xf.sum(0, dtype=torch.float64)  # (n,)
        m = (s / max(xf.shape[0], 1)).to(xf.dtype)  # the batch mean as subtracted (n,)
        c = xf - m  # (T, n)
        m64 = m.double()
        u = c.sum(0, dtype=torch.float64).add_(m64, alpha=xf.shape[0] / 2)  # Σc + T m / 2: the rank-2 term below
        self.xxt += (c.T @ c).double()
        self.xxt.addr_(m64, u).addr_(u, m64)  # + m (Σc)ᵀ + (Σc) mᵀ + T m mᵀ, in place
        self.x_sum += s
        self.n_tokens += x2.shape[0]

    def merge(self, other: InputStats) -> InputStats:
        return InputStats(self.n_tokens + other.n_tokens, self.x_sum + other.x_sum.to(self.x_sum.device),
                          self.xxt + other.xxt.to(self.xxt.device))

    @property
    def mean(self) -> Tensor:  # (n,)
        return self.x_sum / max(self.n_tokens, 1)

    @property
    def second_moment(self) -> Tensor:  # (n, n)  E[x xᵀ]
        return self.xxt / max(self.n_tokens, 1)

    @property
    def cov(self) -> Tensor:  # (n, n)  E[x xᵀ] - E[x] E[x]ᵀ
        mu = self.mean
        return self.second_moment - torch.outer(mu, mu)


@dataclass
class LinearStats:
    """What compression methods need about one linear: its input statistics."""

    inputs: InputStats

    @property
    def n_tokens(self) -> int:
        return self.inputs.n_tokens

    def out_mean(self, weight: Tensor, bias: Tensor | None) -> Tensor:  # (m,)
        mu = weight.double() @ self.inputs.mean.to(weight.device)
        return mu if bias is None else mu + bias.double()

    def out_cov(self, weight: Tensor) -> Tensor:  # (m, m)  W Cov[x] Wᵀ
        w = weight.double()
        return w @ self.inputs.cov.to(w.device) @ w.T

    @staticmethod
    def from_inputs(x: Tensor) -> LinearStats:
        """Statistics of an explicit batch of inputs ``x`` (..., n) — handy in tests."""
        s = InputStats.zeros(x.shape[-1], x.device)
        s.update(x)
        return LinearStats(s)
