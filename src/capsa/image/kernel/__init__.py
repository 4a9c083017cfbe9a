"""capsa's own guest kernel, built from Debian's ``linux-source-6.1`` with :file:`capsa.config`.

Why: under TCG the stock cloud kernel spends most of a cold boot probing hardware a microVM does not
have and loading modules; a tinyconfig-based kernel with every sandbox driver built in reaches init in
less than half the time (docs/architecture.md §Facts). The build takes a few minutes on two
cores, so it is explicit (``capsa kernel build``, run by the setup script) and cached under
``<cache>/kernels/capsa-<source version>-<hash of the config fragment>/``; a cached kernel whose
checksum no longer matches is rebuilt.
"""

from capsa.image.kernel.build import (
    CONFIG_FRAGMENT,
    BuiltKernel,
    build_kernel,
    built_kernel,
    find_kernel_source,
    missing_build_tools,
)

__all__ = [
    "CONFIG_FRAGMENT",
    "BuiltKernel",
    "build_kernel",
    "built_kernel",
    "find_kernel_source",
    "missing_build_tools",
]
