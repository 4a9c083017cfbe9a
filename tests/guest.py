"""The raw-VM test guest is capsa's own minimal busybox guest (``capsa.image.busybox``)."""

from capsa.image.busybox import PROMPT, READY_MARKER, GuestFiles
from capsa.image.busybox import busybox_guest as build_test_guest

__all__ = ["PROMPT", "READY_MARKER", "GuestFiles", "build_test_guest"]
