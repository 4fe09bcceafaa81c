"""Copying a message between two Caffe schemas by field name, as Caffe reads prototxt text.

A fork's caffe.proto (`--caffe-proto`) may number a field differently from our schema (PSPNet's
`bn_param` is 137, ours 1137): copying through the binary form alone would drop or misread it.
Here every set field is matched by name (enum values by name, messages recursively). A field the
target does not name travels as an unknown field under its own number, when that number is free
in the target, so nothing is dropped; but its meaning is unknown to the target, so reading a
fork's layer (`unnamed_is_lost`) reports it like a field that cannot be carried: such a layer is
kept exactly as written, never folded or removed."""

from google.protobuf.descriptor import FieldDescriptor

MESSAGE, ENUM = FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM


def _repeated(field: FieldDescriptor) -> bool:
    """protobuf >= 5 says `is_repeated`; 4.x only has `label`."""
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def convert(message: object, target_class: type, unnamed_is_lost: bool = False) -> tuple[object, list[str]]:
    """`message` as an instance of `target_class`, and the dotted paths of the fields (or enum
    values) that the target schema has no place for, and with `unnamed_is_lost` those it does not
    name either: empty when nothing was lost."""
    target = target_class()
    lost: list[str] = []
    _copy(message, target, "", lost)
    if unnamed_is_lost:
        lost += _unnamed(message, target_class.DESCRIPTOR, "")
    return target, lost


def _unnamed(message: object, target: object, path: str) -> list[str]:
    """The set fields of `message` (recursively) that the `target` descriptor does not name."""
    found = []
    for field, value in message.ListFields():
        other = target.fields_by_name.get(field.name)
        if other is None:
            found.append(f"{path}{field.name}")
        elif field.type == MESSAGE and other.type == MESSAGE:
            items = value if _repeated(field) else [value]
            for item in items:
                found += _unnamed(item, other.message_type, f"{path}{field.name}.")
    return found


def _copy(source: object, target: object, path: str, lost: list[str]) -> None:
    fields = target.DESCRIPTOR.fields_by_name
    for field, value in source.ListFields():
        where = f"{path}{field.name}"
        other = fields.get(field.name)
        if other is None:
            _carry(_only(source, field, value), target, where, lost)
        elif _repeated(field) != _repeated(other) or field.cpp_type != other.cpp_type:
            lost.append(where)
        elif _repeated(field):
            for item in value:
                _add(field, other, getattr(target, other.name), item, f"{where}.", lost)
        elif field.type == MESSAGE:
            _copy(value, getattr(target, other.name), f"{where}.", lost)
        elif (converted := _scalar(field, other, value, where, lost)) is not None:
            setattr(target, other.name, converted)
    _carry(_unknown_only(source), target, f"{path}<unknown fields>", lost)


def _add(
    field: FieldDescriptor, other: FieldDescriptor, container: object, item: object, where: str, lost: list[str]
) -> None:
    if field.type == MESSAGE:
        _copy(item, container.add(), where, lost)
    elif (converted := _scalar(field, other, item, where, lost)) is not None:
        container.append(converted)


def _scalar(field: FieldDescriptor, other: FieldDescriptor, value: object, where: str, lost: list[str]) -> object:
    """`value` for `other`: enum values go by name (None, and reported, when the target lacks it)."""
    if field.type != ENUM:
        return value
    name = field.enum_type.values_by_number[value].name
    target = other.enum_type.values_by_name.get(name)
    if target is None:
        lost.append(f"{where}={name}")
        return None
    return target.number


def _only(source: object, field: FieldDescriptor, value: object) -> bytes:
    """The wire bytes of one field of `source`."""
    alone = type(source)()
    if _repeated(field):
        getattr(alone, field.name).extend(value)
    elif field.type == MESSAGE:
        getattr(alone, field.name).CopyFrom(value)
    else:
        setattr(alone, field.name, value)
    return alone.SerializePartialToString()


def _unknown_only(source: object) -> bytes:
    """The wire bytes of the fields `source`'s own schema does not know."""
    rest = type(source)()
    rest.CopyFrom(source)
    for field, _ in rest.ListFields():
        rest.ClearField(field.name)
    return rest.SerializePartialToString()


def _carry(raw: bytes, target: object, where: str, lost: list[str]) -> None:
    """Keep `raw` as unknown fields of `target`, unless their numbers mean something else there."""
    if not raw:
        return
    probe = type(target)()
    probe.MergeFromString(raw)
    if probe.ListFields():
        lost.append(where)
    else:
        target.MergeFromString(raw)
