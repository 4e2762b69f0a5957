// volscan report viewer: one scan at a time in NiiVue (vendored UMD build, no network), its
// anomaly map as a "warm" overlay above a threshold slider, mask outline in cyan, three
// planes, crosshair on the hotspot. Scan data come as <script> files (viewer/data/*.js)
// because browsers refuse fetch() of file:// URLs but allow classic scripts (viewer_common.js).
(function () {
  "use strict";
  const scans = window.VOLSCAN_SCANS || [];
  const status = document.getElementById("vs-status");
  const select = document.getElementById("vs-scan");
  const slider = document.getElementById("vs-threshold");
  const shown = document.getElementById("vs-threshold-value");
  const common = window.volscanViewerCommon("volscanViewer", scans, status);
  const say = common.say, scanData = common.load, fail = common.fail;
  let nv = null;
  let overlay = null;

  // Distinct colours in the drawn frame, read back right after drawing (before the browser
  // composites and may clear the buffer).
  function colourCount() {
    const gl = nv.gl;
    const w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
    const pixels = new Uint8Array(4 * w * h);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
    return common.colourCount(pixels);
  }

  async function show(index) {
    const scan = scans[index];
    say("loading " + scan.id + " ...", "loading");
    const data = await scanData(index);
    while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
    const base = await niivue.NVImage.loadFromBase64({ base64: data.image, name: scan.id + ".nii.gz", colorbarVisible: false });
    nv.addVolume(base);
    overlay = await niivue.NVImage.loadFromBase64({
      base64: data.map, name: scan.id + "_map.nii.gz", colormap: "warm", opacity: 0.6,
      cal_min: Number(slider.value), cal_max: scan.high,
    });
    nv.addVolume(overlay);
    // NiiVue computes its own display range on load; the slider's threshold and the cohort's
    // maximum are what this map must be shown with (values below the threshold transparent).
    overlay.cal_min = Number(slider.value);
    overlay.cal_max = scan.high;
    if (data.label) {
      const label = await niivue.NVImage.loadFromBase64({
        base64: data.label, name: scan.id + "_mask.nii.gz", colormap: "blue", opacity: 0.35, cal_min: 0.5, cal_max: 1,
        colorbarVisible: false,
      });
      nv.addVolume(label);
    }
    if (scan.hotspot_mm) nv.scene.crosshairPos = nv.mm2frac(scan.hotspot_mm);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.updateGLVolume();
    nv.drawScene();
    status.dataset.colours = String(colourCount());
    say(scan.id + ": rank " + scan.rank + ", hotspot " + (scan.hotspot_mm ? scan.hotspot_mm.join(", ") + " mm (RAS)" : "-"), "drawn");
  }

  function setThreshold() {
    shown.textContent = Number(slider.value).toPrecision(4);
    if (!overlay) return;
    overlay.cal_min = Number(slider.value);
    nv.updateGLVolume();
  }

  async function start() {
    if (!scans.length) return say("no 3D scans to show", "empty");
    if (!window.niivue) return say("viewer bundle viewer/niivue.umd.js did not load", "error");
    common.setRange(slider, scans[0]);
    scans.forEach((scan, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = scan.rank + ". " + scan.id + (scan.flagged ? " (flagged)" : "");
      select.appendChild(option);
    });
    nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: true, crosshairColor: [0, 1, 0, 0.7], crosshairWidth: 0.5,
      isRadiologicalConvention: true, // patient's right on the screen's left, as in the report's panels
    });
    await nv.attachTo("vs-canvas");
    select.addEventListener("change", () => show(Number(select.value)).catch(fail));
    slider.addEventListener("input", setThreshold);
    setThreshold();
    await show(0);
  }

  start().catch(fail);
})();
