"""Host directories shared with guests: virtio-fs (one virtiofsd per share) or virtio-9p."""

from capsa.shares.spec import AccessMode, Mechanism, Share, ShareSpec

__all__ = ["AccessMode", "Mechanism", "Share", "ShareSpec"]
