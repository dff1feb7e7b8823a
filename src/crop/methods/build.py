"""One way to build any method's config: (method name, budget, options) -> the method's config dataclass.

Every caller goes through :func:`build_config`: the Python API, ``crop answer``, ``crop eval``,
``crop bench``, the demo and the lmms-eval plugin. What a method accepts is read off its config
dataclass's own fields, so a new method needs no option plumbing, and a field a method does not
have is refused here, in one place, with the fields it does have.

Two kinds of settings reach a config:

- ``shared``: settings a whole run gives to every method that has the field and that the others
  ignore (``crop eval --layer 1`` sets K of every single-stage inner-LLM method; ``--pool`` is
  PLC's; ``--seed`` the random methods'; ``--grid`` the region-guided methods');
- ``options``: :class:`Option` entries (``--option [METHOD.]FIELD=VALUE``), applied after the
  shared settings. One aimed at a method (``dart.budget=exact``) only reaches that method. An
  unaimed one must be a field of the method (``strict=True``, one method), or, in a run of
  several methods (``strict=False``), of at least one of them (:func:`check_options_used`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crop.methods.base import METHODS
from crop.methods.names import canonical_name

__all__ = ["ConfigAt", "Option", "OptionLike", "build_config", "check_options_used", "config_builder",
           "config_class", "config_fields", "parse_option_value"]


def parse_option_value(text: str) -> Any:
    """A command-line option value as Python: ``none``, ``true``/``false``, an int, a float, a comma list (tuple), or text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(parse_option_value(part) for part in text.split(",") if part.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


@dataclass(frozen=True)
class Option:
    """One config field to set, for every method that has it or for one method.

    Attributes:
        field: the config field's name (``ratio``, ``budget``, ``trim`` ...).
        value: its value; a string is parsed by :func:`parse_option_value` (``"2,8,16"`` -> a tuple).
        method: a method name or alias the option is aimed at, or ``None`` for any method.
        source: where it came from, for error messages (a flag such as ``"--pool"``); ``None``
            for ``--option``.
    """

    field: str
    value: Any
    method: str | None = None
    source: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> Option:
        """``[METHOD.]FIELD=VALUE`` (the ``--option`` syntax) as an option.

        Raises:
            ValueError: for text without ``=`` or with an empty field.
        """
        key, sep, value = text.partition("=")
        method, dot, field = key.strip().rpartition(".")
        if not sep or not field.strip():
            raise ValueError(f"an option is [METHOD.]KEY=VALUE (e.g. ratio=0.3 or dart.budget=exact), got {text!r}")
        return cls(field.strip(), value, method.strip() if dot else None)

    @classmethod
    def of(cls, item: OptionLike) -> Option:
        """An :class:`Option`, a ``"[METHOD.]FIELD=VALUE"`` string, or a ``(method or None, field, value)`` triple."""
        if isinstance(item, Option):
            return item
        if isinstance(item, str):
            return cls.parse(item)
        triple: Sequence[Any] = item  # (method or None, field, value); mypy keeps ``str`` in a Sequence's narrowing
        method, field, value = triple
        return cls(str(field), value, None if method is None else str(method))

    def aimed_at(self, method: str) -> bool:
        """Whether this option is aimed at ``method`` by name (an unaimed option is not).

        Raises:
            ValueError: if the option names an unknown method.
        """
        return self.method is not None and canonical_name(self.method) == method

    def parsed_value(self) -> Any:
        """The value as the config takes it: a string parsed by :func:`parse_option_value`, anything else as is."""
        return parse_option_value(self.value) if isinstance(self.value, str) else self.value


OptionLike = Option | str | Sequence[Any]
ConfigAt = Callable[[int | None], Any]  # a budget -> the method's config at that budget


def config_class(method: str) -> type[Any]:
    """The config dataclass of ``method`` (a registered name or an alias).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    return METHODS.get(canonical_name(method)).config_class


def config_fields(method: str) -> list[str]:
    """The fields of ``method``'s config, in declaration order (what ``--option`` can set)."""
    return [f.name for f in dataclasses.fields(config_class(method))]


def build_config(method: str, keep_tokens: int | None = None, options: Iterable[OptionLike] = (),
                 shared: Mapping[str, Any] | None = None, strict: bool = True) -> Any:
    """The config of ``method`` for a budget, shared run settings and options.

    Args:
        method: a registered method name or an alias (``full``, ``ilp``, ``plc``, ``self``).
        keep_tokens: the visual-token budget, in the method's own meaning (``None``: the method's
            pure variant, e.g. exactly the region's tokens for CROP). The unpruned model (``none``)
            has no budget and ignores it.
        options: fields to set (:class:`Option`, ``"[METHOD.]FIELD=VALUE"`` strings or
            ``(method, field, value)`` triples), applied in order after ``shared``.
        shared: run-wide settings (``layer``, ``pool``, ``seed``, ``grid`` ...), each applied only
            if the method's config has that field.
        strict: an unaimed option the method does not have is an error (one method); with
            ``False`` it is skipped (a run of several methods; see :func:`check_options_used`).

    Returns:
        The method's config dataclass, validated by its ``__post_init__``.

    Raises:
        ValueError: for an unknown method, a field the method does not have (listing those it
            has), or an invalid value.
    """
    name = canonical_name(method)
    cls = METHODS.get(name).config_class
    fields = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {k: v for k, v in (shared or {}).items() if k in fields}
    if "keep_tokens" in fields:
        values["keep_tokens"] = keep_tokens
    for option in map(Option.of, options):
        if option.method is not None and not option.aimed_at(name):
            continue
        if option.field not in fields:
            if option.method is None and not strict:
                continue
            what = f"{option.source} does not apply to {name} (it has no {option.field})" if option.source \
                else f"{name} has no option {option.field}"
            raise ValueError(f"{what}; its options: {', '.join(fields)}")
        values[option.field] = option.parsed_value()
    try:
        return cls(**values)
    except TypeError as exc:  # e.g. a value of a type the validation does not expect
        raise ValueError(f"{name}: {exc}") from None


def check_options_used(methods: Iterable[str], options: Iterable[OptionLike]) -> None:
    """Raise unless every option reaches at least one of ``methods``.

    An option aimed at a method must name one of them; an unaimed one must be a field of at
    least one of their configs (else it would silently change nothing).

    Raises:
        ValueError: naming the options that reach none of the methods.
    """
    names = [canonical_name(m) for m in methods]
    fields = {f for n in names for f in config_fields(n)}
    unused = []
    for option in map(Option.of, options):
        if option.method is not None:
            if canonical_name(option.method) not in names:
                unused.append(f"{option.method}.{option.field} (no {option.method} run here)")
        elif option.field not in fields:
            unused.append(option.field)
    if unused:
        raise ValueError(f"option {', '.join(unused)} is not a field of any method run here")


def config_builder(method: str, options: Iterable[OptionLike] = (), shared: Mapping[str, Any] | None = None,
                   strict: bool = False) -> ConfigAt:
    """``budget -> config``: :func:`build_config` of ``method`` with fixed options, for budget solvers and sweeps."""
    fixed = [Option.of(o) for o in options]

    def config_at(keep_tokens: int | None) -> Any:
        return build_config(method, keep_tokens, fixed, shared, strict)

    return config_at
