"""JSON Schemas of a view's declared events, for OpenAPI and AsyncAPI documents.

`event_schemas(view)` gives one JSON Schema per event name. A small generator
here covers what `event_types` checks without pydantic: plain types, lists,
dicts, unions, `Literal`s, enums, TypedDicts and dataclasses. pydantic models
(and types that hold them, or that only pydantic knows) get pydantic's schema, in
serialization mode: what the client receives. pydantic is imported only then.

Named types (models, dataclasses, TypedDicts, enums) become definitions that the
schemas refer to with `$ref`. Pass `defs` to collect them in your own document
(with a matching `ref_template`, such as `"#/components/schemas/{model}"`);
without it each schema carries the definitions it uses under `$defs`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from ._eventtypes import typeddict_fields

__all__ = ["content_type", "event_schemas", "generate_schemas"]

Schema = dict[str, Any]
_LOCAL_REFS = "#/$defs/{model}"


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_text(tp: Any) -> bool:
    tp = _strip(tp)
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(value, str) for value in typing.get_args(tp))
    if origin is Union or origin is types.UnionType:
        return all(_is_text(arg) for arg in typing.get_args(tp))
    return isinstance(tp, type) and issubclass(tp, str) and issubclass(tp, enum.Enum)


def content_type(tp: Any) -> str:
    """The media type of a payload on the wire: text for `str` payloads, else JSON.

    A `str` (or a `Literal` of strings) is sent as the text itself; anything else is
    JSON-encoded.
    """
    return "text/plain" if _is_text(tp) else "application/json"


class _Fallback:
    """JSON Schemas for the types `event_types` accepts without pydantic."""

    def __init__(self, ref_template: str) -> None:
        self.ref_template = ref_template
        self.defs: dict[str, Schema] = {}
        self._names: dict[Any, str] = {}

    def schema(self, tp: Any) -> Schema:
        tp = _strip(tp)
        if tp is Any or tp is object:
            return {}
        if tp is None or tp is type(None):
            return {"type": "null"}
        simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
        if tp in simple:
            return {"type": simple[tp]}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is Union or origin is types.UnionType:
            return {"anyOf": [self.schema(arg) for arg in args]}
        if origin is Literal:
            values = [value.value if isinstance(value, enum.Enum) else value for value in args]
            return {"const": values[0]} if len(values) == 1 else {"enum": values}
        if tp in (list, tuple, set, frozenset):
            return {"type": "array"}
        if origin in (list, set, frozenset, Sequence) or (
            origin is tuple and len(args) == 2 and args[1] is Ellipsis
        ):
            return {"type": "array", "items": self.schema(args[0])}
        if origin is tuple:
            return {
                "type": "array",
                "prefixItems": [self.schema(arg) for arg in args],
                "minItems": len(args),
                "maxItems": len(args),
            }
        if tp is dict:
            return {"type": "object"}
        if origin in (dict, Mapping):
            return {"type": "object", "additionalProperties": self.schema(args[1])}
        if isinstance(tp, type) and (
            issubclass(tp, enum.Enum) or typing.is_typeddict(tp) or dataclasses.is_dataclass(tp)
        ):
            return {"$ref": self.ref_template.format(model=self._define(tp))}
        raise TypeError(f"no JSON Schema for {tp!r} without pydantic")

    def _define(self, tp: type) -> str:
        name = self._names.get(tp)
        if name is not None:
            return name
        name = tp.__name__
        taken = set(self._names.values())
        number = 2
        while name in taken:  # two types of one name: keep both
            name = f"{tp.__name__}{number}"
            number += 1
        self._names[tp] = name
        if issubclass(tp, enum.Enum):
            self.defs[name] = {"title": name, "enum": [member.value for member in tp]}
            return name
        self.defs[name] = {}  # a field may refer back to tp
        if typing.is_typeddict(tp):
            hints, needed = typeddict_fields(tp)
            names = list(hints)
            required = [key for key in names if key in needed]
        else:
            hints = typing.get_type_hints(tp)
            fields = dataclasses.fields(typing.cast(Any, tp))
            names = [field.name for field in fields]
            required = [
                field.name
                for field in fields
                if field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ]
        definition: Schema = {
            "title": name,
            "type": "object",
            "properties": {key: self.schema(hints[key]) for key in names},
        }
        if required:
            definition["required"] = required
        self.defs[name] = definition
        return name


def generate_schemas(
    payloads: Sequence[tuple[Any, Any]], ref_template: str
) -> tuple[dict[Any, Schema], dict[str, Schema]]:
    """The schemas of many payload types at once, sharing one set of definitions.

    Types that `event_types` checks without pydantic get their schema here; the
    others (pydantic models, and types holding them) get pydantic's.

    Args:
        payloads: `(key, type)` pairs; keys are any hashable values.
        ref_template: How a `$ref` names a definition, with `{model}` for its name.

    Returns:
        The schema per key, and the definitions they refer to.

    Raises:
        ValueError: A pydantic type and another type define different schemas
            under one name.
    """
    fallback = _Fallback(ref_template)
    schemas: dict[Any, Schema] = {}
    rest: list[tuple[Any, Any]] = []
    for key, tp in payloads:
        attempt = _Fallback(ref_template)  # so that a failure leaves no definitions
        try:
            attempt.schema(tp)
        except TypeError:
            rest.append((key, tp))
        else:
            schemas[key] = fallback.schema(tp)
    definitions = fallback.defs
    if rest:
        from pydantic import TypeAdapter
        from pydantic.json_schema import GenerateJsonSchema

        inputs = [(key, "serialization", TypeAdapter(tp).core_schema) for key, tp in rest]
        generator = GenerateJsonSchema(ref_template=ref_template)
        by_key, more = generator.generate_definitions(inputs)  # type: ignore[arg-type]
        for key, _ in rest:
            schemas[key] = by_key[(key, "serialization")]
        for name, definition in more.items():
            if name in definitions and definitions[name] != definition:
                raise ValueError(f"two different payload types have the schema name {name!r}")
            definitions[name] = definition
    return {key: schemas[key] for key, _ in payloads}, definitions


_REF = re.compile(r"^#/\$defs/(.+)$")


def _refs(schema: Any, found: set[str], defs: Mapping[str, Schema]) -> None:
    if isinstance(schema, list):
        for item in schema:
            _refs(item, found, defs)
    elif isinstance(schema, dict):
        ref = schema.get("$ref")
        match = _REF.match(ref) if isinstance(ref, str) else None
        if match is not None and match.group(1) not in found:
            found.add(match.group(1))
            _refs(defs.get(match.group(1)), found, defs)
        for value in schema.values():
            _refs(value, found, defs)


def event_schemas(
    view: type,
    *,
    ref_template: str = _LOCAL_REFS,
    defs: dict[str, Schema] | None = None,
) -> dict[str, Schema]:
    """The JSON Schema of each event `view` declares in `event_types`.

    Args:
        view: An `EventStreamView` subclass.
        ref_template: How a `$ref` names a definition (`{model}` is its name), for
            example `"#/components/schemas/{model}"` with `defs` below.
        defs: A dict to add the definitions to. Without it, each schema carries
            the definitions it refers to under `$defs`, and stands alone.

    Returns:
        Event name (`"message"` for unnamed events) to the JSON Schema of its
        payload; empty when the view declares no events.

    Raises:
        ValueError: `defs` already holds a different definition of the same name.
    """
    declared: Mapping[str, Any] | None = getattr(view, "event_types", None)
    if not declared:
        return {}
    if defs is None and ref_template != _LOCAL_REFS:
        raise ValueError("a ref_template other than the default needs a defs dict")
    schemas, definitions = generate_schemas(list(declared.items()), ref_template)
    if defs is None:
        for name, schema in schemas.items():
            match = _REF.match(schema.get("$ref", "")) if len(schema) == 1 else None
            if match is not None:
                # A bare reference to one named type: that type's schema itself,
                # unless it refers to itself.
                inner = definitions[match.group(1)]
                inner_used: set[str] = set()
                _refs(inner, inner_used, definitions)
                if match.group(1) not in inner_used:
                    schema = schemas[name] = dict(inner)
            used: set[str] = set()
            _refs(schema, used, definitions)
            if used:
                schemas[name] = {**schema, "$defs": {key: definitions[key] for key in sorted(used)}}
        return schemas
    for key, definition in definitions.items():
        if key in defs and defs[key] != definition:
            raise ValueError(f"two different schemas are named {key!r}")
        defs[key] = definition
    return schemas
