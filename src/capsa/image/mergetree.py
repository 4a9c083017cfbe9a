"""What the layers above decided about each path, as a tree of path components (linear cost).

The merge reads layers top (newest) first. For each entry it asks :meth:`Tree.claim` whether an upper
layer already decided its path (an entry there, a whiteout, an opaque directory, a non-directory
above it). The tree is walked one component at a time, so deciding costs the path's length, never
its length times its depth: keeping a set of path strings and looking every ancestor up, as before,
was quadratic in the depth (a 1 MiB ``d/d/d/...`` PAX path took gigabytes).

Within one layer, Docker applies entries in order and a later entry replaces an earlier one of the
same path (a directory replacing a directory only updates its metadata; anything else removes the
earlier entry and everything the layer put under it). The merge streams entries as it reads them, so
a :class:`Planner` replays each layer beside it; when an entry replaces another, the merge stops
(:class:`Repeated`) and is redone with the entries each layer replaces (a header-only pass of the
planner over every layer), skipping those.
"""

from __future__ import annotations

from capsa.errors import ImageError
from capsa.image.tarheader import encode

PATH_MAX = 4096  # the kernel's limits: a path (with its NUL) and one component
NAME_MAX = 255
MAX_NODES = 4_000_000  # paths in one image (entries and their parents): about 1 GiB of merge state

DIR, OTHER, FILE = 1, 2, 2 | 4  # the kinds of entry :meth:`Tree.claim` takes (a file is an OTHER)
_HIDDEN, _OPAQUE = 8, 16
_TOO_MANY = "capsa refuses larger trees to bound the memory an import takes"
_ENTRY = DIR | OTHER


class Repeated(ImageError):
    """A layer has an entry replacing another: the merge must be planned (:class:`Planner`)."""


class _Node:
    """One path: what decided it (``flags``), in which layer (``layer``: for an entry, the layer
    that had it; for a parent no layer had an entry for, the last layer with entries below)."""

    __slots__ = ("children", "flags", "layer")

    def __init__(self, layer: int) -> None:
        self.children: dict[str, _Node] | None = None
        self.flags = 0
        self.layer = layer


def parts(name: str, what: str) -> list[str]:
    """The components of a layer entry's name; ``..``, over-long paths or names raise ImageError."""
    result = [p for p in name.split("/") if p and p != "."]
    if ".." in result:
        raise ImageError(f"{what} escapes the image root: {name!r}")
    size = len(name) if name.isascii() else len(encode(name))
    if size >= PATH_MAX and len(encode("/".join(result))) >= PATH_MAX:
        raise ImageError(
            f"{what} has a {size}-byte path (the kernel's PATH_MAX is {PATH_MAX}): {name[:80]!r}...",
            hint="the image is malformed or hostile: no filesystem could hold this path",
        )
    if size > NAME_MAX and any(len(encode(p)) > NAME_MAX for p in result):
        raise ImageError(
            f"{what} has a name over {NAME_MAX} bytes: {name[:80]!r}...",
            hint="the image is malformed or hostile: no Linux filesystem could hold this name",
        )
    return result


