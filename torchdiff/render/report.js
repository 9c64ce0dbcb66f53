"use strict";
// torchdiff report: draws every chart of the page as SVG from the JSON payload
// (#torchdiff-data). No library, no network. docs/REPORT.md describes each chart.
(function () {
  var SVGNS = "http://www.w3.org/2000/svg";
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); showErrors(); });
  function showErrors() {
    var box = document.getElementById("errors");
    box.hidden = false;
    box.textContent = "report errors: " + errors.join("; ");
    document.body.setAttribute("data-errors", String(errors.length));
  }

  var D = JSON.parse(document.getElementById("torchdiff-data").textContent);
  var main = document.getElementById("main");
  var nav = document.getElementById("nav");

  // ---- helpers -----------------------------------------------------------------------------------
  function h(tag, attrs, children) {
    var e = document.createElement(tag);
    setAll(e, attrs);
    add(e, children);
    return e;
  }
  function s(tag, attrs, children) {
    var e = document.createElementNS(SVGNS, tag);
    setAll(e, attrs);
    add(e, children);
    return e;
  }
  function setAll(e, attrs) {
    if (!attrs) return;
    for (var k in attrs) {
      if (attrs[k] === null || attrs[k] === undefined) continue;
      if (k === "text") e.textContent = attrs[k];
      else if (k === "on") { for (var ev in attrs.on) e.addEventListener(ev, attrs.on[ev]); }
      else e.setAttribute(k, attrs[k]);
    }
  }
  function add(e, children) {
    if (children === undefined || children === null) return;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
  }
  function num(v) {  // payload numbers: finite floats, or the strings NaN / Infinity / -Infinity
    if (typeof v === "number") return v;
    if (v === "NaN") return NaN;
    if (v === "Infinity") return Infinity;
    if (v === "-Infinity") return -Infinity;
    return NaN;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined) return "";
    if (typeof v === "string" && isNaN(num(v))) return v === "NaN" ? "NaN" : v;
    var x = num(v);
    if (x === Infinity) return "∞";
    if (x === -Infinity) return "−∞";
    if (isNaN(x)) return "NaN";
    if (Number.isInteger(x) && Math.abs(x) < 1e15) return x.toLocaleString("en-US");
    var a = Math.abs(x);
    digits = digits || 4;
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(digits - 1);
    return String(Number(x.toPrecision(digits)));
  }
  function pct(v) {
    var x = num(v);
    return isFinite(x) ? (100 * x).toFixed(2) + " %" : fmt(v);
  }
  function bytes(v) {
    if (v === null || v === undefined) return "";
    var u = ["B", "KB", "MB", "GB", "TB"], x = v, i = 0;
    while (x >= 1000 && i < u.length - 1) { x /= 1000; i++; }
    return (i ? x.toFixed(2) : String(x)) + " " + u[i];
  }
  // A figure: the shown text, with the payload's exact number in data-value.
  function fig(v, text, key) {
    var attrs = { "class": "fig", "data-value": v === null || v === undefined ? "" : String(v) };
    if (key) attrs["data-key"] = key;
    var f = key && D.formulas[key];
    if (f) attrs.title = f.formula + "  (" + f.doc + ")";
    return h("span", attrs, text === undefined ? fmt(v) : text);
  }
  function formula(key) {
    var f = D.formulas[key];
    return f ? h("div", { "class": "formula" }, [f.formula + " — ", h("code", { text: f.doc })]) : null;
  }
  function section(id, title) {
    var sec = h("section", { id: id }, h("h2", { text: title }));
    main.appendChild(sec);
    nav.appendChild(h("a", { href: "#" + id, text: title }));
    return sec;
  }
  function chartBox(parent, name) {
    var div = h("div", { "class": "chart", "data-chart": name });
    parent.appendChild(div);
    return div;
  }
  function done(div) { div.setAttribute("data-rendered", String(div.querySelectorAll("svg *").length)); }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }

  // Colour maps (perceptual enough, no library): viridis-like stops, and a diverging one.
  var SEQ = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var p = t * (stops.length - 1), i = Math.min(Math.floor(p), stops.length - 2), f = p - i;
    var a = stops[i], b = stops[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }

  // ---- charts ------------------------------------------------------------------------------------
  // Horizontal bars: one row per label.
  function barChart(div, labels, values, opts) {
    opts = opts || {};
    var rowH = 16, left = Math.min(260, 20 + 7 * Math.max.apply(null, labels.map(function (l) { return l.length; }).concat([4]))),
      width = 460, right = 90, top = 4;
    var finite = values.map(num).filter(isFinite);
    var max = Math.max.apply(null, finite.concat([0])) || 1;
    var H = top + rowH * labels.length + 6;
    var svg = s("svg", { width: left + width + right, height: H, role: "img", "aria-label": opts.title || "bars" });
    labels.forEach(function (l, i) {
      var v = num(values[i]), y = top + i * rowH;
      svg.appendChild(s("text", { x: left - 6, y: y + 12, "text-anchor": "end", text: l }));
      var w = isFinite(v) ? Math.max(0, v / max * width) : (v === Infinity ? width : 0);
      var r = s("rect", { x: left, y: y + 2, width: w, height: rowH - 4, fill: opts.color || "#4b6fb5" });
      r.appendChild(s("title", { text: l + ": " + (opts.pct ? pct(values[i]) : fmt(values[i])) }));
      svg.appendChild(r);
      svg.appendChild(s("text", { x: left + w + 4, y: y + 12, "class": "bar-value", "data-label": l,
        "data-value": String(values[i]), text: opts.pct ? pct(values[i]) : fmt(values[i]) }));
    });
    div.appendChild(svg);
    done(div);
  }

  // Heatmap: rows × cols of numbers (null = no tensor there).
  function heatmap(div, rows, cols, matrix, opts) {
    opts = opts || {};
    var cell = opts.cell || 26, left = Math.min(240, 20 + 7 * Math.max.apply(null, rows.map(function (r) { return String(r).length; }).concat([4])));
    var top = 90, vals = [];
    matrix.forEach(function (r) { r.forEach(function (v) { var x = num(v); if (v !== null && isFinite(x)) vals.push(x); }); });
    if (opts.log) vals = vals.filter(function (x) { return x > 0; });
    var lo = opts.min !== undefined ? opts.min : (vals.length ? Math.min.apply(null, vals) : 0);
    var hi = opts.max !== undefined ? opts.max : (vals.length ? Math.max.apply(null, vals) : 1);
    if (opts.log) { lo = Math.log10(Math.max(lo, 1e-12)); hi = Math.log10(Math.max(hi, 1e-12)); }
    var cw = Math.max(8, Math.min(cell, Math.floor(900 / Math.max(1, cols.length))));
    var ch = Math.max(4, Math.min(cell, Math.floor(4000 / Math.max(1, rows.length))));
    var W = left + cw * cols.length + 120, H = Math.max(top + ch * rows.length + 10, top + 165);
    var svg = s("svg", { width: W, height: H, role: "img", "aria-label": opts.title || "heatmap" });
    cols.forEach(function (c, j) {
      svg.appendChild(s("text", { transform: "translate(" + (left + j * cw + cw / 2 + 4) + "," + (top - 6) + ") rotate(-60)", text: String(c) }));
    });
    var every = Math.max(1, Math.ceil(12 / ch));
    rows.forEach(function (r, i) {
      if (i % every === 0) svg.appendChild(s("text", { x: left - 6, y: top + i * ch + ch / 2 + 4, "text-anchor": "end", text: String(r) }));
      matrix[i].forEach(function (v, j) {
        if (v === null || v === undefined) return;
        var x = num(v), t;
        if (!isFinite(x)) t = x === Infinity ? 1 : 0;
        else t = hi > lo ? ((opts.log ? Math.log10(Math.max(x, 1e-12)) : x) - lo) / (hi - lo) : 0.5;
        if (opts.reverse) t = 1 - t;
        var rect = s("rect", { x: left + j * cw, y: top + i * ch, width: cw - 1, height: ch - (ch > 6 ? 1 : 0),
          fill: isNaN(x) ? "#bbb" : ramp(SEQ, t) });
        rect.appendChild(s("title", { text: r + " · " + cols[j] + ": " + fmt(v) }));
        svg.appendChild(rect);
      });
    });
    // colour scale
    var lx = left + cw * cols.length + 20;
    for (var k = 0; k < 50; k++) {
      var t = 1 - k / 49;
      svg.appendChild(s("rect", { x: lx, y: top + k * 3, width: 12, height: 3, fill: ramp(SEQ, opts.reverse ? 1 - t : t) }));
    }
    var show = function (v) { return fmt(opts.log ? Math.pow(10, v) : v); };
    svg.appendChild(s("text", { x: lx + 16, y: top + 8, text: show(hi) }));
    svg.appendChild(s("text", { x: lx + 16, y: top + 150, text: show(lo) }));
    div.appendChild(svg);
    done(div);
  }

  // Lines over x = 0..n-1.
  function lineChart(div, xlabels, series, opts) {
    opts = opts || {};
    var W = 560, H = 240, L = 64, R = 110, T = 12, B = 34;
    var all = [];
    series.forEach(function (sr) { sr.values.forEach(function (v) { var x = num(v); if (isFinite(x) && (!opts.log || x > 0)) all.push(x); }); });
    var lo = Math.min.apply(null, all.concat(all.length ? [] : [0])), hi = Math.max.apply(null, all.concat(all.length ? [] : [1]));
    if (opts.log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    var n = Math.max(2, xlabels.length);
    var X = function (i) { return L + (W - L - R) * i / (n - 1); };
    var Y = function (v) { var y = opts.log ? Math.log10(v) : v; return T + (H - T - B) * (1 - (y - lo) / (hi - lo)); };
    var svg = s("svg", { width: W, height: H, role: "img", "aria-label": opts.title || "lines" });
    svg.appendChild(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    svg.appendChild(s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
    [lo, (lo + hi) / 2, hi].forEach(function (y) {
      var v = opts.log ? Math.pow(10, y) : y;
      svg.appendChild(s("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end", text: fmt(v, 3) }));
    });
    var step = Math.max(1, Math.ceil(xlabels.length / 8));
    xlabels.forEach(function (l, i) { if (i % step === 0) svg.appendChild(s("text", { x: X(i), y: H - B + 14, "text-anchor": "middle", text: String(l) })); });
    if (opts.xtitle) svg.appendChild(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "class": "muted", text: opts.xtitle }));
    var colors = ["#3b6fd8", "#e0742b", "#2f9a6a", "#b8448c", "#7a5cc4", "#8c6d1f"];
    series.forEach(function (sr, k) {
      var d = "", pen = false, color = sr.color || colors[k % colors.length];
      sr.values.forEach(function (v, i) {
        var x = num(v);
        if (!isFinite(x) || (opts.log && x <= 0)) { pen = false; return; }
        d += (pen ? "L" : "M") + X(i).toFixed(1) + " " + Y(x).toFixed(1) + " ";
        pen = true;
        var c = s("circle", { cx: X(i), cy: Y(x), r: 3, fill: color });
        c.appendChild(s("title", { text: sr.name + " @ " + xlabels[i] + ": " + fmt(v) }));
        svg.appendChild(c);
      });
      if (d) svg.insertBefore(s("path", { d: d, fill: "none", stroke: color, "stroke-width": 1.6 }), svg.firstChild);
      svg.appendChild(s("text", { x: W - R + 6, y: T + 12 + 14 * k, fill: color, text: sr.name }));
    });
    div.appendChild(svg);
    done(div);
  }

  // Histograms over equal bins of [lo, hi]; several overlaid.
  function histChart(div, range, layers, opts) {
    opts = opts || {};
    var W = 420, H = 170, L = 46, R = 8, T = 16, B = 30;
    var bins = layers[0].counts.length;
    var max = 1;
    layers.forEach(function (l) { l.counts.forEach(function (c) { if (c > max) max = c; }); });
    var svg = s("svg", { width: W, height: H, role: "img", "aria-label": opts.title || "histogram" });
    var bw = (W - L - R) / bins;
    layers.forEach(function (l) {
      l.counts.forEach(function (c, i) {
        if (!c) return;
        var y = opts.log ? Math.log10(c + 1) / Math.log10(max + 1) : c / max;
        var hgt = (H - T - B) * y;
        var r = s("rect", { x: L + i * bw, y: H - B - hgt, width: Math.max(1, bw - 0.5), height: hgt, fill: l.color, "fill-opacity": layers.length > 1 ? 0.55 : 0.85 });
        var a = num(range[0]) + (num(range[1]) - num(range[0])) * i / bins, b = num(range[0]) + (num(range[1]) - num(range[0])) * (i + 1) / bins;
        r.appendChild(s("title", { text: l.name + " [" + fmt(a) + ", " + fmt(b) + "): " + c }));
        svg.appendChild(r);
      });
    });
    svg.appendChild(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    svg.appendChild(s("text", { x: L, y: H - B + 14, "text-anchor": "start", text: fmt(range[0], 3) }));
    svg.appendChild(s("text", { x: W - R, y: H - B + 14, "text-anchor": "end", text: fmt(range[1], 3) }));
    svg.appendChild(s("text", { x: L - 4, y: T + 4, "text-anchor": "end", text: fmt(max) }));
    layers.forEach(function (l, k) {
      svg.appendChild(s("rect", { x: L + 8 + 70 * k, y: 2, width: 10, height: 10, fill: l.color }));
      svg.appendChild(s("text", { x: L + 22 + 70 * k, y: 11, text: l.name }));
    });
    div.appendChild(svg);
    done(div);
  }

  // A sortable, filterable, paged table.
  function dataTable(parent, columns, rows, opts) {
    opts = opts || {};
    var numeric = columns.map(function (c, j) {
      return rows.length > 0 && rows.every(function (r) { return r[j] === null || typeof r[j] === "number" || r[j] === "NaN" || r[j] === "Infinity" || r[j] === "-Infinity"; });
    });
    var state = { sort: opts.sort !== undefined ? opts.sort : -1, desc: true, filter: "", status: "", page: 0, exact: null };
    var size = opts.pageSize || 100;
    var controls = h("div", { "class": "controls" });
    var search = h("input", { type: "search", placeholder: "filter by name (substring or /regex/)", "aria-label": "filter" });
    var info = h("span", { "class": "muted" });
    var prev = h("button", { type: "button", text: "◀" }), next = h("button", { type: "button", text: "▶" });
    controls.appendChild(search);
    var statusCol = columns.indexOf("status"), statusSel = null;
    if (statusCol >= 0) {
      var statuses = {};
      rows.forEach(function (r) { statuses[r[statusCol]] = (statuses[r[statusCol]] || 0) + 1; });
      statusSel = h("select", { "aria-label": "status" }, h("option", { value: "", text: "every status" }));
      Object.keys(statuses).sort().forEach(function (st) { statusSel.appendChild(h("option", { value: st, text: st + " (" + statuses[st] + ")" })); });
      controls.appendChild(statusSel);
    }
    add(controls, [prev, next, info]);
    parent.appendChild(controls);
    var table = h("table", { "class": "data" });
    var thead = h("thead"), tbody = h("tbody");
    var tr = h("tr");
    var ths = columns.map(function (c, j) {
      var key = opts.formulaKeys && opts.formulaKeys[c];
      var f = key && D.formulas[key];
      var th = h("th", { "class": "sortable" + (numeric[j] ? " num" : ""), title: f ? f.formula + "  (" + f.doc + ")" : null, text: c });
      th.addEventListener("click", function () {
        if (state.sort === j) state.desc = !state.desc; else { state.sort = j; state.desc = numeric[j]; }
        state.page = 0; draw();
      });
      tr.appendChild(th);
      return th;
    });
    thead.appendChild(tr);
    add(table, [thead, tbody]);
    parent.appendChild(table);
    function matcher() {
      var f = state.filter;
      if (state.exact !== null) return function (name) { return name === state.exact; };
      if (f.length > 2 && f[0] === "/" && f[f.length - 1] === "/") {
        try { var re = new RegExp(f.slice(1, -1)); return function (name) { return re.test(name); }; } catch (e) { return function () { return false; }; }
      }
      return function (name) { return name.indexOf(f) >= 0; };
    }
    function key(v) { var x = num(v); return isNaN(x) ? -Infinity : x; }
    function draw() {
      var m = matcher();
      var shown = rows.filter(function (r) { return m(String(r[0])) && (!state.status || r[statusCol] === state.status); });
      if (state.sort >= 0) {
        var j = state.sort, sign = state.desc ? -1 : 1;
        shown.sort(function (a, b) {
          var x = numeric[j] ? key(a[j]) : String(a[j]), y = numeric[j] ? key(b[j]) : String(b[j]);
          if (x < y) return -sign; if (x > y) return sign;
          return String(a[0]) < String(b[0]) ? -1 : 1;
        });
      }
      ths.forEach(function (th, j) { th.classList.toggle("sorted-asc", state.sort === j && !state.desc); th.classList.toggle("sorted-desc", state.sort === j && state.desc); });
      var pages = Math.max(1, Math.ceil(shown.length / size));
      state.page = Math.min(state.page, pages - 1);
      clear(tbody);
      shown.slice(state.page * size, (state.page + 1) * size).forEach(function (r) {
        var row = h("tr", { "data-name": String(r[0]) });
        if (state.exact !== null) row.className = "hit";
        r.forEach(function (v, j) {
          var text = Array.isArray(v) ? v.join("×") : (numeric[j] ? fmt(v) : (v === null ? "" : String(v)));
          row.appendChild(h("td", { "class": numeric[j] ? "num" : null, "data-value": v === null ? "" : String(v), text: text }));
        });
        tbody.appendChild(row);
      });
      info.textContent = shown.length + " of " + rows.length + " rows" + (pages > 1 ? " · page " + (state.page + 1) + "/" + pages : "");
      prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    }
    search.addEventListener("input", function () { state.filter = search.value; state.exact = null; state.page = 0; draw(); });
    if (statusSel) statusSel.addEventListener("change", function () { state.status = statusSel.value; state.page = 0; draw(); });
    prev.addEventListener("click", function () { state.page--; draw(); });
    next.addEventListener("click", function () { state.page++; draw(); });
    draw();
    return { show: function (name) { state.exact = name; search.value = name; state.page = 0; draw(); } };
  }

  function kvTable(obj, keys) {
    var t = h("table");
    keys.forEach(function (k) {
      if (!(k in obj)) return;
      var v = obj[k];
      t.appendChild(h("tr", null, [h("th", { text: k }), h("td", { "class": typeof v === "number" ? "num" : null },
        typeof v === "object" && v !== null ? JSON.stringify(v) : fig(v, typeof v === "number" ? fmt(v) : String(v), k))]));
    });
    return t;
  }
  function recordsTable(records, cols, formulaKeys) {
    var t = h("table"), tr = h("tr");
    cols.forEach(function (c) { var f = formulaKeys && D.formulas[formulaKeys[c]]; tr.appendChild(h("th", { text: c, title: f ? f.formula : null })); });
    t.appendChild(tr);
    records.forEach(function (r) {
      var row = h("tr");
      cols.forEach(function (c) {
        var v = r[c];
        var isNum = typeof v === "number" || v === "NaN" || v === "Infinity" || v === "-Infinity";
        var cell = h("td", { "class": isNum ? "num" : null, "data-value": v === null || v === undefined ? "" : String(v) });
        if (c === "tensor" && tensorLink) cell.appendChild(tensorLink(String(v)));
        else cell.textContent = isNum ? fmt(v) : (v === null || v === undefined ? "" : (typeof v === "object" ? JSON.stringify(v) : String(v)));
        row.appendChild(cell);
      });
      t.appendChild(row);
    });
    return t;
  }

  // ---- sections ------------------------------------------------------------------------------------
  var tensorTable = null;
  var tensorLink = function (name) {
    return h("a", { href: "#tensors", "data-tensor": name, text: name, on: { click: function () { if (tensorTable) tensorTable.show(name); } } });
  };

  function card(k, v, text, key) { return h("div", { "class": "card" }, [h("div", { "class": "k", text: k }), h("div", { "class": "v" }, fig(v, text, key))]); }

  function summarySection() {
    var sec = section("summary", "Summary"), S = D.summary;
    if (D.kind === "series") {
      var t = h("table");
      S.checkpoints.forEach(function (c, i) { t.appendChild(h("tr", null, [h("td", { text: String(i) }), h("td", { "class": "mono", text: c }), h("td", { "class": "num", text: bytes(S.file_bytes[i]) })])); });
      sec.appendChild(t);
      if (S.base) sec.appendChild(h("p", null, ["base: ", h("code", { text: S.base })]));
    } else {
      var files = h("table");
      if (D.kind === "compare") files.appendChild(h("tr", null, [h("th", { text: "old" }), h("td", { "class": "mono", text: S.old }), h("td", { text: S.old_format }), h("td", { "class": "num", text: bytes(S.old_file_bytes) })]));
      files.appendChild(h("tr", null, [h("th", { text: D.kind === "compare" ? "new" : "file" }), h("td", { "class": "mono", text: S.new }), h("td", { text: S.new_format }), h("td", { "class": "num", text: bytes(S.new_file_bytes) })]));
      sec.appendChild(files);
      var cards = h("div", { "class": "cards" });
      cards.appendChild(card("tensors", S.tensors));
      cards.appendChild(card("parameters", S.params));
      if (D.kind === "compare") {
        Object.keys(S.counts).forEach(function (k) { if (S.counts[k]) cards.appendChild(card(k, S.counts[k])); });
        if (S.global_rel_l2 !== null) cards.appendChild(card("global rel_l2", S.global_rel_l2, undefined, "global_rel_l2"));
        if (S.global_cosine !== null) cards.appendChild(card("global cosine", S.global_cosine, undefined, "global_cosine"));
        cards.appendChild(card("tensor bytes old → new", null, bytes(S.old_tensor_bytes) + " → " + bytes(S.new_tensor_bytes)));
      }
      sec.appendChild(cards);
    }
    if (D.verdicts.length) {
      sec.appendChild(h("h3", { text: "Analyses" }));
      var vt = h("table");
      D.verdicts.forEach(function (v) {
        var parts = Object.keys(v.headline).map(function (k) {
          var x = v.headline[k];
          return k + "=" + (typeof x === "number" ? fmt(x) : (typeof x === "object" ? JSON.stringify(x) : String(x)));
        });
        vt.appendChild(h("tr", null, [h("th", { text: v.analysis }), h("td", { "class": v.failed ? "sev-high" : null, text: parts.join(", ") })]));
      });
      sec.appendChild(vt);
    }
    if (D.command) sec.appendChild(h("p", null, ["command: ", h("code", { "class": "command", text: D.command })]));
    sec.appendChild(h("p", { "class": "muted", text: "torchdiff " + D.torchdiff + " · " + D.schema }));
  }

  function layersSection() {
    var L = D.layers;
    if (!L || !L.rows.length) return;
    var sec = section("layers", "Layers");
    var labels = L.rows.map(function (r) { return r.layer; });
    if (L.top_layer !== undefined) {
      sec.appendChild(h("p", null, ["top layer: ", h("code", { text: L.top_layer }), ", share ",
        fig(L.top_share, pct(L.top_share), "share")]));
      sec.lastChild.id = "top-layer";
    }
    if (L.total !== undefined) {
      sec.appendChild(h("p", { "class": "formula", text: "the " + L.rows.length + " layers of largest share of " + L.total +
        " (--show-layer-impact -o json lists every layer)" }));
    }
    var g = h("div", { "class": "grid2" });
    var a = h("div", null, [h("h3", { text: "Share of the update" }), formula("share")]);
    barChart(chartBox(a, "layer-share"), labels, L.rows.map(function (r) { return r.share; }), { pct: true, title: "share" });
    var b = h("div", null, [h("h3", { text: "rel_l2 per layer" }), formula("layer_rel_l2")]);
    barChart(chartBox(b, "layer-rel-l2"), labels, L.rows.map(function (r) { return r.rel_l2; }), { color: "#e0742b", title: "rel_l2" });
    add(g, [a, b]);
    sec.appendChild(g);
    var HM = D.heatmap;
    if (HM && HM.columns.length) {
      sec.appendChild(h("h3", { text: "Layer × module type" }));
      var sel = h("select", { "aria-label": "heatmap figure" });
      [["rel_l2", "layer_rel_l2"], ["cosine", "layer_cosine"], ["changed_fraction", "layer_changed_fraction"]].forEach(function (o) { sel.appendChild(h("option", { value: o[0], text: o[0] })); });
      var note = h("span", { "class": "formula" });
      sec.appendChild(h("div", { "class": "controls" }, [h("label", { text: "figure: " }), sel, note]));
      var box = chartBox(sec, "layer-module-heatmap");
      var draw = function () {
        clear(box);
        var k = sel.value, f = D.formulas["layer_" + k];
        note.textContent = f ? f.formula + " — " + f.doc : "";
        heatmap(box, HM.rows, HM.columns, HM[k], { log: k === "rel_l2", reverse: k === "cosine", title: k });
      };
      sel.addEventListener("change", draw);
      draw();
    }
  }

  function tensorsSection() {
    var T = D.tensors;
    if (!T) return;
    var sec = section("tensors", "Tensors");
    // Rows come most changed first (the order of --sort-by-change-magnitude); a click sorts by a column.
    tensorTable = dataTable(sec, T.columns, T.rows, { sort: -1, pageSize: 100,
      formulaKeys: { l2: "l2", rel_l2: "rel_l2", cosine: "cosine", max_abs: "max_abs", changed_fraction: "changed_fraction", sqnr_db: "sqnr_db" } });
  }

  function histogramsSection() {
    if (!D.histograms.length) return;
    var sec = section("histograms", "Histograms");
    sec.appendChild(formula("histogram"));
    var g = h("div", { "class": "grid2" });
    D.histograms.forEach(function (H, i) {
      var box = h("div", null, [h("h3", null, tensorLink(H.tensor))]);
      var layers = [];
      if (H.old) layers.push({ name: "old", counts: H.old, color: "#3b6fd8" });
      if (H.new) layers.push({ name: "new", counts: H.new, color: "#e0742b" });
      histChart(chartBox(box, "hist-values-" + i), H.range, layers, { title: "values" });
      if (H.delta) histChart(chartBox(box, "hist-delta-" + i), H.delta_range, [{ name: "Δ", counts: H.delta, color: "#2f9a6a" }], { title: "delta", log: true });
      g.appendChild(box);
    });
    sec.appendChild(g);
  }

  function spectraSection() {
    if (!D.spectra.length) return;
    var sec = section("spectra", "Spectra");
    sec.appendChild(formula("spectrum"));
    var g = h("div", { "class": "grid2" });
    D.spectra.forEach(function (S, i) {
      var box = h("div", null, [h("h3", null, tensorLink(S.tensor)),
        h("div", { "class": "muted", text: S.shape.join("×") + " · " + S.method + (S.rank90 !== undefined ? " · rank90 " + (S.rank90 === null ? "> " + S.values_found : S.rank90) + " · rank99 " + (S.rank99 === null ? "> " + S.values_found : S.rank99) + " · effective rank " + fmt(S.effective_rank) : "") })]);
      if (S.singular_values) {
        var xs = S.singular_values.map(function (_, k) { return k + 1; });
        lineChart(chartBox(box, "spectrum-" + i), xs, [{ name: "σ", values: S.singular_values }], { log: true, xtitle: "index", title: "singular values" });
        var e = S.energy, ks = Object.keys(e);
        box.appendChild(recordsTable([ks.reduce(function (o, k) { o["r=" + k] = e[k]; return o; }, {})], ks.map(function (k) { return "r=" + k; })));
      }
      g.appendChild(box);
    });
    sec.appendChild(g);
  }

  function quantizationSection() {
    var Q = D.quantization;
    if (!Q) return;
    var sec = section("quantization", "Quantization");
    sec.appendChild(kvTable(Q.headline, Object.keys(Q.headline)));
    sec.appendChild(h("h3", { text: "Schemes" }));
    sec.appendChild(recordsTable(Q.schemes, ["scheme", "tensors", "params", "bytes_old", "bytes_new", "compression", "sqnr_db"], { sqnr_db: "sqnr_db" }));
    if (Q.layers.length) {
      sec.appendChild(h("h3", { text: "SQNR per layer (dB)" }));
      sec.appendChild(h("div", { "class": "formula", text: "20 · log10(‖old_g‖ / ‖Δ_g‖) — docs/REPORT.md#group-figures" }));
      barChart(chartBox(sec, "sqnr-layers"), Q.layers.map(function (r) { return r.layer; }), Q.layers.map(function (r) { return r.sqnr_db; }), { color: "#7a5cc4", title: "sqnr per layer" });
    }
    var finite = Q.tensors.filter(function (t) { return isFinite(num(t.sqnr_db)); });
    if (finite.length) {
      sec.appendChild(h("h3", { text: "SQNR per tensor (dB)" }));
      var shown = finite.slice().sort(function (a, b) { return num(a.sqnr_db) - num(b.sqnr_db); }).slice(0, 60);
      barChart(chartBox(sec, "sqnr-tensors"), shown.map(function (t) { return t.tensor; }), shown.map(function (t) { return t.sqnr_db; }), { color: "#7a5cc4", title: "sqnr per tensor" });
    }
    sec.appendChild(h("h3", { text: "Most sensitive (lowest SQNR)" }));
    sec.appendChild(recordsTable(Q.most_sensitive, ["rank", "tensor", "scheme", "sqnr_db", "rel_l2", "max_err_over_rms"], { sqnr_db: "sqnr_db", rel_l2: "rel_l2" }));
  }

  function anomaliesSection() {
    if (D.anomalies === null) return;
    var sec = section("anomalies", "Anomalies");
    if (!D.anomalies.length) { sec.appendChild(h("p", { text: "no findings" })); return; }
    var t = recordsTable(D.anomalies, ["severity", "type", "tensor", "side", "figure", "value", "threshold", "rule"]);
    Array.prototype.forEach.call(t.querySelectorAll("tr"), function (tr, i) {
      if (i > 0) tr.firstChild.className = "sev-" + D.anomalies[i - 1].severity;
    });
    sec.appendChild(t);
  }

  function seriesSection() {
    var S = D.series;
    if (!S) return;
    var sec = section("series", "Series");
    var C = S.convergence;
    if (C) {
      sec.appendChild(h("p", null, ["convergence: ", h("span", { "class": "badge", id: "convergence-status", text: C.status }), " — " + (C.reason || "")]));
      var xl = C.steps.map(function (t) { return S.labels[t] + "→" + S.labels[t + 1]; });
      var g = h("div", { "class": "grid2" });
      var a = h("div", null, [h("h3", { text: "Update norm per step" }), formula("update_norm")]);
      lineChart(chartBox(a, "series-update-norm"), xl, [{ name: "u_t", values: C.update_norm }], { title: "update norm" });
      var b = h("div", null, [h("h3", { text: "rel_update per step" }), formula("rel_update")]);
      lineChart(chartBox(b, "series-rel-update"), xl, [{ name: "r_t", values: C.rel_update }], { log: true, title: "rel update" });
      add(g, [a, b]);
      sec.appendChild(g);
      if (C.layers.length) {
        sec.appendChild(h("h3", { text: "rel_update, step × layer" }));
        var M = C.steps.map(function (t, i) { return C.layer_rel_update.map(function (r) { return r[i]; }); });
        heatmap(chartBox(sec, "series-step-layer"), xl, C.layers, M, { log: true, title: "step x layer" });
      }
    }
    var Sim = S.similarity;
    if (Sim && Sim.cosine) {
      sec.appendChild(h("h3", { text: "Similarity matrix (cosine)" }));
      sec.appendChild(formula("similarity"));
      heatmap(chartBox(sec, "series-similarity"), Sim.labels, Sim.labels, Sim.cosine, { title: "similarity", cell: 40 });
      if (Sim.task_vector_cosine) {
        sec.appendChild(h("h3", { text: "Task-vector cosines (base " + Sim.base + ")" }));
        sec.appendChild(formula("task_cosine"));
        heatmap(chartBox(sec, "series-task-vectors"), Sim.labels, Sim.labels, Sim.task_vector_cosine, { title: "task vectors", cell: 40 });
        sec.appendChild(h("p", null, ["mean task cosine ", fig(Sim.mean_task_cosine), ", sign-conflict rate ", fig(Sim.sign_conflict_rate)]));
      }
    }
  }

  try {
    summarySection();
    layersSection();
    tensorsSection();
    histogramsSection();
    spectraSection();
    quantizationSection();
    anomaliesSection();
    seriesSection();
  } catch (e) {
    errors.push(String(e && e.stack || e));
    showErrors();
  }
  document.body.setAttribute("data-charts", String(document.querySelectorAll(".chart").length));
  document.body.setAttribute("data-render-ms", String(Math.round(performance.now())));
  document.body.setAttribute("data-ready", errors.length ? "error" : "1");
})();
