"""Reading what a user gives, within documented bounds: regular files only, sizes, YAML.

A FIFO or a device named as a recipe, an image or a checkpoint would block a reader or
never end, so only regular files are opened. A recipe is YAML without the traps of YAML:
its size, the number of nodes its aliases expand to and its nesting are bounded, and a
mapping that repeats a key is refused rather than the last value silently winning. Every
bound is stated here, in one place, and in docs/trust.md.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

import yaml

from fakd_deploy.errors import BadInput

MAX_YAML_BYTES = 1_000_000  # a recipe or class list; the shipped recipes are about 2 KB
MAX_YAML_NODES = 100_000  # scalars, lists and mappings after aliases are expanded
MAX_YAML_DEPTH = 64  # lists and mappings inside one another
MAX_METADATA_BYTES = MAX_YAML_BYTES  # one metadata value of an ONNX model or an engine's sidecar
MAX_LIST_BYTES = 64_000_000  # a split list (`image label` per line); ADE20K's is 1 MB
MAX_CLASSES = 1024  # classes of a model or dataset: ADE20K has 150, COCO-Stuff 171
MAX_CHANNELS = 2048  # the width of a model's head: 2048^2 x 9 weights per 3x3 conv
# PIL's own bound (about 9459 x 9459): decoding more could take gigabytes.
MAX_NAME_CHARS = 100  # one class name; it is printed in tables and drawn beside figures


def class_names_problem(names: object) -> str | None:
    """Why a list of class names cannot be shown and told apart, or None when it can.

    The names reach terminals, HTML pages and figures: a control character would be an
    escape sequence there, and two equal names would make two classes one in a table."""
    if not isinstance(names, list) or not names:
        return "is not a list of class names"
    if len(names) > MAX_CLASSES:
        return f"lists {len(names)} classes; the limit is {MAX_CLASSES}"
    for index, name in enumerate(names):
        if not (
            isinstance(name, str) and 1 <= len(name) <= MAX_NAME_CHARS and name.isprintable() and name.strip()
        ):
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
            return f"has {shown} at {index}: a class name is text of 1-{MAX_NAME_CHARS} printable characters"
    seen: dict[str, str] = {}  # by the name without its outer spaces: "a" and "a " look alike in a table
    for name in names:
        if name.strip() in seen:
            earlier = seen[name.strip()]
            return (
                f"names {name!r} twice"
                if earlier == name
                else f"names {earlier!r} and {name!r}, which look alike"
            )
        seen[name.strip()] = name
    return None


# Settings far beyond any real deployment: a larger value is a typo that would exhaust memory
# or start a thread per unit before anything could say so.
MAX_SIDE = 8192  # pixels, of a crop, resize, window or exported input
MAX_BATCH = 1024
MAX_THREADS = 512
MAX_SCALE = 4.0  # a test-time scale
MAX_IMAGE_PIXELS = 89_478_485


def open_regular(path: str | Path, what: str, error: type[BadInput] = BadInput) -> IO[bytes]:
    """`path` opened for reading, if it is a regular file; else one line saying what it is.

    The file is opened without blocking and checked on the open descriptor, so a FIFO
    cannot hang the reader and nothing can be swapped in between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{what} {path} is {kind}; only regular files are read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(path: str | Path, what: str, limit: int, error: type[BadInput] = BadInput) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    with open_regular(path, what, error) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes, the limit for a {what}")
    return data


def read_text(path: str | Path, what: str, limit: int, error: type[BadInput] = BadInput) -> str:
    try:
        return read_bounded(path, what, limit, error).decode()
    except UnicodeDecodeError as failure:
        raise error(f"{what} {path} is not UTF-8 text ({failure.reason} at byte {failure.start})") from None


def parse_json(text: str | bytes, source: str, error: type[BadInput] = BadInput, remedy: str = "") -> Any:
    """JSON text as plain data, or one line naming `source`; nesting too deep for the
    parser (a few hundred kilobytes of `[`) is refused like any other malformed file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as failure:
        reason = f"{failure.msg} at line {failure.lineno}"
    except RecursionError:
        reason = "it nests too deeply"
    except ValueError as failure:  # UnicodeDecodeError included
        reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    raise error(f"{source} is not valid JSON ({reason}){remedy}")


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses repeated keys; `load_yaml` bounds what it builds."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    mark = key.start_mark
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key '{key.value}' appears twice in one mapping", mark
                    )
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def expanded_size(node: yaml.Node, depth: int = 0, sizes: dict[int, int] | None = None) -> int:
    """How many nodes `node` becomes once every alias is copied out (each shared node is
    counted once per use, computed once), refused beyond the bounds on nodes and depth."""
    sizes = {} if sizes is None else sizes
    if id(node) in sizes:
        return sizes[id(node)]
    if depth > MAX_YAML_DEPTH:
        raise ValueError(f"it nests lists and mappings more than {MAX_YAML_DEPTH} deep")
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(expanded_size(child, depth + 1, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(
            expanded_size(key, depth + 1, sizes) + expanded_size(value, depth + 1, sizes)
            for key, value in node.value
        )
    if size > MAX_YAML_NODES:
        raise ValueError(f"it expands to more than {MAX_YAML_NODES:,} values (aliases included), the limit")
    sizes[id(node)] = size
    return size


def load_yaml(text: str, source: str, error: type[BadInput] = BadInput) -> Any:
    """YAML text as plain data (mappings, lists, scalars), or one line naming `source`.

    Only plain data is built (`!!python/...` tags are refused), a key repeated in a mapping
    is refused, and the document may expand to at most MAX_YAML_NODES values.
    """
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{source} is larger than {MAX_YAML_BYTES:,} characters, the limit for YAML")
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as failure:
        raise error(f"{source} is not valid YAML: {yaml_problem(failure)}") from None
    except (ValueError, RecursionError) as failure:
        reason = str(failure) if isinstance(failure, ValueError) else "it nests too deeply"
        raise error(f"{source} is refused: {reason}") from None
    finally:
        loader.dispose()


def yaml_problem(failure: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong and where."""
    if isinstance(failure, yaml.MarkedYAMLError):
        where = failure.problem_mark or failure.context_mark
        position = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        return f"{failure.problem or failure.context}{position}"
    return str(failure).splitlines()[0] if str(failure) else type(failure).__name__