class Tree:
    """The merge's state: the decisions of the layers applied so far (see the module's docstring)."""

    def __init__(self) -> None:
        self.root = _Node(-1)
        self.layer = 0  # the layer being applied: 0 is the top one
        self.nodes = 1
        self._cut: list[_Node] = []  # directories above that this layer has as a non-directory

    def _child(self, node: _Node, name: str) -> _Node:
        children = node.children
        if children is None:
            children = node.children = {}
        child = children.get(name)
        if child is None:
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise ImageError(f"the image has over {MAX_NODES} paths", hint=_TOO_MANY)
            child = children[name] = _Node(self.layer)
        return child

    def claim(self, path: list[str], kind: int, where: str) -> bool:
        """Whether an entry of the current layer at ``path`` (``kind``: :data:`DIR`, :data:`FILE` or
        :data:`OTHER`) is visible; if so it is recorded. :class:`Repeated` if this layer had it."""
        node, layer = self.root, self.layer
        if node.flags & _OPAQUE:
            return False  # the whole tree below was made opaque by an upper layer
        parents: list[_Node] = []
        for name in path[:-1]:
            children = node.children
            child = children.get(name) if children else None
            if child is None:
                child = self._child(node, name)
            else:
                flags = child.flags
                if flags & (_HIDDEN | _OPAQUE):
                    return False
                if flags & OTHER:
                    if child.layer == layer:  # Docker fails here too (ENOTDIR)
                        raise ImageError(f"{where}: a parent of /{'/'.join(path)} is not a directory")
                    return False  # a non-directory above hides the lower layers' tree
                if not flags & DIR:
                    parents.append(child)
            node = child
        children = node.children
        child = children.get(path[-1]) if children else None
        if child is None:
            child = self._child(node, path[-1])
        elif child.flags & _HIDDEN:
            return False
        elif child.flags & _ENTRY or (kind != DIR and (child.children or child.flags & _OPAQUE)):
            if child.layer == layer:
                raise Repeated(f"{where} has more than one entry for /{'/'.join(path)}")
            if kind != DIR and not child.flags & OTHER:
                self._cut.append(child)  # hidden, yet it hides the lower layers' tree below it
            return False  # an upper layer's entry, or its directory (entries or an opaque marker below)
        for parent in parents:  # directories no layer had an entry for: entries below them now
            parent.layer = layer
        child.flags |= kind
        child.layer = layer
        return True

    def is_file(self, path: list[str]) -> bool:
        node: _Node | None = self.root
        for name in path:
            children = node.children if node is not None else None
            node = children.get(name) if children else None
        return node is not None and node.flags & FILE == FILE

    def end_layer(self, hidden: list[list[str]], opaque: list[list[str]]) -> None:
        """Apply the layer's whiteouts (``hidden``) and opaque directories: to lower layers only."""
        for path, flag in [(p, _HIDDEN) for p in hidden] + [(p, _OPAQUE) for p in opaque]:
            node = self.root
            for name in path:
                node = self._child(node, name)
            node.flags |= flag
        for node in self._cut:  # overlayfs looks no further down than a non-directory
            node.flags |= _OPAQUE
        self._cut.clear()
        self.layer += 1


class _Slot:
    """A path of one layer in a :class:`Planner`: the entry now there (``index``, -1: none)."""

    __slots__ = ("children", "index", "is_dir")

    def __init__(self) -> None:
        self.children: dict[str, _Slot] | None = None
        self.index = -1
        self.is_dir = False


class Planner:
    """Replays one layer's entries in order, as Docker applies them: which ones end up replaced."""

    def __init__(self, where: str) -> None:
        self.root = _Slot()
        self.superseded: set[int] = set()
        self.where = where
        self.slots = 1

    def add(self, index: int, path: list[str], is_dir: bool) -> None:
        node = self.root
        for name in path:
            if node.index >= 0 and not node.is_dir:
                raise ImageError(f"{self.where}: a parent of /{'/'.join(path)} is not a directory")
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(name)
            if child is None:
                self.slots += 1
                if self.slots > MAX_NODES:
                    raise ImageError(f"{self.where} has over {MAX_NODES} paths", hint=_TOO_MANY)
                child = children[name] = _Slot()
            node = child
        if node.index >= 0:
            self.superseded.add(node.index)
        if not (is_dir and (node.is_dir or node.index < 0)):  # RemoveAll(path) in Docker
            self._drop_below(node)
        node.index, node.is_dir = index, is_dir

    def add_whiteout(self, index: int, path: list[str]) -> None:
        """A whiteout's device node at ``path``, unless the layer has something there (Docker's
        overlay2 fails, ``EEXIST``; capsa keeps the layer's entries: the OCI image spec applies
        whiteouts to lower layers only)."""
        node: _Slot | None = self.root
        for name in path:
            children = node.children if node is not None else None
            node = children.get(name) if children else None
        if node is None or (node.index < 0 and not node.children):
            self.add(index, path, False)

    def _drop_below(self, slot: _Slot) -> None:
        stack = list(slot.children.values()) if slot.children else []
        slot.children = None
        while stack:
            node = stack.pop()
            if node.index >= 0:
                self.superseded.add(node.index)
            if node.children:
                stack.extend(node.children.values())
