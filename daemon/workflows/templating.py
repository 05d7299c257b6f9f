"""Safe templates for workflow inputs and payloads.

Templates are Jinja2 text rendered in an :class:`ImmutableSandboxedEnvironment`
that is narrowed to a data-only language:

* the only names are the run's data (``trigger``, ``steps``, ``state``,
  ``input``, ``now``, ``run``, ``workflow``) and loop variables;
* no function or method calls, no ``{% set %}``, macros, includes, imports,
  nested or recursive loops; ``.x`` / ``[x]`` read dict keys and list items
  only (never Python attributes), and names starting with ``_`` are refused;
* a short list of filters, with sizes checked where they could blow up
  (``replace``, ``join``, ``*`` on strings, ``**``, ``%`` formatting);
* output is cut at :data:`MAX_OUTPUT` characters (an error, not a truncation).

Everything is checked when the workflow is loaded (:func:`compile_value`), so
a bad template is a configuration error with its key path.  A string that is
exactly one ``{{ expression }}`` keeps the expression's type (a number, a dict);
any other template renders to a string.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jinja2
from jinja2 import nodes
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from daemon.errors import MtorError

# Names a template may read (the run context).
CONTEXT_NAMES: Final = frozenset({"trigger", "steps", "state", "input", "now", "run", "workflow"})
MAX_OUTPUT: Final = 65_536  # characters one template may produce
MAX_SOURCE: Final = 16_384  # characters of one template's source
MAX_POWER_DIGITS: Final = 300  # ``a ** b`` may not exceed 10**300

SAFE_FILTERS: Final = frozenset(
    {
        "abs",
        "capitalize",
        "count",
        "d",
        "default",
        "dictsort",
        "first",
        "float",
        "int",
        "items",
        "join",
        "last",
        "length",
        "list",
        "lower",
        "map",
        "max",
        "min",
        "reject",
        "rejectattr",
        "replace",
        "reverse",
        "round",
        "select",
        "selectattr",
        "sort",
        "string",
        "sum",
        "title",
        "tojson",
        "trim",
        "truncate",
        "unique",
        "upper",
        "wordcount",
    }
)
ALLOWED_NODES: Final = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Name,
    nodes.Const,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Slice,
    nodes.Filter,
    nodes.Test,
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Neg,
    nodes.Pos,
    nodes.Add,
    nodes.Sub,
    nodes.Mul,
    nodes.Div,
    nodes.FloorDiv,
    nodes.Mod,
    nodes.Pow,
    nodes.Concat,
    nodes.CondExpr,
    nodes.If,
    nodes.For,
    nodes.List,
    nodes.Tuple,
    nodes.Dict,
    nodes.Pair,
    nodes.Keyword,
)
_WHOLE_EXPR = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)


class TemplateError(MtorError):
    """A template is not allowed, does not compile, or failed to render."""


class _DataOnlyEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox in which ``.x`` and ``[x]`` only read dict keys and list items."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and not attribute.startswith("_") and attribute in obj:
            return obj[attribute]
        return self.undefined(obj=obj, name=attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, str) and argument.startswith("_"):
            return self.undefined(obj=obj, name=argument)
        if isinstance(obj, Mapping | list | tuple | str) and not isinstance(obj, Undefined):
            try:
                return obj[argument]
            except (KeyError, IndexError, TypeError):
                pass
        return self.undefined(obj=obj, name=str(argument))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False  # filters such as map(attribute=...) go through getattr above

    def is_safe_callable(self, obj: Any) -> bool:
        return False

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if not all(_is_number(v) for v in (left, right)):
                raise TemplateError("'**' takes numbers")
            if abs(right) > 1 and math.log10(abs(left) + 1) * abs(right) > MAX_POWER_DIGITS:
                raise TemplateError("'**' result too large")
            return left**right
        if operator == "%" and not (_is_number(left) and _is_number(right)):
            raise TemplateError("'%' is only for numbers (format text with filters)")
        if operator == "*" and not (_is_number(left) and _is_number(right)):
            n = right if isinstance(left, str | list | tuple) else left
            seq = left if isinstance(left, str | list | tuple) else right
            if _is_number(n) and len(seq) * max(0, int(n)) > MAX_OUTPUT:
                raise TemplateError(f"'*' result longer than {MAX_OUTPUT}")
        if (
            operator == "+"
            and isinstance(left, str | list)
            and isinstance(right, str | list)
            and len(left) + len(right) > MAX_OUTPUT * 16
        ):
            raise TemplateError("'+' result too large")
        return super().call_binop(context, operator, left, right)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _safe_replace(env: Any, s: Any, old: str, new: str, count: int | None = None) -> str:
    text = str(s)
    hits = text.count(str(old)) if old else len(text) + 1
    if count is not None:
        hits = min(hits, max(0, count))
    if len(text) + hits * max(0, len(str(new)) - len(str(old))) > MAX_OUTPUT:
        raise TemplateError(f"replace result longer than {MAX_OUTPUT}")
    return text.replace(str(old), str(new), -1 if count is None else count)


def _safe_join(env: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is not None:
        items = [env.getattr(i, attribute) for i in items]
    parts = [str(i) for i in items]
    if sum(map(len, parts)) + len(d) * len(parts) > MAX_OUTPUT:
        raise TemplateError(f"join result longer than {MAX_OUTPUT}")
    return d.join(parts)


def _tojson(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _make_env() -> _DataOnlyEnvironment:
    env = _DataOnlyEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.globals.clear()
    keep = {k: v for k, v in env.filters.items() if k in SAFE_FILTERS}
    env.filters.clear()
    env.filters.update(keep)
    replace_filter: Callable[..., str] = jinja2.pass_environment(_safe_replace)
    join_filter: Callable[..., str] = jinja2.pass_environment(_safe_join)
    env.filters["replace"] = replace_filter
    env.filters["join"] = join_filter
    env.filters["tojson"] = _tojson
    return env


ENV: Final = _make_env()


def _check_ast(tree: nodes.Node, source: str) -> None:
    stored: set[str] = set()
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            raise TemplateError("recursive loops are not allowed in templates")
        if any(True for _ in loop.find_all(nodes.For)):
            raise TemplateError("nested loops are not allowed in templates")
        for name in loop.target.find_all(nodes.Name):
            stored.add(name.name)
        if isinstance(loop.target, nodes.Name):
            stored.add(loop.target.name)
    stored.add("loop")
    for node in _walk(tree):
        if not isinstance(node, ALLOWED_NODES):
            what = type(node).__name__
            hint = " (use filters)" if isinstance(node, nodes.Call) else ""
            raise TemplateError(f"{what} is not allowed in templates{hint}")
        if (
            isinstance(node, nodes.Name)
            and node.ctx == "load"
            and node.name not in CONTEXT_NAMES
            and node.name not in stored
        ):
            names = ", ".join(sorted(CONTEXT_NAMES))
            raise TemplateError(f"unknown name {node.name!r} (templates may use: {names})")
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            raise TemplateError(f"'{node.attr}': names starting with '_' are not allowed")
        if (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
            and node.arg.value.startswith("_")
        ):
            raise TemplateError(f"'{node.arg.value}': names starting with '_' are not allowed")
        if isinstance(node, nodes.Filter) and node.name not in SAFE_FILTERS:
            raise TemplateError(f"filter {node.name!r} is not allowed")


def _walk(node: nodes.Node) -> Iterable[nodes.Node]:
    yield node
    for child in node.iter_child_nodes():
        yield from _walk(child)


@dataclass(frozen=True, slots=True)
class Template:
    """One compiled template string."""

    source: str
    _render: Callable[[dict[str, Any]], Any]

    def render(self, context: dict[str, Any]) -> Any:
        try:
            return self._render(context)
        except TemplateError:
            raise
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template {self.source!r}: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.source!r}: {exc}") from exc
        except (ArithmeticError, ValueError, TypeError, LookupError, RecursionError) as exc:
            raise TemplateError(f"template {self.source!r}: {type(exc).__name__}: {exc}") from exc


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def compile_template(source: str) -> Template:
    """Check and compile ``source``; raises :class:`TemplateError`."""
    if len(source) > MAX_SOURCE:
        raise TemplateError(f"template longer than {MAX_SOURCE} characters")
    try:
        tree = ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error at line {exc.lineno}: {exc.message}") from exc
    _check_ast(tree, source)
    whole = _WHOLE_EXPR.match(source)
    try:
        if whole and "{{" not in whole["expr"] and "}}" not in whole["expr"]:
            expr = ENV.compile_expression(whole["expr"], undefined_to_none=False)

            def native(ctx: dict[str, Any]) -> Any:
                value = expr(**ctx)
                if isinstance(value, Undefined):
                    str(value)  # StrictUndefined raises here with its message
                return _plain(value)

            return Template(source, native)
        tpl = ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error at line {exc.lineno}: {exc.message}") from exc

    def text(ctx: dict[str, Any]) -> str:
        out: list[str] = []
        size = 0
        for chunk in tpl.generate(**ctx):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise TemplateError(f"template output longer than {MAX_OUTPUT} characters")
            out.append(chunk)
        return "".join(out)

    return Template(source, text)


def _plain(value: Any) -> Any:
    """Only JSON data leaves a template (tuples become lists; anything else is refused)."""
    if value is None or isinstance(value, str | int | float | bool):
        if isinstance(value, str) and len(value) > MAX_OUTPUT:
            raise TemplateError(f"template output longer than {MAX_OUTPUT} characters")
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    raise TemplateError(f"a template produced a {type(value).__name__}, not data")


@dataclass(frozen=True, slots=True)
class Value:
    """A JSON-like value whose strings may be templates, compiled once."""

    raw: Any
    _compiled: Any

    def render(self, context: dict[str, Any]) -> Any:
        return _render_tree(self._compiled, context)

    @property
    def static(self) -> bool:
        return not _has_template(self._compiled)


def compile_value(raw: Any, path: str = "") -> Value:
    """Compile every template string inside ``raw``; errors name the key path."""
    return Value(raw, _compile_tree(raw, path))


def _compile_tree(raw: Any, path: str) -> Any:
    if isinstance(raw, str):
        if not is_template(raw):
            return raw
        try:
            return compile_template(raw)
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}" if path else str(exc)) from exc
    if isinstance(raw, dict):
        return {k: _compile_tree(v, f"{path}.{k}" if path else str(k)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_compile_tree(v, f"{path}[{i}]") for i, v in enumerate(raw)]
    return raw


def _render_tree(node: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(node, Template):
        return node.render(ctx)
    if isinstance(node, dict):
        return {k: _render_tree(v, ctx) for k, v in node.items()}
    if isinstance(node, list):
        return [_render_tree(v, ctx) for v in node]
    return node


def _has_template(node: Any) -> bool:
    if isinstance(node, Template):
        return True
    if isinstance(node, dict):
        return any(_has_template(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_template(v) for v in node)
    return False
