"""YAML for configs: plain data only, YAML 1.2 booleans, a bound on what aliases expand to, errors with a line.

Presets and command-line values are read by `load_yaml`. Every problem raises `YAMLInputError` (a ValueError
whose message names where the text came from and the line), which `vae.config` turns into a `ConfigError`:

- syntax errors and tags (`!!python/object/apply:os.system`, `!foo`): the safe loader refuses tags, and its
  error is reworded with the file and line instead of a parser traceback;
- aliases: `&a [x, x]` then `[*a, *a]` doubles per level, so a few hundred bytes name billions of values
  (PyYAML builds each node once and shares it, but a config is copied and dumped expanded: a 455-byte
  preset wrote a 27.5 MB config.yaml). The composed document is measured as if every alias were a copy,
  and one over `MAX_YAML_VALUES` is refused before anything is built; a recursive alias is refused too.
"""

from __future__ import annotations

import re

import yaml

MAX_YAML_VALUES = 10_000  # nodes (keys, values, lists, mappings) once aliases are expanded; presets hold < 100


class YAMLInputError(ValueError):
    """Config text that is not plain YAML, or that expands beyond MAX_YAML_VALUES; the message names the line."""


class _YAML12Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false. Under YAML 1.1, `mixed_precision: no` reads as False."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAML12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """(label, child) pairs of a node: a mapping's keys and values, a sequence's items, none for a scalar."""
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key, value in node.value:
            label = key.value if isinstance(key, yaml.ScalarNode) else "?"
            pairs += [(label, key), (label, value)]
        return pairs
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", item) for i, item in enumerate(node.value)]
    return []


def check_expansion(root: yaml.Node, limit: int = MAX_YAML_VALUES) -> None:
    """Refuse a document whose nodes, with every alias counted as a copy, exceed `limit`, or that holds itself.

    Iterative post-order walk, each distinct node once (sizes memoised), so a bomb costs its own length to measure.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()  # ancestors of the node being visited: meeting one again is a recursive alias
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, done = stack.pop()
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for _, child in _children(node))
            if sizes[id(node)] > limit:
                raise YAMLInputError(
                    f"line {node.start_mark.line + 1}{f' ({path})' if path else ''}: expands to more than {limit:,} "
                    "values (aliases such as *name repeat what they point to): write the values out; a config "
                    "needs far fewer"
                )
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise YAMLInputError(f"line {node.start_mark.line + 1} ({path}): an alias refers to a collection that "
                                 "contains it, which would be infinite: remove the recursive alias")
        on_path.add(id(node))
        stack.append((node, path, True))
        for label, child in reversed(_children(node)):  # reversed: the stack visits them in document order,
            if id(child) not in sizes:  # so a shared node is named by its anchor's path, not an alias's
                stack.append((child, f"{path}.{label}" if path and not label.startswith("[") else path + label, False))


def _describe(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = "; ".join(p for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p) or str(err)
    if isinstance(err, yaml.constructor.ConstructorError):
        problem += " (configs are plain YAML: mappings, lists, strings, numbers, true/false, null; no tags)"
    return where + problem


def load_yaml(text: str, origin: str):
    """Plain data from YAML `text`; `origin` (a file name, an override) starts every error message."""
    loader = _YAML12Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        check_expansion(root)
        return loader.construct_document(root)
    except yaml.YAMLError as err:
        raise YAMLInputError(f"{origin}: invalid YAML at {_describe(err)}") from None
    except YAMLInputError as err:
        raise YAMLInputError(f"{origin}: {err}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise YAMLInputError(f"{origin}: nested too deeply to be a config") from None
    finally:
        loader.dispose()
