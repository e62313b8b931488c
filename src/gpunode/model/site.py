"""The site file: defaults, groups and nodes, each a partial NodeProfile."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from gpunode.model.parts import Strict
from gpunode.model.profile import FROM_LOCK, NodeProfile
from gpunode.model.types import Text

#: Top-level keys of a site file.
SITE_KEYS = ("site", "defaults", "groups", "nodes")
GROUP_NAME = r"^[a-z][a-z0-9_]*$"


class SiteMeta(Strict):
    name: Text = Field("site", description="Site name.")
    description: Text = Field("", description="Free text.")


class SiteSchema:
    """JSON Schema of a site file, derived from NodeProfile so it cannot drift."""

    @staticmethod
    def json_schema() -> dict[str, Any]:
        profile = NodeProfile.model_json_schema(ref_template="#/$defs/{model}")
        defs = profile.pop("$defs", {})
        layer = copy.deepcopy(profile)
        layer.pop("required", None)
        layer["properties"].pop("name", None)
        for key in FROM_LOCK:  # from <site>.lock, never written in a site
            layer["properties"].pop(key, None)
        for name in ("PyPin", "ImagePin"):  # only the lock fields use them
            defs.pop(name, None)
        layer["title"] = "Layer"
        layer["description"] = ("A partial node profile; defaults -> groups (in the order a "
                                "node lists them) -> node are merged: maps merge key by key, "
                                "lists and scalars replace.")
        group_layer = copy.deepcopy(layer)
        group_layer["properties"].pop("groups", None)
        # Layers are partial at every depth (a group may set only connection.user), except
        # list items, which replace whole and so must be complete.
        for name, definition in defs.items():
            if name not in ("VllmService", "Hostpci", "PciMapping"):
                definition.pop("required", None)
        defs["Layer"] = layer
        defs["GroupLayer"] = group_layer
        meta = SiteMeta.model_json_schema()
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "gpunode site",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "site": meta,
                "defaults": {"$ref": "#/$defs/GroupLayer"},
                "groups": {"type": "object", "propertyNames": {"pattern": GROUP_NAME},
                           "additionalProperties": {"$ref": "#/$defs/GroupLayer"}},
                "nodes": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Layer"}},
            },
            "required": ["nodes"],
            "$defs": defs,
        }
