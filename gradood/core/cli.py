"""The jobs' command line: ``key=value`` settings, ``--help`` generated from the config dataclasses, and
one-line errors for a bad key or value (exit status 2, no traceback).

A job's settings are a dataclass tree; each field's documentation is the ``#:`` comment above it in the
source, the same text the configuration reference is written from.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from difflib import get_close_matches
from typing import Any

#: exit status of a job given a bad key or value (the convention of argparse and most Unix tools)
USAGE_ERROR = 2
HELP_FLAGS = ("-h", "--help")
#: settings that were renamed (old key -> new key); the old key fails with a message naming the new one
RENAMED_KEYS = {
    "train.limit": "train.size",
    "corpus.limit": "corpus.size",
    "train.use_gpu": "train.gpus_per_worker",
    "train.storage_path": "train.runs_uri",
    "extract.num_gpus_per_worker": "extract.gpus_per_worker",
    "detect.detector": "detect.test",
    "evaluate.extra_sources": "evaluate.ood",
}


class ConfigError(ValueError):
    """A setting that does not exist, or a value that a setting cannot take; the message is one line."""


def check_dotlist(items: Sequence[str]) -> None:
    """Every command-line setting is ``key=value``; a bare word would silently set a key to null."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r}: settings are key=value (see --help)")


def unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    """The error for a key the job does not have, naming the closest valid keys (or, for a renamed
    key, its new name)."""
    if key in RENAMED_KEYS and RENAMED_KEYS[key] in valid:
        return ConfigError(f"{key} was renamed to {RENAMED_KEYS[key]}")
    section, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
    if siblings:  # the section exists: a typo in the last part
        close = [f"{section}.{m}" if section else m for m in get_close_matches(leaf, siblings, 3, 0.6)]
    else:  # a typo in the section: the whole key, or keys with the same last part
        close = get_close_matches(key, valid, 3, 0.6) or [k for k in valid if k.endswith(f".{leaf}")][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help for the keys"
    return ConfigError(f"unknown key {key}{hint}")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its ``#:`` comment (joined lines) in the source of the dataclass or of the base
    class that declares it; the class docstring is not a field's documentation."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):  # a subclass's comment wins over its base's
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def leaf_settings(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, documentation) of every setting of a dataclass instance, in field order;
    nested dataclasses are walked, dicts and lists are one setting each."""
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaf_settings(value, f"{key}.")
        else:
            yield key, value, docs.get(f.name, "")


def setting_keys(cfg: Any) -> list[str]:
    return [key for key, _, _ in leaf_settings(cfg)]


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shown(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def help_text(usage: str, cfg: Any, note: str = "") -> str:
    """Usage, then every key with its current default and its documentation."""
    out = [usage.strip(), ""]
    if note:
        out += [note.strip(), ""]
    out.append("settings (key=value; the default follows '='):")
    for key, value, doc in leaf_settings(cfg):
        out.append(f"  {key}={_shown(value)}")
        choice = value[0] if isinstance(value, list) and value else value
        if isinstance(choice, enum.Enum):
            doc = f"{doc} (one of: {', '.join(str(c.value) for c in type(choice))})".strip()
        if doc:
            out += textwrap.wrap(
                doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False
            )
    return "\n".join(out)


def run_job(main: Callable[[list[str]], int], argv: Sequence[str], show_help: Callable[[], str]) -> int:
    """Run a job's ``main``: ``--help`` prints ``show_help()``; a :class:`ConfigError` prints one line
    to stderr and gives exit status 2."""
    args = list(argv)
    if any(a in HELP_FLAGS for a in args):
        print(show_help())
        return 0
    try:
        return main(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
