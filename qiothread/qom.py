"""A small QOM: user-creatable objects with typed properties.

QEMU's object model is far larger than what qiothread needs.  What users
meet of it here is ``-object TYPE,id=ID,...`` on the command line, QMP's
``object-add``/``object-del``, and ``qom-list``/``qom-get``/``qom-set``
on ``/objects/ID`` (reference §8).  This module keeps exactly the
behaviour visible through those, with QEMU's messages:

- Creating an object checks its options in QAPI order: ``qom-type``,
  ``id``, then each property's *type* (the visitor's message: ``expects
  integer`` on the command line, ``Invalid parameter type ...`` in JSON),
  then unexpected keys.  Only then are the properties stored one by one
  through their setters, which make the *range* checks, and finally the
  object is completed (an IOThread starts its process there).
- A setter stores its value before it tells the object.  When the object
  then rejects the combination (``bad thread-pool-min/thread-pool-max
  values``) the value stays stored, as QEMU 7.2 does; ``qom-get`` shows
  it (reference §8.1, "verified quirk").
- Every property is an int64 except the read-only ``type`` and the
  enum-like string properties a type declares in ``STR_PROPERTIES``
  (an iothread's ``poll-policy``, a qiothread extension for issue 7),
  which are checked against their list of values.  Extensions that the
  imitated QEMU release lacks are listed in ``HIDDEN``: accepted, but
  not shown by ``help`` or ``qom-list``.

Thread-safety: an object and the root are used from one thread at a
time (the main thread, or QMP's worker thread which QEMU also serialises
under its big lock); nothing here is shared with iothread processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from qiothread.errors import ConfigError, QMPCommandError
from qiothread.keyval import INT64_MAX, InputVisitor, ParsedOption
from qiothread.process import Supervisor

__all__ = [
    "Int64Property",
    "ObjectRoot",
    "StrProperty",
    "UserCreatable",
    "id_wellformed",
]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
OBJECTS = "/objects"


def id_wellformed(object_id: str) -> bool:
    """QEMU's rule for ids: a letter, then letters, digits, ``-._``."""
    return _ID.match(object_id) is not None


@dataclass(frozen=True)
class Int64Property:
    """An int64 property that refuses negative values."""

    name: str
    default: int

    def check(self, value: int) -> None:
        """:raises ConfigError: QEMU's range message for ``value < 0``."""
        if value < 0:
            raise ConfigError(
                f"{self.name} value must be in range [0, {INT64_MAX}]")


@dataclass(frozen=True)
class StrProperty:
    """A string property with a fixed set of values (a QAPI enum)."""

    name: str
    default: str
    choices: tuple[str, ...]

    def check(self, value: str) -> None:
        """:raises ConfigError: QAPI's enum message."""
        if value not in self.choices:
            raise ConfigError(
                f"Parameter '{self.name}' does not accept value "
                f"'{value}'")


