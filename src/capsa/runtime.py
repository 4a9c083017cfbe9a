"""This process's runtime directory, as the faces above the library (the server, Ray) may use it.

Every VM's files live under one directory per Python process (RAM-backed when it can be, since
fork images live there), removed by a guardian process when this one dies (:mod:`capsa._guardian`
keeps the mechanism). A face that keeps scratch files next to the VMs' (the server's fork of a
sandbox) or reports where they are (a Ray host) uses these two names instead of that private module.

``cache_dir`` is capsa's persistent cache (kernels, images, templates), for tools that keep their
own artifacts beside it (the benchmarks).
"""

from __future__ import annotations

from capsa._guardian import new_vm_dir, runtime_root
from capsa._paths import cache_dir

__all__ = ["cache_dir", "new_vm_dir", "runtime_root"]
