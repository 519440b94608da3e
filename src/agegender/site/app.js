// agegender, private mode: detection, alignment and the age/gender network all run in this
// browser (ONNX Runtime Web, WebAssembly, one thread); no pixel leaves the device. Every URL
// below is relative, so the folder works on any static host and under any path.
//
// The pipeline mirrors the Python package step by step, so that both give the same answers:
//   vision/detect.py  YuNet's decoding and NMS (OpenCV's FaceDetectorYN), the long-side
//                     resizes, the refinement passes on template-framed crops, the alignment
//                     (least-squares similarity onto UTKFACE_TEMPLATE_200, bilinear warp with
//                     replicated edges, area prefilter when shrinking by more than 2);
//   vision/images.py  preprocess: PIL's convert("L") luma and PIL's antialiased resize;
//   inference/*.py    uint8 NCHW in, flip-TTA merge, 90 % age interval, gender at p >= 0.5.
"use strict";

// ------------------------------------------------------------------ constants (detect.py)

const TEMPLATE_200 = [[59.82, 56.53], [136.69, 56.58], [97.95, 102.32], [65.29, 134.49],
                      [131.04, 134.59]];
const UTKFACE_SIZE = 200;
const FALLBACK_SIDE = 320, REFINE_MARGIN = 0.3, COARSE_SIZE = 224;
const INTERVAL_Z = 1.6448536269514722;  // two-sided 90 % of a normal distribution
// YuNetDetector's defaults; "yunet" for photos, "yunet-fast" for the webcam (as the service)
const DETECTOR = { scoreThreshold: 0.6, nmsThreshold: 0.3, topK: 5000, maxSide: 640,
                   minSide: 160, refine: 2, flip: true, refineSize: 320 };
const DETECTOR_FAST = { ...DETECTOR, refine: 1, refineSize: 224, flip: false };

// ------------------------------------------------------------------ small helpers

