"""Command-line options built from the settings dataclasses (as sparsify builds its CLI from its configs):
every field of a config becomes an option ``--field-name`` with the field's default and, as its help, the
field's comment, so a setting and its description are stated once, in the dataclass, and a field added
there reaches the command line without a second list to keep.

    @app.command()
    @config_options(Spec(TrainConfig, exclude=("crosscoder",)))
    def train(cache: str = typer.Option(...), **settings): ...
        tc = build(TrainConfig, settings)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any, Callable

import typer

_FIELD = re.compile(r"^ {4}(\w+)\s*:")  # a field line of a class body (dedented source)
_PLAIN = (int, float, str, bool)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass ``cls`` (its own and its dataclass bases'): the ``# ...`` on the
    field's own lines, else the block of comment lines just above it (a field without either gets none)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_own_comments(base))
    return out


def _own_comments(cls: type) -> dict[str, str]:
    """:func:`field_comments` of the fields declared in ``cls``'s own class body."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    comments: dict[int, str] = {}  # 0-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    names = set(cls.__dict__.get("__annotations__", {}))
    starts = [(i, m.group(1)) for i, line in enumerate(lines) if (m := _FIELD.match(line)) and m.group(1) in names]
    only_comment = {i for i, line in enumerate(lines) if line.strip().startswith("#")}
    out: dict[str, str] = {}
    for n, (start, name) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        own = [comments[i] for i in range(start, end) if i in comments and i not in only_comment
               and (i == start or not _FIELD.match(lines[i]))]
        if own:
            out[name] = " ".join(own)
            continue
        above, i = [], start - 1
        while i in only_comment:
            above.insert(0, comments[i])
            i -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _option_type(hint: Any) -> Any:
    """The type typer parses a field as: a plain type, Optional of one, or a list of one; else None."""
    if hint in _PLAIN:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _PLAIN:
            return typing.Optional[rest[0]]
    if origin is list and len(args) == 1 and args[0] in _PLAIN:
        return list[args[0]]
    return None


def _markup_safe(text: str) -> str:
    """``text`` as typer's rich help shows it verbatim (``[batch, F]`` is otherwise read as a markup tag)."""
    try:
        from rich.markup import escape
    except ImportError:  # typer without rich prints help as it is
        return text
    return escape(text)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The options one settings dataclass gives a command.

    exclude: fields the command sets itself (or that mean nothing on the command line);
    names: field -> the option's name where the command line has long used another one (``n_tokens`` ->
    ``tokens``); the keyword the command receives is that name too;
    help: field -> help text where the command needs a different description than the field comment.
    """

    cls: type
    exclude: tuple[str, ...] = ()
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    help: dict[str, str] = dataclasses.field(default_factory=dict)

    def fields(self) -> list[tuple[dataclasses.Field, str]]:
        return [(f, self.names.get(f.name, f.name)) for f in dataclasses.fields(self.cls)
                if f.init and f.name not in self.exclude]

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        comments = field_comments(self.cls)
        params = []
        for f, name in self.fields():
            kind = _option_type(hints[f.name])
            if kind is None:
                raise TypeError(f"{self.cls.__name__}.{f.name} ({hints[f.name]}) has no command-line form: "
                                "exclude it from the Spec and give the command its own option")
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ...
            text = _markup_safe(self.help.get(f.name) or comments.get(f.name) or f.name.replace("_", " "))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                            default=typer.Option(default, help=text)))
        return params

    def build(self, settings: dict[str, Any], **given: Any) -> Any:
        """``cls`` from the options a command received (``settings``: its keyword arguments) and ``given``
        (the fields the command sets itself)."""
        kw = {f.name: settings[name] for f, name in self.fields() if name in settings}
        return self.cls(**kw, **given)


def config_options(*specs: Spec) -> Callable[[Callable], Callable]:
    """Add every field of each ``spec`` as a keyword-only option to a typer command that takes ``**settings``
    (after its own parameters); a name two specs share is one option."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        seen = {p.name for p in own}
        extra = []
        for spec in specs:
            for p in spec.parameters():
                if p.name not in seen:
                    seen.add(p.name)
                    extra.append(p)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
               else p for p in own]
        fn.__signature__ = sig.replace(parameters=own + extra)
        return fn

    return decorate
