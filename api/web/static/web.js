// Progressive help only: every page works without this file.
(function () {
  "use strict";
  function copied(button, ok) {
    var status = button.closest("section, dd, div").parentNode.querySelector(".copy-status") ||
                 document.querySelector(".copy-status");
    if (status) { status.textContent = ok ? button.textContent.replace("Copy", "Copied") + "." : "Copy failed: select the text and copy it."; }
  }
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var field = document.getElementById(button.getAttribute("data-copy"));
    if (!field) { return; }
    button.hidden = false;
    button.addEventListener("click", function () {
      field.focus();
      field.select();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(function () { copied(button, true); },
                                                         function () { copied(button, document.execCommand("copy")); });
      } else {
        copied(button, document.execCommand("copy"));
      }
    });
  });
  document.querySelectorAll("a[data-back]").forEach(function (link) {
    if (history.length > 1) {
      link.addEventListener("click", function (event) { event.preventDefault(); history.back(); });
    }
  });
  // The sync page refreshes its live part while the pipeline has work pending:
  // fetched and swapped in place (focus and scroll stay), a full reload if that fails.
  var refresh = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  var live = document.getElementById("sync-live");
  function tick() {
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("sync-live");
        if (!fresh) { throw new Error("no live part"); }
        if (fresh.innerHTML !== live.innerHTML) { live.innerHTML = fresh.innerHTML; }
        var next = parseInt(doc.body.getAttribute("data-refresh") || "0", 10);
        document.body.setAttribute("data-refresh", String(next));
        if (next > 0) { setTimeout(tick, next); }
      })
      .catch(function () { setTimeout(function () { location.reload(); }, refresh); });
  }
  if (refresh > 0) {
    if (live && window.fetch && window.DOMParser) { setTimeout(tick, refresh); }
    else { setTimeout(function () { location.reload(); }, refresh); }
  }
  // After a preview, move focus to it so keyboard and screen reader users land on the result.
  var preview = document.getElementById("preview");
  if (preview) { preview.focus(); }
})();
