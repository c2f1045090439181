// node --test tests/js/: the object picker's data model (js/picker_model.js).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  addPoint, emptyObject, fitScale, fromPromptsJSON, setBox, toImagePixel, toPromptsJSON, undo,
} from "../../js/picker_model.js";

test("objects become the JSON the Segment Objects node reads", () => {
  let cat = setBox(emptyObject(), 40.4, 50, 10, 5);
  cat = addPoint(cat, 20, 30, true);
  const pot = addPoint(addPoint(emptyObject(), 7, 8, true), 1, 2, false);
  assert.equal(
    toPromptsJSON([cat, pot, emptyObject()]),
    '[{"box":[10,5,40,50],"points":[[20,30]],"labels":[1]},{"points":[[7,8],[1,2]],"labels":[1,0]}]',
  );
});

test("every form parse_prompts accepts is read back", () => {
  const objects = fromPromptsJSON('[{"box":[1,2,3,4]},{"positive":[[5,6]],"negative":[{"x":7,"y":8}]},{"points":[[9,9]]}]');
  assert.deepEqual(objects[0].box, [1, 2, 3, 4]);
  assert.deepEqual(objects[1].points, [[5, 6], [7, 8]]);
  assert.deepEqual(objects[1].labels, [1, 0]);
  assert.deepEqual(objects[2].labels, [1]);
  assert.deepEqual(fromPromptsJSON("not json"), []);
  assert.equal(fromPromptsJSON('{"box":[0,0,4,4]}').length, 1);
});

test("undo removes the newest point, then the box", () => {
  let o = addPoint(setBox(emptyObject(), 0, 0, 9, 9), 3, 3, true);
  o = undo(o);
  assert.equal(o.points.length, 0);
  assert.deepEqual(o.box, [0, 0, 9, 9]);
  assert.equal(undo(o).box, null);
});

test("canvas clicks map back to image pixels inside the image", () => {
  const scale = fitScale(2000, 1000, 800, 800);
  assert.equal(scale, 0.4);
  assert.deepEqual(toImagePixel(400, 200, scale, 2000, 1000), [1000, 500]);
  assert.deepEqual(toImagePixel(-5, 900, scale, 2000, 1000), [0, 999]);
  assert.equal(fitScale(800, 400, 2000, 2000), 1);  // already comfortable: drawn at its own size
});

test("small photos are drawn at a comfortable size, within the window", () => {
  assert.equal(fitScale(64, 64, 2000, 2000), 8);  // 512 px on screen
  assert.equal(fitScale(64, 32, 2000, 2000), 8);  // the longer side decides
  assert.equal(fitScale(64, 64, 300, 2000), 300 / 64);  // a small window wins
  assert.deepEqual(toImagePixel(300, 100, 8, 64, 64), [37.5, 12.5]);  // clicks still land in image pixels
});
