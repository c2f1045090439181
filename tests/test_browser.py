"""The extension in a real browser: headless Chromium on the test ComfyUI's own page (tests/browser.py).

The object picker is opened on the one-object workflow's Segment Objects node, a box and two clicks are drawn
with synthetic mouse events, Done is pressed, and the node's `prompts` widget must hold them in image pixels; the
extension's scripts must load without console errors. A Train Concept queued from the page shows its live preview
on the node. Skipped, with the reason, where Chromium is absent.

    python tests/test_browser.py docs/live-preview.png   # the README's screenshot: training in the page
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import WHY_MISSING, BrowserError, Chromium, chromium_binary
from comfyui_harness import execution_error
from comfyui_models import RED_SQUARE, two_shapes_photo
from conftest import ROOT
from workflow_convert import WIDGET_TYPES, to_api_prompt, widgets_of

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
    await asyncio.sleep(1)
    await browser.press("Escape", 27)  # the current frontend greets a new profile with its template browser


SEGMENT_NODE = "window.app.graph._nodes.find((n) => n.type === 'ProtoBoothSegmentObjects')"


async def pick_objects(browser: Chromium) -> dict:
    await browser.evaluate(f"window.app.loadGraphData({json.dumps(one_object_workflow())})")
    await browser.wait_for(f"!!{SEGMENT_NODE}")
    await browser.evaluate(f"{SEGMENT_NODE}.widgets.find((w) => w.name === 'prompts').value = '[]'")
    # The node's "pick objects…" button, as a click on it runs it.
    await browser.evaluate(f"{SEGMENT_NODE}.widgets.find((w) => w.name.startsWith('pick objects')).callback()")
    where = ("(() => { const c = document.querySelector('.protobooth-picker canvas'); if (!c || !c.width) return null;"
             " const r = c.getBoundingClientRect(); return r.width ? {left: r.left, top: r.top, width: r.width} : null; })()")
    canvas, settled = await browser.wait_for(where), None
    for _ in range(50):  # the dialog may still be laying itself out (a loaded machine): wait until it holds still
        await asyncio.sleep(0.2)
        settled, canvas = canvas, await browser.wait_for(where)
        if canvas == settled:
            break
    scale = canvas["width"] / two_shapes_photo().shape[1]  # the canvas as shown, whatever its pixel size

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


# ------------------------------------------------------------------------------------------------------
# the live preview, queued from the page

TRAIN_NODE = 4


def ui_workflow(object_info: dict, nodes: list[tuple], links: list[tuple]) -> dict:
    """A UI-format workflow (what the frontend saves and loads) from (id, type, pos, size, widget values by name)
    nodes and (id, from node, slot, to node, slot, type) links; unnamed widgets keep their defaults."""
    made = []
    for node_id, kind, pos, size, values in nodes:
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        sockets = [name for name, spec in specs.items() if not isinstance(spec[0], list) and spec[0] not in WIDGET_TYPES]
        widgets = [values.get(w.name, {"control_after_generate": "fixed", "upload": "image"}.get(w.name, w.default))
                   for w in widgets_of(info)]
        made.append({
            "id": node_id, "type": kind, "pos": pos, "size": size, "flags": {}, "order": node_id, "mode": 0,
            "inputs": [{"name": name, "type": specs[name][0],
                        "link": next((l[0] for l in links if l[3] == node_id and l[4] == slot), None)}
                       for slot, name in enumerate(sockets)],
            "outputs": [{"name": name, "type": kind_, "slot_index": slot,
                         "links": [l[0] for l in links if l[1] == node_id and l[2] == slot]}
                        for slot, (name, kind_) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {}, "widgets_values": widgets,
        })
    return {"last_node_id": max(n[0] for n in nodes), "last_link_id": max(l[0] for l in links), "nodes": made,
            "links": [list(link) for link in links], "groups": [], "config": {}, "extra": {}, "version": 0.4}


def training_workflow(object_info: dict, checkpoint: str, steps: int, preview_every: int, resolution: int) -> dict:
    """Load Checkpoint and the photo's red square (a box mask) into Train Concept, its loss curve previewed."""
    train = {"tokens": "zqsquare", "class_words": "square", "steps": steps, "prior_weight": 0.0, "seed": 7,
             "resolution": resolution, "preview_every": preview_every, "lora_learning_rate": 1e-3,
             "token_learning_rate": 5e-3}
    nodes = [(1, "CheckpointLoaderSimple", [20, 40], [320, 100], {"ckpt_name": checkpoint}),
             (2, "LoadImage", [20, 190], [320, 330], {"image": PHOTO}),
             (3, "ProtoBoothTestBoxMasks", [20, 570], [320, 80], {"boxes": json.dumps([list(RED_SQUARE)])}),
             (TRAIN_NODE, "ProtoBoothTrainConcept", [380, 40], [560, 740], train),
             (5, "PreviewImage", [980, 40], [300, 320], {})]
    links = [(1, 1, 0, 4, 0, "MODEL"), (2, 1, 1, 4, 1, "CLIP"), (3, 1, 2, 4, 2, "VAE"), (4, 2, 0, 3, 0, "IMAGE"),
             (5, 2, 0, 4, 3, "IMAGE"), (6, 3, 0, 4, 4, "MASK"), (7, 4, 3, 5, 0, "IMAGE")]
    return ui_workflow(object_info, nodes, links)


