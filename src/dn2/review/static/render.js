/* dn2 review: draws verdict records (see dn2/review/results.py) as cards, a summary and a score
 * histogram. Shared by the page of `dn2 serve` (page.js feeds it) and the self-contained report of
 * `dn2 score --report` (which embeds its records as JSON in <script id="dn2-data">; drawn below on
 * load). Names come from users: they are only ever set as text, never as HTML. */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else if (key === "className") node.className = attrs[key];
      else node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    var a = Math.abs(x);
    return a !== 0 && (a < 0.001 || a >= 1e5) ? x.toExponential(2) : x.toFixed(a < 10 ? 3 : 1);
  }

  /* An image, or a labelled placeholder while (or if) it cannot be shown. ``resolve`` turns a URL
   * into one the browser may load (the page fetches thumbnails with its token). */
  function picture(url, alt, resolve) {
    var ph = el("div", { className: "placeholder", role: "img", "aria-label": alt, text: url ? "loading…" : "no picture" });
    if (!url) return ph;
    Promise.resolve(resolve ? resolve(url) : url).then(function (src) {
      if (!src) { ph.textContent = "no picture"; return; }
      var img = el("img", { src: src, alt: alt, loading: "lazy", decoding: "async" });
      ph.replaceWith(img);
    }, function () { ph.textContent = "not available"; });
    return ph;
  }

  function gauge(result) {
    var t = result.threshold, s = result.anomaly_score;
    var top = Math.max(2 * t, s * 1.1, 1e-12);
    var bar = el("div", {
      className: "gauge", role: "meter", "aria-label": "anomaly score against the threshold",
      "aria-valuemin": "0", "aria-valuemax": String(top), "aria-valuenow": String(s),
      "aria-valuetext": fmt(s) + ", threshold " + fmt(t)
    });
    var fill = el("div", { className: "fill" });
    fill.style.width = Math.min(100, 100 * s / top) + "%";
    var mark = el("div", { className: "mark", title: "threshold " + fmt(t) });
    mark.style.left = (100 * t / top) + "%";
    bar.appendChild(fill);
    bar.appendChild(mark);
    var ratio = t > 0 ? " · " + (s / t).toFixed(2) + "× the threshold" : "";
    return [bar, el("p", { className: "gauge-legend", text: "threshold " + fmt(t) + ratio })];
  }

  function card(result, options) {
    options = options || {};
    var kind = result.error ? "error" : result.verdict;
    var label = result.error ? "not scored" : result.verdict;
    var node = el("article", { className: "card panel " + kind, "data-verdict": kind, tabindex: "-1",
                               "aria-label": result.name + ": " + label });
    var query = el("figure", { className: "query" }, [
      picture(result.image, "the image " + result.name, null),
      el("figcaption", { text: result.name })
    ]);
    var panel = el("div", { className: "verdict-panel" });
    var line = el("p", { className: "verdict-line" }, [
      el("span", { className: "badge " + kind, text: label }),
      result.error ? null : el("span", { className: "score", text: fmt(result.anomaly_score) }),
      el("span", { className: "name", text: result.name })
    ]);
    panel.appendChild(line);
    if (result.error) {
      panel.appendChild(el("p", { className: "error-text", text: result.error }));
    } else {
      gauge(result).forEach(function (n) { panel.appendChild(n); });
    }
    if (result.heatmap) {
      panel.appendChild(el("figure", { className: "heatmap" }, [
        el("img", { src: result.heatmap, alt: "heat map of where " + result.name + " looks anomalous" }),
        el("figcaption", { text: "heat map: white line = pixel threshold" })
      ]));
    }
    node.appendChild(query);
    node.appendChild(panel);
    if (result.nearest && result.nearest.length) {
      var list = el("ol");
      result.nearest.forEach(function (nb, i) {
        list.appendChild(el("li", {}, [el("figure", {}, [
          picture(nb.thumbnail, "normal training image " + nb.name, options.resolve),
          el("figcaption", {}, [el("span", { text: nb.name }), el("span", { text: "distance " + fmt(nb.distance) })])
        ])]));
      });
      node.appendChild(el("section", { className: "nearest", "aria-label": "nearest normal training images" },
                          [el("h3", { text: "Nearest normal images" }), list]));
    }
    return node;
  }

  /* Score histogram with the threshold as a dashed line; bars above it in the anomaly colour. */
  function histogram(scores, threshold) {
    var W = 560, H = 150, L = 8, B = 24, n = 24;
    var top = Math.max.apply(null, scores.concat([threshold * 1.25, 1e-12])) * 1.02;
    var normal = new Array(n).fill(0), anomalous = new Array(n).fill(0);
    scores.forEach(function (s) {
      var bin = Math.max(0, Math.min(n - 1, Math.floor(n * s / top)));
      (s > threshold ? anomalous : normal)[bin] += 1;
    });
    var most = Math.max.apply(null, normal.map(function (c, i) { return c + anomalous[i]; }).concat([1]));
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, className: "histogram", role: "img",
                            "aria-label": "histogram of " + scores.length + " anomaly scores; threshold " + fmt(threshold) });
    root.setAttribute("class", "histogram");
    var title = svg("title");
    title.textContent = "Anomaly scores (threshold " + fmt(threshold) + ")";
    root.appendChild(title);
    var bw = (W - 2 * L) / n;
    normal.forEach(function (c, i) {  /* a bin holding both kinds stacks its anomalies on top */
      var base = H - B;
      [[c, "bar-normal"], [anomalous[i], "bar-anomaly"]].forEach(function (part) {
        if (!part[0]) return;
        var h = (H - B - 12) * part[0] / most;
        base -= h;
        root.appendChild(svg("rect", { x: L + i * bw + 1, y: base, width: bw - 2, height: h, rx: 2, class: part[1] }));
      });
    });
    root.appendChild(svg("line", { x1: L, x2: W - L, y1: H - B, y2: H - B, class: "axis" }));
    var tx = L + (W - 2 * L) * threshold / top;
    root.appendChild(svg("line", { x1: tx, x2: tx, y1: 6, y2: H - B + 4, class: "threshold" }));
    var label = svg("text", { x: Math.min(tx + 4, W - 110), y: 14 });
    label.textContent = "threshold " + fmt(threshold);
    root.appendChild(label);
    [0, top / 2, top].forEach(function (v, i) {
      var t = svg("text", { x: L + (W - 2 * L) * v / top, y: H - 6, "text-anchor": ["start", "middle", "end"][i] });
      t.textContent = fmt(v);
      root.appendChild(t);
    });
    return root;
  }

  function summary(root, results) {
    root.textContent = "";
    var scored = results.filter(function (r) { return !r.error; });
    var flagged = scored.filter(function (r) { return r.verdict === "anomaly"; }).length;
    var failed = results.length - scored.length;
    var counts = el("div", { className: "counts" }, [
      el("div", { className: "count anomaly" }, [el("b", { text: String(flagged) }), document.createTextNode("anomalies")]),
      el("div", { className: "count normal" }, [el("b", { text: String(scored.length - flagged) }), document.createTextNode("normal")]),
      failed ? el("div", { className: "count" }, [el("b", { text: String(failed) }), document.createTextNode("not scored")]) : null
    ]);
    root.appendChild(counts);
    if (scored.length) {
      var threshold = scored[0].threshold;
      root.appendChild(histogram(scored.map(function (r) { return r.anomaly_score; }), threshold));
    }
    root.hidden = results.length === 0;
  }

  /* Filter buttons: all / anomalies / normal / not scored (keyboard: ordinary buttons). */
  function filters(root, cards) {
    var choices = [["all", "All"], ["anomaly", "Anomalies"], ["normal", "Normal"], ["error", "Not scored"]];
    var bar = el("div", { className: "filters", role: "group", "aria-label": "show" });
    choices.forEach(function (choice) {
      var b = el("button", { type: "button", "aria-pressed": choice[0] === "all" ? "true" : "false", text: choice[1] });
      b.addEventListener("click", function () {
        bar.querySelectorAll("button").forEach(function (o) { o.setAttribute("aria-pressed", o === b ? "true" : "false"); });
        cards.querySelectorAll(".card").forEach(function (c) {
          c.hidden = choice[0] !== "all" && c.getAttribute("data-verdict") !== choice[0];
        });
      });
      bar.appendChild(b);
    });
    root.appendChild(bar);
  }

  function renderResults(root, results, options) {
    root.textContent = "";
    if (!results.length) {
      root.appendChild(el("p", { className: "empty", text: (options && options.empty) || "No images yet." }));
      return;
    }
    var cards = el("div", { className: "cards" });
    results.forEach(function (r) { cards.appendChild(card(r, options)); });
    filters(root, cards);
    root.appendChild(cards);
  }

  /* Records sorted for review: most anomalous first, unscored images last. */
  function byScore(results) {
    return results.slice().sort(function (a, b) {
      var x = a.error ? -Infinity : a.anomaly_score, y = b.error ? -Infinity : b.anomaly_score;
      return y - x;
    });
  }

  window.DN2Review = { card: card, histogram: histogram, summary: summary, renderResults: renderResults,
                       byScore: byScore, format: fmt };

  /* The static report: its records are embedded as JSON. */
  document.addEventListener("DOMContentLoaded", function () {
    var data = document.getElementById("dn2-data");
    if (!data) return;
    var report = JSON.parse(data.textContent);
    var results = byScore(report.results);
    summary(document.getElementById("summary"), results);
    renderResults(document.getElementById("results"), results, { empty: "No image could be scored." });
  });
})();
