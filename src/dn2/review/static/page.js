/* dn2 review page: lists the server's models, sends dropped or chosen images to /v1/score, and
 * draws the verdicts with render.js. The token (when the server asks for one) stays in this tab's
 * sessionStorage and is sent as a bearer token; thumbnails are fetched with it too. */
(function () {
  "use strict";
  var R = window.DN2Review;
  var $ = function (id) { return document.getElementById(id); };
  var state = { token: sessionStorage.getItem("dn2-token") || "", models: {}, results: [] };

  function headers() {
    return state.token ? { Authorization: "Bearer " + state.token } : {};
  }

  function status(text, bad) {
    var s = $("status");
    s.textContent = text;
    s.className = "status" + (bad ? " bad" : "");
  }

  function needToken(message) {
    $("token-field").hidden = false;
    status(message, true);
    $("token").focus();
  }

  function problem(response) {
    return response.json().then(function (body) {
      var d = body && body.detail;
      return typeof d === "string" ? d : JSON.stringify(d || body);
    }, function () { return response.status + " " + response.statusText; });
  }

  function loadModels() {
    return fetch("v1/models", { headers: headers() }).then(function (r) {
      if (r.status === 401) { needToken("This server needs an access token."); return null; }
      if (!r.ok) return problem(r).then(function (m) { throw new Error(m); });
      return r.json();
    }).then(function (body) {
      if (!body) return;
      var select = $("model");
      select.textContent = "";
      body.models.forEach(function (m) {
        state.models[m.name] = m;
        var o = document.createElement("option");
        o.value = m.name;
        o.textContent = m.name + " (" + m.backbone + ", k=" + m.k + ")";
        select.appendChild(o);
      });
      $("server-info").textContent = "dn2 " + body.dn2_version + " · " + body.models.length + " model" +
        (body.models.length === 1 ? "" : "s") + (state.token ? " · signed in with a token" : "");
      if (state.token) $("token-field").hidden = false;
      status("Ready: drop images to score them.");
    }).catch(function (e) { status("Cannot reach the server: " + e.message, true); });
  }

  /* Thumbnail URLs need the token when the server has one: fetch them and show blob URLs. */
  function resolve(url) {
    if (!state.token || url.indexOf("data:") === 0) return url;
    return fetch(url.replace(/^\//, ""), { headers: headers() }).then(function (r) {
      if (!r.ok) throw new Error(String(r.status));
      return r.blob();
    }).then(function (b) { return URL.createObjectURL(b); });
  }

  function redraw() {
    var ordered = R.byScore(state.results);
    R.summary($("summary"), ordered);
    R.renderResults($("results"), ordered, { resolve: resolve });
  }

  function score(files) {
    files = Array.prototype.slice.call(files || []);
    if (!files.length) return;
    var form = new FormData();
    files.forEach(function (f) { form.append("files", f, f.name); });
    form.append("explain", String(Math.max(0, Math.min(20, parseInt($("explain").value, 10) || 0))));
    if ($("model").value) form.append("model", $("model").value);
    status("Scoring " + files.length + " image" + (files.length === 1 ? "" : "s") + "…");
    var started = performance.now();
    fetch("v1/score", { method: "POST", body: form, headers: headers() }).then(function (r) {
      if (r.status === 401) { needToken("The access token was refused: enter the server's token."); return null; }
      if (!r.ok) return problem(r).then(function (m) { throw new Error(m); });
      return r.json();
    }).then(function (body) {
      if (!body) return;
      body.results.forEach(function (res, i) {
        res.image = files[i] ? URL.createObjectURL(files[i]) : null;
        state.results.push(res);
      });
      var flagged = body.results.filter(function (r) { return r.verdict === "anomaly"; }).length;
      status("Scored " + body.results.length + " with " + body.model + " in " +
             Math.round(performance.now() - started) + " ms: " + flagged + " flagged.");
      redraw();
    }).catch(function (e) { status("Not scored: " + e.message, true); });
  }

  function init() {
    var drop = $("drop"), input = $("files");
    input.addEventListener("change", function () { score(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach(function (type) {
      drop.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (type) {
      drop.addEventListener(type, function () { drop.classList.remove("over"); });
    });
    drop.addEventListener("drop", function (e) { e.preventDefault(); score(e.dataTransfer.files); });
    function useToken() {
      state.token = $("token").value.trim();
      sessionStorage.setItem("dn2-token", state.token);
      loadModels();
    }
    $("token-use").addEventListener("click", useToken);
    $("token").addEventListener("keydown", function (e) { if (e.key === "Enter") useToken(); });
    $("token").value = state.token;
    R.renderResults($("results"), [], { empty: "Scored images appear here, most anomalous first." });
    loadModels();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