class UserCreatable:
    """Base of the ``-object`` types (QEMU's ``TYPE_USER_CREATABLE``).

    Subclasses name their QOM type and list their properties twice: in
    QAPI order (how options are visited) and in ``qom-list`` order.
    """

    #: QOM type name, e.g. ``iothread``.
    TYPE: ClassVar[str]
    #: Properties in the QAPI schema's visit order.
    PROPERTIES: ClassVar[tuple[Int64Property, ...]]
    #: Property names as ``qom-list`` shows them after ``type``.
    QOM_LIST_ORDER: ClassVar[tuple[str, ...]]
    #: String properties, visited after the int64 ones.
    STR_PROPERTIES: ClassVar[tuple[StrProperty, ...]] = ()
    #: qiothread's own properties, which the QEMU release it imitates
    #: does not have: settable and readable, but left out of ``help``
    #: and ``qom-list`` so that those stay QEMU's.
    HIDDEN: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, object_id: str) -> None:
        #: The id under ``/objects``.
        self.id = object_id
        self._values: dict[str, int] = {
            p.name: p.default for p in self.PROPERTIES}
        self._strs: dict[str, str] = {
            p.name: p.default for p in self.STR_PROPERTIES}
        #: True once :meth:`complete` succeeded.
        self.completed = False

    @classmethod
    def new(cls, object_id: str, root: ObjectRoot) -> UserCreatable:
        """``object_new`` for ``root``; override to take what the
        object needs from it (an IOThread takes its supervisor)."""
        return cls(object_id)

    @classmethod
    def property(cls, name: str) -> Int64Property | None:
        """The declaration of ``name``, or ``None``."""
        for p in cls.PROPERTIES:
            if p.name == name:
                return p
        return None

    @classmethod
    def str_property(cls, name: str) -> StrProperty | None:
        """The declaration of string property ``name``, or ``None``."""
        for p in cls.STR_PROPERTIES:
            if p.name == name:
                return p
        return None

    def get_str(self, name: str) -> str:
        """The stored value of string property ``name``."""
        return self._strs[name]

    def set_str(self, name: str, value: str) -> None:
        """A string property's setter (see :meth:`set`)."""
        prop = self.str_property(name)
        if prop is None:
            raise ConfigError(f"Property '{self.TYPE}.{name}' not found")
        prop.check(value)
        self._strs[name] = value
        self.property_updated(name)

    def get(self, name: str) -> int:
        """The stored value of property ``name``."""
        return self._values[name]

    def set(self, name: str, value: int) -> None:
        """Run property ``name``'s setter with an int64 ``value``.

        :raises ConfigError: out of range (nothing stored), or rejected
            by the object after storing (the value stays, as in QEMU).
        """
        prop = self.property(name)
        if prop is None:
            raise ConfigError(f"Property '{self.TYPE}.{name}' not found")
        prop.check(value)
        self._values[name] = value
        self.property_updated(name)

    def property_updated(self, name: str) -> None:
        """Hook: property ``name`` was stored.  May raise ConfigError."""

    def complete(self) -> None:
        """Hook: all creation-time properties are set (QEMU's
        ``user_creatable_complete``).  May raise ConfigError."""
        self.completed = True

    def can_be_deleted(self) -> bool:
        """Hook: False while something uses the object."""
        return True

    def finalize(self) -> None:
        """Hook: the object leaves ``/objects``; release everything."""

    def qom_list(self) -> list[dict[str, str]]:
        """``qom-list`` of this object, in QMP's shape."""
        return [{"name": "type", "type": "string"}] + [
            {"name": n, "type": "string" if self.str_property(n) else "int"}
            for n in self.QOM_LIST_ORDER]

    def qom_get(self, name: str) -> int | str:
        """``qom-get``: the ``type`` string or an int64 property.

        :raises ConfigError: no such property.
        """
        if name == "type":
            return self.TYPE
        if self.str_property(name) is not None:
            return self.get_str(name)
        if self.property(name) is None:
            raise ConfigError(f"Property '{self.TYPE}.{name}' not found")
        return self.get(name)

    def qom_set(self, name: str, value: Any) -> None:
        """``qom-set`` with a JSON ``value``, QMP's type rules.

        :raises ConfigError: unknown or read-only property, wrong JSON
            type, out of range, or rejected by the object.
        """
        if name == "type":
            raise ConfigError(
                "Insufficient permission to perform this operation")
        if self.str_property(name) is not None:
            text = InputVisitor({name: value}, keyval=False).type_str(
                name, required=True)
            assert text is not None
            self.set_str(name, text)
            return
        if self.property(name) is None:
            raise ConfigError(f"Property '{self.TYPE}.{name}' not found")
        v = InputVisitor({name: value}, keyval=False)
        parsed = v.type_int64(name, required=True)
        assert parsed is not None
        self.set(name, parsed)

    @classmethod
    def help_text(cls) -> str:
        """What ``-object TYPE,help`` prints."""
        lines = [f"{cls.TYPE} options:"]
        lines += sorted(
            [f"  {p.name}=<int>" for p in cls.PROPERTIES
             if p.name not in cls.HIDDEN]
            + [f"  {p.name}=<{'|'.join(p.choices)}>"
               for p in cls.STR_PROPERTIES if p.name not in cls.HIDDEN])
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self._values}>"


