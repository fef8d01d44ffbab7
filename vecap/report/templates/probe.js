(function () {
  /* The page's only script (allowed by its hash in the CSP): after load it records, as attributes
     of <body> for tests and curious readers, script errors and blocked content, how many
     thumbnails decoded, and which boxes are wider than their room (tables that overflow). */
  var body = document.body, errors = [];
  function record(message) {
    errors.push(String(message));
    body.setAttribute("data-script-errors", errors.join(" | "));
  }
  body.setAttribute("data-script-errors", "");
  window.onerror = function (message) { record(message); };
  document.addEventListener("securitypolicyviolation", function (e) {
    record("blocked by CSP: " + e.violatedDirective + " " + e.blockedURI);
  });
  function describe(el) {
    return el.tagName.toLowerCase() + (el.className ? "." + String(el.className).split(" ").join(".") : "") +
      (el.getAttribute("data-table") ? "[" + el.getAttribute("data-table") + "]" : "");
  }
  window.addEventListener("load", function () {
    var images = document.images, loaded = 0, over = [], i, el, boxes, tables;
    for (i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) loaded++;
    }
    boxes = document.querySelectorAll("main, .panel, .card, .hists figure, .scroll");
    for (i = 0; i < boxes.length; i++) {
      el = boxes[i];
      if (el.scrollWidth > el.clientWidth + 1) over.push(describe(el));
    }
    tables = document.querySelectorAll("table");
    for (i = 0; i < tables.length; i++) {
      el = tables[i];
      if (el.offsetWidth > el.parentElement.clientWidth + 1) over.push(describe(el));
    }
    if (document.documentElement.scrollWidth > window.innerWidth + 1) over.push("page");
    body.setAttribute("data-images-total", String(images.length));
    body.setAttribute("data-images-loaded", String(loaded));
    body.setAttribute("data-overflowing", over.join(" "));
  });
})();
