"""VM backends. Each turns a :class:`VMSpec` into a hypervisor process; QEMU is the one implemented."""

from .base import Backend, DiskSpec, VMSpec
from .qemu import QemuBackend

BACKENDS: dict[str, type[Backend]] = {"qemu": QemuBackend}


def get_backend(name: str = "qemu") -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        from ..errors import InvalidArgument

        raise InvalidArgument(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}") from None


__all__ = ["Backend", "DiskSpec", "VMSpec", "QemuBackend", "get_backend", "BACKENDS"]
