"""Load a site file, merge its layers once, validate, and report every problem.

Merge rule (the only one): ``defaults`` -> each group the node lists, in the order it
lists them -> the node itself. Mappings merge key by key, recursively; lists and scalars
from a later layer replace the earlier value whole (so ``vllm.services`` is never spliced).
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from gpunode.model import NodeProfile, ProfileProblems, check_fleet
from gpunode.model.profile import FROM_LOCK
from gpunode.model.site import GROUP_NAME, SITE_KEYS, SiteMeta

DEFAULT_SITE = Path("inventory/site.yaml")
Path_ = tuple[str | int, ...]


class SiteError(Exception):
    """Invalid input: one line per problem in ``lines``. Nothing has been touched."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Site:
    path: Path
    meta: SiteMeta
    nodes: dict[str, NodeProfile]
    groups: dict[str, list[str]] = field(default_factory=dict)

    def select(self, names: list[str] | None) -> list[NodeProfile]:
        """Nodes by name or group name; all nodes when names is empty."""
        if not names:
            return list(self.nodes.values())
        chosen: dict[str, NodeProfile] = {}
        unknown = []
        for name in names:
            if name in self.nodes:
                chosen[name] = self.nodes[name]
            elif name in self.groups:
                chosen.update({h: self.nodes[h] for h in self.groups[name]})
            else:
                unknown.append(name)
        if unknown:
            known = sorted(self.nodes) + sorted(self.groups)
            raise SiteError([f"{self.path}: unknown node or group {u!r}"
                             f"{_suggest(u, known)}; known: {', '.join(known)}"
                             for u in unknown])
        return list(chosen.values())


def resolve_site_path(option: str | os.PathLike[str] | None = None) -> Path:
    """--site, else $GPUNODE_SITE, else inventory/site.yaml."""
    if option:
        return Path(option)
    if os.environ.get("GPUNODE_SITE"):
        return Path(os.environ["GPUNODE_SITE"])
    return DEFAULT_SITE


# --- YAML with line numbers -------------------------------------------------------------

class _LineLoader(yaml.SafeLoader):
    pass


class LineDict(dict):
    """A mapping that remembers the line (1-based) of each key."""

    lines: dict[Any, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - own  # pairs from `<<: *alias` come first; own keys override
    result = LineDict()
    result.lines = {}
    own_keys: set[Any] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found unhashable key (a mapping key must be a plain value)",
                key_node.start_mark) from None
        if i >= merged:
            if key in own_keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            own_keys.add(key)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


#: Problems reported at most (a generated file can hold thousands of the same mistake).
MAX_PROBLEMS = 200
#: Group names the engines define themselves.
#: Groups Ansible and pyinfra define, and the ones gpunode's inventories add per node kind.
KIND_GROUPS = {"pve-host": "gpunode_pve_hosts"}
RESERVED_GROUPS = frozenset({"all", "ungrouped", *KIND_GROUPS.values()})
#: The most values a site document may expand to through aliases (a large site has a few
#: thousand); beyond it, loading would take exponential time and memory.
MAX_YAML_NODES = 200_000


