// The object picker's data: objects made of an optional box and labelled points, kept in image pixels,
// and their JSON form — the one the Segment Objects node's `prompts` widget reads
// (engine/segment.py parse_prompts). Pure functions, no DOM: tested with `node --test`.

export function emptyObject() {
  return { box: null, points: [], labels: [] };
}

export function addPoint(object, x, y, positive) {
  return { ...object, points: [...object.points, [Math.round(x), Math.round(y)]], labels: [...object.labels, positive ? 1 : 0] };
}

export function setBox(object, x0, y0, x1, y1) {
  const box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)].map(Math.round);
  return { ...object, box };
}

export function undo(object) {
  // Remove the newest point; with no points left, remove the box.
  if (object.points.length) {
    return { ...object, points: object.points.slice(0, -1), labels: object.labels.slice(0, -1) };
  }
  return { ...object, box: null };
}

export function isEmpty(object) {
  return !object.box && object.points.length === 0;
}

export function toPromptsJSON(objects) {
  const entries = objects.filter((o) => !isEmpty(o)).map((o) => {
    const entry = {};
    if (o.box) entry.box = o.box;
    if (o.points.length) {
      entry.points = o.points;
      entry.labels = o.labels;
    }
    return entry;
  });
  return JSON.stringify(entries);
}

export function fromPromptsJSON(text) {
  // Read what the widget holds (any form parse_prompts accepts); unreadable text starts empty.
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    return [];
  }
  const list = Array.isArray(parsed) ? parsed : [parsed];
  return list.filter((e) => e && typeof e === "object").map((e) => {
    let object = emptyObject();
    if (Array.isArray(e.box) && e.box.length === 4) object = setBox(object, ...e.box);
    const points = Array.isArray(e.points) ? e.points : [];
    const labels = Array.isArray(e.labels) ? e.labels : points.map(() => 1);
    points.forEach((p, i) => { object = addPoint(object, ...asXY(p), labels[i] !== 0); });
    (e.positive || []).forEach((p) => { object = addPoint(object, ...asXY(p), true); });
    (e.negative || []).forEach((p) => { object = addPoint(object, ...asXY(p), false); });
    return object;
  });
}

function asXY(point) {
  return Array.isArray(point) ? [point[0], point[1]] : [point.x, point.y];
}

// Display scaling: the picture is drawn `scale` times its pixel size; clicks map back to image pixels.
// Large pictures shrink to fit the window; small ones grow until their longer side reaches `comfortable`
// pixels (a 64-px photo at its own size is too small to click on), never beyond the window.
export const COMFORTABLE_SIDE = 512;

export function fitScale(width, height, maxWidth, maxHeight, comfortable = COMFORTABLE_SIDE) {
  const fits = Math.min(maxWidth / width, maxHeight / height);
  return Math.min(fits, Math.max(1, comfortable / Math.max(width, height)));
}

export function toImagePixel(canvasX, canvasY, scale, width, height) {
  const clamp = (v, hi) => Math.max(0, Math.min(hi - 1, v));
  return [clamp(canvasX / scale, width), clamp(canvasY / scale, height)];
}
