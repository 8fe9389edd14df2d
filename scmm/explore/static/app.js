// scmm explore: the page. Every text that comes from the data is put on the page with textContent (never as HTML).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) history.replaceState(null, "", location.pathname); // the cookie holds it now; keep it off the screen

  // --- small helpers ------------------------------------------------------------------------------
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function status(text, isError) {
    const s = $("status");
    s.textContent = text || "";
    s.className = isError ? "error" : "";
  }
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h["X-Scmm-Token"] = token;
    return h;
  }
  async function request(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    opts.credentials = "same-origin";
    const r = await fetch(path, opts);
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error || message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return r;
  }
  async function getJSON(path, options) { return (await request(path, options)).json(); }
  // a binary answer: uint32 length, JSON metadata, then a little-endian typed array
  async function getFramed(path, options, ArrayType) {
    const buf = await (await request(path, options)).arrayBuffer();
    const len = new DataView(buf).getUint32(0, true);
    const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, len)));
    const Type = ArrayType || (meta.kind === "categorical" ? Uint16Array : Float32Array);
    return { meta: meta, values: new Type(buf, 4 + len) };
  }
  function postJSON(body) {
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  function postCells(cells) {
    return { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: Uint32Array.from(cells) };
  }
  function fmt(x, digits) { return x === null || x === undefined ? "" : Number(x).toFixed(digits === undefined ? 3 : digits); }

  // --- colours --------------------------------------------------------------------------------------
  const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
    [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232], [255, 187, 120],
    [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148], [247, 182, 210], [219, 219, 141],
    [158, 218, 229], [57, 59, 121]];
  const MISSING = [205, 208, 214];
  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]; // viridis stops
  function ramp(t) {
    if (!(t >= 0)) t = 0;
    if (t > 1) t = 1;
    const x = t * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
    const a = RAMP[i], b = RAMP[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
  }
  function rgb(c) { return "rgb(" + Math.round(c[0]) + "," + Math.round(c[1]) + "," + Math.round(c[2]) + ")"; }

  // --- the WebGL map ------------------------------------------------------------------------------
  const VERTEX = [
    "attribute vec2 a_pos; attribute vec4 a_col;",
    "uniform vec2 u_center; uniform vec2 u_scale; uniform float u_size; uniform float u_pass;",
    "varying vec4 v_col;",
    "void main() {",
    "  bool front = a_col.a > 0.99;",
    "  if ((u_pass < 0.5 && front) || (u_pass > 0.5 && !front)) { gl_Position = vec4(2.0, 2.0, 2.0, 1.0); return; }",
    "  gl_Position = vec4((a_pos - u_center) * u_scale, 0.0, 1.0);",
    "  gl_PointSize = u_size; v_col = a_col;",
    "}"].join("\n");
  const FRAGMENT = [
    "precision mediump float; varying vec4 v_col;",
    "void main() {",
    "  vec2 d = gl_PointCoord - vec2(0.5);",
    "  if (dot(d, d) > 0.25) discard;",
    "  gl_FragColor = v_col;",
    "}"].join("\n");

  class MapView {
    constructor(canvas, overlay) {
      this.canvas = canvas;
      this.overlay = overlay;
      const gl = canvas.getContext("webgl", { preserveDrawingBuffer: true, antialias: false, alpha: false });
      if (!gl) throw new Error("this browser has no WebGL");
      this.gl = gl;
      const program = gl.createProgram();
      for (const [type, src] of [[gl.VERTEX_SHADER, VERTEX], [gl.FRAGMENT_SHADER, FRAGMENT]]) {
        const shader = gl.createShader(type);
        gl.shaderSource(shader, src);
        gl.compileShader(shader);
        if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
        gl.attachShader(program, shader);
      }
      gl.linkProgram(program);
      if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
      gl.useProgram(program);
      this.loc = {
        pos: gl.getAttribLocation(program, "a_pos"), col: gl.getAttribLocation(program, "a_col"),
        center: gl.getUniformLocation(program, "u_center"), scale: gl.getUniformLocation(program, "u_scale"),
        size: gl.getUniformLocation(program, "u_size"), pass: gl.getUniformLocation(program, "u_pass"),
      };
      this.posBuffer = gl.createBuffer();
      this.colBuffer = gl.createBuffer();
      this.n = 0;
      this.center = [0, 0];
      this.zoom = 1; // pixels per data unit
      this.baseZoom = 1;
      this.pending = false;
      this.marks = { cell: -1, lasso: null };
      this.dimmed = false; // whether some cells are drawn dimmed (a second pass draws them first)
    }
    setPoints(xy, bounds) {
      const gl = this.gl;
      this.xy = xy;
      this.n = xy.length / 2;
      gl.bindBuffer(gl.ARRAY_BUFFER, this.posBuffer);
      gl.bufferData(gl.ARRAY_BUFFER, xy, gl.STATIC_DRAW);
      this.bounds = bounds;
      this.fit();
    }
    fit() {
      const [x0, y0, x1, y1] = this.bounds;
      this.resize();
      const w = this.canvas.width, h = this.canvas.height;
      this.center = [(x0 + x1) / 2, (y0 + y1) / 2];
      this.zoom = 0.92 * Math.min(w / Math.max(x1 - x0, 1e-9), h / Math.max(y1 - y0, 1e-9));
      this.baseZoom = this.zoom;
      this.redraw();
    }
    setColours(rgba) {
      const gl = this.gl;
      gl.bindBuffer(gl.ARRAY_BUFFER, this.colBuffer);
      gl.bufferData(gl.ARRAY_BUFFER, rgba, gl.DYNAMIC_DRAW);
      this.redraw();
    }
    resize() {
      const dpr = window.devicePixelRatio || 1;
      for (const c of [this.canvas, this.overlay]) {
        const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
        if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
      }
    }
    pointSize() {
      const dpr = window.devicePixelRatio || 1;
      const base = this.n < 2000 ? 7 : this.n < 20000 ? 4.5 : this.n < 200000 ? 2.5 : 1.6;
      return Math.min(base * Math.sqrt(this.zoom / this.baseZoom), 14) * dpr;
    }
    redraw() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }
    draw() {
      const gl = this.gl;
      this.resize();
      const w = this.canvas.width, h = this.canvas.height;
      gl.viewport(0, 0, w, h);
      gl.clearColor(1, 1, 1, 1);
      gl.clear(gl.COLOR_BUFFER_BIT);
      if (this.n) {
        gl.enable(gl.BLEND);
        gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.posBuffer);
        gl.enableVertexAttribArray(this.loc.pos);
        gl.vertexAttribPointer(this.loc.pos, 2, gl.FLOAT, false, 0, 0);
        gl.bindBuffer(gl.ARRAY_BUFFER, this.colBuffer);
        gl.enableVertexAttribArray(this.loc.col);
        gl.vertexAttribPointer(this.loc.col, 4, gl.UNSIGNED_BYTE, true, 0, 0);
        gl.uniform2f(this.loc.center, this.center[0], this.center[1]);
        gl.uniform2f(this.loc.scale, 2 * this.zoom / w, 2 * this.zoom / h);
        gl.uniform1f(this.loc.size, this.pointSize());
        for (const pass of this.dimmed ? [0, 1] : [1]) { // dimmed cells first, highlighted ones on top
          gl.uniform1f(this.loc.pass, pass);
          gl.drawArrays(gl.POINTS, 0, this.n);
        }
      }
      this.drawOverlay();
      document.body.dataset.drawn = String((Number(document.body.dataset.drawn) || 0) + 1);
    }
    // canvas pixels (device) <-> data
    toScreen(x, y) {
      return [(x - this.center[0]) * this.zoom + this.canvas.width / 2,
        this.canvas.height / 2 - (y - this.center[1]) * this.zoom];
    }
    toData(px, py) {
      return [(px - this.canvas.width / 2) / this.zoom + this.center[0],
        (this.canvas.height / 2 - py) / this.zoom + this.center[1]];
    }
    drawOverlay() {
      const ctx = this.overlay.getContext("2d");
      ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
      const dpr = window.devicePixelRatio || 1;
      if (this.marks.cell >= 0) {
        const [sx, sy] = this.toScreen(this.xy[2 * this.marks.cell], this.xy[2 * this.marks.cell + 1]);
        ctx.lineWidth = 2.5 * dpr;
        ctx.strokeStyle = "#111";
        ctx.beginPath();
        ctx.arc(sx, sy, 9 * dpr, 0, 2 * Math.PI);
        ctx.stroke();
      }
      const lasso = this.marks.lasso;
      if (lasso && lasso.length > 1) {
        ctx.lineWidth = 1.5 * dpr;
        ctx.strokeStyle = "#2f5fb3";
        ctx.fillStyle = "rgba(47,95,179,0.08)";
        ctx.beginPath();
        lasso.forEach((p, i) => {
          const [sx, sy] = this.toScreen(p[0], p[1]);
          if (i) ctx.lineTo(sx, sy); else ctx.moveTo(sx, sy);
        });
        ctx.closePath();
        ctx.fill();
        ctx.stroke();
      }
    }
    zoomAt(px, py, factor) {
      const [dx, dy] = this.toData(px, py);
      this.zoom *= factor;
      this.center = [dx - (px - this.canvas.width / 2) / this.zoom, dy - (this.canvas.height / 2 - py) / this.zoom];
      this.redraw();
    }
    pan(dpx, dpy) {
      this.center = [this.center[0] - dpx / this.zoom, this.center[1] + dpy / this.zoom];
      this.redraw();
    }
    nearest(px, py, radius) {
      const [dx, dy] = this.toData(px, py);
      const r = radius / this.zoom;
      let best = -1, bestD = r * r;
      const xy = this.xy;
      for (let i = 0; i < this.n; i++) {
        const ex = xy[2 * i] - dx, ey = xy[2 * i + 1] - dy;
        const d = ex * ex + ey * ey;
        if (d <= bestD) { bestD = d; best = i; }
      }
      return best;
    }
    inside(poly) { // cell numbers inside a polygon of data points (even-odd rule)
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const [x, y] of poly) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
      const out = [], xy = this.xy, m = poly.length;
      for (let i = 0; i < this.n; i++) {
        const x = xy[2 * i], y = xy[2 * i + 1];
        if (x < x0 || x > x1 || y < y0 || y > y1) continue;
        let c = false;
        for (let a = 0, b = m - 1; a < m; b = a++) {
          const ya = poly[a][1], yb = poly[b][1];
          if ((ya > y) !== (yb > y) && x < (poly[b][0] - poly[a][0]) * (y - ya) / (yb - ya) + poly[a][0]) c = !c;
        }
        if (c) out.push(i);
      }
      return out;
    }
  }

  // --- the state of the page ----------------------------------------------------------------------
  const state = {
    info: null, view: null, colour: null, search: null, threshold: -Infinity,
    selection: null, // Uint32Array of cell numbers (a lasso or a legend entry), or null
    cell: -1, // the clicked cell, or -1
  };

  function paint() {
    const view = state.view, n = view.n;
    const rgba = new Uint8Array(4 * n);
    const c = state.colour, s = state.search;
    let pick;
    if (s) {
      const lo = s.meta.min, span = Math.max(s.meta.max - s.meta.min, 1e-9), v = s.values;
      pick = (i) => ramp((v[i] - lo) / span);
    } else if (c && c.meta.kind === "categorical") {
      const v = c.values;
      pick = (i) => (v[i] === 65535 ? MISSING : PALETTE[v[i] % PALETTE.length]);
    } else if (c) {
      const lo = c.meta.min, span = Math.max(c.meta.max - c.meta.min, 1e-9), v = c.values;
      pick = (i) => (Number.isFinite(v[i]) ? ramp((v[i] - lo) / span) : MISSING);
    } else {
      pick = () => [47, 95, 179];
    }
    let chosen = null, dimmed = false;
    if (state.selection) { chosen = new Uint8Array(n); for (const i of state.selection) chosen[i] = 1; }
    for (let i = 0; i < n; i++) {
      const col = pick(i);
      let front = true;
      if (s && s.values[i] < state.threshold) front = false;
      if (chosen && !chosen[i]) front = false;
      const o = 4 * i;
      if (front) { rgba[o] = col[0]; rgba[o + 1] = col[1]; rgba[o + 2] = col[2]; rgba[o + 3] = 255; }
      else { rgba[o] = 200; rgba[o + 1] = 203; rgba[o + 2] = 210; rgba[o + 3] = 110; dimmed = true; }
    }
    view.dimmed = dimmed;
    view.setColours(rgba);
  }

  function legend() {
    const box = $("legend");
    clear(box);
    const c = state.search ? { meta: { kind: "continuous", name: "similarity to \u201c" + state.search.meta.query + "\u201d",
      min: state.search.meta.min, max: state.search.meta.max } } : state.colour;
    if (!c) return;
    const title = el("div", c.meta.name + (c.meta.unit ? " (" + c.meta.unit + ")" : ""), "muted");
    box.appendChild(title);
    if (c.meta.kind === "categorical") {
      const order = c.meta.categories.map((_, i) => i).sort((a, b) => c.meta.counts[b] - c.meta.counts[a]);
      for (const k of order.slice(0, 200)) {
        const item = el("div", null, "legend-item");
        const sw = el("span", null, "swatch");
        sw.style.background = rgb(PALETTE[k % PALETTE.length]);
        item.appendChild(sw);
        const label = el("span", c.meta.categories[k], "legend-label");
        label.title = c.meta.categories[k];
        item.appendChild(label);
        item.appendChild(el("span", c.meta.counts[k].toLocaleString(), "legend-count"));
        item.addEventListener("click", () => selectCategory(k, c.meta.categories[k]));
        box.appendChild(item);
      }
      if (order.length > 200) box.appendChild(el("div", "and " + (order.length - 200) + " more", "muted"));
    } else {
      const bar = document.createElement("canvas");
      bar.className = "colourbar";
      bar.width = 256; bar.height = 1;
      const ctx = bar.getContext("2d");
      for (let x = 0; x < 256; x++) { ctx.fillStyle = rgb(ramp(x / 255)); ctx.fillRect(x, 0, 1, 1); }
      box.appendChild(bar);
      const ticks = el("div", null, "colourbar-ticks");
      ticks.appendChild(el("span", fmt(c.meta.min)));
      ticks.appendChild(el("span", fmt(c.meta.max)));
      box.appendChild(ticks);
    }
  }

  async function colourBy(query) {
    status("colouring\u2026");
    try {
      state.colour = await getFramed("/api/colour?" + query);
      state.search = null;
      $("search-controls").hidden = true;
      clear($("matches"));
      paint(); legend();
      status("");
    } catch (e) { status(e.message, true); }
  }

  function selectCategory(k, name) {
    const v = state.colour.values, out = [];
    for (let i = 0; i < v.length; i++) if (v[i] === k) out.push(i);
    select(out, name);
  }

  // --- search ------------------------------------------------------------------------------------
  async function search(query) {
    status("searching\u2026");
    try {
      const t0 = performance.now();
      state.search = await getFramed("/api/search", postJSON({ query: query, top: 50 }), Float32Array);
      const m = state.search.meta;
      const last = m.matches.length ? m.matches[m.matches.length - 1].similarity : m.min;
      setThreshold(last);
      $("search-controls").hidden = false;
      const list = $("matches");
      clear(list);
      for (const match of m.matches) {
        const li = el("li");
        li.appendChild(el("span", match.label === null ? match.cell_id : match.label));
        li.appendChild(el("span", fmt(match.similarity), "sim"));
        li.title = match.cell_id;
        li.dataset.index = String(match.index);
        li.addEventListener("click", () => showCell(match.index));
        list.appendChild(li);
      }
      legend();
      status(m.matches.length + " best matches in " + Math.round(performance.now() - t0) + " ms");
    } catch (e) { status(e.message, true); }
  }

  function setThreshold(value) {
    const m = state.search.meta, slider = $("threshold");
    const span = Math.max(m.max - m.min, 1e-9);
    slider.value = String(Math.round(1000 * (value - m.min) / span));
    applyThreshold();
  }

  function applyThreshold() {
    const m = state.search.meta, slider = $("threshold");
    state.threshold = m.min + (m.max - m.min) * Number(slider.value) / 1000;
    $("threshold-value").textContent = fmt(state.threshold);
    let kept = 0;
    for (const v of state.search.values) if (v >= state.threshold) kept++;
    $("search-count").textContent = kept.toLocaleString() + " of " + state.search.values.length.toLocaleString() + " cells kept";
    paint();
  }

  // --- a cell, a selection -----------------------------------------------------------------------
  function kvTable(rows) {
    const table = el("table", null, "kv");
    for (const [k, v, cls] of rows) {
      const tr = el("tr");
      tr.appendChild(el("th", k));
      const td = el("td", v === null || v === undefined ? "" : v, cls);
      tr.appendChild(td);
      table.appendChild(tr);
    }
    return table;
  }

  function currentCells() {
    if (state.selection) return Array.from(state.selection);
    return state.cell >= 0 ? [state.cell] : [];
  }

  function resetActions(text) {
    $("panel-actions").hidden = false;
    $("answer").textContent = "";
    $("description").textContent = text || "";
    $("describe").disabled = !state.info.has_stage2;
    $("question").disabled = !state.info.has_stage2;
  }

  async function showCell(index) {
    state.cell = index;
    state.selection = null;
    state.view.marks.cell = index;
    state.view.marks.lasso = null;
    paint();
    $("panel-title").textContent = "Cell " + index;
    const body = $("panel-body");
    clear(body);
    resetActions("");
    status("reading the cell\u2026");
    try {
      const c = await getJSON("/api/cell/" + index);
      $("panel-title").textContent = "Cell " + c.cell_id;
      const a = c.annotation;
      const unknown = a.cell_type === "unknown";
      body.appendChild(el("h3", "scmm annotation"));
      body.appendChild(kvTable([
        ["cell type", a.cell_type, unknown ? "unknown" : "confidence"],
        ["Cell Ontology ID", a.cell_type_ontology_term_id],
        ["confidence", a.confidence === undefined ? "" : fmt(a.confidence)],
        ["back-off level", a.level === undefined ? "" : (a.level ? a.level + " step(s) up the ontology" : "0 (no back-off)")],
        ["novelty (similarity to training cells)", a.novelty === undefined || a.novelty === null ? "n/a" : fmt(a.novelty)],
        ["QC", a.qc === undefined ? "" : a.qc],
        ["source", a.source],
      ]));
      body.appendChild(el("h3", "labels"));
      body.appendChild(kvTable(Object.keys(c.obs).filter((k) => k !== "scmm_description").map((k) => [k, c.obs[k]])));
      if (c.description) {
        $("description").textContent = c.description;
        status("");
      } else if (c.can_describe) {
        $("description").textContent = "generating with the LLM\u2026";
        await describe();
      } else {
        $("description").textContent = "no stored description, and the model has no stage 2 to write one";
        status("");
      }
    } catch (e) { status(e.message, true); }
  }

  function select(cells, name) {
    state.selection = Uint32Array.from(cells);
    state.cell = -1;
    state.view.marks.cell = -1;
    paint();
    showSelection(name);
  }

  async function showSelection(name) {
    const body = $("panel-body");
    clear(body);
    const n = state.selection.length;
    $("panel-title").textContent = n.toLocaleString() + " cells selected" + (name ? " (" + name + ")" : "");
    resetActions(state.info.has_stage2 ? "press Describe for descriptions of up to 16 of these cells" : "");
    if (!n) return;
    status("summarising the selection\u2026");
    try {
      const s = await getJSON("/api/selection", postCells(state.selection));
      for (const [column, counts] of Object.entries(s.columns)) {
        body.appendChild(el("h3", column));
        const table = el("table", null, "kv");
        for (const [value, count] of counts) {
          const tr = el("tr");
          tr.appendChild(el("th", value === null ? "(missing)" : value));
          const td = el("td");
          const bar = el("span", null, "bar");
          bar.style.width = Math.max(2, Math.round(80 * count / n)) + "px";
          td.appendChild(bar);
          td.appendChild(document.createTextNode(count.toLocaleString() + " (" + Math.round(100 * count / n) + "%)"));
          tr.appendChild(td);
          table.appendChild(tr);
        }
        body.appendChild(table);
      }
      const means = Object.entries(s.means);
      if (means.length) {
        body.appendChild(el("h3", "means"));
        body.appendChild(kvTable(means.map(([k, v]) => [k, fmt(v)])));
      }
      status("");
    } catch (e) { status(e.message, true); }
  }

  async function describe() {
    const cells = currentCells();
    if (!cells.length) return;
    status("the LLM is describing\u2026");
    $("describe").disabled = true;
    try {
      const d = await getJSON("/api/describe", postCells(cells));
      const box = $("description");
      clear(box);
      if (d.descriptions.length === 1) box.textContent = d.descriptions[0].text;
      else {
        box.appendChild(el("div", d.n_described + " of " + d.n_cells + " cells:", "muted"));
        for (const item of d.descriptions) box.appendChild(el("div", "\u2022 " + item.text));
      }
      status("");
    } catch (e) { status(e.message, true); }
    $("describe").disabled = !state.info.has_stage2;
  }

  async function ask(question) {
    const cells = currentCells();
    if (!cells.length) { status("select a cell first", true); return; }
    status("the LLM is answering\u2026");
    const box = $("answer");
    box.textContent = "";
    try {
      const a = await getJSON("/api/ask", postJSON({ cells: cells, question: question }));
      clear(box);
      if (a.kind === "cell_type") {
        const line = el("div");
        line.appendChild(el("span", a.unknown ? "unknown" : a.answer, a.unknown ? "unknown" : "confidence"));
        line.appendChild(document.createTextNode(" \u2014 confidence " + fmt(a.confidence, 2) +
          (a.level ? ", backed off " + a.level + " step(s) up the Cell Ontology" : "")));
        box.appendChild(line);
        if (a.n_asked > 1) box.appendChild(el("div", "the answer for " + Math.round(100 * a.share) + "% of " + a.n_asked + " cells asked", "muted"));
      } else {
        box.appendChild(el("div", a.answer));
        if (a.n_asked > 1) box.appendChild(el("div", "the commonest of " + a.n_asked + " cells' answers (" + Math.round(100 * a.share) + "%)", "muted"));
      }
      box.dataset.kind = a.kind;
      status("");
    } catch (e) { status(e.message, true); }
  }

  async function exportCells(format) {
    const cells = currentCells();
    if (!cells.length) return;
    status("exporting\u2026");
    try {
      const r = await request("/api/export?format=" + format, postCells(cells));
      const blob = await r.blob();
      const disposition = r.headers.get("content-disposition") || "";
      const m = /filename="([^"]+)"/.exec(disposition);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = m ? m[1] : "selection." + format;
      document.body.appendChild(a);
      a.click();
      setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
      status("exported " + cells.length.toLocaleString() + " cells");
    } catch (e) { status(e.message, true); }
  }

  // --- mouse on the map -------------------------------------------------------------------------
  function wireMap(view) {
    const canvas = view.canvas;
    let drag = null;
    const px = (e) => {
      const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
      return [(e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr];
    };
    canvas.addEventListener("mousedown", (e) => {
      const p = px(e);
      drag = { start: p, last: p, lasso: e.shiftKey ? [view.toData(p[0], p[1])] : null };
      if (drag.lasso) view.marks.lasso = drag.lasso;
    });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      const p = px(e);
      if (drag.lasso) { drag.lasso.push(view.toData(p[0], p[1])); view.redraw(); }
      else { view.pan(p[0] - drag.last[0], p[1] - drag.last[1]); }
      drag.last = p;
    });
    window.addEventListener("mouseup", (e) => {
      if (!drag) return;
      const p = px(e), d = drag;
      drag = null;
      const moved = Math.hypot(p[0] - d.start[0], p[1] - d.start[1]);
      if (d.lasso && d.lasso.length > 2 && moved > 3) {
        select(view.inside(d.lasso), "lasso");
      } else if (moved < 4) {
        view.marks.lasso = null;
        const i = view.nearest(p[0], p[1], 10 * (window.devicePixelRatio || 1));
        if (i >= 0) showCell(i);
      }
    });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const p = px(e);
      view.zoomAt(p[0], p[1], Math.exp(-e.deltaY * 0.0015));
    }, { passive: false });
    window.addEventListener("resize", () => view.redraw());
    canvas.addEventListener("dblclick", () => view.fit());
  }

  // --- start ------------------------------------------------------------------------------------
  async function start() {
    status("loading\u2026");
    try {
      const t0 = performance.now();
      const info = await getJSON("/api/info");
      state.info = info;
      $("dataset").textContent = info.input + " \u2014 " + info.n_cells.toLocaleString() + " cells, " +
        info.n_genes.toLocaleString() + " genes";
      const menu = $("colour-obs");
      for (const c of info.obs_columns) {
        if (c === "scmm_description") continue;
        const o = el("option", c);
        o.value = c;
        menu.appendChild(o);
      }
      if (info.programs.length) {
        $("program-box").hidden = false;
        const p = $("colour-program");
        p.appendChild(el("option", "(choose a program)"));
        for (const c of info.programs) { const o = el("option", c); o.value = c; p.appendChild(o); }
      }
      const map = await getFramed("/api/map", undefined, Float32Array);
      $("map-source").textContent = "map: " + map.meta.source;
      const view = new MapView($("map"), $("overlay"));
      state.view = view;
      window.scmmExplore.view = view;
      view.setPoints(map.values, map.meta.bounds);
      wireMap(view);
      if (info.default_colour) { menu.value = info.default_colour; await colourBy("obs=" + encodeURIComponent(info.default_colour)); }
      else paint();
      document.body.dataset.ready = "1";
      status("map of " + info.n_cells.toLocaleString() + " cells in " + Math.round(performance.now() - t0) + " ms");
    } catch (e) { status(e.message, true); }
  }

  $("colour-obs").addEventListener("change", (e) => colourBy("obs=" + encodeURIComponent(e.target.value)));
  $("colour-program").addEventListener("change", (e) => { if (state.info.programs.includes(e.target.value)) colourBy("obs=" + encodeURIComponent(e.target.value)); });
  $("gene-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const g = $("gene").value.trim();
    if (g) colourBy("gene=" + encodeURIComponent(g));
  });
  let geneTimer = null;
  $("gene").addEventListener("input", () => {
    clearTimeout(geneTimer);
    const prefix = $("gene").value.trim();
    if (!prefix) return;
    geneTimer = setTimeout(async () => {
      try {
        const g = await getJSON("/api/genes?prefix=" + encodeURIComponent(prefix));
        const list = $("gene-list");
        clear(list);
        for (const name of g.genes) { const o = document.createElement("option"); o.value = name; list.appendChild(o); }
      } catch (e) { /* the list is a convenience */ }
    }, 200);
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("query").value.trim();
    if (q) search(q);
  });
  $("threshold").addEventListener("input", applyThreshold);
  $("search-clear").addEventListener("click", () => {
    state.search = null; state.threshold = -Infinity;
    $("search-controls").hidden = true; clear($("matches")); paint(); legend();
  });
  $("describe").addEventListener("click", describe);
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("question").value.trim() || $("question").placeholder;
    ask(q);
  });
  $("export-csv").addEventListener("click", () => exportCells("csv"));
  $("export-h5ad").addEventListener("click", () => exportCells("h5ad"));

  window.scmmExplore = {
    state: state,
    // where cell i is drawn, in CSS pixels from the map canvas's top-left corner (for tests and scripts)
    screenOf: (i) => {
      const v = state.view, dpr = window.devicePixelRatio || 1;
      const [sx, sy] = v.toScreen(v.xy[2 * i], v.xy[2 * i + 1]);
      return [sx / dpr, sy / dpr];
    },
  };
  start();
})();
