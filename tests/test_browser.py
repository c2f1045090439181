"""The extension in a real browser: headless Chromium on the test ComfyUI's own page (tests/browser.py).

The object picker is opened on the one-object workflow's Segment Objects node, a box and two clicks are drawn
with synthetic mouse events, Done is pressed, and the node's `prompts` widget must hold them in image pixels; the
extension's scripts must load without console errors. Skipped, with the reason, where Chromium is absent.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

from browser import WHY_MISSING, Chromium, chromium_binary
from comfyui_models import RED_SQUARE, two_shapes_photo
from conftest import ROOT

pytestmark = pytest.mark.skipif(chromium_binary() is None, reason=WHY_MISSING)
PHOTO = "browser_photo.png"
SHIFT = 8  # CDP's modifier bit


def one_object_workflow() -> dict:
    """workflows/one_object.json with its Load Image on the test photo."""
    workflow = json.loads((ROOT / "workflows" / "one_object.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":
            node["widgets_values"][0] = PHOTO
    return workflow


async def open_page(browser: Chromium, url: str) -> None:
    await browser.goto(url)
    await browser.wait_for("window.app && window.app.graph && (window.app.extensions || [])"
                           ".some((e) => e.name === 'ProtoBooth.ObjectPicker')", timeout=120)


SEGMENT_NODE = "window.app.graph._nodes.find((n) => n.type === 'ProtoBoothSegmentObjects')"


async def pick_objects(browser: Chromium) -> dict:
    await browser.evaluate(f"window.app.loadGraphData({json.dumps(one_object_workflow())})")
    await browser.wait_for(f"!!{SEGMENT_NODE}")
    await browser.evaluate(f"{SEGMENT_NODE}.widgets.find((w) => w.name === 'prompts').value = '[]'")
    # The node's "pick objects…" button, as a click on it runs it.
    await browser.evaluate(f"{SEGMENT_NODE}.widgets.find((w) => w.name.startsWith('pick objects')).callback()")
    canvas = await browser.wait_for(
        "(() => { const c = document.querySelector('.protobooth-picker canvas'); if (!c || !c.width) return null;"
        " const r = c.getBoundingClientRect(); return {left: r.left, top: r.top, width: c.width}; })()")
    scale = canvas["width"] / two_shapes_photo().shape[1]

    def at(x: float, y: float) -> tuple[float, float]:  # image pixels → page coordinates
        return canvas["left"] + x * scale, canvas["top"] + y * scale

    left, top, right, bottom = RED_SQUARE
    await browser.drag(at(left, top), at(right, bottom))  # a box around the red square
    await browser.click(*at(18, 18))  # a point on it
    await browser.click(*at(4, 60), modifiers=SHIFT)  # a point on the background
    done = await browser.evaluate(
        "(() => { const b = [...document.querySelectorAll('.protobooth-picker button')].find((b) => b.textContent === "
        "'Done'); const r = b.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    await browser.click(*done)
    await browser.wait_for("!document.querySelector('.protobooth-picker')")
    return json.loads(await browser.evaluate(f"{SEGMENT_NODE}.widgets.find((w) => w.name === 'prompts').value"))


def test_the_picker_writes_a_box_and_two_clicks_into_the_prompts_widget(comfyui):
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)

    async def scenario():
        async with Chromium() as browser:
            await open_page(browser, comfyui.url)
            return await pick_objects(browser), browser.errors

    prompts, errors = asyncio.run(scenario())
    assert prompts == [{"box": list(RED_SQUARE), "points": [[18, 18], [4, 60]], "labels": [1, 0]}]
    ours = [error for error in errors if "protobooth" in error.lower() or "/extensions/" in error]
    assert not ours, ours