class ObjectRoot:
    """``/objects``: the user-created objects, by id.

    ``types`` maps each accepted ``qom-type`` to its class.  The order of
    ``objects`` is creation order; QEMU's own walk order differs and is
    not promised to anyone (reference §8.3).
    """

    def __init__(self, types: Mapping[str, type[UserCreatable]],
                 supervisor: Supervisor | None = None,
                 type_options: Mapping[str, dict[str, Any]] | None = None
                 ) -> None:
        self.types = dict(types)
        #: Starts the processes of objects that have one (iothreads);
        #: None lets each such object supervise its own.
        self.supervisor = supervisor
        #: Extra constructor keywords per type, for options that are no
        #: QOM property (an iothread's fd monitor and polling policy).
        self.type_options = dict(type_options or {})
        #: id -> object, in creation order.
        self.objects: dict[str, UserCreatable] = {}

    # -- creation -------------------------------------------------------

    def help_text(self, option: ParsedOption) -> str:
        """What ``-object ...,help`` prints for this option."""
        qom_type = option.data.get("qom-type")
        cls = self.types.get(qom_type) if isinstance(qom_type, str) \
            else None
        if cls is not None:
            return cls.help_text()
        return "List of user creatable objects:\n" + "".join(
            f"  {t}\n" for t in sorted(self.types))

    def object_add(self, option: ParsedOption) -> UserCreatable:
        """Create an object from a parsed ``-object`` option.

        The option's syntax (keyval or JSON) selects the messages.

        :raises ConfigError: any rejection, with QEMU's message; nothing
            is left in ``/objects`` then.
        """
        v = option.visitor()
        qom_type = v.type_str("qom-type", required=True)
        assert qom_type is not None
        cls = self.types.get(qom_type)
        if cls is None:
            raise ConfigError(
                f"Parameter 'qom-type' does not accept value '{qom_type}'")
        object_id = v.type_str("id", required=True)
        assert object_id is not None
        values: list[tuple[str, int]] = []
        for prop in cls.PROPERTIES:
            value = v.type_int64(prop.name)
            if value is not None:
                values.append((prop.name, value))
        strs: list[tuple[str, str]] = []
        for sprop in cls.STR_PROPERTIES:
            text = v.type_str(sprop.name)
            if text is not None:
                strs.append((sprop.name, text))
        v.check_struct()
        return self._add(cls, object_id, values, strs)

    def object_add_qmp(self, qom_type: str, object_id: str,
                       props: Mapping[str, Any]) -> UserCreatable:
        """QMP ``object-add``: JSON values, QMP's messages."""
        data = {"qom-type": qom_type, "id": object_id, **props}
        return self.object_add(ParsedOption(data, keyval=False))

    def _add(self, cls: type[UserCreatable], object_id: str,
             values: Iterable[tuple[str, int]],
             strs: Iterable[tuple[str, str]] = ()) -> UserCreatable:
        if not id_wellformed(object_id):
            raise ConfigError("Parameter 'id' expects an identifier")
        obj = cls.new(object_id, self)
        for name, value in values:
            obj.set(name, value)
        for name, text in strs:
            obj.set_str(name, text)
        if object_id in self.objects:
            raise ConfigError(
                f"attempt to add duplicate property '{object_id}' to "
                "object (type 'container')")
        try:
            obj.complete()
        except BaseException:
            # QEMU unparents an object whose completion failed, which
            # finalizes it: nothing it set up may stay behind.
            obj.finalize()
            raise
        self.objects[object_id] = obj
        return obj

    def object_del(self, object_id: str) -> None:
        """QMP ``object-del``.

        :raises QMPCommandError: no such object, or still in use.
        """
        obj = self.objects.get(object_id)
        if obj is None:
            raise QMPCommandError(f"object '{object_id}' not found")
        if not obj.can_be_deleted():
            raise QMPCommandError(
                f"object '{object_id}' is in use, can not be deleted")
        del self.objects[object_id]
        obj.finalize()

    def close(self) -> None:
        """Finalize every object, newest first (any exit path)."""
        while self.objects:
            _, obj = self.objects.popitem()
            obj.finalize()

    # -- QMP's qom-* ----------------------------------------------------

    def resolve(self, path: str) -> UserCreatable | None:
        """The object at ``/objects/ID`` or the partial path ``ID``."""
        if path.startswith(OBJECTS + "/"):
            path = path[len(OBJECTS) + 1:]
        elif path.startswith("/"):
            return None
        return self.objects.get(path)

    def _resolve_or_raise(self, path: str) -> UserCreatable:
        obj = self.resolve(path)
        if obj is None:
            raise QMPCommandError(f"Device '{path}' not found",
                                  "DeviceNotFound")
        return obj

    def qom_list(self, path: str) -> list[dict[str, str]]:
        """QMP ``qom-list``; ``/objects`` itself lists its children."""
        if path == OBJECTS:
            return [{"name": "type", "type": "string"}] + [
                {"name": i, "type": f"child<{o.TYPE}>"}
                for i, o in self.objects.items()]
        return self._resolve_or_raise(path).qom_list()

    def qom_get(self, path: str, name: str) -> int | str:
        """QMP ``qom-get``.

        :raises QMPCommandError: unknown path (``DeviceNotFound``).
        :raises ConfigError: unknown property.
        """
        return self._resolve_or_raise(path).qom_get(name)

    def qom_set(self, path: str, name: str, value: Any) -> None:
        """QMP ``qom-set`` with a JSON value.

        :raises QMPCommandError: unknown path (``DeviceNotFound``).
        :raises ConfigError: see :meth:`UserCreatable.qom_set`.
        """
        self._resolve_or_raise(path).qom_set(name, value)
