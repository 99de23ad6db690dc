// Renders the Carrel API reference from the document this admin listener serves.
// Kept out of index.html so the Content-Security-Policy can forbid inline scripts.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/admin/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // "none" turns off the badge that would send the document to an online validator.
    validatorUrl: "none",
  });
});