def _expanded_size(root: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded (aliases share
    composed nodes, so this is computed per distinct node). A recursive alias is refused."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in active:
            raise yaml.constructor.ConstructorError(
                None, None, "recursive alias (a value that contains itself)", node.start_mark)
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = " (copy one of inventory/examples/*.yaml to inventory/site.yaml, or pass --site)"
        raise SiteError([f"{path}: site file not found{hint}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteError([f"{path}: cannot read: {exc}"]) from None
    try:
        loader = _LineLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            size = _expanded_size(node)
            if size > MAX_YAML_NODES:
                raise SiteError([f"{path}: YAML aliases expand the document to more than "
                                 f"{MAX_YAML_NODES:,} values (an alias bomb?); write the "
                                 "values out or use fewer nested aliases"])
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise SiteError([f"{path}: YAML nesting is too deep"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None and "\t" in problem or "'\\t'" in str(exc):
            problem += " (YAML indentation must use spaces, not tabs)"
        raise SiteError([f"{where}: YAML syntax error: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise SiteError([f"{path}: YAML error: {exc}"]) from None


# --- merging ----------------------------------------------------------------------------

def merge(base: Any, over: Any) -> Any:
    """Maps merge recursively; anything else from ``over`` replaces ``base``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _leaf_paths(data: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    if isinstance(data, dict):
        yield prefix
        for key, value in data.items():
            yield from _leaf_paths(value, prefix + (key,))
    else:
        yield prefix


# --- unknown keys -----------------------------------------------------------------------

def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(model class, is list of it, is free-form dict) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found[0] is not None or found[2]:
                return found
        return None, False, False
    if origin is list:
        model, _, _ = _model_of(typing.get_args(annotation)[0])
        return model, model is not None, False
    if origin is dict:
        return None, False, True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, False
    return None, False, False


def unknown_keys(data: Any, model: type[BaseModel], prefix: str,
                 skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[Any], str]]:
    """Yield (field path, key path for the line lookup, message) per unknown key."""
    if not isinstance(data, dict):
        return
    allowed = [name for name in model.model_fields if name not in skip]
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in allowed:
            yield path, [key], (f"unknown key {key!r}{_suggest(str(key), allowed)}; allowed: "
                                f"{', '.join(allowed)}")
            continue
        sub, is_list, _ = _model_of(model.model_fields[key].annotation)
        if sub is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                for p, keys, msg in unknown_keys(item, sub, f"{path}[{i}]"):
                    yield p, [key, i, *keys], msg
        elif isinstance(value, dict):
            for p, keys, msg in unknown_keys(value, sub, path):
                yield p, [key, *keys], msg


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = model.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[info.annotation, *info.metadata])  # type: ignore[valid-type]


def layer_errors(data: Any, model: type[BaseModel], prefix: str,
                 skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[Any], str]]:
    """Type-check one partial layer (defaults, a group, a node) as a layer: every value it
    sets must be valid for its field on its own, so a wrong-typed value can never replace
    an inherited map silently, and groups no node uses are checked too. Sections merge, so
    they may be partial; list items replace whole, so they must be complete. Yields (field
    path, key path for the line lookup, message); unknown keys are unknown_keys' job."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if key in skip or key not in model.model_fields:
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        sub, is_list, _ = _model_of(model.model_fields[key].annotation)
        if sub is not None and not is_list and isinstance(value, dict):
            yield from ((p, [key, *k], m) for p, k, m in layer_errors(value, sub, path))
            continue
        if sub is not None and not is_list and value is not None:
            yield path, [key], (f"must be a mapping (a {sub.__name__} section), got "
                                f"{type(value).__name__} {_short(value)}")
            continue
        try:
            _field_adapter(model, key).validate_python(value)
        except ValidationError as exc:
            for loc, message in error_messages(exc):
                sub_path = path + "".join(f"[{k}]" if isinstance(k, int) else f".{k}"
                                          for k in loc)
                yield sub_path, [key, *loc], message


def error_messages(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """One (location, message) per problem: the alternatives of a union are folded into
    one message; unknown keys are left out (reported at the layer that holds them)."""
    grouped: dict[tuple[str | int, ...], list[Any]] = {}
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            continue
        grouped.setdefault(_field_loc(tuple(err["loc"])), []).append(err)
    out = []
    for loc, errs in grouped.items():
        if len(errs) == 1:
            out.append((loc, _error_message(errs[0], loc)))
            continue
        options = list(dict.fromkeys(_clean(e["msg"]) for e in errs))
        out.append((loc, f"invalid value {_short(errs[0].get('input'))}: "
                         + "; or ".join(options)))
    return out


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error_message(err: Any, loc: tuple[str | int, ...]) -> str:
    if err["type"] == "missing":
        return "required field is missing"
    if len(loc) < len(err["loc"]):
        return f"invalid value {_short(err.get('input'))}: {_clean(err['msg'])}"
    if err["type"] == "string_pattern_mismatch":
        return _pattern_message(err)
    return _clean(err["msg"])


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line_of(data: Any, keys: list[Any]) -> int | None:
    line = None
    for key in keys:
        if isinstance(data, LineDict) and key in data:
            line = data.lines.get(key, line)
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
            if isinstance(data, LineDict) and data.lines:
                line = min(data.lines.values())
        else:
            break
    return line


# --- loading ----------------------------------------------------------------------------

def _loc_str(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_site(path: str | os.PathLike[str] | None = None) -> Site:
    """Read, merge and validate a site file. Raises SiteError listing every problem."""
    site_path = resolve_site_path(path)
    raw = read_yaml(site_path)
    lines: list[str] = []
    seen: set[str] = set()

    def report(layer_keys: list[Any], field_path: str, message: str) -> None:
        line = _line_of(raw, layer_keys)
        where = f"{site_path}:{line}" if line else str(site_path)
        entry = f"{where}: {field_path}: {message}" if field_path else f"{where}: {message}"
        if entry not in seen and len(lines) < MAX_PROBLEMS:
            seen.add(entry)
            lines.append(entry)
        elif len(lines) == MAX_PROBLEMS and entry not in seen:
            seen.add(entry)
            lines.append(f"{site_path}: more problems not shown (the first {MAX_PROBLEMS} are "
                         "above)")

    if not isinstance(raw, dict):
        raise SiteError([f"{site_path}: a site file is a mapping with keys {', '.join(SITE_KEYS)}"])
    for key in raw:
        if key not in SITE_KEYS:
            report([key], str(key), f"unknown key{_suggest(str(key), list(SITE_KEYS))}; "
                   f"allowed: {', '.join(SITE_KEYS)}")
    meta_raw = raw.get("site") or {}
    defaults = raw.get("defaults") or {}
    groups = raw.get("groups") or {}
    nodes = raw.get("nodes")
    for name, value in (("defaults", defaults), ("groups", groups), ("nodes", nodes)):
        if value is not None and not isinstance(value, dict):
            report([name], name, "must be a mapping")
    if not isinstance(nodes, dict) or not nodes:
        report(["nodes"], "nodes", "a site needs at least one node")
    if lines:
        raise SiteError(lines)

    for field_path, sub_keys, message in unknown_keys(meta_raw, SiteMeta, "site"):
        report(["site", *sub_keys], field_path, message)
    try:
        meta = SiteMeta.model_validate(meta_raw)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] != "extra_forbidden":
                report(["site", *err["loc"]], _loc_str(("site", *err["loc"])), err["msg"])
        meta = SiteMeta()

    bad_layers: set[tuple[Any, ...]] = set()  # layers with type errors (already reported)
    # `name` comes from the key, FROM_LOCK from <site>.lock: none is written in a site
    layers: list[tuple[list[Any], Any, frozenset[str]]] = [(["defaults"], defaults,
                                                          frozenset({"name", "groups", *FROM_LOCK}))]
    for gname, gdata in groups.items():
        if not isinstance(gname, str) or not re.fullmatch(GROUP_NAME, gname):
            report(["groups", gname], f"groups.{gname}", "group names are lower-case letters, "
                   "digits and _ (they become Ansible group names)")
        elif gname in RESERVED_GROUPS:
            report(["groups", gname], f"groups.{gname}", f"{gname!r} is a group Ansible, "
                   "pyinfra or gpunode's inventories define themselves; choose another name")
        elif isinstance(nodes, dict) and gname in nodes:
            report(["groups", gname], f"groups.{gname}", f"{gname!r} is also a node name; "
                   "Ansible keeps hosts and groups in one namespace")
        if gdata is not None and not isinstance(gdata, dict):
            report(["groups", gname], f"groups.{gname}", "must be a mapping")
            continue
        layers.append((["groups", gname], gdata or {}, frozenset({"name", "groups", *FROM_LOCK})))
    for nname, ndata in nodes.items():
        if ndata is not None and not isinstance(ndata, dict):
            report(["nodes", nname], f"nodes.{nname}", "must be a mapping")
            continue
        layers.append((["nodes", nname], ndata or {}, frozenset({"name", *FROM_LOCK})))
    for keys, data, skip in layers:
        prefix = ".".join(str(k) for k in keys)
        for field_path, sub_keys, message in unknown_keys(data, NodeProfile, prefix, skip):
            report([*keys, *sub_keys], field_path, message)
        for field_path, sub_keys, message in layer_errors(data, NodeProfile, prefix,
                                                          skip | {"groups"}):
            report([*keys, *sub_keys], field_path, message)
            bad_layers.add(tuple(keys))

    profiles: dict[str, NodeProfile] = {}
    origins: dict[str, dict[Path_, list[Any]]] = {}
    members: dict[str, list[str]] = {g: [] for g in groups}
    for nname, ndata in nodes.items():
        ndata = ndata if isinstance(ndata, dict) else {}
        node_groups = ndata.get("groups", [])
        if not isinstance(node_groups, list):
            report(["nodes", nname, "groups"], f"nodes.{nname}.groups", "must be a list")
            continue
        merged: Any = merge({}, defaults)
        origin: dict[Path_, list[Any]] = {p: ["defaults"] for p in _leaf_paths(defaults)}
        bad_group = False
        for gname in node_groups:
            if not isinstance(gname, str):
                report(["nodes", nname, "groups"], f"nodes.{nname}.groups",
                       f"group entries are group names (strings), got {gname!r}")
                bad_group = True
                continue
            if gname not in groups:
                report(["nodes", nname, "groups"], f"nodes.{nname}.groups",
                       f"unknown group {gname!r}{_suggest(str(gname), list(groups))}; "
                       f"defined groups: {', '.join(map(str, groups)) or 'none'}")
                bad_group = True
                continue
            members[gname].append(nname)
            gdata = groups[gname] or {}
            merged = merge(merged, gdata)
            origin.update({p: ["groups", gname] for p in _leaf_paths(gdata)})
        merged = merge(merged, ndata)
        origin.update({p: ["nodes", nname] for p in _leaf_paths(ndata)})
        merged["name"] = nname
        if bad_group or {("defaults",), ("nodes", nname),
                         *(("groups", g) for g in node_groups)} & bad_layers:
            continue  # its problems were reported where they are
        try:
            profile = NodeProfile.model_validate(merged)
        except ValidationError as exc:
            cross = _profile_problems(exc)
            if cross is None:
                for loc, message in error_messages(exc):
                    layer = _origin_of(origin, loc) or ["nodes", nname]
                    field_path = ".".join(str(k) for k in layer) + "." + _loc_str(loc)
                    report([*layer, *loc], field_path, message)
                continue
            for problem in cross.problems:
                keys = _keys_of(problem.path)
                layer = _origin_of(origin, tuple(keys)) or ["nodes", nname]
                prefix = ".".join(str(k) for k in layer)
                report([*layer, *keys], f"{prefix}.{problem.path}", problem.message)
            profile = cross.profile  # fields are valid: the fleet rules still see the node
        profiles[nname] = profile
        origins[nname] = origin
    for nname, problem in check_fleet(profiles):
        keys = _keys_of(problem.path)
        layer = _origin_of(origins[nname], tuple(keys)) or ["nodes", nname]
        prefix = ".".join(str(k) for k in layer)
        report([*layer, *keys], f"{prefix}.{problem.path}", problem.message)
    if lines:
        raise SiteError(lines)
    site = Site(path=site_path, meta=meta, nodes=profiles, groups=members)
    # pve-guest nodes whose connection.address is "auto" get the address their guest agent
    # reported at the last `gpunode provision` (recorded next to the site file).
    from gpunode.proxmox.run import use_recorded_addresses

    use_recorded_addresses(site)
    return site


def _profile_problems(exc: ValidationError) -> ProfileProblems | None:
    """The cross-field problems NodeProfile's validator raised (None: field errors; the
    validator runs only once every field is valid, so the two never come together)."""
    for err in exc.errors():
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, ProfileProblems):
            return error
    return None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "function-after", "literal",
              "constrained-int", "constrained-str", "constrained-float", "none"}


def _field_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Cut pydantic's union/type tags (e.g. 'str', 'list[...]') off an error location."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            return loc[:i]
    return loc


def _pattern_message(err: dict[str, Any]) -> str:
    from gpunode.model.parts import PCI_ADDRESS

    pattern = (err.get("ctx") or {}).get("pattern")
    if pattern == PCI_ADDRESS:
        return (f"{err.get('input')!r} is not a lower-case PCI address dddd:bb:ss[.f] "
                "(e.g. 0000:41:00.0)")
    return f"{err.get('input')!r} does not match the pattern {pattern}"


def _origin_of(origin: dict[Path_, list[Any]], loc: tuple[str | int, ...]) -> list[Any] | None:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in origin:
            return origin[loc[:cut]]
    return None


def _keys_of(path: str) -> list[Any]:
    keys: list[Any] = []
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            keys.append(int(part.strip("[]")))
        elif part:
            keys.append(part)
    return keys
