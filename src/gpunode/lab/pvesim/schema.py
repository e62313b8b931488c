"""PVE's parameter validation (SIMULATION of pve-common `PVE::JSONSchema`), with its wording.

`validate(params, table, version)` returns `{param: message}` like PVE's `errors` object;
an empty dict means the request is valid. Property strings are parsed with their real
keys (`parse_property_string`), booleans at the top level accept only `1`/`0`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from gpunode.lab.pvesim import params as tables
from gpunode.lab.pvesim.messages import msg
from gpunode.lab.pvesim.params import P

_INT_RE = re.compile(r"^[+-]?\d+$")
_NUM_RE = re.compile(r"^[+-]?(\d+\.\d+|\d+\.|\.\d+|\d+)([eE][+-]?\d+)?$")
CONFIGID_RE = re.compile(r"^(?i:[a-z][a-z0-9_-]+)$")
_STORAGE_RE = re.compile(r"^(?i:[a-z][a-z0-9\-_.]*[a-z0-9])$")
_NODE_RE = re.compile(r"^(?i:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)$")
_DNS_RE = re.compile(r"^(?:(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?)\.)*"
                     r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)$")
_URLENC_RE = re.compile(r"^[-%a-zA-Z0-9_.!~*'()]*$")
_MAC_RE = re.compile(r"^[a-f0-9][02468ace](?::[a-f0-9]{2}){5}$", re.I)


class FormatError(Exception):
    """A `die` inside a format check: the text after `invalid format - `. PVE's `die "...\n"`
    keeps its newline in the `errors` value, so the text always ends with one."""

    def __init__(self, text: str) -> None:
        super().__init__(text if text.endswith("\n") else text + "\n")


def parse_boolean(value: str) -> int | None:
    if re.fullmatch(r"1|on|yes|true", value, re.I):
        return 1
    if re.fullmatch(r"0|off|no|false", value, re.I):
        return 0
    return None


def _perl_re(pattern: str) -> str:
    return pattern.replace("(?^:", "(?:")


def config_tables(version: str) -> tuple[dict[str, P], dict[str, dict[str, P]]]:
    """The VM config keys and the property-string formats of one PVE version."""
    config = dict(tables.CONFIG)
    formats = {k: dict(v) for k, v in tables.FORMATS.items()}
    formats.update({k: dict(v) for k, v in tables.NAMED_FORMATS.items()})
    if version == "8.4":
        for k, v in tables.CONFIG_84.items():
            if v is None:
                config.pop(k, None)
            else:
                config[k] = v
        for fmt, delta in (*tables.FORMATS_84.items(), *tables.NAMED_FORMATS_84.items()):
            for k, v in delta.items():
                if v is None:
                    formats[fmt].pop(k, None)
                else:
                    formats[fmt][k] = v
    return config, formats


def endpoint_table(method: str, path: str, version: str) -> dict[str, P]:
    """All parameters of one endpoint (config keys expanded into families)."""
    raw = dict(tables.ENDPOINTS[(method, path)])
    if version == "8.4":
        for k, v in tables.ENDPOINTS_84.get((method, path), {}).items():
            if v is None:
                raw.pop(k, None)
            else:
                raw[k] = v
    out: dict[str, P] = {}
    if raw.pop("*", None) == "config":
        config, _ = config_tables(version)
        out.update(config)
    out.update(raw)  # type: ignore[arg-type]
    return out


def lookup(table: dict[str, P], key: str) -> P | None:
    """`table[key]`, resolving `net3` to the `net[n]` family."""
    if key in table:
        return table[key]
    m = re.fullmatch(r"([a-z]+)(\d+)", key)
    if m and f"{m[1]}[n]" in table and int(m[2]) < tables.FAMILIES.get(m[1], 0) \
            and str(int(m[2])) == m[2]:
        return table[f"{m[1]}[n]"]
    return None


def _check_named_format(fmt: str, value: str, path: str, formats: dict[str, dict[str, P]]
                        ) -> None:
    """Registered formats (pve-common / qemu-server `register_format`); raise FormatError."""
    if fmt.startswith("@") or fmt in tables.NAMED_FORMATS:
        name = fmt.removeprefix("@")
        parse_property_string(formats[name], value, path, formats)
        return
    if fmt == "urlencoded":
        if not _URLENC_RE.match(value):
            raise FormatError(msg("fmt_urlencoded", value=value))
    elif fmt == "pve-configid":
        if not CONFIGID_RE.match(value):
            raise FormatError(msg("fmt_configid", value=value))
    elif fmt == "pve-storage-id":
        if not _STORAGE_RE.match(value):
            raise FormatError(msg("fmt_storage_id", value=value))
    elif fmt == "pve-node":
        if not _NODE_RE.match(value):
            raise FormatError(msg("fmt_node"))
    elif fmt == "dns-name":
        if not _DNS_RE.match(value):
            raise FormatError(msg("fmt_dns"))
    elif fmt == "mac-addr":
        if not _MAC_RE.match(value):
            raise FormatError(msg("fmt_mac"))
    elif fmt == "pve-vmid":
        if not re.fullmatch(r"[1-9][0-9]{2,8}", value):
            raise FormatError(msg("fmt_vmid"))
    elif fmt in ("pve-ipv4-config", "pve-ipv6-config"):
        v6 = fmt == "pve-ipv6-config"
        special = ("dhcp", "auto", "manual") if v6 else ("dhcp", "manual")
        if value not in special and not _is_cidr(value, 6 if v6 else 4):
            raise FormatError(msg("fmt_ipconfig", family="ipv6" if v6 else "ipv4"))
    elif fmt in ("ipv4", "ipv6"):
        if not _is_ip(value, int(fmt[-1])):
            raise FormatError(msg("fmt_ip", n=fmt[-1]))
    # Other registered formats (pve-cpuset, pve-tag-list, address-list, ...) are accepted as
    # they come: pvesim does not simulate their checks (documented in README).


def _is_ip(value: str, version: int) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def _is_cidr(value: str, version: int) -> bool:
    import ipaddress

    if "/" not in value:
        return False
    try:
        return ipaddress.ip_interface(value).version == version
    except ValueError:
        return False


def check_prop(value: Any, spec: P, path: str, errors: dict[str, str],
               formats: dict[str, dict[str, P]]) -> None:
    """PVE::JSONSchema::check_prop for one (present) value."""
    if spec.alias:
        return
    if isinstance(value, list):
        if spec.type != "array":
            # PVE's HTTP layer hands a repeated key to a scalar parameter as an array.
            errors[path] = msg("array_type", type=spec.type)
            return
        for i, item in enumerate(value):
            if spec.items and spec.items.startswith("@"):
                try:
                    parse_property_string(formats[spec.items[1:]], item, f"{path}[{i}]", formats)
                except FormatError as exc:
                    errors[f"{path}[{i}]"] = msg("invalid_format", detail=exc)
        return
    value = str(value)
    t = spec.type
    if t == "array":  # a single value of an array parameter (one `map=` key) is a list of one
        check_prop([value], spec, path, errors, formats)
        return
    if t == "boolean" and value not in ("0", "1"):
        errors[path] = msg("type_check", type=t, value=value)
        return
    if t == "integer" and not _INT_RE.match(value):
        errors[path] = msg("type_check", type=t, value=value)
        return
    if t == "number" and not _NUM_RE.match(value):
        errors[path] = msg("type_check", type=t, value=value)
        return
    if spec.format:
        try:
            _check_named_format(spec.format, value, path, formats)
        except FormatError as exc:
            errors[path] = msg("invalid_format", detail=exc)
            return
    if spec.pattern and not re.fullmatch(_perl_re(spec.pattern), value):
        errors[path] = msg("regex")
        return
    if spec.maxLength is not None and len(value) > spec.maxLength:
        errors[path] = msg("max_length", max=spec.maxLength)
        return
    if spec.minLength is not None and len(value) < spec.minLength:
        errors[path] = msg("min_length", min=spec.minLength)
        return
    if _NUM_RE.match(value):
        if spec.maximum is not None and float(value) > spec.maximum:
            errors[path] = msg("maximum", max=_num(spec.maximum))
            return
        if spec.minimum is not None and float(value) < spec.minimum:
            errors[path] = msg("minimum", min=_num(spec.minimum))
            return
    if spec.enum and value not in spec.enum:
        errors[path] = msg("enum", value=value, enum=", ".join(spec.enum))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_property_string(fmt: dict[str, P], data: str, path: str,
                          formats: dict[str, dict[str, P]] | None = None) -> dict[str, Any]:
    """PVE::JSONSchema::parse_property_string: split, resolve aliases and the default key,
    then check every key; raise FormatError with PVE's text."""
    formats = formats or {}
    res: dict[str, Any] = {}
    default_key: str | None = None
    for part in data.split(","):
        if not part.strip():
            continue
        m = re.fullmatch(r"([^=]+)=(.+)", part, re.S)
        if m:
            k, v = m[1], m[2]
            if k in res:
                raise FormatError(msg("ps_duplicate", key=k))
            spec = fmt.get(k)
            if spec is not None and spec.alias:
                key_alias = spec.extra.get("keyAlias")
                if key_alias:
                    if key_alias in res:
                        raise FormatError(msg("ps_alias_twice", key=key_alias))
                    res[key_alias] = k
                k = spec.alias
                spec = fmt.get(k)
                if k in res:
                    raise FormatError(msg("ps_alias_dup", key=k))
            if spec is None:
                raise FormatError(msg("ps_invalid_key", key=k))
            if spec.type == "boolean":
                b = parse_boolean(v)
                v = str(b) if b is not None else v
            res[k] = v
        elif "=" not in part:
            if default_key:
                raise FormatError(msg("ps_duplicate", key=default_key))
            for key, spec in fmt.items():
                if spec.default_key:
                    default_key = key
                    if key in res:
                        raise FormatError(msg("ps_duplicate", key=key))
                    if spec.type == "boolean":
                        b = parse_boolean(part)
                        part = str(b) if b is not None else part
                    res[key] = part
                    break
            if not default_key:
                raise FormatError(msg("ps_no_default"))
        else:
            raise FormatError(msg("ps_missing_key"))
    errors: dict[str, str] = {}
    for key, spec in fmt.items():
        if spec.alias:
            continue
        if key not in res:
            if not spec.optional:
                errors[f"{path}.{key}"] = msg("missing")
            continue
        check_prop(res[key], spec, f"{path}.{key}", errors, formats)
    if errors:
        raise FormatError(msg("ps_format_error") + "\n"
                          + "".join(f"{k}: {v}\n" for k, v in errors.items()))
    return res


def validate(params: dict[str, Any], table: dict[str, P], formats: dict[str, dict[str, P]]
             ) -> dict[str, str]:
    """PVE::JSONSchema::validate against one endpoint's table; returns the `errors`."""
    errors: dict[str, str] = {}
    for key, value in params.items():
        spec = lookup(table, key)
        if spec is None:
            errors[key] = msg("not_in_schema")
            continue
        check_prop(value, spec, key, errors, formats)
        if spec.requires and spec.requires not in params:
            errors.setdefault(spec.requires, msg("requires", key=key))
    for key, spec in table.items():
        if not spec.optional and key not in params and "[n]" not in key:
            errors[key] = msg("missing")
    return errors


def unescape_sshkeys(value: str) -> str:
    return unquote(value)
