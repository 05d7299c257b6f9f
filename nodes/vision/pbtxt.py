"""Protocol buffers text format, just enough to read and write a TensorFlow GraphDef.

OpenCV turns a binary frozen graph into text (``cv2.dnn.writeTextGraph``);
:mod:`nodes.vision.ssd_graph` reads that text, keeps the layers OpenCV can
run and adds its SSD head.  Messages stay generic (ordered ``(field, value)``
pairs, a value being a raw scalar token or a nested message) so nothing is
lost on the way back out: scalars are written exactly as they were read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from daemon.errors import MtorError

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<punct>[{}:<>\[\],])
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<word>[A-Za-z0-9_.+\-]+)
    )""",
    re.VERBOSE,
)


class TextFormatError(MtorError):
    """The text is not protocol buffers text format (as far as this reader knows it)."""


@dataclass
class Message:
    """Fields in order; repeated fields simply appear several times."""

    fields: list[tuple[str, str | Message]] = field(default_factory=list)

    def get(self, name: str) -> str | Message | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str | Message]:
        return [value for key, value in self.fields if key == name]

    def add(self, name: str, value: str | Message) -> Message:
        self.fields.append((name, value))
        return self

    def string(self, name: str) -> str | None:
        value = self.get(name)
        return unquote(value) if isinstance(value, str) else None

    def message(self, name: str) -> Message | None:
        value = self.get(name)
        return value if isinstance(value, Message) else None


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def _tokens(text: str) -> Iterator[str]:
    pos, end = 0, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise TextFormatError(f"unexpected text at offset {pos}: {text[pos : pos + 20]!r}")
            return
        pos = m.end()
        if m.lastgroup != "comment":
            yield m.group(m.lastgroup or 0)


def parse(text: str) -> Message:
    """The whole text as one (top-level) message."""
    tokens = _tokens(text)
    stack: list[Message] = [Message()]
    for tok in tokens:
        if tok in ("}", ">"):
            if len(stack) == 1:
                raise TextFormatError("unbalanced closing brace")
            stack.pop()
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", tok):
            raise TextFormatError(f"a field name expected, got {tok!r}")
        nxt = next(tokens, None)
        if nxt == ":":
            nxt = next(tokens, None)
        if nxt in ("{", "<"):
            child = Message()
            stack[-1].add(tok, child)
            stack.append(child)
        elif nxt is None or nxt in "}>:,[]":
            raise TextFormatError(f"field {tok!r} has no value")
        else:
            stack[-1].add(tok, nxt)
    if len(stack) != 1:
        raise TextFormatError("unbalanced opening brace")
    return stack[0]


def dump(msg: Message, indent: int = 0) -> str:
    pad = "  " * indent
    out: list[str] = []
    for key, value in msg.fields:
        if isinstance(value, Message):
            out.append(f"{pad}{key} {{\n{dump(value, indent + 1)}{pad}}}\n")
        else:
            out.append(f"{pad}{key}: {value}\n")
    return "".join(out)
