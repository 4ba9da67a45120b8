"""String-keyed registries: one per component kind, so configs pick components by name.

A registered object is looked up by its key (``SAMPLERS.get("euler")``) and, for config nodes, built
with keyword arguments that :mod:`gmmcond.config` has already checked against its signature.
Contracts of the registered objects:

* ``CONDITIONERS``: a :class:`gmmcond.modeling.conditioners.Conditioner` called as
  ``(attrs[B, K] float, index[B] long) -> mapping_cond[B, dim]``, with ``.dim``, ``.partial``, ``.pairs_latents``
  and ``unconditional(n)``; built with ``num_attrs`` injected from the dataset.
* ``HEADS``: ``nn.Module`` fed by a forward hook on the U-Net bottleneck, returning ``logits[B, K]``.
* ``LOSSES``: callable ``(logits[B, K], targets[B, K]) -> loss[B]``.
* ``SAMPLERS``: a function with k-diffusion's sampler signature
  ``(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x``.
* ``SCHEDULES``: object with ``sample_sigmas(n, generator=None)`` (training density) and ``sigmas(steps)``
  (sampling sigmas ending in 0).
* ``DATASETS``: ``torch.utils.data.Dataset`` of ``(image[3, H, W] in [-1, 1], attrs[K] float, index)``
  with ``.attr_names`` and ``.groups`` (mutually exclusive attribute groups).
* ``MODELS``: a builder returning a k-diffusion inner model, with ``mapping_cond_dim`` injected from the
  conditioner's ``.dim``.
* ``DENOISER_LOSSES``: a callable ``(inner_model, sigma_data=...) -> k_diffusion.layers.Denoiser`` (its ``loss``
  is the training objective); picked by ``denoiser.loss``.
* ``EVAL_PROTOCOLS``: an :class:`gmmcond.data.protocol.EvaluationProtocol` subclass, keyed by the ``DATASETS``
  key it evaluates; a dataset without one gets the generic protocol.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import RegistryError

T = TypeVar("T")


def closest(word: str, choices) -> str | None:
    """Return the choice closest to ``word`` (for "did you mean" hints), or None."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


class Registry(Generic[T]):
    """A named mapping from string keys to objects, filled by ``register``.

    Args:
        name: the registry's name, used in error messages (``"SAMPLERS"``).
        injected: constructor arguments that gmmcond supplies itself; a config may not set them.
    """

    def __init__(self, name: str, *, injected: tuple[str, ...] = ()):
        self.name = name
        self.injected = injected
        self._objects: dict[str, T] = {}

    def register(self, name: Any = None, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator.

        Three forms: ``@REG.register("key")``, ``@REG.register()`` (the object's ``__name__``) and the plain
        call ``REG.register(MyClass)`` (also its ``__name__``).
        """
        if name is not None and not isinstance(name, str):
            if obj is not None or not callable(name):
                raise TypeError(f"{self.name}.register: the key must be a string, got {name!r}")
            name, obj = None, name
        if obj is not None:
            self._add(name or obj.__name__, obj)
            return obj

        def decorator(fn: T) -> T:
            self._add(name or fn.__name__, fn)
            return fn

        return decorator

    def _add(self, name: str, obj: T) -> None:
        if name in self._objects:
            raise RegistryError(f"{self.name}: key '{name}' is already registered")
        self._objects[name] = obj

    def get(self, name: str) -> T:
        """Return the object registered under ``name``; an unknown key lists the registered ones."""
        if name not in self._objects:
            raise RegistryError(self.unknown_message(name))
        return self._objects[name]

    def unknown_message(self, name: Any) -> str:
        """The error text for an unknown key: the registry, the key, a suggestion, the valid keys."""
        hint = closest(name, self._objects)
        hint = f"; did you mean '{hint}'?" if hint else ""
        return f"{self.name} has no key '{name}'{hint} Registered: {', '.join(sorted(self._objects))}"

    def build(self, node: str | dict, **injected: Any) -> Any:
        """Build a config node (a key, or ``{type: key, **kwargs}``) with gmmcond's injected arguments."""
        if isinstance(node, str):
            node = {"type": node}
        kwargs = {k: v for k, v in node.items() if k != "type"}
        return self.get(node["type"])(**kwargs, **injected)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._objects))

    def __len__(self) -> int:
        return len(self._objects)

    def keys(self) -> list[str]:
        """Return the registered keys, sorted."""
        return sorted(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, keys={self.keys()})"


CONDITIONERS: Registry[Callable] = Registry("CONDITIONERS", injected=("num_attrs",))
HEADS: Registry[Callable] = Registry("HEADS", injected=("num_attrs", "channels"))
LOSSES: Registry[Callable] = Registry("LOSSES")
SAMPLERS: Registry[Callable] = Registry("SAMPLERS")
SCHEDULES: Registry[Callable] = Registry("SCHEDULES")
DATASETS: Registry[Callable] = Registry("DATASETS")
MODELS: Registry[Callable] = Registry("MODELS", injected=("mapping_cond_dim",))
DENOISER_LOSSES: Registry[Callable] = Registry("DENOISER_LOSSES")
EVAL_PROTOCOLS: Registry[type] = Registry("EVAL_PROTOCOLS")
