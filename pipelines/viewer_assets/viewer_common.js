// What the 3D (viewer.js) and 2D (viewer2d.js) report viewers share: the data scripts that
// register themselves (browsers refuse fetch() of file:// URLs but allow classic <script src>),
// the status line the browser tests read (data-state, data-errors), the error path, the
// threshold slider's range and the blank-canvas check.
window.volscanViewerCommon = function (registry, items, status) {
  "use strict";
  const loaded = {};
  const waiting = {};
  window[registry] = {
    register(index, data) {
      loaded[index] = data;
      if (waiting[index]) waiting[index](data);
    },
  };

  function say(text, state) {
    status.textContent = text;
    if (state) status.dataset.state = state;
    status.dataset.errors = JSON.stringify(window.volscanErrors || []);
  }

  return {
    say,
    // The data of item `index`, loading its script on first use.
    load(index) {
      if (loaded[index]) return Promise.resolve(loaded[index]);
      return new Promise((resolve, reject) => {
        waiting[index] = resolve;
        const tag = document.createElement("script");
        tag.src = items[index].file;
        tag.onerror = () => reject(new Error("cannot load " + items[index].file));
        document.head.appendChild(tag);
      });
    },
    fail(error) {
      say("viewer error: " + error, "error");
      console.error(error);
    },
    // Slider over the run's score range [low, high] in 500 steps, starting at `threshold`.
    setRange(slider, item) {
      slider.min = String(item.low);
      slider.max = String(item.high);
      slider.step = String((item.high - item.low) / 500 || 1);
      slider.value = String(item.threshold);
    },
    // Distinct colours among every 7th pixel of RGBA bytes: a blank canvas has one.
    colourCount(pixels) {
      const seen = new Set();
      for (let i = 0; i < pixels.length; i += 4 * 7) seen.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
      return seen.size;
    },
  };
};
