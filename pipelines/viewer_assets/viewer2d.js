// volscan report viewer for 2D runs: plain canvas, no library, no network. Left: the image;
// right: the image under its anomaly map where the map is above the threshold slider (score
// units), the mask outlined in cyan. Image data come as <script> files (viewer/data2d/*.js)
// because browsers refuse fetch() of file:// URLs but allow classic scripts (viewer_common.js); the PNGs inside
// are data URLs, which do not taint a canvas, so the map's 8-bit codes can be read back.
(function () {
  "use strict";
  const images = window.VOLSCAN_IMAGES || [];
  const status = document.getElementById("v2-status");
  const list = document.getElementById("v2-list");
  const slider = document.getElementById("v2-threshold");
  const shown = document.getElementById("v2-threshold-value");
  const maskBox = document.getElementById("v2-mask");
  const left = document.getElementById("v2-image");
  const right = document.getElementById("v2-overlay");
  // Inferno at 9 even stops (matplotlib), interpolated linearly: the colours of the PNG heat maps.
  const STOPS = [[0, 0, 4], [33, 12, 74], [87, 16, 110], [138, 34, 106], [188, 55, 84], [228, 90, 49],
    [249, 142, 9], [249, 203, 53], [252, 255, 164]];
  const ALPHA = 0.6;
  const common = window.volscanViewerCommon("volscanViewer2d", images, status);
  const say = common.say, fail = common.fail;
  let current = null; // {index, pixels: {image, map, mask}}

  function inferno(t) {
    const x = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i;
    return STOPS[i].map((c, k) => c + f * (STOPS[i + 1][k] - c));
  }

  function decode(base64, width, height) {
    return new Promise((resolve, reject) => {
      const picture = new Image();
      picture.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = width;
        canvas.height = height;
        const context = canvas.getContext("2d");
        context.drawImage(picture, 0, 0, width, height);
        resolve(context.getImageData(0, 0, width, height));
      };
      picture.onerror = () => reject(new Error("cannot decode an embedded PNG"));
      picture.src = "data:image/png;base64," + base64;
    });
  }

  function draw() {
    if (!current) return;
    const item = images[current.index];
    const { image, map, mask } = current.pixels;
    const width = image.width, height = image.height;
    const span = item.high - item.low || 1;
    const threshold = Number(slider.value);
    const out = new ImageData(width, height);
    const rgba = out.data, base = image.data, codes = map.data;
    let above = 0;
    for (let p = 0; p < width * height; p++) {
      const o = 4 * p;
      const score = item.low + (codes[o] / 255) * span;
      let r = base[o], g = base[o + 1], b = base[o + 2];
      if (score >= threshold) {
        const [cr, cg, cb] = inferno((score - item.low) / span);
        r = (1 - ALPHA) * r + ALPHA * cr;
        g = (1 - ALPHA) * g + ALPHA * cg;
        b = (1 - ALPHA) * b + ALPHA * cb;
        above++;
      }
      rgba[o] = r; rgba[o + 1] = g; rgba[o + 2] = b; rgba[o + 3] = 255;
    }
    if (mask && maskBox.checked) {
      const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && mask.data[4 * (y * width + x)] > 127;
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) {
          if (inside(x, y) && !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1))) {
            const o = 4 * (y * width + x);
            rgba[o] = 0; rgba[o + 1] = 255; rgba[o + 2] = 255;
          }
        }
      }
    }
    right.width = width;
    right.height = height;
    right.getContext("2d").putImageData(out, 0, 0);
    shown.textContent = threshold.toPrecision(4);
    status.dataset.above = String(above);
    status.dataset.colours = String(common.colourCount(right.getContext("2d").getImageData(0, 0, width, height).data));
  }

  async function show(index) {
    const item = images[index];
    say("loading " + item.id + " ...", "loading");
    const data = await common.load(index);
    const [image, map, mask] = await Promise.all([
      decode(data.image, data.width, data.height), decode(data.map, data.width, data.height),
      data.mask ? decode(data.mask, data.width, data.height) : Promise.resolve(null),
    ]);
    current = { index, pixels: { image, map, mask } };
    left.width = data.width;
    left.height = data.height;
    left.getContext("2d").putImageData(image, 0, 0);
    for (const row of list.querySelectorAll("tr[data-index]")) {
      row.style.background = Number(row.dataset.index) === index ? "#ffe9a8" : "";
    }
    draw();
    say(item.id + ": rank " + item.rank + ", score " + item.score.toPrecision(4) + ", hotspot pixel (row, col) "
      + item.hotspot.join(", ") + (item.flagged ? " (flagged)" : ""), "drawn");
  }

  function start() {
    if (!images.length) return say("no images to show", "empty");
    common.setRange(slider, images[0]);
    images.forEach((item, i) => {
      const row = list.insertRow();
      row.dataset.index = String(i);
      row.tabIndex = 0;
      row.style.cursor = "pointer";
      [String(item.rank), item.id + (item.flagged ? " *" : ""), item.score.toPrecision(4)].forEach((text) => {
        row.insertCell().textContent = text;
      });
      row.addEventListener("click", () => show(i).catch(fail));
      row.addEventListener("keydown", (event) => {
        const step = { ArrowDown: 1, ArrowUp: -1 }[event.key];
        const next = list.querySelector(`tr[data-index="${i + (step || 0)}"]`);
        if (step && next) { event.preventDefault(); next.focus(); show(i + step).catch(fail); }
      });
    });
    slider.addEventListener("input", draw);
    maskBox.addEventListener("change", draw);
    // A link may name the image and threshold: report.html#image=ID&threshold=SCORE.
    const wanted = new URLSearchParams(window.location.hash.slice(1));
    if (wanted.has("threshold")) slider.value = wanted.get("threshold");
    const named = images.findIndex((item) => item.id === wanted.get("image"));
    return show(named >= 0 ? named : 0);
  }

  Promise.resolve().then(start).catch(fail);
})();