// Python's round(): halves to even, so sizes computed here equal the package's
function roundHalfEven(v) {
  const r = Math.round(v);
  return (Math.abs(v % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
const sat8 = (v) => clamp(Math.round(v), 0, 255);

// An image is { w, h, c, data: Uint8Array } with c channels interleaved (RGB: c = 3).
function makeImage(w, h, c) { return { w, h, c, data: new Uint8Array(w * h * c) }; }

function fromImageData(id) {  // canvas RGBA -> RGB
  const img = makeImage(id.width, id.height, 3), src = id.data, dst = img.data;
  for (let i = 0, j = 0; i < src.length; i += 4, j += 3) {
    dst[j] = src[i]; dst[j + 1] = src[i + 1]; dst[j + 2] = src[i + 2];
  }
  return img;
}

// ------------------------------------------------------------------ resampling (OpenCV's)

// cv2.INTER_AREA's weights along one axis: each output cell averages the input it covers
function areaTaps(inSize, outSize) {
  const scale = inSize / outSize, taps = [];
  for (let d = 0; d < outSize; d++) {
    const f1 = d * scale, f2 = f1 + scale, cell = Math.min(scale, inSize - f1);
    const s1 = Math.ceil(f1), s2 = Math.floor(f2), t = [];
    if (s1 - f1 > 1e-3) t.push([s1 - 1, (s1 - f1) / cell]);
    for (let s = s1; s < s2; s++) t.push([s, 1 / cell]);
    if (f2 - s2 > 1e-3 && s2 < inSize) {
      t.push([s2, Math.min(Math.min(f2 - s2, 1), cell - (s2 - s1) - (s1 - f1)) / cell]);
    }
    taps.push(t);
  }
  return taps;
}

// cv2.INTER_LINEAR's weights (pixel centres, clamped at the edges)
function linearTaps(inSize, outSize) {
  const scale = inSize / outSize, taps = [];
  for (let d = 0; d < outSize; d++) {
    let f = (d + 0.5) * scale - 0.5, s = Math.floor(f);
    f -= s;
    if (s < 0) { s = 0; f = 0; }
    if (s >= inSize - 1) { s = inSize - 1; f = 0; }
    taps.push(f === 0 ? [[s, 1]] : [[s, 1 - f], [s + 1, f]]);
  }
  return taps;
}

// taps [[source, weight], ...] per output -> flat arrays, for the inner loops
function flatTaps(taps) {
  const start = new Int32Array(taps.length + 1);
  taps.forEach((t, i) => { start[i + 1] = start[i] + t.length; });
  const src = new Int32Array(start[taps.length]), wt = new Float32Array(start[taps.length]);
  taps.forEach((t, i) => t.forEach(([s, w], j) => { src[start[i] + j] = s; wt[start[i] + j] = w; }));
  return { start, src, wt, n: taps.length };
}

// separable resampling in float, rounded once at the end (as cv2's area resize)
function resampleTaps(img, xTaps, yTaps) {
  const { w, h, c } = img, X = flatTaps(xTaps), Y = flatTaps(yTaps), tw = X.n, th = Y.n;
  const data = img.data, rows = new Float32Array(h * tw * c);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < tw; x++) {
      for (let k = 0; k < c; k++) {
        let acc = 0;
        for (let t = X.start[x]; t < X.start[x + 1]; t++) acc += X.wt[t] * data[(y * w + X.src[t]) * c + k];
        rows[(y * tw + x) * c + k] = acc;
      }
    }
  }
  const out = makeImage(tw, th, c), dst = out.data, stride = tw * c;
  for (let y = 0; y < th; y++) {
    for (let i = 0; i < stride; i++) {
      let acc = 0;
      for (let t = Y.start[y]; t < Y.start[y + 1]; t++) acc += Y.wt[t] * rows[Y.src[t] * stride + i];
      dst[y * stride + i] = acc <= 0 ? 0 : acc >= 255 ? 255 : Math.round(acc);
    }
  }
  return out;
}

function cvResize(img, tw, th, area) {
  const taps = area ? areaTaps : linearTaps;
  return resampleTaps(img, taps(img.w, tw), taps(img.h, th));
}

// cv2.warpAffine(img, m, (size, size), INTER_LINEAR, BORDER_REPLICATE)
function warpAffine(img, m, size) {
  const inv = invertAffine(m), { w, h, c } = img, src = img.data, out = makeImage(size, size, c);
  const dst = out.data;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const sx = inv[0] * x + inv[1] * y + inv[2], sy = inv[3] * x + inv[4] * y + inv[5];
      const x0 = Math.floor(sx), y0 = Math.floor(sy), fx = sx - x0, fy = sy - y0;
      // edges replicated: each tap clamped into the image
      const xa = (x0 < 0 ? 0 : x0 > w - 1 ? w - 1 : x0) * c;
      const xb = (x0 + 1 < 0 ? 0 : x0 + 1 > w - 1 ? w - 1 : x0 + 1) * c;
      const ya = (y0 < 0 ? 0 : y0 > h - 1 ? h - 1 : y0) * w * c;
      const yb = (y0 + 1 < 0 ? 0 : y0 + 1 > h - 1 ? h - 1 : y0 + 1) * w * c;
      const w00 = (1 - fx) * (1 - fy), w01 = fx * (1 - fy), w10 = (1 - fx) * fy, w11 = fx * fy;
      const o = (y * size + x) * c;
      for (let k = 0; k < c; k++) {
        const v = src[ya + xa + k] * w00 + src[ya + xb + k] * w01 + src[yb + xa + k] * w10 +
                  src[yb + xb + k] * w11;
        dst[o + k] = v + 0.5;  // in [0, 255] already; the Uint8Array truncates: rounding
      }
    }
  }
  return out;
}

function mirror(img) {  // cv2.flip(img, 1)
  const { w, h, c } = img, out = makeImage(w, h, c), src = img.data, dst = out.data;
  for (let y = 0; y < h; y++) {
    const row = y * w * c;
    for (let x = 0; x < w; x++) {
      const o = row + x * c, i = row + (w - 1 - x) * c;
      for (let k = 0; k < c; k++) dst[o + k] = src[i + k];
    }
  }
  return out;
}

// ------------------------------------------------------------------ geometry (detect.py)

// affine matrices are [a, b, tx, c, d, ty]: x' = a x + b y + tx, y' = c x + d y + ty
function invertAffine(m) {
  const det = m[0] * m[4] - m[1] * m[3];
  const a = m[4] / det, b = -m[1] / det, c = -m[3] / det, d = m[0] / det;
  return [a, b, -(a * m[2] + b * m[5]), c, d, -(c * m[2] + d * m[5])];
}

// Least-squares similarity taking src points onto dst: what cv2.estimateAffinePartial2D's
// Levenberg-Marquardt refinement over all five points converges to, in closed form.
function similarity(src, dst) {
  const n = src.length, mean = (pts, k) => pts.reduce((s, p) => s + p[k], 0) / n;
  const sx = mean(src, 0), sy = mean(src, 1), dx = mean(dst, 0), dy = mean(dst, 1);
  let num = 0, cross = 0, den = 0;
  for (let i = 0; i < n; i++) {
    const x = src[i][0] - sx, y = src[i][1] - sy, u = dst[i][0] - dx, v = dst[i][1] - dy;
    num += x * u + y * v; cross += x * v - y * u; den += x * x + y * y;
  }
  if (!(den > 1e-12)) throw new Error("cannot align: the landmarks are degenerate");
  const a = num / den, b = cross / den;
  return [a, -b, dx - (a * sx - b * sy), b, a, dy - (b * sx + a * sy)];
}

