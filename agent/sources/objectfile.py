"""Files of Kubernetes objects (the lab's cluster state, the CA's pod file): YAML or JSON streams, read safely."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import yaml

from agent.mesh.convert import ObjectError

MAX_DEPTH = 100  # nesting of a document: Kubernetes objects are far shallower, and PyYAML recurses per level
MAX_ALIASED = 100_000  # nodes that the aliases of a document stand for (a "billion laughs" stands for 10**9)


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, bounded so that any document is refused with a ``YAMLError`` at its position rather
    than exhausting the stack or memory: at most ``MAX_DEPTH`` levels, no alias inside the node it names (a
    cycle), at most ``MAX_ALIASED`` nodes reached through aliases."""

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._open: set[str] = set()  # anchors of the nodes being composed
        self._sizes: dict[str, int] = {}  # anchor -> nodes it stands for
        self._nodes = 0  # nodes of this document so far, counting what aliases stand for
        self._aliased = 0

    def compose_document(self) -> yaml.Node | None:
        self._sizes.clear()
        self._nodes = self._aliased = 0
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]  # the parser's, mixed in by _Loader
        anchor: Any = getattr(event, "anchor", None)  # str | None
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            if anchor in self._open:
                raise yaml.composer.ComposerError(None, None, f"alias *{anchor} is inside the node it names", mark)
            size = self._sizes.get(anchor, 1)
            self._aliased += size
            self._nodes += size
            if self._aliased > MAX_ALIASED:
                raise yaml.composer.ComposerError(None, None, f"aliases stand for more than {MAX_ALIASED} nodes",
                                                  mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        first = self._nodes
        self._depth += 1
        self._nodes += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)
                self._sizes[anchor] = self._nodes - first


def _guarded(construct: Callable[[yaml.SafeLoader, Any], Any]) -> Callable[[yaml.SafeLoader, Any], Any]:
    """``construct`` (a scalar's), raising a ``YAMLError`` at the scalar for values Python cannot read."""
    def guarded(loader: yaml.SafeLoader, node: Any) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, OverflowError, KeyError, AttributeError) as e:  # !!bool x: KeyError, !!timestamp x: ...
            problem = str(e).partition(";")[0]  # without Python's advice (sys.set_int_max_str_digits)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value[:40]!r}: {problem}",
                                                    node.start_mark) from None
    return guarded


class _SafeConstructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe constructors; booleans, integers, floats and timestamps that Python cannot read
    (``!!bool x``, over 4300 digits, month 13) are refused where they are written."""


for _tag, _construct in (("bool", yaml.SafeLoader.construct_yaml_bool), ("int", yaml.SafeLoader.construct_yaml_int),
                         ("float", yaml.SafeLoader.construct_yaml_float),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _SafeConstructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _guarded(_construct))


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own scanner and parser, for a PyYAML built without libyaml."""

    def __init__(self, stream: bytes) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


def loader(events: Any) -> type[yaml.SafeLoader]:
    """A safe loader taking its events from ``events`` (a parser class) under the bounded composer."""

    class Loader(_BoundedComposer, events, _SafeConstructor, yaml.resolver.Resolver):  # type: ignore[misc]
        def __init__(self, stream: bytes) -> None:
            events.__init__(self, stream)
            _SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            _BoundedComposer.__init__(self)

    return Loader


# libyaml's scanner and parser (CParser) when PyYAML has them, five times faster; else PyYAML's own
EVENT_SOURCES: list[Any] = [yaml.CSafeLoader.__mro__[1]] if yaml.__with_libyaml__ else []
EVENT_SOURCES.append(_PythonEvents)
_Loader = loader(EVENT_SOURCES[0])


def kubernetes_objects(data: bytes) -> Iterator[Any]:
    """The objects of a YAML stream: each document, with the items of a ``kind: List`` spread out. Anything
    else (YAML errors, documents or items that are not mappings, a List's ``items`` not a list) raises
    ``ObjectError`` naming the document and where in it."""
    documents = yaml.load_all(data, Loader=_Loader)
    number = 0
    while True:
        number += 1
        try:
            doc = next(documents)
        except StopIteration:
            return
        except yaml.YAMLError as e:
            raise ObjectError(f"document {number}: {e}") from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ObjectError(f"document {number}: must be a Kubernetes object (a mapping), not {_type(doc)}")
        kind = doc.get("kind")
        if isinstance(kind, str) and (kind == "List" or (kind.endswith("List") and "items" in doc)):
            items = doc.get("items")
            if items is None:
                continue
            if not isinstance(items, list):
                raise ObjectError(f"document {number} ({kind}): items must be a list, not {_type(items)}")
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ObjectError(f"document {number} ({kind}): items[{i}] must be a Kubernetes object "
                                      f"(a mapping), not {_type(item)}")
            yield from items
        else:
            yield doc


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
