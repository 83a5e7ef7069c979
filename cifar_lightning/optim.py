"""Muon for convolution filters beside Nesterov SGD for everything else, as ONE optimizer.

airbench94_muon's split (Muon orthogonalises each filter bank's update; biases, BatchNorm
shifts and the head keep SGD) needs two optimizers, but Lightning's automatic optimisation,
its LR schedulers, checkpoints and exact resume all expect one. ``MuonSGD`` holds a
``torch.optim.SGD`` and a ``torch.optim.Muon`` and looks like a single optimizer: one list of
param groups (so one schedule scales both learning rates), one ``state_dict``, one ``step``.

torch's Muon takes 2-D parameters only, so each (out, in, kh, kw) filter bank is stepped as an
(out, kh*kw*in) matrix: a copy in NHWC column order, taken before and written back after each
step. Copies rather than views, so a filter in either memory format, moved to another device or
restored from a checkpoint is always the matrix Muon sees (the orthogonalised update does not
depend on the column order; the momentum buffer keeps this one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _matrix(w: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, kh*kw*in), NHWC order, a fresh contiguous tensor."""
    return w.detach().permute(0, 2, 3, 1).reshape(w.size(0), -1).clone()


def _write_back(w: torch.Tensor, m: torch.Tensor) -> None:
    o, i, kh, kw = w.shape
    w.copy_(m.view(o, kh, kw, i).permute(0, 3, 1, 2))


class MuonSGD(torch.optim.Optimizer):
    """Muon (torch's) on 4-D conv filters, Nesterov SGD on the rest.

    ``groups`` are SGD's param groups (as for ``torch.optim.SGD``). ``normalize_filters``:
    before each step every filter bank is rescaled to Frobenius norm sqrt(out) (airbench94_muon):
    BatchNorm follows each conv, so the scale carries no information, and a fixed scale keeps
    Muon's fixed-size update a fixed fraction of the weights without weight decay.
    """

    def __init__(
        self,
        filters: Iterable[torch.nn.Parameter],
        groups: list[dict],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        muon_lr: float,
        muon_momentum: float,
        ns_steps: int = 5,
        normalize_filters: bool = True,
    ) -> None:
        self.filters = [f for f in filters]
        if any(f.ndim != 4 for f in self.filters):
            raise ValueError("MuonSGD steps 4-D convolution filters with Muon; pass the rest in groups")
        self.normalize_filters = normalize_filters
        self.matrices = [_matrix(f) for f in self.filters]
        self.sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        self.muon = torch.optim.Muon(self.matrices, lr=muon_lr, momentum=muon_momentum, nesterov=True,
                                     weight_decay=0.0, ns_steps=ns_steps)  # fmt: skip
        for g in self.muon.param_groups:
            g["muon"] = True
        # The outer groups ARE the parts' groups (the same dicts): a scheduler that scales
        # self.param_groups scales both optimizers.
        super().__init__(self.sgd.param_groups + self.muon.param_groups, {})

    # The parts own the state; the outer object only routes.
    @property
    def state(self) -> dict:  # type: ignore[override]
        return {**self.sgd.state, **self.muon.state}

    @state.setter
    def state(self, value: object) -> None:  # Optimizer.__init__ assigns an empty one
        pass

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"sgd", "muon"}:
            raise ValueError("not a MuonSGD optimizer state (a checkpoint of another --optimizer?)")
        self.sgd.load_state_dict(state_dict["sgd"])
        self.muon.load_state_dict(state_dict["muon"])
        for g in self.muon.param_groups:
            g["muon"] = True
        # load_state_dict replaces the parts' group dicts: route to the new ones.
        self.param_groups = self.sgd.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none)
        for f in self.filters:
            if set_to_none:
                f.grad = None
            elif f.grad is not None:
                f.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sgd.step()
        for f, m in zip(self.filters, self.matrices, strict=True):
            m.data = _matrix(f)  # keeps the tensor Muon's state is keyed by
            if self.normalize_filters:
                m.mul_(m.size(0) ** 0.5 / m.norm().clamp(min=1e-12))
            m.grad = None if f.grad is None else _matrix(f.grad)
        self.muon.step()
        for f, m in zip(self.filters, self.matrices, strict=True):
            if m.grad is not None:
                _write_back(f, m)
                m.grad = None
        return loss
