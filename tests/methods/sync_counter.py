"""Count the host-device synchronisations a piece of code would make on a GPU, on a CPU run.

A GPU runs the kernels PyTorch queues on it asynchronously; the host only waits when it needs a
value back (``.item()``, ``if tensor:``, ``.tolist()``), an output whose size depends on the data
(``nonzero``, boolean-mask indexing, ``unique``), or a blocking copy between host and device memory
(``.cpu()``, and also ``.to("cuda")`` of a host tensor: PyTorch's blocking copies synchronise the
stream). Each such wait stalls the pipeline, so a method that waits once per visual token costs
thousands of round trips per request.

:class:`SyncCounter` is a :class:`torch.overrides.TorchFunctionMode` that models those rules on a
CPU, where every tensor lives in the same memory and nothing really waits:

- every tensor is *device-resident* (as on a GPU run: the inputs, the weights) unless it was born
  on the host: made by a factory without a device (``torch.arange(n)``, ``torch.tensor([...])``),
  with a host device (``device="cpu"``, or the ``.device`` of a host tensor), moved there
  (``.cpu()``, ``.to("cpu")``), or computed from host tensors only. ``tensor.device`` of a
  device-resident tensor returns a device object the counter remembers, so ``x.to(hidden.device)``
  and ``torch.zeros(n, device=hidden.device)`` are recognised as targeting the device;
- a sync is counted for: reading a device tensor's values on the host (``item``, ``tolist``,
  ``numpy``, ``__bool__``/``__int__``/``__float__``/``__index__``, ``__contains__``, ``equal``,
  ``allclose``, printing); a data-dependent output size on the device (``nonzero``, ``argwhere``,
  one-argument ``where``, ``masked_select``, ``unique*``, ``repeat_interleave`` with tensor repeats
  and no ``output_size``, ``bincount``, ``one_hot`` without ``num_classes``, indexing or
  ``index_put`` with a boolean mask, ``isin`` on its sorting path, which calls ``_unique``); a
  blocking copy between host and device (``.cpu()``/``.to`` across, ``torch.tensor(data,
  device=...)``, and the implicit copy when a device op receives a host tensor of more than one
  element or a Python list of indices).

It counts what the code asks for, not what a particular GPU driver does: an upper bound where a
kernel would avoid a sync, and blind to syncs hidden inside a Python-implemented torch function
it sees as one call (the mode is off while a function it intercepted runs).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# reading a device tensor's values on the host
_READS = {"item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__", "__complex__",
          "__contains__", "__repr__", "__str__", "__format__", "equal", "allclose", "is_nonzero"}
# outputs whose size depends on the data
_DATA_SIZED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique", "_unique2",
               "unique_dim", "bincount"}
_FACTORIES_WITH_DATA = {"tensor", "as_tensor", "asarray"}  # copy host data: a blocking copy when aimed at the device
_MOVES = {"to", "cpu", "cuda"}
# calls that look at a tensor's metadata or object, never at its values
_METADATA = {"size", "dim", "numel", "stride", "storage_offset", "element_size", "is_contiguous", "is_floating_point",
             "is_complex", "data_ptr", "untyped_storage", "__len__", "__hash__", "__set__", "requires_grad_",
             "_has_compatible_shallow_copy_type", "is_set_to", "get_device", "type"}


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) argument structure."""
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _has_bool_index(index: Any) -> bool:
    """Whether an indexing key holds a boolean (or uint8) mask tensor."""
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(index))


