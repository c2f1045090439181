// ProtoBooth frontend: an object picker for the Segment Objects node.
// "Pick objects…" opens the input image; a click adds a point on the object, a shift- or right-click a
// point on the background, a drag draws a box; "New object" starts the next object. "Done" writes the
// JSON the node's `prompts` widget reads, in image pixels. Works with the old (LiteGraph) frontend and
// the current one, which keeps the same scripts/app.js entry.
import { app } from "../../scripts/app.js";
import {
  addPoint, emptyObject, fitScale, fromPromptsJSON, isEmpty, setBox, toImagePixel, toPromptsJSON, undo,
} from "./picker_model.js";

const COLOURS = ["#ff5252", "#40c4ff", "#69f0ae", "#ffd740", "#e040fb", "#ff6e40", "#b2ff59", "#18ffff"];

function sourceImageUrl(node) {
  // The picture feeding the node's `image` input: a node that shows images (LoadImage, previews).
  const input = node.inputs?.find((i) => i.name === "image");
  const link = input?.link != null ? app.graph.links[input.link] : null;
  const origin = link ? app.graph.getNodeById(link.origin_id) : null;
  if (origin?.imgs?.length) return origin.imgs[0].src;
  const widget = origin?.widgets?.find((w) => w.name === "image");
  if (widget?.value) {
    const [name, subfolder] = [widget.value.split("/").pop(), widget.value.split("/").slice(0, -1).join("/")];
    return `/view?filename=${encodeURIComponent(name)}&type=input&subfolder=${encodeURIComponent(subfolder)}`;
  }
  return null;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.style.margin = "0 4px";
  b.onclick = onClick;
  return b;
}

function openPicker(url, initialJSON, onDone) {
  const overlay = document.createElement("div");
  overlay.className = "protobooth-picker";  // what the browser test finds it by
  Object.assign(overlay.style, {
    position: "fixed", inset: "0", background: "rgba(0,0,0,0.75)", zIndex: 10000,
    display: "flex", flexDirection: "column", alignItems: "center", justifyContent: "center", color: "#eee",
    font: "14px sans-serif",
  });
  const help = document.createElement("div");
  help.textContent = "click: object point · shift/right-click: background point · drag: box · New object for the next one";
  help.style.marginBottom = "8px";
  const canvas = document.createElement("canvas");
  canvas.style.cursor = "crosshair";
  const bar = document.createElement("div");
  bar.style.marginTop = "8px";
  overlay.append(help, canvas, bar);

  let objects = fromPromptsJSON(initialJSON);
  if (!objects.length) objects = [emptyObject()];
  let current = objects.length - 1;
  let scale = 1;
  let dragStart = null;
  let dragNow = null;
  const image = new Image();

  function draw() {
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = scale < 1;  // a small photo drawn larger keeps its pixels sharp
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    objects.forEach((o, i) => {
      const colour = COLOURS[i % COLOURS.length];
      ctx.strokeStyle = colour;
      ctx.fillStyle = colour;
      ctx.lineWidth = i === current ? 3 : 1.5;
      if (o.box) {
        const [x0, y0, x1, y1] = o.box.map((v) => v * scale);
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
        ctx.fillText(String(i + 1), x0 + 4, y0 + 14);
      }
      o.points.forEach(([x, y], k) => {
        ctx.beginPath();
        ctx.arc(x * scale, y * scale, 5, 0, 2 * Math.PI);
        if (o.labels[k]) ctx.fill(); else ctx.stroke();
        if (!o.box && k === 0) ctx.fillText(String(i + 1), x * scale + 7, y * scale - 7);
      });
    });
    if (dragStart && dragNow) {
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = COLOURS[current % COLOURS.length];
      ctx.strokeRect(dragStart[0], dragStart[1], dragNow[0] - dragStart[0], dragNow[1] - dragStart[1]);
      ctx.setLineDash([]);
    }
    status.textContent = `object ${current + 1} of ${objects.length}`;
  }

  const position = (e) => {
    const rect = canvas.getBoundingClientRect();
    return [e.clientX - rect.left, e.clientY - rect.top];
  };
  canvas.oncontextmenu = (e) => e.preventDefault();
  canvas.onmousedown = (e) => { dragStart = position(e); dragNow = null; };
  canvas.onmousemove = (e) => { if (dragStart) { dragNow = position(e); draw(); } };
  canvas.onmouseup = (e) => {
    const end = position(e);
    const [sx, sy] = dragStart || end;
    const moved = Math.hypot(end[0] - sx, end[1] - sy) > 6;
    const [x0, y0] = toImagePixel(sx, sy, scale, image.naturalWidth, image.naturalHeight);
    const [x1, y1] = toImagePixel(end[0], end[1], scale, image.naturalWidth, image.naturalHeight);
    objects[current] = moved
      ? setBox(objects[current], x0, y0, x1, y1)
      : addPoint(objects[current], x1, y1, !(e.shiftKey || e.button === 2));
    dragStart = dragNow = null;
    draw();
  };

  const status = document.createElement("span");
  status.style.marginRight = "12px";
  const close = () => overlay.remove();
  bar.append(
    status,
    button("New object", () => {
      if (!isEmpty(objects[current])) objects.push(emptyObject());
      current = objects.length - 1;
      draw();
    }),
    button("Undo", () => { objects[current] = undo(objects[current]); draw(); }),
    button("Clear", () => { objects = [emptyObject()]; current = 0; draw(); }),
    button("Done", () => { onDone(toPromptsJSON(objects)); close(); }),
    button("Cancel", close),
  );

  image.onload = () => {
    scale = fitScale(image.naturalWidth, image.naturalHeight, window.innerWidth * 0.85, window.innerHeight * 0.75);
    canvas.width = Math.round(image.naturalWidth * scale);
    canvas.height = Math.round(image.naturalHeight * scale);
    draw();
  };
  image.onerror = () => { close(); alert("ProtoBooth: could not load the input image."); };
  image.src = url;
  document.body.append(overlay);
}

app.registerExtension({
  name: "ProtoBooth.ObjectPicker",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "ProtoBoothSegmentObjects") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const picker = this.addWidget("button", "pick objects…", null, () => {
        const url = sourceImageUrl(this);
        if (!url) {
          alert("ProtoBooth: connect a Load Image node (or run the graph once) so there is a picture to pick on.");
          return;
        }
        const prompts = this.widgets.find((w) => w.name === "prompts");
        openPicker(url, prompts?.value ?? "[]", (json) => {
          if (prompts) prompts.value = json;
          app.graph.setDirtyCanvas(true, true);
        });
      }, { serialize: false });
      // The current frontend reads `serialize` on the widget itself (the old one its options): without it every
      // saved workflow gets a trailing null in this node's widgets_values, which a later widget would inherit.
      picker.serialize = false;
      return result;
    };
  },
});