function template(size) {  // TEMPLATE_200 scaled about pixel centres
  return TEMPLATE_200.map(([x, y]) => [(x + 0.5) * size / UTKFACE_SIZE - 0.5,
                                       (y + 0.5) * size / UTKFACE_SIZE - 0.5]);
}

function applyAffine(m, [x, y]) { return [m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]]; }

// detect.py's _prefilter: area-shrink the part the crop sees to twice the crop's scale
function prefilter(img, m, size, scale) {
  const inv = invertAffine(m);
  const corners = [[0, 0], [size, 0], [0, size], [size, size]].map((p) => applyAffine(inv, p));
  const xs = corners.map((p) => p[0]), ys = corners.map((p) => p[1]);
  const x0 = Math.max(0, Math.floor(Math.min(...xs)) - 2), y0 = Math.max(0, Math.floor(Math.min(...ys)) - 2);
  const x1 = Math.min(img.w, Math.ceil(Math.max(...xs)) + 2), y1 = Math.min(img.h, Math.ceil(Math.max(...ys)) + 2);
  if (x1 - x0 < 2 || y1 - y0 < 2) return [img, m];
  const roi = makeImage(x1 - x0, y1 - y0, img.c);
  for (let y = y0; y < y1; y++) {
    roi.data.set(img.data.subarray((y * img.w + x0) * img.c, (y * img.w + x1) * img.c),
                 (y - y0) * roi.w * img.c);
  }
  const r = 2 * scale;
  const tw = Math.max(1, roundHalfEven(roi.w * r)), th = Math.max(1, roundHalfEven(roi.h * r));
  const small = cvResize(roi, tw, th, true);
  const rx = tw / roi.w, ry = th / roi.h;
  // small pixel p is image pixel (p + 0.5) / r - 0.5 + offset (pixel centres)
  const t = [1 / rx, 0, 0.5 / rx - 0.5 + x0, 0, 1 / ry, 0.5 / ry - 0.5 + y0];
  return [small, [m[0] * t[0], m[1] * t[4], m[0] * t[2] + m[1] * t[5] + m[2],
                  m[3] * t[0], m[4] * t[4], m[3] * t[2] + m[4] * t[5] + m[5]]];
}

function warp(img, m, size) {  // detect.py's _warp
  const scale = Math.sqrt(Math.abs(m[0] * m[4] - m[1] * m[3]));
  if (scale < 0.5) [img, m] = prefilter(img, m, size, scale);
  return warpAffine(img, m, size);
}

// ------------------------------------------------------------------ YuNet

// OpenCV's FaceDetectorYN on an image at its own size: rows [x, y, w, h, 10 landmark
// coordinates, score], after the score threshold and NMS, best first.
async function yunetRun(img, cfg, timing) {
  const padW = Math.ceil(img.w / 32) * 32, padH = Math.ceil(img.h / 32) * 32;
  const x = new Float32Array(3 * padH * padW);  // BGR planes, 0-255, zero padding right/below
  const plane = padH * padW;
  for (let y = 0; y < img.h; y++) {
    for (let xx = 0; xx < img.w; xx++) {
      const i = (y * img.w + xx) * 3, o = y * padW + xx;
      x[o] = img.data[i + 2]; x[plane + o] = img.data[i + 1]; x[2 * plane + o] = img.data[i];
    }
  }
  const t0 = performance.now();
  const out = await state.yunet.run({ input: new ort.Tensor("float32", x, [1, 3, padH, padW]) });
  timing.wasm_ms += performance.now() - t0;
  timing.detector_runs += 1;
  return nms(decodeYunet(out, padW, padH, cfg.scoreThreshold), cfg);
}

