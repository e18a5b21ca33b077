// Tessera's web dashboard: refresh the page every few seconds while it is visible, keeping the
// scroll position; a click on the footer's note pauses it.
(function () {
  "use strict";
  var every = Number(document.body.dataset.refresh || 0) * 1000;
  var note = document.getElementById("refresh");
  var paused = sessionStorage.getItem("tessera-paused") === "1";
  function show() {
    if (note) note.textContent = paused ? "paused (click to refresh again)" : "refreshes every " + every / 1000 + " s (click to pause)";
  }
  if (note) {
    note.style.cursor = "pointer";
    note.addEventListener("click", function () {
      paused = !paused;
      sessionStorage.setItem("tessera-paused", paused ? "1" : "0");
      show();
    });
  }
  var y = sessionStorage.getItem("tessera-scroll:" + location.pathname);
  if (y) window.scrollTo(0, Number(y));
  show();
  if (every > 0) {
    setInterval(function () {
      if (!paused && document.visibilityState === "visible") {
        sessionStorage.setItem("tessera-scroll:" + location.pathname, String(window.scrollY));
        location.reload();
      }
    }, every);
  }
})();
