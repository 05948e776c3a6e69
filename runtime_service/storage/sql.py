"""SQL text written once, with `:name` parameters, and each driver's form derived from it.

The parameters are read from the text once, when a statement is defined. sqlite3 takes `:name`
as it is; psycopg takes `%(name)s`; a PostgreSQL prepared statement takes `$n` with each
parameter's type, which the statement declares beside its text (PREPARE is told the types
because a parameter used in two contexts, a step number compared and concatenated, could
otherwise be inferred as the wrong one). A parameter without a declared type, or a type for a
parameter the text does not use, fails when the statement is defined (at import); a call that
does not bind every parameter fails naming the statement and the parameter.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

# `:name`, but not the second colon of a `::type` cast.
_PARAMETER = re.compile(r"(?<!:):([a-z_][a-z_0-9]*)")
_names = (f"stopline_{n}" for n in itertools.count(1))


class Sql:
    """One statement's text and the names of its parameters, in order of first use."""

    __slots__ = ("names", "pyformat", "required", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.names: tuple[str, ...] = tuple(dict.fromkeys(_PARAMETER.findall(text)))
        self.required = frozenset(self.names)
        self.pyformat = _PARAMETER.sub(r"%(\1)s", text.replace("%", "%%"))

    def check(self, params: Mapping[str, Any]) -> None:
        """Fail clearly when `params` leaves a parameter of this statement unbound."""
        missing = self.required.difference(params)
        if missing:
            raise KeyError(f"no value for {', '.join(sorted(missing))} in {self.text.strip()!r}")


class PgSql(Sql):
    """A PostgreSQL statement, with the type of each parameter declared beside its text, and
    its prepared form (see pg_batch)."""

    __slots__ = ("execute", "prepare")

    def __init__(self, text: str, **types: str) -> None:
        super().__init__(text)
        undeclared = [name for name in self.names if name not in types]
        unused = sorted(set(types) - self.required)
        if undeclared or unused:
            raise ValueError(
                f"parameter types must match the statement's parameters: "
                f"undeclared {undeclared}, unused {unused}, in {text.strip()!r}"
            )
        position = {name: i for i, name in enumerate(self.names, 1)}
        body = _PARAMETER.sub(lambda match: f"${position[match.group(1)]}", text)
        name = next(_names)
        declared = ", ".join(types[p] for p in self.names)
        self.prepare = f"PREPARE {name} ({declared}) AS {body}"
        self.execute = f"EXECUTE {name}({', '.join(f'%({p})s' for p in self.names)})"