function decodeYunet(out, padW, padH, threshold) {
  const rows = [];
  for (const stride of [8, 16, 32]) {
    const cols = padW / stride, n = cols * (padH / stride);
    const cls = out["cls_" + stride].data, obj = out["obj_" + stride].data;
    const bbox = out["bbox_" + stride].data, kps = out["kps_" + stride].data;
    for (let i = 0; i < n; i++) {
      const score = Math.sqrt(clamp(cls[i], 0, 1) * clamp(obj[i], 0, 1));
      if (!(score >= threshold)) continue;
      const r = Math.floor(i / cols), c = i % cols;
      const cx = (c + bbox[4 * i]) * stride, cy = (r + bbox[4 * i + 1]) * stride;
      const w = Math.exp(bbox[4 * i + 2]) * stride, h = Math.exp(bbox[4 * i + 3]) * stride;
      const row = [cx - w / 2, cy - h / 2, w, h];
      for (let k = 0; k < 5; k++) {
        row.push((kps[10 * i + 2 * k] + c) * stride, (kps[10 * i + 2 * k + 1] + r) * stride);
      }
      row.push(score);
      // detect.py drops the inf/NaN rows some inputs give, and empty boxes
      if (row.every(Number.isFinite) && w > 0 && h > 0) rows.push(row);
    }
  }
  return rows;
}

// cv2.dnn.NMSBoxes on the integer boxes FaceDetectorYN gives it
function nms(rows, cfg) {
  const order = rows.map((r, i) => i).sort((a, b) => rows[b][14] - rows[a][14]).slice(0, cfg.topK);
  const boxes = rows.map((r) => r.slice(0, 4).map(Math.trunc));
  const iouInt = (a, b) => {
    const w = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
    const h = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
    const inter = w > 0 && h > 0 ? w * h : 0, union = a[2] * a[3] + b[2] * b[3] - inter;
    return union > 0 ? inter / union : 0;
  };
  const keep = [];
  for (const i of order) {
    if (keep.every((k) => iouInt(boxes[i], boxes[k]) <= cfg.nmsThreshold)) keep.push(i);
  }
  return keep.map((i) => rows[i]);
}

async function detectAt(img, side, cfg, timing) {
  const s = side / Math.max(img.w, img.h);
  const tw = Math.max(1, roundHalfEven(img.w * s)), th = Math.max(1, roundHalfEven(img.h * s));
  const work = tw === img.w && th === img.h ? img : cvResize(img, tw, th, s < 1);
  const sx = img.w / tw, sy = img.h / th;
  const faces = (await yunetRun(work, cfg, timing)).map((row) => ({
    box: [row[0] * sx, row[1] * sy, (row[0] + row[2]) * sx, (row[1] + row[3]) * sy],
    score: row[14],
    // points map through pixel centres, as cv2.resize samples them
    landmarks: [0, 1, 2, 3, 4].map((k) => [(row[4 + 2 * k] + 0.5) * sx - 0.5,
                                            (row[5 + 2 * k] + 0.5) * sy - 0.5]),
  }));
  return faces.sort((a, b) => b.score - a.score);
}

function nearestCentre(rows, c) {
  let best = null, bestDist = Infinity;
  for (const r of rows) {
    const d = Math.hypot(r[0] + r[2] / 2 - c / 2, r[1] + r[3] / 2 - c / 2);
    if (d < bestDist) { best = r; bestDist = d; }
  }
  if (best === null || bestDist > c / 4) return null;
  return [0, 1, 2, 3, 4].map((k) => [best[4 + 2 * k], best[5 + 2 * k]]);
}

// detect.py's _refine: re-detect the face on upright crops framed like UTKFace's
async function refine(img, face, cfg, timing) {
  let pts = face.landmarks;
  for (let k = 0; k < cfg.refine; k++) {
    const last = k === cfg.refine - 1;
    const c = last ? cfg.refineSize : Math.min(COARSE_SIZE, cfg.refineSize);
    const faceSide = c / (1 + 2 * REFINE_MARGIN);
    const frame = template(faceSide).map(([x, y]) => [x + (c - faceSide) / 2, y + (c - faceSide) / 2]);
    let m;
    try { m = similarity(pts, frame); } catch (err) { break; }
    const crop = warp(img, m, c);
    const found = [nearestCentre(await yunetRun(crop, cfg, timing), c)];
    if (cfg.flip && last) {
      const mirrored = nearestCentre(await yunetRun(mirror(crop), cfg, timing), c);
      if (mirrored) {  // the person's right is now on the left
        const back = mirrored.map(([x, y]) => [c - 1 - x, y]);
        found.push([back[1], back[0], back[2], back[4], back[3]]);
      }
    }
    const ok = found.filter((f) => f !== null);
    if (ok.length === 0) break;
    const mean = [0, 1, 2, 3, 4].map((i) => [0, 1].map(
      (j) => ok.reduce((s, f) => s + f[i][j], 0) / ok.length));
    const inv = invertAffine(m);
    pts = mean.map((p) => applyAffine(inv, p));
  }
  return { box: face.box, score: face.score, landmarks: pts };
}

