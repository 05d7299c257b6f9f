// The API reference, rendered from /openapi.json with textContent only (no CDN, no HTML injection).
"use strict";
(async () => {
  const intro = document.getElementById("docs-intro");
  const out = document.getElementById("docs");
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  let doc;
  try {
    doc = await (await fetch("/openapi.json")).json();
  } catch (err) {
    intro.textContent = "Could not load /openapi.json: " + err;
    return;
  }
  intro.textContent = (doc.info.summary || "") + " " + (doc.info.description || "");
  const ref = (schema) => (schema && schema.$ref ? schema.$ref.split("/").pop() : null);
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const card = el("section", "op");
      const head = el("h3");
      head.append(el("span", "method " + method, method.toUpperCase()), el("code", null, " " + path));
      card.append(head, el("p", null, op.summary || ""));
      const params = (op.parameters || []).map((p) => `${p.name} (${p.in}${p.required ? ", required" : ""})`);
      if (params.length) card.append(el("p", "muted", "parameters: " + params.join(", ")));
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        const [ctype, media] = Object.entries(body)[0];
        const name = ref(media.schema);
        card.append(el("p", "muted", `body: ${ctype}${name ? " — " + name : ""}`));
        const schema = name && doc.components.schemas[name];
        if (schema && schema.properties) {
          const list = el("ul", "fields");
          for (const [field, spec] of Object.entries(schema.properties)) {
            const req = (schema.required || []).includes(field) ? " (required)" : "";
            list.append(el("li", null, `${field}${req}: ${spec.description || spec.type || ref(spec) || ""}`));
          }
          card.append(list);
        }
      }
      out.append(card);
    }
  }
})();
