"""N copies of one user module as one module: the local CNNs of a backbone factory (:mod:`ddcnn.models.factory`).

The copies' tensors are stored once, as real parameters and buffers of :class:`StackedModules` under the user
module's own names (``features.0.weight``...), each the dim-0 concatenation of the N copies' tensors: the layout of
the built-in grouped backbones (``models/layers.py``), which the optimizer's weight-decay rule, model-parallel
checkpoint gathering and splitting (``distributed/state.py``), :meth:`~ddcnn.models.LocalCNNs.subset` and
:meth:`~ddcnn.models.LocalCNNs.local_cnn` rely on. (A copy's 0-dimensional tensor, such as batch norm's
``num_batches_tracked``, is stored as one entry per copy, shape ``(N,)``.)

Both ways of running the copies read that one storage, viewed as ``(N, *shape)`` per tensor:

* ``vmap``: one call of ``torch.func.vmap`` over ``torch.func.functional_call`` of a template module, the copies'
  parameters and buffers batched along dim 0 (the way ``torch.func.stack_module_state`` stacks them). Batch norm's
  running statistics are batched too, so train mode updates each copy's own statistics in place, in the storage.
* ``loop``: the copies one after another, the template computing with each copy's slice of the storage.

``batching="auto"`` takes ``vmap`` where a probe (a forward and backward in train mode of two random images, and
eval-mode outputs equal to the loop's) succeeds, else ``loop``; the choice is logged once per backbone and input
shape. Tracing and export (TorchScript, ONNX) always run the loop, which they can record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .factory import check_features_interface, pooled_forward

log = logging.getLogger(__name__)

BATCHING = ("auto", "vmap", "loop")
_PROBED: dict[tuple[Any, ...], tuple[str, str]] = {}  # (name, input shape, dtype) -> (batching, why): probed once


class StackedModules(nn.Module):
    """``(B, N, *input_shape)`` -> ``(B, N, K)``: copy ``i`` of ``modules`` applied to ``x[:, i]``.

    ``modules`` are N modules of one architecture (the same names and shapes); their values become the copies'.
    ``input_shape`` (one copy's input without the batch, e.g. ``(C, H, W)``) is what the ``auto`` probe runs on;
    ``name`` names the backbone in the log line.
    """

    def __init__(
        self, modules: Sequence[nn.Module], input_shape: Sequence[int], batching: str = "auto", name: str = ""
    ):
        super().__init__()
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHING)}")
        self._n, self._name = len(modules), name or type(modules[0]).__name__
        template = modules[0]
        params, buffers = stack_module_state(list(modules))  # (N, *shape) each, detached
        self._shapes = {k: tuple(v.shape[1:]) for k, v in {**params, **buffers}.items()}
        self._param_names, self._buffer_names = list(params), list(buffers)
        non_persistent = {
            f"{prefix}.{b}" if prefix else b
            for prefix, m in template.named_modules()
            for b in m._non_persistent_buffers_set
        }
        requires_grad = dict(template.named_parameters())
        for key, value in params.items():
            owner, leaf = self._owner(key)
            owner.register_parameter(leaf, nn.Parameter(_stored(value.detach()), requires_grad[key].requires_grad))
        for key, value in buffers.items():
            owner, leaf = self._owner(key)
            owner.register_buffer(leaf, _stored(value), persistent=key not in non_persistent)  # a new tensor
        # the module whose forward runs each copy (its own tensors replaced by the copies'); outside the module tree,
        # so that its tensors are in no state dict, but moved and cast with this module (_apply)
        object.__setattr__(self, "_template", template)
        self._slots = _slots(template)
        self._batching = batching
        if batching == "auto":
            self._batching = self._probed(tuple(int(s) for s in input_shape))

    # -- the storage -------------------------------------------------------------------------------------------------
    def _owner(self, name: str) -> tuple[nn.Module, str]:
        """The holder module of tensor ``name`` (a plain ``nn.Module`` at the path the user's module has it, made on
        the way) and the tensor's own name in it."""
        *path, leaf = name.split(".")
        module: nn.Module = self
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        return module, leaf

    def _tensor(self, name: str) -> torch.Tensor:
        owner, leaf = self._owner(name)
        return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]

    def stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The copies' parameters and buffers as views ``(N, *shape)`` of the storage (what vmap batches over)."""
        n = self._n
        params = {k: self._tensor(k).view(n, *self._shapes[k]) for k in self._param_names}
        return params, {k: self._tensor(k).view(n, *self._shapes[k]) for k in self._buffer_names}

    @property
    def num_copies(self) -> int:
        return self._n

    def split_state(self, state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """Copy ``index``'s state dict, as the user's module has it, from a state dict of this module."""
        n = state_copies(state, self._shapes)
        return {k: v.view(n, *self._shapes[k])[index].clone() for k, v in state.items()}

    def stack_states(self, states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`split_state`: the state dict of the copies whose own state dicts are ``states``."""
        return {k: _stored(torch.stack([s[k] for s in states])) for k in states[0]}

    def load_copy_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a user module's state dict ``state`` into copy ``index``, in place."""
        with torch.no_grad():
            for k, value in self.state_dict().items():
                value.view(self._n, *self._shapes[k])[index].copy_(state[k])

    # -- running the copies ------------------------------------------------------------------------------------------
    @property
    def batching(self) -> str:
        """``vmap`` or ``loop``: how :meth:`forward` runs the copies. Settable (both read the same storage)."""
        return self._batching

    @batching.setter
    def batching(self, value: str) -> None:
        if value not in BATCHING[1:]:
            raise ValueError(f"batching {value!r} is not vmap or loop")
        self._batching = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self._n:
            raise ValueError(f"expected inputs (B, {self._n}, ...) for {self._n} copies, got {tuple(x.shape)}")
        params, buffers = self.stacked()
        recorded = torch.jit.is_tracing() or torch.compiler.is_exporting()
        if self._batching == "vmap" and not recorded:
            return self._vmap(params, buffers, x)
        return self._loop(params, buffers, x)

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``(B, N, K)`` and pooled features ``(B, N, C)`` of the copies, from one pass of each
        (:func:`~ddcnn.models.factory.pooled_forward`: the user module's ``forward_features`` then ``forward_head``)."""
        if x.dim() < 2 or x.shape[1] != self._n:
            raise ValueError(f"expected inputs (B, {self._n}, ...) for {self._n} copies, got {tuple(x.shape)}")
        check_features_interface(self._name, self._template)
        params, buffers = self.stacked()
        if self._batching == "vmap" and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            pooled = _Pooled(self._template)  # forward: the template's pooled_forward, so functional_call runs it
            params = {f"module.{k}": v for k, v in params.items()}
            buffers = {f"module.{k}": v for k, v in buffers.items()}

            def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor) -> Any:
                return functional_call(pooled, (p, b), (xi,))

            return vmap(call, in_dims=(0, 0, 1), out_dims=1, randomness="different")(params, buffers, x)
        outputs = []
        for i in range(self._n):
            with _swapped(self._slots, {k: v[i] for k, v in params.items()} | {k: v[i] for k, v in buffers.items()}):
                outputs.append(pooled_forward(self._template, x[:, i]))
        return torch.stack([o[0] for o in outputs], 1), torch.stack([o[1] for o in outputs], 1)

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template, (params, buffers), (x,))

    def _vmap(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # randomness="different": each copy its own dropout masks, as N separate modules would draw
        return vmap(self._call, in_dims=(0, 0, 1), out_dims=1, randomness="different")(params, buffers, x)

    def _loop(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # the copies' tensors put into the template's own slots one copy at a time, not by functional_call, which
        # refuses to run under torch.jit.trace (TorchScript export)
        outputs = []
        for i in range(self._n):
            with _swapped(self._slots, {k: v[i] for k, v in params.items()} | {k: v[i] for k, v in buffers.items()}):
                outputs.append(self._template(x[:, i]))
        return torch.stack(outputs, 1)

    def train(self, mode: bool = True) -> StackedModules:
        super().train(mode)
        self._template.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):  # torch's signature
        super()._apply(fn, recurse)
        self._template._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return f"{self._n} x {type(self._template).__name__}, batching={self._batching}"

    # -- the probe ---------------------------------------------------------------------------------------------------
    def _probed(self, input_shape: tuple[int, ...]) -> str:
        """``vmap`` if :meth:`probe` passes on inputs of ``input_shape``, else ``loop``; probed (and logged) once
        per backbone, input shape and dtype."""
        if self._n == 1:
            return "loop"  # one copy: the loop is a plain call
        first = next(iter(self.parameters()), None)
        key = (self._name, input_shape, None if first is None else first.dtype)
        if key not in _PROBED:
            failure = self.probe(input_shape)
            _PROBED[key] = ("loop", failure) if failure else ("vmap", "")
            if failure:
                log.info(
                    "backbone %s: the local CNNs run in a loop, one after another (vmap failed on a probe: %s)",
                    self._name,
                    failure,
                )
            else:
                log.info("backbone %s: the local CNNs run batched (torch.func.vmap over functional_call)", self._name)
        return _PROBED[key][0]

    def probe(self, input_shape: tuple[int, ...]) -> str:
        """Why the vmap path cannot run this module ("" if it can): a train-mode forward and backward of two random
        inputs under vmap, and eval-mode outputs equal to the loop's. On copies of the tensors, so that no statistic
        moves, and on a forked RNG."""
        params, buffers = self.stacked()
        first = next(iter(params.values()), None)
        device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
        x = torch.randn(2, self._n, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        training = self._template.training
        try:
            forked = [device] if device.type == "cuda" else []  # dropout on a GPU draws from its own generator
            with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=forked):
                trial = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in params.items()}
                self._template.train(True)
                out = self._vmap(trial, {k: v.clone() for k, v in buffers.items()}, x)
                out.float().sum().backward()
                self._template.train(False)
                with torch.no_grad():
                    batched = self._vmap(params, {k: v.clone() for k, v in buffers.items()}, x)
                    looped = self._loop(params, {k: v.clone() for k, v in buffers.items()}, x)
        except Exception as e:  # noqa: BLE001 - any operator without a batching rule, an in-place update...
            text = str(e).strip()
            return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__
        finally:
            self._template.train(training)
        scale = float(looped.abs().max()) if looped.numel() else 0.0
        if batched.shape != looped.shape or not torch.allclose(batched, looped, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
            return "its outputs differ from the loop's"
        return ""


class _Pooled(nn.Module):
    """``module`` whose forward is :func:`~ddcnn.models.factory.pooled_forward`: what ``functional_call`` runs for
    :meth:`StackedModules.forward_pooled` (its tensors under ``module.``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pooled_forward(self.module, x)


def _slots(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """For each parameter and buffer name of ``module`` (as ``named_parameters`` gives them, ties once), the
    ``(owner, name)`` of every place it is held: itself, and every name tied to it."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for leaf, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is not None:
                places.setdefault(id(t), []).append((owner, leaf))
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name: list(dict.fromkeys(places[id(t)])) for name, t in named.items()}


@contextlib.contextmanager
def _swapped(slots: dict[str, list[tuple[nn.Module, str]]], tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """The modules of ``slots`` (:func:`_slots`) holding ``tensors`` (by name) in place of their own, for the
    block."""
    saved = []
    try:
        for name, value in tensors.items():
            for owner, leaf in slots[name]:
                held = owner._parameters if leaf in owner._parameters else owner._buffers
                saved.append((held, leaf, held[leaf]))
                held[leaf] = value
        yield
    finally:
        for held, leaf, original in reversed(saved):
            held[leaf] = original


def _stored(stacked: torch.Tensor) -> torch.Tensor:
    """``(N, *shape)`` -> the storage: ``(N * shape[0], *shape[1:])``, or ``(N,)`` for 0-dimensional tensors."""
    return stacked.flatten(0, 1) if stacked.dim() > 1 else stacked


def state_copies(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> int:
    """How many copies a state dict of this layout holds (from its first tensor)."""
    name, value = next(iter(state.items()))
    shape = shapes[name]
    return value.shape[0] // shape[0] if shape else value.shape[0]