async function detectFaces(img, cfg, timing) {
  const long = Math.max(img.w, img.h);
  const sides = [long > cfg.maxSide ? cfg.maxSide : long < cfg.minSide ? cfg.minSide : long];
  if (sides[0] > FALLBACK_SIDE) sides.push(FALLBACK_SIDE);
  let faces = [];
  for (const side of sides) {
    faces = await detectAt(img, side, cfg, timing);
    if (faces.length) break;
  }
  const refined = [];
  for (const face of faces) refined.push(cfg.refine ? await refine(img, face, cfg, timing) : face);
  return refined;
}

// ------------------------------------------------------------------ preprocess (images.py)

function toGray(img) {  // PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point
  const out = makeImage(img.w, img.h, 1);
  for (let i = 0, j = 0; j < out.data.length; i += 3, j++) {
    out.data[j] = (img.data[i] * 19595 + img.data[i + 1] * 38470 + img.data[i + 2] * 7471 + 0x8000) >> 16;
  }
  return out;
}

const PIL_FILTERS = {  // [support, kernel] of Pillow's resampling filters
  nearest: null,
  box: [0.5, (x) => (x > -0.5 && x <= 0.5 ? 1 : 0)],
  bilinear: [1, (x) => Math.max(0, 1 - Math.abs(x))],
  hamming: [1, (x) => {
    x = Math.abs(x);
    if (x === 0) return 1;
    if (x >= 1) return 0;
    return (Math.sin(Math.PI * x) / (Math.PI * x)) * (0.54 + 0.46 * Math.cos(Math.PI * x));
  }],
  bicubic: [2, (x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
  }],
  lanczos: [3, (x) => {
    const sinc = (t) => (t === 0 ? 1 : Math.sin(Math.PI * t) / (Math.PI * t));
    return x > -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
  }],
};

// Pillow's ImagingResample coefficients (antialiasing when shrinking), in its 22-bit fixed point
function pilTaps(inSize, outSize, name) {
  const scale = inSize / outSize, taps = [];
  if (PIL_FILTERS[name] === null) {  // nearest
    for (let d = 0; d < outSize; d++) taps.push([[Math.min(Math.floor((d + 0.5) * scale), inSize - 1), 1 << 22]]);
    return taps;
  }
  const [support0, kernel] = PIL_FILTERS[name], fs = Math.max(scale, 1), support = support0 * fs;
  for (let d = 0; d < outSize; d++) {
    const centre = (d + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(centre - support + 0.5)), hi = Math.min(inSize, Math.trunc(centre + support + 0.5));
    const ws = [];
    for (let s = lo; s < hi; s++) ws.push(kernel((s - centre + 0.5) / fs));
    const total = ws.reduce((a, b) => a + b, 0);
    taps.push(ws.map((w, i) => [lo + i, Math.trunc((total ? w / total : w) * (1 << 22) + (w < 0 ? -0.5 : 0.5))]));
  }
  return taps;
}

function pilPass(img, taps, horizontal) {
  const { w, h, c } = img, ow = horizontal ? taps.length : w, oh = horizontal ? h : taps.length;
  const out = makeImage(ow, oh, c);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      for (let k = 0; k < c; k++) {
        let acc = 1 << 21;  // rounding
        for (const [s, wt] of taps[horizontal ? x : y]) {
          acc += wt * img.data[((horizontal ? y : s) * w + (horizontal ? s : x)) * c + k];
        }
        out.data[(y * ow + x) * c + k] = clamp(Math.floor(acc / (1 << 22)), 0, 255);
      }
    }
  }
  return out;
}

function pilResize(img, size, name) {
  let out = img;
  if (img.w !== size) out = pilPass(out, pilTaps(img.w, size, name), true);
  if (img.h !== size) out = pilPass(out, pilTaps(img.h, size, name), false);
  return out;
}

// images.py's preprocess: centre square, the model's colour, its size and interpolation
function preprocess(img, dataConfig) {
  const size = dataConfig.input_size[1];
  let x = dataConfig.color === "gray" ? toGray(img) : img;
  if (x.w !== x.h) {
    const side = Math.min(x.w, x.h), left = Math.floor((x.w - side) / 2), top = Math.floor((x.h - side) / 2);
    const sq = makeImage(side, side, x.c);
    for (let y = 0; y < side; y++) {
      sq.data.set(x.data.subarray(((top + y) * x.w + left) * x.c, ((top + y) * x.w + left + side) * x.c), y * side * x.c);
    }
    x = sq;
  }
  return x.w === size ? x : pilResize(x, size, dataConfig.interpolation || "bilinear");
}