def _has_list_index(index: Any) -> bool:
    """Whether an indexing key holds a Python sequence of indices (made into a host tensor, then copied)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, range)) for p in parts)


class SyncCounter(TorchFunctionMode):
    """Counts modelled host-device syncs while active (see the module docstring).

    Attributes:
        count: syncs counted so far.
        sites: per ``(reason, where)``, how many: ``where`` is the innermost ``crop`` source line
            that asked for it (``"-"`` when none, e.g. inside ``transformers``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> True when born on the host
        self._device_objects: dict[int, torch.device] = {}  # id -> a device object read off a device tensor

    # -- residence ---------------------------------------------------------------------------------

    def _on_host(self, t: torch.Tensor) -> bool:
        return t in self._host

    def _target_is_device(self, spec: Any) -> bool | None:
        """Whether a device argument aims at the device (True), the host (False), or is no device (None)."""
        if isinstance(spec, torch.device):
            return id(spec) in self._device_objects
        if isinstance(spec, str):
            return not spec.startswith("cpu") and spec not in ("meta",)
        if isinstance(spec, int) and not isinstance(spec, bool):
            return True  # a CUDA ordinal
        return None

    def _move_target(self, name: str, args: tuple, kwargs: dict) -> bool | None:
        """For ``to``/``cpu``/``cuda``: whether the result is on the device (None: unchanged residence)."""
        if name == "cpu":
            return False
        if name == "cuda":
            return True
        if "device" in kwargs:
            return self._target_is_device(kwargs["device"])
        for a in args[1:]:
            if isinstance(a, torch.Tensor):
                return not self._on_host(a)
            target = self._target_is_device(a)
            if target is not None:
                return target
        return None

    # -- the mode -----------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (``.device``, ``.shape``, ``.T`` ...): no sync
            out = func(*args, **kwargs)
            owner_on_host = bool(args) and isinstance(args[0], torch.Tensor) and self._on_host(args[0])
            if getattr(func, "__self__", None) is torch._C.TensorBase.device and not owner_on_host:
                self._device_objects[id(out)] = out  # kept alive, so its id stays unique
            if isinstance(out, torch.Tensor) and owner_on_host:
                self._host[out] = True  # ``.T``, ``.mT`` ... of a host tensor
            return out
        inputs = _tensors((args, kwargs))
        source_on_host = bool(args) and isinstance(args[0], torch.Tensor) and self._on_host(args[0])
        device_in = [t for t in inputs if not self._on_host(t)]
        host_in = [t for t in inputs if self._on_host(t)]
        out = func(*args, **kwargs)
        on_device = self._classify(func, name, args, kwargs, inputs, device_in, host_in)
        if name in _MOVES and out is (args[0] if args else None) and on_device == source_on_host:
            # a move between "memories" that is a no-op here returns the tensor itself: hand back an alias,
            # so the source keeps its residence and the result gets the new one
            out = out.view_as(out)
        for t in _tensors(out):
            if not on_device:
                self._host[t] = True
            elif t in self._host:
                del self._host[t]
        return out

    def _classify(self, func, name: str, args: tuple, kwargs: dict, inputs: list[torch.Tensor],
                  device_in: list[torch.Tensor], host_in: list[torch.Tensor]) -> bool:
        """Count the call's syncs; return whether its tensor outputs live on the device."""
        if name in _MOVES and inputs and args and isinstance(args[0], torch.Tensor):
            source_device = not self._on_host(args[0])
            target = self._move_target(name, args, kwargs)
            target = source_device if target is None else target
            if source_device and not target:
                self._sync("device->host copy")
            elif not source_device and target and not kwargs.get("non_blocking", False):
                self._sync("host->device copy")
            return target
        if not inputs:  # a factory: where its device says
            target = self._target_is_device(kwargs.get("device"))
            if target and name in _FACTORIES_WITH_DATA:
                self._sync("host->device copy")
            return bool(target)
        if not device_in:
            return False  # computed from host tensors only: free, stays on the host
        if name in _METADATA:
            return True
        if name in _FACTORIES_WITH_DATA:
            for _ in device_in:
                self._sync(f"read {name} element")  # torch.tensor([t0, t1]) reads every tensor's value
            return self._target_is_device(kwargs.get("device")) is True
        if name == "new_tensor":
            self._sync("host->device copy (new_tensor)")
        if name in _READS:
            self._sync(f"read {name}")
        elif name in _DATA_SIZED or (name == "where" and len(args) + len(kwargs) == 1):
            self._sync(f"data-sized {name}")
        elif name == "repeat_interleave" and any(isinstance(a, torch.Tensor) for a in args[1:2]) \
                and kwargs.get("output_size") is None:
            self._sync("data-sized repeat_interleave")
        elif name == "one_hot" and (args[1:2] or [kwargs.get("num_classes", -1)])[0] in (-1, None):
            self._sync("data-sized one_hot")
        elif name in ("__getitem__", "__setitem__", "index_put", "index_put_") and \
                _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")) and \
                any(not self._on_host(t) for t in _tensors(args[1] if len(args) > 1 else kwargs.get("indices"))):
            self._sync(f"boolean-mask {name}")
        elif name == "isin" and self._isin_sorts(args, kwargs):
            self._sync("isin sorting path (_unique)")
        if name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_list_index(args[1]):
            self._sync("host->device copy (list index)")
        for t in host_in:
            if t.dim() > 0 and t.numel() > 1:
                self._sync(f"host->device copy (host tensor into {name})")
        return True

    @staticmethod
    def _isin_sorts(args: tuple, kwargs: dict) -> bool:
        """Whether ``torch.isin`` takes its sorting path (ATen's numpy heuristic), which syncs in ``_unique``."""
        elements = args[0] if args else kwargs.get("elements")
        test = args[1] if len(args) > 1 else kwargs.get("test_elements")
        if kwargs.get("assume_unique", False) or not isinstance(test, torch.Tensor):
            return False
        n = elements.numel() if isinstance(elements, torch.Tensor) else 1
        return n > 0 and test.numel() >= 10.0 * n ** 0.145

    def _sync(self, reason: str) -> None:
        self.count += 1
        self.sites[(reason, _crop_site())] += 1

    def report(self, top: int = 12) -> str:
        """The most frequent sync sites, one per line (for failure messages)."""
        return "\n".join(f"{n:6d}  {reason}  @ {where}" for (reason, where), n in self.sites.most_common(top))


def _crop_site() -> str:
    """``file:line`` of the innermost frame in crop's sources (``"-"`` if none is on the stack)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/src/crop/" in path or "/site-packages/crop/" in path:
            return f"{path.rsplit('/crop/', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "-"


def count_syncs(run) -> tuple[int, SyncCounter]:
    """Run ``run()`` under a :class:`SyncCounter`; return the syncs counted and the counter."""
    with SyncCounter() as counter:
        run()
    return counter.count, counter


def iter_sites(counter: SyncCounter) -> Iterator[tuple[str, str, int]]:
    """``(reason, where, count)`` of every sync site, most frequent first."""
    for (reason, where), n in counter.sites.most_common():
        yield reason, where, n
