// The page /docs: Swagger UI showing this server's contract, /openapi.json. "Authorize"
// takes an organization's JWT (`whatslike token`); "Try it out" then calls this server.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // No call home: Swagger UI would otherwise send the document to an online validator.
  validatorUrl: null,
});