function alignFace(img, face) {
  return warp(img, similarity(face.landmarks, template(UTKFACE_SIZE)), UTKFACE_SIZE);
}

// ------------------------------------------------------------------ the age/gender network

async function predictCrops(crops, timing) {
  const cfg = state.model, [chans, size] = cfg.data_config.input_size;
  const n = crops.length, views = cfg.tta ? 2 : 1, plane = size * size;
  const x = new Uint8Array(n * views * chans * plane);  // (B, C, H, W)
  crops.forEach((crop, b) => {
    for (let v = 0; v < views; v++) {
      const base = (v * n + b) * chans * plane;
      for (let y = 0; y < size; y++) {
        for (let xx = 0; xx < size; xx++) {
          const from = v ? size - 1 - xx : xx;  // the mirrored view rides in the same batch
          for (let k = 0; k < chans; k++) {
            x[base + k * plane + y * size + xx] = crop.data[(y * size + from) * chans + k];
          }
        }
      }
    }
  });
  const t0 = performance.now();
  const input = state.session.inputNames[0];
  const out = await state.session.run({ [input]: new ort.Tensor("uint8", x, [n * views, chans, size, size]) });
  timing.wasm_ms += performance.now() - t0;
  timing.model_ms += performance.now() - t0;
  return mergeViews(out, n, views);
}

// runtime.py's merge_views: means, and the spread of the mixture of the views' distributions
function mergeViews(out, n, views) {
  const has = (k) => k in out, res = [];
  for (let b = 0; b < n; b++) {
    const idx = Array.from({ length: views }, (_, v) => v * n + b);
    const mean = (f) => idx.reduce((s, i) => s + f(i), 0) / views;
    const age = mean((i) => out.age.data[i]);
    const face = { age, p_female: mean((i) => out.p_female.data[i]) };
    if (has("age_std")) {
      const second = mean((i) => out.age_std.data[i] ** 2 + out.age.data[i] ** 2);
      face.age_std = Math.sqrt(Math.max(second - age * age, 0));
    }
    res.push(face);
  }
  return res;
}

function toFace(est, box, score, landmarks) {  // face.py's faces_from, plus the landmarks
  const face = { box, score, landmarks, age: est.age, gender: est.p_female >= 0.5 ? "female" : "male",
                 p_female: est.p_female };
  if (est.age_std !== undefined) {
    const half = INTERVAL_Z * est.age_std;
    face.age_interval = [Math.max(est.age - half, 0), est.age + half];
  }
  face.age_std = est.age_std;
  return face;
}

// The whole pipeline on an RGB image: a list of faces, best score first.
async function analyse(img, { aligned = false, cfg = DETECTOR } = {}) {
  const timing = { wasm_ms: 0, model_ms: 0, detector_runs: 0, faces: 0 };
  const t0 = performance.now();
  let faces, crops;
  if (aligned) {
    faces = [{ box: [0, 0, img.w, img.h], score: 1 }];
    crops = [preprocess(img, state.model.data_config)];
  } else {
    faces = await detectFaces(img, cfg, timing);
    timing.detect_ms = performance.now() - t0;
    crops = faces.map((f) => preprocess(alignFace(img, f), state.model.data_config));
  }
  const est = crops.length ? await predictCrops(crops, timing) : [];
  timing.total_ms = performance.now() - t0;
  timing.js_ms = timing.total_ms - timing.wasm_ms;  // decoding, resampling, warps: plain JS
  timing.faces = faces.length;
  timing.per_face_ms = faces.length ? timing.total_ms / faces.length : null;
  timing.model_per_face_ms = faces.length ? timing.model_ms / faces.length : null;
  return { faces: faces.map((f, i) => toFace(est[i], f.box, f.score, f.landmarks)), timing };
}

// ------------------------------------------------------------------ loading the runtime

const state = { yunet: null, session: null, model: null };
const $ = (id) => document.getElementById(id);

