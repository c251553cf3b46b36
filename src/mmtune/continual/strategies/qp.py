"""A small exact solver for the bound-constrained quadratic program of GEM's dual.

GEM (Lopez-Paz & Ranzato 2017, sec. 3, eq. 13) solves, for the t stored task gradients G (t, p)
and the step's gradient g (p,), the dual

    min_v  1/2 v^T (G G^T) v + (G g)^T v    s.t.  v >= margin

a t-variable QP (t = the number of past tasks: small). Its reference code and Avalanche's
``GEMPlugin`` call ``quadprog``, which is not a dependency of mmtune. With u = v - margin the
problem is ``min_u 1/2 u^T P u + d^T u, u >= 0`` with d = c + P margin, solved here exactly by
the Lawson-Hanson active-set method (Lawson & Hanson 1974, "Solving Least Squares Problems",
ch. 23, written for NNLS; the same steps apply to any strictly convex QP over u >= 0): grow the
free set by the most violated KKT condition, solve the equality-constrained problem on it, and
step back to the boundary when a free variable would turn negative. For a positive definite P
it ends after finitely many steps at the unique point meeting the KKT conditions
(u >= 0, Pu + d >= 0, u_i (Pu + d)_i = 0). Float64 on the tensors' device.
"""

from __future__ import annotations

import torch


def kkt_residual(P: torch.Tensor, c: torch.Tensor, lower: torch.Tensor | float, v: torch.Tensor) -> float:
    """Largest violation of the KKT conditions of ``min 1/2 v'Pv + c'v, v >= lower`` at ``v``:
    infeasibility, negative gradient on a free-to-decrease bound, and complementarity."""
    P, c, v = P.double(), c.double(), v.double()
    lower = torch.as_tensor(lower, dtype=torch.float64, device=P.device).expand_as(v)
    grad = P @ v + c  # (t,)
    slack = v - lower
    return float(torch.cat([(-slack).clamp_min(0), (-grad).clamp_min(0), (slack * grad).abs()]).max())


def solve_nonneg_qp(P: torch.Tensor, d: torch.Tensor, *, tol: float = 1e-10, max_iter: int | None = None) -> torch.Tensor:
    """argmin_{u >= 0} 1/2 u^T P u + d^T u for a symmetric positive definite ``P`` (t, t)."""
    P, d = P.double(), d.double()
    t = d.shape[0]
    max_iter = max_iter if max_iter is not None else 10 * t + 10
    u = torch.zeros_like(d)
    free = torch.zeros(t, dtype=torch.bool, device=d.device)
    scale = tol * max(1.0, float(d.abs().max()) if t else 1.0)
    for _ in range(max_iter):
        w = -(P @ u + d)  # (t,) negative gradient: > 0 where raising u_i lowers the objective
        w_bound = w.masked_fill(free, float("-inf"))
        if bool(free.all()) or float(w_bound.max()) <= scale:
            return u
        free[int(w_bound.argmax())] = True
        while True:
            z = torch.zeros_like(u)
            idx = free.nonzero().squeeze(1)
            z[idx] = torch.linalg.solve(P[idx][:, idx], -d[idx])
            bad = free & (z <= 0)
            if not bool(bad.any()):
                u = z
                break
            # Step from u towards z until the first free variable reaches 0, and fix it there.
            ratio = (u[bad] / (u[bad] - z[bad]).clamp_min(1e-300)).min()
            u = u + ratio * (z - u)
            free &= u > scale
            u = u.masked_fill(~free, 0.0)
    return u


def solve_gem_dual(P: torch.Tensor, c: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """argmin_{v >= margin} 1/2 v^T P v + c^T v (GEM's dual with the reference code's margin)."""
    P, c = P.double(), c.double()
    m = torch.full_like(c, float(margin))
    return solve_nonneg_qp(P, c + P @ m) + m