# The sources of the node's preview pictures as the page holds them: the 2024 frontend's nodePreviewImages, or the
# node's imgs.
PREVIEW_SOURCES = (f"((window.app.nodePreviewImages || {{}})['{TRAIN_NODE}'] || "
                   f"(window.app.graph.getNodeById({TRAIN_NODE})?.imgs || []).map((i) => i.src))")


async def train_in_the_page(browser: Chromium, server, workflow: dict, screenshot=None, previews: int = 1,
                            timeout: float = 600) -> int:
    """Load the workflow into the page, queue it for the page (its API form, with the page's client id), and wait
    until the Train node has shown `previews` preview pictures (the page's count of them is returned); screenshot
    then, when a path is given. Queued over HTTP rather than by the page's Queue button: the current frontend
    cannot build Load Checkpoint's widget in a fresh headless profile (it leaves that node without a class), while
    the preview, which is what is tested, reaches the node either way. A run that fails stops the wait with its
    error."""
    await open_page(browser, server.url)
    await browser.evaluate(f"window.app.loadGraphData({json.dumps(workflow)})")
    client_id = await browser.evaluate("window.app.api?.clientId || window.comfyAPI?.api?.api?.clientId || "
                                       "sessionStorage.getItem('clientId')")
    prompt_id = server.queue(to_api_prompt(workflow, server.object_info()), client_id)
    shown, seen = [], 0
    for _ in range(int(timeout)):
        source = await browser.evaluate(f"String({PREVIEW_SOURCES}[0])")
        if source != "undefined" and source not in shown:
            shown.append(source)
            seen = await browser.evaluate(f"{PREVIEW_SOURCES}.length")
        if len(shown) >= previews:
            break
        entry = server.history(prompt_id)
        if entry is not None and entry["status"]["status_str"] == "error":
            raise BrowserError(f"the run failed: {execution_error(entry)}")
        await asyncio.sleep(0.5)
    else:
        raise BrowserError(f"the Train node showed {len(shown)} of {previews} previews within {timeout:.0f} s")
    if screenshot is not None:
        await asyncio.sleep(1)  # the canvas draws the newest picture on its next frame
        await browser.evaluate("window.app.graph.setDirtyCanvas(true, true)")
        await asyncio.sleep(1)
        await browser.screenshot(screenshot)
    return seen


# Slow (about 25 s a build): the preview path itself runs in the default suite over the server's websocket
# (test_concept_nodes.py); this shows it drawn on the node by each frontend.
@pytest.mark.slow
def test_train_concept_shows_its_live_preview_on_the_node_in_the_page(comfyui, comfyui_checkpoint, tmp_path):
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    workflow = training_workflow(comfyui.object_info(), comfyui_checkpoint, steps=6, preview_every=2, resolution=64)

    async def scenario():
        async with Chromium() as browser:
            return await train_in_the_page(browser, comfyui, workflow, tmp_path / "page.png", previews=2)

    assert asyncio.run(scenario()) >= 1
    # The preview's loss-curve panel is the one white area of the page (dark canvas, nodes and widgets).
    page = np.asarray(Image.open(tmp_path / "page.png").convert("L"))
    assert page.shape == (900, 1400) and (page > 245).mean() > 0.01, (page > 245).mean()


def main(argv: list[str]) -> int:
    """Write the README's screenshot: the test kit's ComfyUI-sized SD1.5 model (random weights: ComfyUI cannot load
    ShapesWorld, whose UNet no ComfyUI model config matches) learning the red square, the page showing its live
    preview."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from comfyui_harness import CURRENT, ComfyUIServer
    from kit.checkpoints import write_single_file
    from kit.models import comfy_tiny_model

    out = Path(argv[0]) if argv else ROOT / "docs" / "live-preview.png"
    with ComfyUIServer(CURRENT) as server:
        write_single_file(comfy_tiny_model(seed=0), server.models("checkpoints") / "tiny-sd15.safetensors")
        Image.fromarray(two_shapes_photo()).save(server.input_dir / PHOTO)
        workflow = training_workflow(server.object_info(), "tiny-sd15.safetensors", steps=200, preview_every=20,
                                     resolution=64)

        async def scenario():
            async with Chromium() as browser:
                await train_in_the_page(browser, server, workflow, out, previews=8)

        try:
            asyncio.run(scenario())
        except Exception:
            print(server.log_tail(30))
            raise
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