async function wasmBinary(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error("cannot load " + url + ": " + response.status);
  const bytes = new Uint8Array(await response.arrayBuffer());
  // a host may already have inflated it (Content-Encoding: gzip): then it starts with \0asm
  if (bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes.buffer;
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return await new Response(stream).arrayBuffer();
}

async function load() {
  const base = new URL("vendor/ort/", document.baseURI).href;
  ort.env.wasm.numThreads = 1;  // threads would need cross-origin isolation headers
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = { mjs: base + "ort-wasm-simd-threaded.mjs" };
  ort.env.wasm.wasmBinary = await wasmBinary(base + "ort-wasm-simd-threaded.wasm.gz");
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const config = await (await fetch("models/model.json")).json();
  state.yunet = await ort.InferenceSession.create("models/yunet.onnx", options);
  state.session = await ort.InferenceSession.create("models/" + config.file, options);
  state.model = config;
  // one run of each on blank input: the first run of a session is several times slower
  const timing = { wasm_ms: 0, model_ms: 0, detector_runs: 0 };
  await yunetRun(makeImage(64, 64, 3), DETECTOR, timing);
  const [chans, size] = config.data_config.input_size;
  await predictCrops([makeImage(size, size, chans)], timing);
}

// ------------------------------------------------------------------ the page

let busy = false;

function setStatus(text, isError) {
  const line = $("status");
  line.textContent = text;
  line.className = isError ? "error" : "";
}

function fillTable(faces) {
  const body = $("faces").querySelector("tbody");
  body.replaceChildren();
  faces.forEach((face, i) => {
    const row = document.createElement("tr");
    const cells = [
      [String(face.track || i + 1)],
      [faceLabel(face), "label " + face.gender],
      [face.gender],
      [face.p_female.toFixed(2)],
      [face.age.toFixed(1)],
      [face.age_interval ? face.age_interval.map((v) => v.toFixed(0)).join("-") : "", "opt"],
      [face.box.map((v) => Math.round(v)).join(", "), "opt"],
      [face.score.toFixed(2), "opt"],
    ];
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      row.appendChild(td);
    }
    body.appendChild(row);
  });
  $("faces").classList.toggle("hidden", faces.length === 0);
}

function publish(faces, timing) {  // what scripts and tests read
  window.agegender.lastResult = faces.map((f) => {
    const out = { box: f.box, age: f.age, gender: f.gender, p_female: f.p_female, score: f.score };
    if (f.age_interval) out.age_interval = f.age_interval;
    if (f.landmarks) out.landmarks = f.landmarks;
    if (f.track) out.track = f.track;
    return out;
  });
  window.agegender.lastTiming = timing;
}

function pixels(source, w, h) {
  const grab = document.createElement("canvas");
  grab.width = w;
  grab.height = h;
  const ctx = grab.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(source, 0, 0, w, h);
  return fromImageData(ctx.getImageData(0, 0, w, h));
}

async function analysePhoto(blob, name) {
  if (!state.session || busy) return;
  busy = true;
  setStatus("analysing " + name + " in this browser ...");
  try {
    // boxes refer to the EXIF-upright image, which is how the package decodes it too
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
    const { faces, timing } = await analyse(pixels(bitmap, bitmap.width, bitmap.height),
                                            { aligned: $("aligned").checked });
    drawFaces($("canvas"), bitmap, faces);
    fillTable(faces);
    publish(faces, timing);
    const n = faces.length, ms = timing.total_ms.toFixed(0);
    setStatus(n === 0 ? "No face found (" + ms + " ms, on this device)."
                      : n + (n === 1 ? " face" : " faces") + " in " + ms + " ms, on this device.");
  } catch (err) {
    setStatus("Error: " + (err && err.message ? err.message : err), true);
  } finally {
    busy = false;
  }
}

// ------------------------------------------------------------------ webcam, with tracking

// A small IoU tracker: each detection joins the live track whose last box overlaps it most
// (IoU >= TRACK_IOU, greedy, best pairs first) or starts a new one; a track unseen for
// TRACK_TTL_MS is dropped. A track's estimate pools its frames: mean age and P(female), and
// the spread of the mixture of the frames' age distributions, so labels settle.
const TRACK_IOU = 0.3, TRACK_TTL_MS = 2000, LIVE_SIDE = 640;
let stream = null, live = null;

function boxIou(a, b) {
  const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
  const inter = w > 0 && h > 0 ? w * h : 0;
  const area = (z) => (z[2] - z[0]) * (z[3] - z[1]);
  return inter / Math.max(area(a) + area(b) - inter, 1e-9);
}

function track(run, faces, now) {
  run.tracks = run.tracks.filter((t) => now - t.seen <= TRACK_TTL_MS);
  const pairs = [];
  faces.forEach((f, i) => run.tracks.forEach((t, j) => {
    const v = boxIou(f.box, t.box);
    if (v >= TRACK_IOU) pairs.push([v, i, j]);
  }));
  pairs.sort((a, b) => b[0] - a[0]);
  const faceTrack = new Map(), used = new Set();
  for (const [, i, j] of pairs) {
    if (!faceTrack.has(i) && !used.has(j)) { faceTrack.set(i, run.tracks[j]); used.add(j); }
  }
  return faces.map((f, i) => {
    let t = faceTrack.get(i);
    if (!t) {
      t = { id: ++run.nextId, n: 0, age: 0, p: 0, second: 0 };
      run.tracks.push(t);
    }
    t.box = f.box; t.seen = now; t.n += 1;
    t.age += (f.age - t.age) / t.n;
    t.p += (f.p_female - t.p) / t.n;
    t.second += ((f.age_std || 0) ** 2 + f.age ** 2 - t.second) / t.n;
    return pooled(f, t);
  });
}

