"""UI workflow (what the ComfyUI frontend saves, schema 0.4) → API prompt (what POST /prompt runs). Tests only.

ComfyUI has no server-side converter: the frontend builds the prompt when a user presses Queue
(`graphToPrompt` in web/scripts/app.js of the test ComfyUI). This module follows those rules:

- Widgets are created in the order of the node's inputs in /object_info (required, then optional;
  `input_order` when the server sends it): INT, FLOAT, STRING, BOOLEAN and combo (list) inputs.
  `widgets_values` holds their values by position, including values of frontend-only companions that
  never reach the prompt: the control_after_generate choice after an INT named seed/noise_seed or one
  flagged control_after_generate (a flagged combo also gets a filter-list value), and LoadImage's upload
  button after the last required input (inputs flagged image_upload). Values left over at the end belong
  to widgets that extensions add (e.g. buttons) and are ignored, as the frontend ignores them; widgets at
  the end with no value (added to the node after the file was saved) keep their defaults, as there.
- A linked input becomes [origin node id, origin slot]; a widget converted to an input is fed by its
  link, and is left out when its input is not linked (the frontend serialises nothing for it).
- Muted nodes (mode 2) are left out; bypassed nodes (mode 4) are left out and a link from one is
  followed to the bypassed node's input of the same type. Links to nodes that were left out are dropped.
- Frontend-only nodes: Note/MarkdownNote are skipped, Reroute is followed to its source, and a
  PrimitiveNode's value goes into the widget it feeds.
- Widget values are not rewritten: the frontend's dynamic-prompt expansion ({a|b} in multiline text)
  and filename %date% replacement are random or time-dependent and are not applied here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_WIDGET_NAMES = {"seed", "noise_seed"}
SKIPPED_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be turned into a prompt (unknown node, missing widget values, bad link)."""


@dataclass(frozen=True)
class Widget:
    name: str
    serialized: bool = True  # False: a frontend-only companion whose value stays out of the prompt
    default: object = field(default=None, compare=False)  # what a file saved before the widget existed gets


def widgets_of(node_info: dict) -> list[Widget]:
    """The widgets the frontend creates for a node class, in widgets_values order."""
    inputs = node_info["input"]
    order = node_info.get("input_order", {})
    widgets = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section, specs):
            spec = specs[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):
                widgets.append(Widget(name, default=options.get("default", kind[0] if kind else None)))
                if options.get("control_after_generate"):
                    widgets += [Widget("control_after_generate", False), Widget("control_filter_list", False)]
            elif kind in WIDGET_TYPES:
                widgets.append(Widget(name, default=options.get("default")))
                if kind == "INT" and (name in SEED_WIDGET_NAMES or options.get("control_after_generate")):
                    widgets.append(Widget("control_after_generate", False))
        if section == "required" and any((s[1] if len(s) > 1 else {}).get("image_upload") for s in specs.values()):
            widgets.append(Widget("upload", False))
    return widgets


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for this UI workflow."""
    if workflow.get("version") != 0.4 or not isinstance(workflow.get("links"), list):
        raise WorkflowError(f"expected a schema 0.4 UI workflow (version 0.4, links as lists), got version {workflow.get('version')!r}")
    if workflow.get("extra", {}).get("groupNodes"):
        raise WorkflowError("group nodes are not supported; convert them back to nodes before saving")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(nodes.values(), key=lambda n: n.get("order", 0)):
        kind = node["type"]
        if kind in SKIPPED_TYPES or kind in ("Reroute", "PrimitiveNode") or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']} is a {kind!r}, which this server does not know; install the "
                                "extension that provides it")
        inputs = _widget_inputs(node, object_info[kind])
        for slot in node.get("inputs", []):
            origin = _origin(slot, nodes, links)
            if origin is None:
                continue
            source, source_slot = origin
            if source["type"] == "PrimitiveNode":  # the frontend copies its value into the target widget
                inputs[slot["name"]] = source["widgets_values"][0]
            else:
                inputs[slot["name"]] = [str(source["id"]), source_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title", object_info[kind].get("display_name", kind))}}
    for entry in prompt.values():  # links to nodes left out (muted, or bypassed without a way through)
        for name, value in list(entry["inputs"].items()):
            if _is_link(value) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _widget_inputs(node: dict, node_info: dict) -> dict:
    widgets = widgets_of(node_info)
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        raise WorkflowError(f"node {node['id']} ({node['type']}) saves its widgets as {type(values).__name__}; expected a list")
    # A file saved before a node gained widgets at its end has fewer values: those widgets keep their defaults.
    missing = [w for w in widgets[len(values):] if w.serialized and w.default is None]
    if missing:
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values for "
                            f"{len(widgets)} widgets {[w.name for w in widgets]}")
    values = list(values) + [w.default for w in widgets[len(values):]]
    converted = {slot["widget"]["name"]: slot for slot in node.get("inputs", []) if slot.get("widget")}
    inputs = {}
    for widget, value in zip(widgets, values):
        slot = converted.get(widget.name)
        if widget.serialized and (slot is None or slot.get("link") is not None):
            inputs[widget.name] = value
    return inputs


def _origin(slot: dict, nodes: dict, links: dict):
    """(node, output slot) feeding this input, past reroutes and bypassed nodes; None when unlinked."""
    link_id = slot.get("link")
    while link_id is not None:
        if link_id not in links:
            raise WorkflowError(f"input {slot['name']!r} names link {link_id}, which the workflow does not have")
        _, origin_id, origin_slot, _, _, _ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} comes from node {origin_id}, which the workflow does not have")
        if origin["type"] == "Reroute":
            link_id = origin["inputs"][0].get("link")
        elif origin.get("mode", 0) == BYPASSED:
            link_id = _through_bypass(origin, origin_slot, slot["type"])
        else:
            return origin, origin_slot
    return None


def _through_bypass(node: dict, origin_slot: int, wanted_type: str):
    """The link into a bypassed node that replaces its output: the input at the output's index if its type
    fits, else the first input of the wanted type (the frontend's rule)."""
    inputs = node.get("inputs", [])
    for index in [origin_slot, *range(len(inputs))]:
        if index < len(inputs) and inputs[index]["type"] == wanted_type:
            return inputs[index].get("link")
    return None


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
