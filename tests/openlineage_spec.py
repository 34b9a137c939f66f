"""Check RunEvents against the official OpenLineage model: the `openlineage-python` client's classes.

No package on PyPI or npm ships the spec's OpenLineage.json (the client's wheel carries the model generated
from it, not the file), so an event is structured strictly into the client's typed classes
(`openlineage.client.event_v2` and the generated facet classes): an unknown key at any level is an error,
a missing required field is an error, the client's own validators run (eventTime, runId a UUID, eventType
its enum), standard facets must name the schema version the client was generated from, and custom facets
must carry `_producer` and `_schemaURL` and validate against lockgate's published JSON Schema. Last, the
client's Serde must serialise the typed event back to exactly the JSON we emitted.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from typing import Any

import attr
import jsonschema
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent
from openlineage.client.facet_v2 import BaseFacet, RunFacet
from openlineage.client.generated import (
    data_quality_metrics_input_dataset,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    schema_dataset,
)
from openlineage.client.serde import Serde

from lockgate.provenance.openlineage import FACET_SCHEMAS


class SpecViolation(ValueError):
    """The event does not fit the official OpenLineage model."""


# The spec's eventTime is `format: date-time`: RFC 3339, whose times carry an offset (`Z` or `+hh:mm`). The
# client's validator parses with dateutil, which takes a time without one (Marquez, a ZonedDateTime, does not).
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def _custom(name: str, schema: dict[str, Any]) -> type:
    # A custom facet as the client documents it: a subclass of RunFacet naming its own schema.
    props = {k: attr.ib(default=None, kw_only=True) for k in schema["properties"] if not k.startswith("_")}
    cls = attr.make_class(name, props, bases=(RunFacet,))
    cls._get_schema = staticmethod(lambda: schema["$id"])  # type: ignore[attr-defined]
    return cls


# Facets by key, as lockgate uses them (the spec names a facet by its key in the facets map).
STANDARD: dict[str, type] = {
    "jobType": job_type_job.JobTypeJobFacet,
    "version": dataset_version_dataset.DatasetVersionDatasetFacet,
    "schema": schema_dataset.SchemaDatasetFacet,
    "dataQualityMetrics": data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet,
    "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet,
    "errorMessage": error_message_run.ErrorMessageRunFacet,
    "parent": parent_run.ParentRunFacet,
}
CUSTOM: dict[str, type] = {name: _custom(name, schema) for name, schema in FACET_SCHEMAS.items()}


def _is_facet_map(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is dict and isinstance(args[1], type) and issubclass(args[1], BaseFacet)


def _facet(key: str, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SpecViolation(f"{path}: a facet must be an object")
    for required in ("_producer", "_schemaURL"):
        if not isinstance(data.get(required), str) or not data[required]:
            raise SpecViolation(f"{path}: facet {key!r} has no {required}")
    if key in CUSTOM:
        try:
            jsonschema.Draft202012Validator(FACET_SCHEMAS[key]).validate(data)
        except jsonschema.ValidationError as exc:
            raise SpecViolation(f"{path}: {exc.message}") from None
        fields = {k: v for k, v in data.items() if not k.startswith("_")}
        try:
            return CUSTOM[key](producer=data["_producer"], **fields)
        except TypeError as exc:
            raise SpecViolation(f"{path}: {exc}") from None
    if key not in STANDARD:
        raise SpecViolation(f"{path}: facet {key!r} is neither a standard facet nor one of lockgate's")
    return _structure(STANDARD[key], data, path)


def _structure(tp: Any, data: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        [inner] = [a for a in args if a is not type(None)]
        return _structure(inner, data, path)
    if origin is list:
        if not isinstance(data, list):
            raise SpecViolation(f"{path}: not an array")
        return [_structure(args[0], item, f"{path}[{i}]") for i, item in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise SpecViolation(f"{path}: not an object")
        if _is_facet_map(tp):
            return {k: _facet(k, v, f"{path}.{k}") for k, v in data.items()}
        return {k: _structure(args[1], v, f"{path}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise SpecViolation(f"{path}: {data!r} is not one of {[e.value for e in tp]}") from None
    if attr.has(tp):
        return _attrs(tp, data, path)
    expected = {str: str, int: int, float: (int, float), bool: bool}.get(tp)
    if expected is None or not isinstance(data, expected) or (tp is not bool and isinstance(data, bool)):
        raise SpecViolation(f"{path}: {data!r} is not a {getattr(tp, '__name__', tp)}")
    return data


def _attrs(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SpecViolation(f"{path}: not an object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attr.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecViolation(f"{path}: {', '.join(unknown)} not in the spec's {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if not f.init:
            continue  # schemaURL/_schemaURL: the class knows its own; compared on re-serialisation
        kwargs[f.alias] = _structure(hints[name], value, f"{path}.{name}")
    missing = [f.name for f in fields.values() if f.init and f.default is attr.NOTHING and f.name not in data]
    if missing:
        raise SpecViolation(f"{path}: {', '.join(missing)} required by the spec's {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the client's validators: eventTime, runId, URIs
        raise SpecViolation(f"{path}: {cls.__name__} refused it: {exc}") from None


def _drop_empty(value: Any) -> Any:
    # The client's defaults add empty facet maps and lists that our JSON leaves out (both mean "none").
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


def check(event: dict[str, Any]) -> RunEvent:
    """The event as the client's RunEvent; SpecViolation naming the path of the first problem."""
    for required in ("producer", "eventTime", "eventType", "schemaURL"):
        if not event.get(required):
            raise SpecViolation(f"$: {required} is required")
    if not RFC3339.fullmatch(str(event["eventTime"])):
        raise SpecViolation(f"$.eventTime: {event['eventTime']!r} is not an RFC 3339 date-time with an offset")
    typed = _attrs(RunEvent, event, "$")
    assert isinstance(typed.run, Run) and isinstance(typed.job, Job)
    assert all(isinstance(d, InputDataset) for d in typed.inputs or [])
    assert all(isinstance(d, OutputDataset) for d in typed.outputs or [])
    again = _drop_empty(Serde.to_dict(typed))
    if again != _drop_empty(event):
        raise SpecViolation(f"$: the client serialises it differently:\n ours   {_drop_empty(event)}\n client {again}")
    return typed
