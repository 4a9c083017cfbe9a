"""UEFI boot through OVMF: firmware discovery, the boot disk's ESP check and copy-on-write overlay,
per-VM variable stores (see :class:`capsa.UefiBoot` and ``docs/uefi.md``)."""
