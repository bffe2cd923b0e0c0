"""Planar normalising flows over prompt biases: Bayes-PFL's prompt-flow distributions.

Bayes-PFL (Qu et al., CVPR 2025) models a bias added to the text-prompt token embeddings as a
random variable: a diagonal Gaussian base ``q0 = N(mu, diag(var))`` pushed through K planar
flows (Rezende & Mohamed 2015), ``z_k = z_{k-1} + u_k tanh(w_k . z_{k-1} + b_k)``. Two kinds:

* :class:`ImageFlow` — image-specific: the base and every flow step are predicted from the
  image's global (class-token) feature (amortised).
* :class:`StateFlow` — image-agnostic: a learned input vector feeds the (shared) encoder and the
  flow steps are free parameters.

Conventions kept from the reference code: the encoder's second head ``h`` gives the base
*variance* ``exp(h / 2)`` (so samples use ``std = exp(h / 4)``); the planar flow has no
invertibility constraint on ``u``; the log-determinant is ``log(|1 + psi . u| + 1e-5)``.
Shapes: B rows, D the bias width (the text tower's token width), E the input width, K steps.
"""

from __future__ import annotations

import torch
from torch import nn

# The reference adds this inside the log of |det| so a (near-)singular step stays finite.
LOGDET_EPS = 1e-5


def planar_step(
    z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One planar flow step and its log |det Jacobian|.

    Args:
        z: ... x D points.
        u: ... x D (broadcast against ``z``).
        w: ... x D.
        b: ... offsets (``z``'s leading shape, or broadcastable to it).

    Returns:
        ``z + u tanh(w . z + b)`` (... x D) and ``log(|1 + (1 - tanh^2(w . z + b)) w . u| +
        1e-5)`` (...).
    """
    h = torch.tanh((w * z).sum(-1) + b)  # ...
    out = z + u * h.unsqueeze(-1)
    psi_u = (1.0 - h * h) * (w * u).sum(-1)
    return out, torch.log(torch.abs(1.0 + psi_u) + LOGDET_EPS)


def run_flows(
    z0: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K planar steps in order.

    Args:
        z0: ... x D base samples.
        u: ... x K x D, w: ... x K x D, b: ... x K (leading dims broadcast against ``z0``'s).

    Returns:
        z_K (... x D) and the summed log-determinants (...).
    """
    z = z0
    logdet = torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
    for k in range(u.shape[-2]):
        z, step = planar_step(z, u[..., k, :], w[..., k, :], b[..., k])
        logdet = logdet + step
    return z, logdet


def gaussian_log_density(
    z: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float
) -> torch.Tensor:
    """``sum_d -0.5 (log var + (z - mean)^2 / var)``: the diagonal Gaussian log-density without
    its ``-D/2 log 2 pi`` constant (the reference drops it in both densities of the KL, where it
    cancels). ... x D → ..."""
    var_t = torch.as_tensor(var, dtype=z.dtype, device=z.device)
    return (-0.5 * (torch.log(var_t) + (z - mean) ** 2 / var_t)).sum(-1)


def flow_kl(
    z0: torch.Tensor,
    zk: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    logdet: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """The single-sample KL estimate of a flow posterior against ``N(0, I)``, as the reference's
    ``binary_loss_function`` sums it: ``(sum(log q0(z0) - log p(zK)) - sum(logdet)) / count``.

    Args:
        z0: N x D base samples; zk: N x D flowed samples.
        mean: N x D base means; var: N x D base variances.
        logdet: N summed log-determinants.
        count: The divisor (the reference divides by the *image* batch size, also for the
            image-agnostic flows that draw one sample).
    """
    log_q0 = gaussian_log_density(z0, mean, var)
    log_p = gaussian_log_density(zk, 0.0, 1.0)
    return ((log_q0 - log_p).sum() - logdet.sum()) / count


class _InferenceMLP(nn.Sequential):
    """Linear → Softplus → Linear → Softplus → Linear (the reference's ``InferenceBlock``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__(
            nn.Linear(d_in, d_hidden),
            nn.Softplus(),
            nn.Linear(d_hidden, d_hidden),
            nn.Softplus(),
            nn.Linear(d_hidden, d_out),
        )


class GaussianEncoder(nn.Module):
    """The base distribution's parameters from an input vector: E → (mean, variance), each D."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.mean = _InferenceMLP(d_in, d_hidden, d_out)
        self.log_var = _InferenceMLP(d_in, d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """N x E → mean (N x D) and variance (N x D, ``exp(h / 2)`` as in the reference)."""
        return self.mean(x), torch.exp(0.5 * self.log_var(x))


def reparameterise(mean: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean + sqrt(var) * eps`` (eps broadcasts: S x N x D samples from N x D parameters)."""
    return mean + var.sqrt() * eps


class ImageFlow(nn.Module):
    """Image-specific prompt distribution: base and K planar steps predicted from each image's
    global feature.

    Attributes:
        encoder: The base distribution's encoder (E → D).
        amor_u, amor_w, amor_b: Linear maps E → K·D, K·D, K (the amortised flow parameters).
    """

    def __init__(self, *, d_in: int, d_hidden: int, d_out: int, steps: int) -> None:
        super().__init__()
        self.steps, self.d_out = steps, d_out
        self.encoder = GaussianEncoder(d_in, d_hidden, d_out)
        self.amor_u = nn.Linear(d_in, steps * d_out)
        self.amor_w = nn.Linear(d_in, steps * d_out)
        self.amor_b = nn.Linear(d_in, steps)

    def parameters_for(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """N x E features → mean, var (N x D), u, w (N x K x D), b (N x K)."""
        mean, var = self.encoder(x)
        n = x.shape[0]
        u = self.amor_u(x).view(n, self.steps, self.d_out)
        w = self.amor_w(x).view(n, self.steps, self.d_out)
        return mean, var, u, w, self.amor_b(x)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow ``eps`` (... x N x D standard normal draws) for the N images ``x`` (N x E).

        Returns:
            z0, zK (... x N x D), logdet (... x N), mean, var (N x D).
        """
        mean, var, u, w, b = self.parameters_for(x)
        z0 = reparameterise(mean, var, eps)
        zk, logdet = run_flows(z0, u, w, b)
        return z0, zk, logdet, mean, var


class StateFlow(nn.Module):
    """Image-agnostic prompt distribution: a learned input through a shared encoder, then K
    planar steps with free parameters (initialised N(0, 1) as in the reference).

    Attributes:
        state: 1 x E, the encoder's input.
        u, w: K x D; b: K.
    """

    def __init__(self, *, d_in: int, d_out: int, steps: int) -> None:
        super().__init__()
        self.state = nn.Parameter(torch.randn(1, d_in))
        self.u = nn.Parameter(torch.randn(steps, d_out))
        self.w = nn.Parameter(torch.randn(steps, d_out))
        self.b = nn.Parameter(torch.randn(steps))

    def forward(
        self, encoder: GaussianEncoder, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow ``eps`` (S x D draws) through the distribution ``encoder`` gives ``state``.

        Returns:
            z0, zK (S x D), logdet (S), mean, var (1 x D).
        """
        mean, var = encoder(self.state)
        z0 = reparameterise(mean, var, eps)
        zk, logdet = run_flows(z0, self.u, self.w, self.b)
        return z0, zk, logdet, mean, var


def init_linear(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights and zero biases for every Linear inside ``module`` (the reference's
    ``_initialize_weights``)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "GaussianEncoder",
    "ImageFlow",
    "StateFlow",
    "flow_kl",
    "gaussian_log_density",
    "init_linear",
    "planar_step",
    "reparameterise",
    "run_flows",
]
