"""A ledger of host <-> device copies, for benchmarks and tests of the GPU path.

``count_transfers()`` records every copy between host and device memory made inside it by numba-cuda
(or its simulator, ``NUMBA_ENABLE_CUDASIM=1``): explicit ones (``cuda.to_device``, ``copy_to_host``,
``copy_to_device``) and the implicit ones that a host array passed to a kernel causes (copied in and
back out). Each entry is (direction "up" / "down", bytes, the code that asked: "module.function").
Allocations on the device (``cuda.device_array``) and device-to-device copies are not transfers.

numba is imported inside ``count_transfers`` (only benchmarks and tests use it)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

_SKIP = ("device_transfers", "numba", "contextlib", "functools", "threading")


def _caller() -> str:
    """The first frame outside numba and this module: where the copy was asked for."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if not any(s in mod for s in _SKIP):
            return f"{mod.rsplit('.', 1)[-1]}.{f.f_code.co_name}"
        f = f.f_back
    return "?"


@dataclass
class Ledger:
    entries: list = field(default_factory=list)  # (direction, nbytes, site)

    def add(self, direction: str, nbytes: int) -> None:
        self.entries.append((direction, int(nbytes), _caller()))

    def total(self, direction: str) -> int:
        return sum(b for d, b, _ in self.entries if d == direction)

    def count(self, direction: str) -> int:
        return sum(1 for d, _, _ in self.entries if d == direction)

    def by_site(self) -> dict:
        """{(direction, site): [copies, bytes]}."""
        out: dict = {}
        for d, b, s in self.entries:
            e = out.setdefault((d, s), [0, 0])
            e[0] += 1
            e[1] += b
        return out

    def summary(self) -> str:
        """One line per (direction, site), largest first, then the totals."""
        rows = sorted(self.by_site().items(), key=lambda kv: -kv[1][1])
        lines = [f"  {d:4s} {n:3d} x {b:>12,d} B  {s}" for (d, s), (n, b) in rows]
        lines.append(f"  up {self.count('up')} copies, {self.total('up'):,d} B; down {self.count('down')} copies, "
                     f"{self.total('down'):,d} B")
        return "\n".join(lines)


def _nbytes(a) -> int:
    return int(getattr(a, "nbytes", np.asarray(a).nbytes))


@contextmanager
def count_transfers():
    """Yield a ``Ledger`` of the host <-> device copies made inside the block."""
    import numba
    from numba import cuda

    led = Ledger()
    patches = []  # (object, attribute, original)

    def patch(obj, name, new):
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    sim = bool(numba.config.ENABLE_CUDASIM)
    if sim:
        from numba.cuda.simulator import kernel as skernel
        from numba.cuda.simulator.cudadrv import devicearray as sda
    try:
        if sim:
            # the simulator's device arrays wrap numpy arrays; a numpy view of one (reshape, view) is
            # device memory too, so an argument whose base is one is not an implicit copy
            live = {}
            init0 = sda.FakeCUDAArray.__init__

            def init(self, ary, stream=0):
                init0(self, ary, stream)
                base = ary
                while isinstance(base, np.ndarray) and base.base is not None:
                    base = base.base
                live[id(base)] = base

            patch(sda.FakeCUDAArray, "__init__", init)
            to_dev0 = sda.to_device

            def to_device(ary, stream=0, copy=True, to=None):
                led.add("up", _nbytes(ary))
                return to_dev0(ary, stream, copy, to)

            patch(cuda, "to_device", to_device)
            patch(sda, "to_device", to_device)
            c2h0 = sda.FakeCUDAArray.copy_to_host

            def copy_to_host(self, ary=None, stream=0):
                led.add("down", self.nbytes)
                return c2h0(self, ary, stream)

            patch(sda.FakeCUDAArray, "copy_to_host", copy_to_host)
            c2d0 = sda.FakeCUDAArray.copy_to_device

            def copy_to_device(self, ary, stream=0):
                if not isinstance(ary, sda.FakeCUDAArray):
                    led.add("up", _nbytes(ary))
                return c2d0(self, ary, stream)

            patch(sda.FakeCUDAArray, "copy_to_device", copy_to_device)
            inout0 = skernel.InOut

            class InOut(inout0):
                def to_device(self, retr, stream=0):
                    base = self.value
                    while isinstance(base, np.ndarray) and base.base is not None:
                        base = base.base
                    if live.get(id(base)) is base:  # a view of device memory: no copy, as on a GPU
                        return sda.FakeCUDAArray(self.value)
                    return super().to_device(retr, stream)  # copied in and back out (counted there)

            patch(skernel, "InOut", InOut)
        else:
            from numba.cuda.cudadrv import devicearray as dda

            c2h0 = dda.DeviceNDArrayBase.copy_to_host
            c2d0 = dda.DeviceNDArrayBase.copy_to_device

            def copy_to_host(self, ary=None, stream=0):
                led.add("down", self.nbytes)
                return c2h0(self, ary, stream)

            def copy_to_device(self, ary, stream=0):
                if not dda._driver.is_device_memory(ary):
                    led.add("up", _nbytes(ary))
                return c2d0(self, ary, stream)

            patch(dda.DeviceNDArrayBase, "copy_to_host", copy_to_host)
            patch(dda.DeviceNDArrayBase, "copy_to_device", copy_to_device)
        yield led
    finally:
        for obj, name, orig in reversed(patches):
            setattr(obj, name, orig)
