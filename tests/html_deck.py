"""A deck's HTML, parsed as a browser builds it (not grepped): elements by id, a table's rows as cell texts."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if n.tag == tag and (cls is None or cls in n.attrs.get("class", "").split())]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]
        self.decls: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.decls.append(decl)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert tag in [n.tag for n in self.stack], f"</{tag}> closes nothing"
        while self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


@dataclass
class Page:
    raw: str
    root: Node
    decls: list[str]

    def ids(self) -> list[str]:
        return [n.attrs["id"] for n in self.root.walk() if "id" in n.attrs]

    def get(self, element_id: str) -> Node | None:
        found = [n for n in self.root.walk() if n.attrs.get("id") == element_id]
        assert len(found) <= 1, f"id {element_id!r} appears {len(found)} times"
        return found[0] if found else None

    def by_id(self, element_id: str) -> Node:
        node = self.get(element_id)
        assert node is not None, f"no element with id {element_id!r}"
        return node

    def text_of(self, element_id: str) -> str:
        return self.by_id(element_id).text().strip()

    def row_nodes(self, table_id: str, cls: str | None = None) -> list[Node]:
        """The table's rows that hold data (a `<td>`), optionally only those of a class."""
        return [tr for tr in self.by_id(table_id).find_all("tr", cls) if any(
            isinstance(c, Node) and c.tag == "td" for c in tr.children)]

    def rows(self, table_id: str, cls: str | None = None) -> list[list[str]]:
        return [[c.text().strip() for c in cells(tr)] for tr in self.row_nodes(table_id, cls)]


def cells(tr: Node) -> list[Node]:
    return [c for c in tr.children if isinstance(c, Node) and c.tag in ("td", "th")]


def parse(document: str) -> Page:
    builder = _Builder()
    builder.feed(document)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[n.tag for n in builder.stack[1:]]}"
    return Page(document, builder.root, builder.decls)


def read_deck(path: pathlib.Path) -> Page:
    return parse(path.read_text())