function pooled(face, t) {
  const out = { box: face.box, score: face.score, track: t.id, age: t.age, p_female: t.p,
                gender: t.p >= 0.5 ? "female" : "male", frames: t.n };
  if (face.age_interval) {
    const half = INTERVAL_Z * Math.sqrt(Math.max(t.second - t.age * t.age, 0));
    out.age_interval = [Math.max(t.age - half, 0), t.age + half];
  }
  return out;
}

async function liveLoop(run) {
  const video = $("video");
  while (live === run) {
    if (video.videoWidth && !busy) {
      busy = true;
      try {
        const scale = Math.min(1, LIVE_SIDE / Math.max(video.videoWidth, video.videoHeight));
        const w = Math.round(video.videoWidth * scale), h = Math.round(video.videoHeight * scale);
        const frame = document.createElement("canvas");
        frame.width = w; frame.height = h;
        frame.getContext("2d").drawImage(video, 0, 0, w, h);
        const img = fromImageData(frame.getContext("2d").getImageData(0, 0, w, h));
        const { faces, timing } = await analyse(img, { cfg: DETECTOR_FAST });
        if (live !== run) break;
        const tracked = track(run, faces, performance.now());
        drawFaces($("canvas"), frame, tracked);
        fillTable(tracked);
        publish(tracked, timing);
        run.frames += 1;
        setStatus("live: " + tracked.length + (tracked.length === 1 ? " person" : " persons") +
                  ", " + timing.total_ms.toFixed(0) + " ms a frame, " + run.frames + " frames, on this device");
      } catch (err) {
        setStatus("Error: " + (err && err.message ? err.message : err), true);
        live = null;
      } finally {
        busy = false;
      }
    }
    await new Promise((done) => requestAnimationFrame(done));
  }
  $("live").textContent = "Live";
}

async function toggleCamera() {
  const video = $("video");
  if (stream) {  // second click: stop the camera
    stream.getTracks().forEach((t) => t.stop());
    stream = null;
    live = null;
    for (const id of ["video", "snap", "live"]) $(id).classList.add("hidden");
    $("camera").textContent = "Use the webcam";
    return;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus("No camera access here (browsers allow it on https or localhost only).", true);
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" } });
  } catch (err) {
    setStatus("Camera unavailable: " + err.message, true);
    return;
  }
  video.srcObject = stream;
  for (const id of ["video", "snap", "live"]) $(id).classList.remove("hidden");
  $("camera").textContent = "Stop the webcam";
}

function wire() {
  const drop = $("drop"), fileInput = $("file");
  const take = (file) => {
    if (file.type.startsWith("video/")) {
      setStatus("Videos are analysed by the server page only; here, use photos or the webcam.", true);
    } else {
      analysePhoto(file, file.name);
    }
  };
  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") fileInput.click(); });
  fileInput.addEventListener("change", () => {
    if (fileInput.files.length) take(fileInput.files[0]);
    fileInput.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) take(e.dataTransfer.files[0]); });
  $("camera").addEventListener("click", toggleCamera);
  $("live").addEventListener("click", () => {
    if (live) { live = null; return; }
    live = { frames: 0, tracks: [], nextId: 0 };
    $("live").textContent = "Stop live";
    liveLoop(live);
  });
  $("snap").addEventListener("click", () => {
    const video = $("video"), grab = document.createElement("canvas");
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    grab.toBlob((blob) => analysePhoto(blob, "webcam.jpg"), "image/jpeg", 0.92);
  });
}

window.agegender = { ready: false, error: null, lastResult: null, lastTiming: null,
                     analyse, analysePhoto };

wire();
setStatus("loading the detector and the model (about 7 MB, once) ...");
const loadStart = performance.now();
load().then(() => {
  window.agegender.ready = true;
  window.agegender.loadMs = performance.now() - loadStart;
  setStatus("Ready: everything runs in this browser (" + (window.agegender.loadMs / 1000).toFixed(1) +
            " s to load). Choose a photo.");
}).catch((err) => {
  window.agegender.error = String(err && err.message ? err.message : err);
  setStatus("Cannot start the in-browser model: " + window.agegender.error, true);
});
