// What both pages draw, the served one (agegender serve) and the private one (agegender site):
// one home for a face's label and where it goes, as agegender.inference.draw draws them.
"use strict";

function faceLabel(face) {
  // a gender the tracker is not yet sure of comes as "?" and is shown so
  const g = face.gender === "female" ? "F " : face.gender === "male" ? "M " : "? ";
  let text = (face.track ? "#" + face.track + " " : "") + g + Math.round(face.age);
  if (face.age_interval) {
    text += " (" + Math.round(face.age_interval[0]) + "-" + Math.round(face.age_interval[1]) + ")";
  }
  return text;
}

// Where a w x h label goes for box, kept whole inside a W x H image (the rule of
// agegender.inference.draw.place_label): above the box, else below it, else inside its top;
// moved left from the box's left edge as far as the right edge needs; the first of those
// places clear of the labels already placed (taken), if one is.
function placeLabel(box, w, h, W, H, taken) {
  const [x0, y0, , y1] = box;
  const left = Math.min(Math.max(x0, 0), Math.max(W - w, 0));
  const tops = [y0 - h, y1].filter(t => t >= 0 && t <= H - h).concat([y0]);
  const places = tops.map(t => {
    const top = Math.min(Math.max(t, 0), Math.max(H - h, 0));
    return [left, top, left + w, top + h];
  });
  const overlaps = (a, b) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
  return places.find(p => !taken.some(o => overlaps(p, o))) || places[0];
}

// The picture with a box and a label per face on canvas: every box first, then the labels
// on a filled background of the face's colour, placed by placeLabel.
function drawFaces(canvas, bitmap, faces) {
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const side = Math.max(bitmap.width, bitmap.height);
  const lw = Math.max(2, Math.round(side / 300));
  const px = Math.max(12, Math.round(side / 40));
  ctx.font = "600 " + px + "px system-ui, sans-serif";
  ctx.textBaseline = "top";
  const colorOf = face => face.gender === "female" ? "#e63c78" :
                          face.gender === "male" ? "#2878e6" : "#808080";
  for (const face of faces) {  // every box first: no box crosses a label drawn after
    const [x0, y0, x1, y1] = face.box;
    ctx.lineWidth = lw;
    ctx.strokeStyle = colorOf(face);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  const taken = [];
  for (const face of faces) {
    const text = faceLabel(face);
    const h = px + 2 * lw;
    const w = Math.min(ctx.measureText(text).width + 2 * lw, bitmap.width);
    const where = placeLabel(face.box, w, h, bitmap.width, bitmap.height, taken);
    taken.push(where);
    ctx.fillStyle = colorOf(face);
    ctx.fillRect(where[0], where[1], w, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, where[0] + lw, where[1] + lw, w - 2 * lw);  // squeezed if wider than the image
  }
  canvas.classList.remove("hidden");
}
